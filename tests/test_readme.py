"""The README: its set-up commands come first, its links resolve, and its
example runs as written and prints the table."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

MAIN_JOB = ("python3 -m venv .venv && .venv/bin/pip install -e . && "
            ".venv/bin/tasksurrogate run digits --preset cpu")
TESTS = ('python3 -m venv .venv && .venv/bin/pip install -e ".[test]" && '
         ".venv/bin/python -m pytest -q")


def readme_snippet(section: str) -> str:
    """The first ```python block after the heading ``## {section}``."""
    text = README.read_text()
    after = text[text.index(f"## {section}\n"):]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def test_the_two_set_up_commands_come_first():
    blocks = re.findall(r"```(\w*)\n(.*?)```", README.read_text(), re.S)
    assert [code.strip() for _, code in blocks[:2]] == [MAIN_JOB, TESTS]
    assert [lang for lang, _ in blocks[:2]] == ["bash", "bash"]
    # CI installs the same extra and runs the same test command.
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install --quiet -e ".[test]"' in ci and "python -m pytest -q\n" in ci


def test_relative_links_resolve():
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    local = [link for link in links if "://" not in link]
    assert local, "the README links to the docs"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, missing


def test_the_example_stays_short():
    code = [line for line in readme_snippet("Your own model").splitlines()
            if line.strip()]
    assert len(code) <= 22, len(code)


@pytest.mark.slow
def test_your_own_model_snippet_runs_and_prints_the_table(tmp_path, monkeypatch,
                                                          capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_snippet("Your own model"), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "my-digits, seed 0" in printed
    assert "| ceiling (4 replicates) |" in printed
    assert "| kernel surrogate (exact) |" in printed
    assert "| trak |" in printed  # the baselines ran
    assert (tmp_path / "results" / "my-digits" / "results.json").stat().st_size > 0
