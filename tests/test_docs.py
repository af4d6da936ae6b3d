"""The docs site: built strictly, and its Python examples executed.

- Every ```` ```python ```` block of the README and of a page under ``docs/``
  runs, in page
  order, in one namespace per page (a later block uses what an earlier one
  defined), in a temporary working directory. A block preceded by the line
  ``<!-- illustrative -->`` is shown but not run (it needs something this
  machine lacks, such as a checkpoint on disk); such blocks are few, and
  counted here.
- ``mkdocs build --strict`` builds the site (the API reference from the
  docstrings through mkdocstrings) into a temporary directory. The docs tools
  come with the ``test`` extra, so neither test is ever skipped.

Both run in the slow tier (``pytest -m slow``); the check that every block
is either run or marked illustrative is fast.
"""

import contextlib
import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
ILLUSTRATIVE = "<!-- illustrative -->"
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)

# The pages whose examples run (paths from the repository root), and text each
# page's run must print.
EXECUTED = {
    "README.md": ["| kernel surrogate (exact) |", "ceiling (4 replicates)"],
    "docs/your-own-model.md": ["| kernel surrogate (exact) |", "ceiling (2 replicates)",
                          "ceiling of the LOO ground truth", "shifted labels"],
    "docs/icl.md": ["| kernel surrogate (exact) |", "best 4-shot prompt",
               "plain-JAX language model"],
    "docs/rl.md": ["| kernel surrogate (exact) |", "mixture_bandit"],
    "docs/surrogates.md": ["helps most", "raises under jit"],
    "docs/pipeline.md": ["| ceiling (2 replicates) |", "| method |"],
    "docs/scaling.md": ["devices on the mesh"],
}
# Shown, not run: at most this many blocks in all.
MAX_ILLUSTRATIVE = 3


def python_blocks(path: Path) -> list[tuple[str, bool]]:
    """``(code, illustrative)`` of each top-level python block of ``path``."""
    text = path.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        before = text[:match.start()].rstrip().splitlines()
        blocks.append((match.group(1), bool(before) and before[-1].strip()
                       == ILLUSTRATIVE))
    return blocks


def markdown_pages() -> list[Path]:
    """The README and the docs pages."""
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def pages_with_code() -> dict[str, list[tuple[str, bool]]]:
    return {path.relative_to(ROOT).as_posix(): python_blocks(path)
            for path in markdown_pages() if python_blocks(path)}


def test_every_example_runs_or_is_marked_illustrative():
    pages = pages_with_code()
    assert set(pages) == set(EXECUTED), (
        "pages with python blocks and the pages tests/test_docs.py runs differ: "
        f"{sorted(set(pages) ^ set(EXECUTED))}")
    illustrative = [name for name, blocks in pages.items()
                    for _, shown_only in blocks if shown_only]
    assert len(illustrative) <= MAX_ILLUSTRATIVE, illustrative
    # An indented block (inside a list or an admonition) would escape the
    # extraction above: keep examples at the top level.
    for path in markdown_pages():
        assert not re.search(r"^[ \t]+```python", path.read_text(), re.M), path


@pytest.mark.slow
@pytest.mark.parametrize("page", sorted(EXECUTED))
def test_docs_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    name = re.sub(r"[^A-Za-z0-9]", "_", page)
    namespace = {"__name__": f"docs_{name}"}
    printed = io.StringIO()
    timings = []
    for index, (code, illustrative) in enumerate(python_blocks(ROOT / page)):
        if illustrative:
            compile(code, f"{page} block {index}", "exec")  # still valid Python
            continue
        start = time.perf_counter()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, f"{page} block {index}", "exec"), namespace)
        timings.append(round(time.perf_counter() - start, 1))
    sys.stdout.write(f"{page}: block seconds {timings}\n")
    text = printed.getvalue()
    for expected in EXECUTED[page]:
        assert expected in text, (expected, text[-2000:])


@pytest.mark.slow
def test_docs_build_strictly(tmp_path):
    site = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-6000:]
    for page in ("index.html", "getting-started/index.html",
                 "your-own-model/index.html", "icl/index.html", "rl/index.html",
                 "pipeline/index.html", "method/index.html",
                 "architecture/index.html", "api/pipeline/index.html",
                 "api/workloads/index.html"):
        assert (site / page).stat().st_size > 0, page
    # The API reference is generated from the docstrings.
    api = (site / "api" / "pipeline" / "index.html").read_text()
    assert "run_pipeline" in api and "PipelineConfig" in api
    workloads = (site / "api" / "workloads" / "index.html").read_text()
    assert "LeaveOneOutWorkload" in workloads and "FixedSizeWorkload" in workloads
