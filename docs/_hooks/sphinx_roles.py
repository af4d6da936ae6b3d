"""MkDocs hook: the Sphinx roles of the docstrings shown as code.

The package's docstrings cross-reference with Sphinx roles
(:class:`~tasksurrogate_jax.pipeline.PipelineConfig`); mkdocstrings renders
them as the role's name followed by inline code. This shows the code alone,
the last component only where Sphinx would (``~``). Excluded from the site
(``exclude_docs`` in mkdocs.yml).
"""

import re

ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):<code>(~?)([^<]*)</code>")


def _code(match: re.Match) -> str:
    tilde, target = match.groups()
    target = re.sub(r"\s+", "", target)  # a name wrapped across docstring lines
    if tilde:
        target = target.rsplit(".", 1)[-1]
    return f"<code>{target}</code>"


def on_page_content(html: str, **kwargs) -> str:
    return ROLE.sub(_code, html)
