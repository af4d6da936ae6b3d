"""Executes the notebooks end to end in their quick mode.

Each notebook runs in a separate kernel process, in a temporary working
directory, with ``TASKSURROGATE_QUICK=1`` (the ``tiny`` preset, few subsets) and
the CPU backend. The kernel is this interpreter's ipykernel: a ``python3``
kernel spec pointing at ``sys.executable`` is put first on ``JUPYTER_PATH``, so
a ``python3`` spec of another environment (e.g. one installed with ``--user``)
cannot take its place.
"""

from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient

# 40-50 s each on 2 cores: the slow tier (pytest -m slow).
pytestmark = pytest.mark.slow

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
PLOTS = ("loo_effects.png", "interactions.png", "heldout.png")


def _text(outputs) -> str:
    parts = []
    for out in outputs:
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def _execute(name, tmp_path, monkeypatch):
    """Runs notebook ``name`` in quick mode.

    Returns:
      ``(text, num_images, work)``: its printed text, the number of PNG
      outputs, and its working folder.
    """
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert all(not cell.get("outputs") for cell in nb.cells
               if cell.cell_type == "code"), "stored outputs: clear them"

    write_kernel_spec(tmp_path / "jupyter" / "kernels" / "python3")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    # The kernel inherits this process's environment.
    monkeypatch.setenv("TASKSURROGATE_QUICK", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    work = tmp_path / "work"
    work.mkdir()
    client = NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(work)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [out for cell in nb.cells if cell.cell_type == "code"
               for out in cell.outputs]
    assert not [out for out in outputs if out.get("output_type") == "error"]
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    return _text(outputs), len(images), work


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    text, num_images, work = _execute("quickstart.ipynb", tmp_path, monkeypatch)
    assert "| method |" in text
    assert "| kernel surrogate (exact) |" in text
    assert "| ceiling (4 replicates) |" in text
    assert "flipped-labels" in text  # the per-source table
    assert num_images == len(PLOTS)

    out_dir = work / "results" / "quickstart-quick"
    assert (out_dir / "results.json").stat().st_size > 0
    for name in PLOTS:
        assert (out_dir / name).stat().st_size > 1000, name


def test_icl_notebook_executes(tmp_path, monkeypatch):
    text, num_images, _ = _execute("icl_demonstration_selection.ipynb", tmp_path,
                                   monkeypatch)
    assert "query accuracy on fresh tasks" in text
    assert "| kernel | " in text and "| linear | " in text
    assert "Most helpful demonstrations" in text
    assert "| kernel surrogate | " in text
    assert "| random prompts (mean of 60) | " in text
    assert num_images == 3  # effects, interactions, selection


def test_rl_notebook_executes(tmp_path, monkeypatch):
    text, num_images, _ = _execute("rl_task_selection.ipynb", tmp_path, monkeypatch)
    assert "relative error" in text
    assert "| linear | " in text and "| kernel | " in text
    assert "| target | all variants |" in text
    assert num_images == 3  # returns, effect heatmaps, selection


def test_your_own_model_notebook_executes(tmp_path, monkeypatch):
    text, num_images, work = _execute("your_own_model.ipynb", tmp_path, monkeypatch)
    assert "ceiling of the LOO ground truth (mean target)" in text
    assert "| first-order estimate | " in text and "| kernel surrogate | " in text
    assert "| kernel surrogate (exact) |" in text  # the pipeline's table
    assert "| ceiling (2 replicates) |" in text
    # The two corrupted sources are the most harmful, with the plain-JAX model.
    assert "most harmful sources: ['" in text
    line = text.split("most harmful sources: ")[1].splitlines()[0]
    assert "random labels" in line and "shifted labels" in line
    assert num_images == 2  # LOO effects, interactions
    assert (work / "results" / "my-digits" / "results.json").stat().st_size > 0
