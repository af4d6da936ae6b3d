"""The README's "Your own model" snippet runs as written and prints the table."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippet(section: str) -> str:
    """The first ```python block after the heading ``## {section}``."""
    text = README.read_text()
    after = text[text.index(f"## {section}\n"):]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


@pytest.mark.slow
def test_your_own_model_snippet_runs_and_prints_the_table(tmp_path, monkeypatch,
                                                          capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_snippet("Your own model"), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "my-digits, seed 0" in printed
    assert "| ceiling (4 replicates) |" in printed
    assert "| kernel surrogate (exact) |" in printed
    assert (tmp_path / "results" / "my-digits" / "results.json").stat().st_size > 0
