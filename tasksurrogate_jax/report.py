"""Reports of a pipeline run: a terminal table, ``results.json`` and PNG plots.

Input is the dict returned by :func:`tasksurrogate_jax.pipeline.run_pipeline`.
Plots (matplotlib, headless):

- ``loo_effects.png``: predicted vs true leave-one-out effects on the mean
  target, one panel per method (each on its own scale: only the order and
  the correlation compare across methods);
- ``interactions.png``: the kernel surrogate's pairwise interaction heatmap
  with task names;
- ``heldout.png``: predicted vs true held-out subset scores (mean target) per
  surrogate, with the diagonal.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

TABLE_COLUMNS = (
    ("loo_spearman", "LOO Spearman (per target)"),
    ("loo_spearman_mean_target", "LOO Spearman (mean target)"),
    ("heldout_spearman", "held-out Spearman"),
    ("normalized_error", "held-out norm. error"),
)
CEILING_COLUMNS = {"loo_spearman": "loo_spearman_per_target",
                   "loo_spearman_mean_target": "loo_spearman_mean_target",
                   "heldout_spearman": "heldout_spearman"}


def _cell(values: dict, key: str) -> str:
    value = values.get(key)
    if value is None:
        return "-"
    interval = values.get(f"{key}_interval")
    if interval is None:
        return f"{value:.3f}"
    low, high = interval
    return f"{value:.3f} [{low:.2f}, {high:.2f}]"


def format_table(results: dict) -> str:
    """The per-method metrics as a Markdown table (also readable in a terminal):
    the ground truth's ceiling first, then each method's figure with its
    bootstrap interval in brackets."""
    header = ["method", *(title for _, title in TABLE_COLUMNS)]
    rows = [header, ["---"] * len(header)]
    ceiling = results["ceiling"]
    rows.append([f"ceiling ({ceiling['num_replicates']} replicates)", *(
        f"{ceiling[CEILING_COLUMNS[key]]:.3f}" if key in CEILING_COLUMNS else "-"
        for key, _ in TABLE_COLUMNS)])
    rows.append(["attainable (√ceiling)", *(
        f"{ceiling['attainable'][CEILING_COLUMNS[key]]:.3f}"
        if key in CEILING_COLUMNS else "-" for key, _ in TABLE_COLUMNS)])
    for name, values in results["methods"].items():
        rows.append([name, *(_cell(values, key) for key, _ in TABLE_COLUMNS)])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def summary(results: dict) -> str:
    """The table plus the estimation errors and the time of each stage."""
    est = results["estimation"]
    seconds = ", ".join(f"{k} {v:.1f}" for k, v in results["seconds"].items())
    cfg = results["config"]
    level = round(100 * cfg["confidence_level"])
    return "\n".join([
        f"{cfg['workload']} ({cfg['preset']}), seed {cfg['seed']}: "
        f"{len(results['task_names'])} tasks, {results['num_targets']} targets "
        f"({results['target_description']}); ground truth: {results['regime']} "
        f"regime, mean of {results['ceiling']['num_replicates']} paired replicates; "
        f"full-set loss {results['full_set_loss']:.4f}",
        "",
        format_table(results),
        "",
        "ceiling: agreement of two independent ground truths of this size "
        "(split-half, Spearman-Brown); attainable: the most a noise-free method "
        f"can expect against one; brackets: {level}% bootstrap intervals (over "
        "targets for per-target figures, over tasks for the mean target)",
        f"estimated vs {est['truth']} of the fitting subsets: median relative "
        f"error {est['median_relative_error']:.3f} (mean target "
        f"{est['mean_target_relative_error']:.3f}), Spearman across subsets "
        f"{est['spearman_across_subsets']:.3f} (mean target "
        f"{est['spearman_mean_target']:.3f})",
        f"seconds: {seconds}",
    ])


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(results: dict, path) -> Path:
    """Writes ``results`` as JSON (arrays as lists, non-finite as null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(results), indent=2))
    return path


def _scatter(ax, x, y, title, xlabel, ylabel):
    ax.scatter(x, y, s=14)
    ax.axhline(0, color="0.8", lw=0.8)
    ax.axvline(0, color="0.8", lw=0.8)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)


def write_plots(results: dict, out_dir) -> list[Path]:
    """Writes the three PNG plots into ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    true = np.asarray(results["true_effects"])

    methods = results["methods"]
    cols = min(3, len(methods))
    rows = -(-len(methods) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, values) in zip(axes.flat, methods.items(), strict=False):
        _scatter(ax, true, np.asarray(values["effects"]),
                 f"{name}\nSpearman (mean target) "
                 f"{values['loo_spearman_mean_target']:.2f}",
                 "true LOO effect", "predicted")
    for ax in axes.flat[len(methods):]:
        ax.axis("off")
    fig.suptitle("Leave-one-out effects on the mean target (positive = helps)")
    fig.tight_layout()
    paths.append(out_dir / "loo_effects.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    names = results["task_names"]
    inter = np.asarray(results["interactions"])
    bound = float(np.abs(inter).max()) or 1.0
    size = max(5.0, 0.3 * len(names))
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(inter, cmap="RdBu_r", vmin=-bound, vmax=bound)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_title("Kernel surrogate interactions (mean target)\n"
                 "> 0: substitutes, < 0: complements")
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    paths.append(out_dir / "interactions.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    held = results["heldout"]
    predicted = held["predicted"]
    fig, axes = plt.subplots(1, len(predicted), figsize=(4 * len(predicted), 3.6),
                             squeeze=False)
    true_held = np.asarray(held["true"])
    for ax, (name, values) in zip(axes.flat, predicted.items(), strict=True):
        values = np.asarray(values)
        ax.scatter(true_held, values, s=14)
        lo = float(min(true_held.min(), values.min()))
        hi = float(max(true_held.max(), values.max()))
        ax.plot([lo, hi], [lo, hi], color="0.7", lw=0.8)
        ax.set_title(f"{name}\nSpearman (mean target) "
                     f"{methods[name]['heldout_spearman_mean_target']:.2f}", fontsize=9)
        ax.set_xlabel("true held-out loss (mean target)", fontsize=8)
        ax.set_ylabel("predicted", fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "heldout.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write_report(results: dict, out_dir) -> list[Path]:
    """``results.json`` plus the plots in ``out_dir``; returns the paths."""
    return [write_json(results, Path(out_dir) / "results.json"),
            *write_plots(results, out_dir)]


__all__ = ["format_table", "summary", "write_json", "write_plots", "write_report"]
