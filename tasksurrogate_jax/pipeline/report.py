"""Reports: tables, ``results.json`` and plots.

From plain arrays (yours or a run's), each plot a matplotlib figure that the
caller saves or shows:

- :func:`plot_loo_effects`: predicted vs true leave-one-out effects, one panel
  per method (each on its own scale: only the order and the correlation
  compare across methods);
- :func:`plot_interactions`: a ``[K, K]`` interaction heatmap with task names;
- :func:`plot_heldout`: predicted vs true held-out subset scores, every method
  on one axes with the diagonal;
- :func:`format_correlation_table`: each method's Spearman and Pearson
  correlation with the truth, as a Markdown table.

From the dict returned by :func:`tasksurrogate_jax.pipeline.run_pipeline`:
:func:`format_table`, :func:`summary`, :func:`write_json`, and
:func:`write_plots` (the three plots above on the mean target, as
``loo_effects.png``, ``interactions.png`` and ``heldout.png``). Each follows
the run's protocol: leave-one-out effects (``"loo"``) or effects within prompts
of one size (``"fixed_size"``, whose ``loo_effects.png`` plots those).
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike

from tasksurrogate_jax.core import metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TABLE_COLUMNS = (
    ("loo_spearman", "LOO Spearman (per target)"),
    ("loo_spearman_mean_target", "LOO Spearman (mean target)"),
    ("heldout_spearman", "held-out Spearman"),
    ("normalized_error", "held-out norm. error"),
)
CEILING_COLUMNS = {"loo_spearman": "loo_spearman_per_target",
                   "loo_spearman_mean_target": "loo_spearman_mean_target",
                   "heldout_spearman": "heldout_spearman"}
# The "fixed_size" protocol (prompts): effects within prompts of one size.
FIXED_SIZE_TABLE_COLUMNS = (
    ("effect_spearman", "effect Spearman (per target)"),
    ("effect_spearman_mean_target", "effect Spearman (mean target)"),
    ("heldout_spearman", "held-out Spearman"),
    ("normalized_error", "held-out norm. error"),
)
FIXED_SIZE_CEILING_COLUMNS = {
    "effect_spearman": "effect_spearman_per_target",
    "effect_spearman_mean_target": "effect_spearman_mean_target",
    "heldout_spearman": "heldout_spearman"}


def _columns(results: dict) -> tuple[tuple, dict]:
    """The table's columns and ceiling columns for the run's protocol."""
    if results.get("protocol") == "fixed_size":
        return FIXED_SIZE_TABLE_COLUMNS, FIXED_SIZE_CEILING_COLUMNS
    return TABLE_COLUMNS, CEILING_COLUMNS


def _number(value) -> str:
    """``value`` to 3 decimals; ``None`` (NaN read back from JSON) as nan."""
    return f"{math.nan if value is None else value:.3f}"


def _cell(values: dict, key: str) -> str:
    value = values.get(key)
    if value is None:
        return "-"
    interval = values.get(f"{key}_interval")
    if interval is None:
        return f"{value:.3f}"
    # NaN bounds (a degenerate bootstrap) are null once read back from JSON.
    low, high = (math.nan if bound is None else bound for bound in interval)
    return f"{value:.3f} [{low:.2f}, {high:.2f}]"


def format_table(results: dict) -> str:
    """The per-method metrics as a Markdown table (also readable in a terminal):
    the ground truth's ceiling first, then each method's figure with its
    bootstrap interval in brackets."""
    columns, ceiling_columns = _columns(results)
    rows = [["method", *(title for _, title in columns)]]
    ceiling = results["ceiling"]
    label = ("deterministic truth" if ceiling.get("deterministic")
             else f"{ceiling['num_replicates']} replicates")
    for name, values in ((f"ceiling ({label})", ceiling),
                         ("attainable (√ceiling)", ceiling["attainable"])):
        rows.append([name, *(
            _number(values[ceiling_columns[key]]) if key in ceiling_columns else "-"
            for key, _ in columns)])
    for name, values in results["methods"].items():
        rows.append([name, *(_cell(values, key) for key, _ in columns)])
    return _markdown(rows)


def summary(results: dict) -> str:
    """The table plus the estimation errors and the time of each stage."""
    est = results["estimation"]
    seconds = ", ".join(f"{k} {v:.1f}" for k, v in results["seconds"].items())
    cfg = results["config"]
    level = round(100 * cfg["confidence_level"])
    preset = f" ({cfg['preset']})" if results.get("registered", True) else ""
    targets = (f" ({results['target_description']})"
               if results["target_description"] else "")
    head = (f"{cfg['workload']}{preset}, seed {cfg['seed']}: "
            f"{len(results['task_names'])} tasks, {results['num_targets']} targets"
            f"{targets}; ")
    ceiling = ("ceiling: agreement of two independent ground truths of this size "
               "(split-half, Spearman-Brown)")
    if results.get("protocol") == "fixed_size":
        head += (f"prompts of {results['shots']} ({cfg['num_subsets']} to fit, "
                 f"{cfg['num_heldout']} held out); ground truth: {results['truth']}"
                 f"; mean prompt loss {results['mean_prompt_loss']:.4f}")
        ceiling = (
            f"effect: how much lower the mean loss of {results['shots']}-prompts "
            "is with a demonstration than without (positive = helps), read off "
            "each surrogate in random contexts; " + (
                "ceiling 1: the truth is deterministic (forward passes of every "
                "prompt)" if results["ceiling"]["deterministic"] else
                "ceiling: agreement of two independent truths of this size "
                "(split-half over the truth's groups of random prompts, "
                "Spearman-Brown), held-out 1 (forward passes)"))
    else:
        head += (f"ground truth: {results['regime']} regime, mean of "
                 f"{results['ceiling']['num_replicates']} paired replicates; "
                 f"full-set loss {results['full_set_loss']:.4f}")
    return "\n".join([
        head,
        "",
        format_table(results),
        "",
        f"{ceiling}; attainable: the most a noise-free method "
        f"can expect against one; brackets: {level}% bootstrap intervals (over "
        "targets for per-target figures, over tasks for the mean target)",
        f"estimated ({_projection(est.get('proj_dim'), results.get('protocol'))}) "
        f"vs {est['truth']} of the "
        "fitting subsets: median relative "
        f"error {est['median_relative_error']:.3f} (mean target "
        f"{est['mean_target_relative_error']:.3f}), Spearman across subsets "
        f"{est['spearman_across_subsets']:.3f} (mean target "
        f"{est['spearman_mean_target']:.3f})",
        *_baseline_settings(results.get("baseline_settings", {})),
        *_heldout_gain_lines(results.get("heldout", {}), level),
        *_interaction_lines(results.get("interactions"), level),
        f"seconds: {seconds}",
    ])


def _interaction_lines(inter: dict | None, level: int) -> list[str]:
    """The ``"pairs"`` protocol's table: each method's interactions against
    the pair-removal truth, beside its ceiling."""
    if inter is None:
        return []
    planted = inter.get("planted_signs_correct", {})
    rows = [f"| ceiling ({inter['num_replicates']} replicates) | "
            f"{inter['ceiling']:.3f} (attainable "
            f"{inter['attainable']['mean_target']:.3f}) | "
            f"{inter['ceiling_per_target']:.3f} | - | - |"]
    for name, values in inter["comparison"].items():
        low, high = values["spearman_mean_target_interval"]
        interval = "" if low is None or high is None else f" [{low:.2f}, {high:.2f}]"
        error = inter["pair_removal_error"].get(name)
        signs = planted.get(name)
        rows.append(
            f"| {name} | {_fmt(values['spearman_mean_target'])}{interval} | "
            f"{_fmt(values['spearman'])} | "
            f"{'-' if error is None else f'{error:.3f}'} | "
            f"{'-' if signs is None else f'{signs[0]}/{signs[1]}'} |")
    for name, error in inter["pair_removal_error"].items():
        if name not in inter["comparison"]:  # additive: no interactions
            rows.append(f"| {name} | 0 by construction | - | {error:.3f} | - |")
    rows.append("")
    rows.append("kernel minus linear normalized error of F(-i-j) (< 0: the kernel "
                f"predicts the pair removals better; paired {level}% intervals over "
                "pairs): " + _gains(inter["kernel_minus_linear_pair_removal_error"]))
    return ["", f"interactions against the pair-removal truth ({len(inter['pairs'])} "
            f"pairs; > 0 substitutes, < 0 complements; {level}% intervals over "
            "pairs):",
            "| method | Spearman (mean target) | Spearman (per target) | "
            "normalized error of F(-i-j) | planted signs right |",
            "| --- | --- | --- | --- | --- |", *rows]


def _gains(gains: dict) -> str:
    """``{scores: normalized_error_difference(...)}`` as one line."""
    return "; ".join(
        f"{scores} {g['difference']:+.3f} [{_fmt(g['difference_interval'][0])}, "
        f"{_fmt(g['difference_interval'][1])}]" for scores, g in gains.items())


def _heldout_gain_lines(heldout: dict, level: int) -> list[str]:
    """The kernel-minus-linear held-out error line (``"loo"`` runs)."""
    gains = heldout.get("kernel_minus_linear_error")
    if not gains:
        return []
    return [f"kernel minus linear normalized error on the held-out subsets (< 0: "
            f"the kernel predicts them better; paired {level}% intervals over "
            f"subsets): {_gains(gains)}"]


def _fmt(value) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _baseline_settings(used: dict) -> list[str]:
    """One line saying what damping and projection each baseline used."""
    parts = []
    if "influence" in used:
        u = used["influence"]
        parts.append(f"influence λ = {u['damping']:.3g} ({u['damping_rule']}, "
                     f"{u['hessian']}; CG residual {u['cg_residual']:.1e})")
    if "trak" in used:
        u = used["trak"]
        d = "full" if u["proj_dim"] is None else u["proj_dim"]
        parts.append(f"TRAK d = {d} ({u['proj_dim_rule']}), λ = {u['damping']:.3g} "
                     f"({u['damping_rule']})")
    return ["baselines: " + "; ".join(parts)] if parts else []


def _projection(proj_dim, protocol) -> str:
    """Where the estimates were linearized, in words."""
    if proj_dim is None:
        return ("in the prompts' embeddings" if protocol == "fixed_size" else
                "the workload's own first-order estimate")
    return "full parameter space" if proj_dim == "full" else f"d = {proj_dim}"


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


def _numeric_array(values, name: str, what: str) -> np.ndarray:
    """``values`` as a float array, or a ``TypeError`` naming ``name``."""
    message = f"{name} must be a {what} numeric array, got {type(values).__name__}."
    if values is None or isinstance(values, (str, bytes)):
        raise TypeError(message)
    try:
        return np.asarray(values, dtype=float)
    except (TypeError, ValueError) as err:
        raise TypeError(message) from err


def _vector(values, name: str, *, length: int | None = None,
            length_of: str = "") -> np.ndarray:
    """``values`` as a finite 1-D float array, or an error naming ``name``."""
    arr = _numeric_array(values, name, "1-D")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}.")
    if length is None and arr.size < 2:
        raise ValueError(f"{name} must have at least 2 entries, got {arr.size}.")
    if length is not None and arr.size != length:
        raise ValueError(f"{name} has {arr.size} entries, expected {length} "
                         f"(the length of {length_of}).")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"{name} must be finite, got {bad.size} non-finite "
                         f"entries (first: {arr[bad[0]]} at index {bad[0]}).")
    return arr


def _methods(predicted, name: str, *, length: int, length_of: str) -> dict:
    """``{method: [length]}`` checked entry by entry (non-empty mapping)."""
    if not isinstance(predicted, Mapping):
        raise TypeError(f"{name} must be a mapping {{method name: values}}, got "
                        f"{type(predicted).__name__} (one method: "
                        f"{{'name': values}}).")
    if not predicted:
        raise ValueError(f"{name} must name at least one method, got an empty "
                         "mapping.")
    return {str(method): _vector(values, f"{name}[{method!r}]", length=length,
                                 length_of=length_of)
            for method, values in predicted.items()}


def _task_names(task_names, num_tasks: int, length_of: str) -> list[str] | None:
    if task_names is None:
        return None
    if isinstance(task_names, (str, bytes)):
        raise TypeError("task_names must be a sequence of names, got a single "
                        "string.")
    names = [str(n) for n in task_names]
    if len(names) != num_tasks:
        raise ValueError(f"task_names has {len(names)} names, expected {num_tasks} "
                         f"(one per task of {length_of}).")
    return names


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman correlation (NaN when either side is constant)."""
    return float(metrics.spearman(x, y))


def _markdown(rows: list[list[str]]) -> str:
    """A Markdown table: the header row, a rule, then ``rows[1:]``."""
    rows = [rows[0], ["---"] * len(rows[0]), *rows[1:]]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def format_correlation_table(true, predicted: Mapping[str, ArrayLike]) -> str:
    """Spearman and Pearson correlation of each method with the truth, as a
    Markdown table (one row per method).

    Args:
      true: ``[n]`` true values (e.g. LOO effects, or held-out subset scores).
      predicted: ``{method name: [n]}`` each method's predictions of ``true``.

    Returns:
      The table; a correlation with a constant side shows as ``nan``.
    """
    true = _vector(true, "true")
    predicted = _methods(predicted, "predicted", length=true.size,
                         length_of="true")
    rows = [["method", "Spearman", "Pearson"]]
    for method, values in predicted.items():
        rows.append([method, f"{_spearman(true, values):.3f}",
                     f"{float(metrics.pearson(true, values)):.3f}"])
    return _markdown(rows)


def plot_loo_effects(true_effects, predicted: Mapping[str, ArrayLike], *,
                     task_names: Sequence[str] | None = None,
                     title: str | None = None,
                     xlabel: str = "true LOO effect") -> Figure:
    """Predicted against true leave-one-out effects, one panel per method.

    Each panel has its own scale (methods report effects in different units:
    only the order, hence the Spearman correlation in its title, compares).

    Args:
      true_effects: ``[K]`` true LOO effects, one per task (positive = helps).
      predicted: ``{method name: [K]}`` each method's effects of the same tasks.
      task_names: ``K`` names; each point is labelled with its task's index
        (labels of nearby points stacked apart) and the index-to-name key is
        written under the panels; ``None``: no labels.
      title: the figure's title; ``None``: none.
      xlabel: the horizontal axes' label (e.g. another kind of effect).

    Returns:
      A pyplot figure (``fig.savefig(path)``; ``plt.close(fig)`` when done).
    """
    true = _vector(true_effects, "true_effects")
    predicted = _methods(predicted, "predicted", length=true.size,
                         length_of="true_effects")
    names = _task_names(task_names, true.size, "true_effects")
    plt = _pyplot()
    cols = min(3, len(predicted))
    rows = -(-len(predicted) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows),
                             squeeze=False)
    for ax, (method, values) in zip(axes.flat, predicted.items(), strict=False):
        ax.scatter(true, values, s=14)
        ax.axhline(0, color="0.8", lw=0.8)
        ax.axvline(0, color="0.8", lw=0.8)
        if names is not None:
            for index, (x, y, level) in enumerate(zip(
                    true, values, _label_levels(true, values), strict=True)):
                ax.annotate(str(index), (x, y), xytext=_label_offset(level),
                            textcoords="offset points", fontsize=6)
        ax.set_title(f"{method}\nSpearman {_spearman(true, values):.2f}",
                     fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("predicted", fontsize=8)
    for ax in axes.flat[len(predicted):]:
        ax.axis("off")
    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    if names is not None:
        key = "   ".join(f"{i}: {name}" for i, name in enumerate(names))
        fig.text(0.01, 0.0, "\n".join(textwrap.wrap(key, 40 * cols)), fontsize=6,
                 va="top")
    return fig


def _label_offset(level: int) -> tuple[int, int]:
    """Where the label of a point with ``level`` earlier neighbours goes, in
    points: right, left, then the next rows below and above, alternately."""
    row = level // 2
    step = 10 * ((row + 1) // 2)
    return (-10 if level % 2 else 4, 2 + (step if row % 2 == 0 else -step))


def _label_levels(x, y, near: float = 0.04) -> np.ndarray:
    """Per point, how many earlier points lie within ``near`` of it (in units
    of each axis's range): its label goes around the point by that many
    places (:func:`_label_offset`)."""
    scaled = np.stack([(v - v.min()) / (np.ptp(v) or 1.0) for v in (x, y)], 1)
    close = np.all(np.abs(scaled[:, None] - scaled[None]) < near, axis=2)
    return np.tril(close, k=-1).sum(1)


def plot_interactions(matrix, *, truth=None,
                      task_names: Sequence[str] | None = None,
                      title: str | None = None) -> Figure:
    """Heatmap of pairwise task interactions, e.g. one target's (or the
    mean over targets) of
    :func:`tasksurrogate_jax.downstream.attribution.interaction_matrix`,
    beside the ground truth's when given, on the same colour scale.

    The colour scale is symmetric about 0 (red > 0: substitutes, blue < 0:
    complements).

    Args:
      matrix: ``[K, K]`` interactions, row and column ``i`` for task ``i``.
      truth: ``[K, K]`` true interactions (e.g. of a pair-removal truth,
        :func:`tasksurrogate_jax.downstream.interactions.interactions_to_matrix`), or
        ``None``.
      task_names: ``K`` names on both axes; ``None``: the indices ``0..K-1``.
      title: the figure's title; ``None``: none.

    Returns:
      A pyplot figure (``fig.savefig(path)``; ``plt.close(fig)`` when done).
    """
    panels = {"surrogate": _square(matrix, "matrix")}
    if truth is not None:
        panels["ground truth"] = _square(truth, "truth")
        if panels["ground truth"].shape != panels["surrogate"].shape:
            raise ValueError(f"truth must have matrix's shape "
                             f"{panels['surrogate'].shape}, got "
                             f"{panels['ground truth'].shape}.")
    num_tasks = panels["surrogate"].shape[0]
    names = _task_names(task_names, num_tasks, "matrix")
    if names is None:
        names = [str(i) for i in range(num_tasks)]
    plt = _pyplot()
    bound = max(float(np.abs(p).max()) for p in panels.values()) or 1.0
    size = max(5.0, 0.3 * num_tasks)
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * size + 1.5, size),
                             squeeze=False)
    for ax, (label, values) in zip(axes[0], panels.items(), strict=True):
        image = ax.imshow(values, cmap="RdBu_r", vmin=-bound, vmax=bound)
        ax.set_xticks(range(num_tasks), names, rotation=90, fontsize=6)
        ax.set_yticks(range(num_tasks), names, fontsize=6)
        if truth is not None:
            ax.set_title(label, fontsize=9)
    if title is not None:
        fig.suptitle(title, fontsize=10)
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8)
    return fig


def _square(matrix, name: str) -> np.ndarray:
    """A finite ``[K, K]`` array, or a clear error naming the argument."""
    values = _numeric_array(matrix, name, "[K, K]")
    if values.ndim != 2 or values.shape[0] != values.shape[1] or values.size == 0:
        raise ValueError(f"{name} must be square [K, K] with K >= 1, got shape "
                         f"{values.shape}.")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} must be finite, got "
                         f"{int((~np.isfinite(values)).sum())} non-finite entries.")
    return values


def plot_heldout(true, predicted: Mapping[str, ArrayLike], *,
                 title: str | None = None) -> Figure:
    """Predicted against true scores of held-out subsets, every method on one
    axes with the line ``y = x``; the legend gives each method's Spearman
    correlation.

    Args:
      true: ``[m]`` true scores of ``m`` held-out subsets (e.g. mean target loss).
      predicted: ``{method name: [m]}`` each method's predictions of them.
      title: the axes' title; ``None``: none.

    Returns:
      A pyplot figure (``fig.savefig(path)``; ``plt.close(fig)`` when done).
    """
    true = _vector(true, "true")
    predicted = _methods(predicted, "predicted", length=true.size,
                         length_of="true")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    for method, values in predicted.items():
        ax.scatter(true, values, s=14, alpha=0.8,
                   label=f"{method} (Spearman {_spearman(true, values):.2f})")
    lo = float(min(true.min(), *(v.min() for v in predicted.values())))
    hi = float(max(true.max(), *(v.max() for v in predicted.values())))
    ax.plot([lo, hi], [lo, hi], color="0.6", lw=0.8, label="y = x")
    ax.set_xlabel("true", fontsize=8)
    ax.set_ylabel("predicted", fontsize=8)
    ax.legend(fontsize=7)
    if title is not None:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def _pyplot():
    import matplotlib.pyplot as plt

    return plt


def write_plots(results: dict, out_dir) -> list[Path]:
    """Writes the three PNG plots of a pipeline run into ``out_dir`` (through
    :func:`plot_loo_effects`, :func:`plot_interactions`, :func:`plot_heldout`,
    on the mean target); returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = results["task_names"]
    if results.get("protocol") == "fixed_size":
        shots = results["shots"]
        effects = {"title": f"Effects within {shots}-prompts on the mean target "
                            "(positive = helps)",
                   "xlabel": f"true effect in {shots}-prompts"}
        within, subsets = f" within {shots}-prompts", "prompts"
    else:
        effects = {"title": "Leave-one-out effects on the mean target "
                            "(positive = helps)"}
        within, subsets = "", "subsets"
    plots = {
        "loo_effects.png": lambda: plot_loo_effects(
            results["true_effects"],
            {name: values["effects"] for name, values in results["methods"].items()},
            task_names=names, **effects),
        "interactions.png": lambda: plot_interactions(
            results["interaction_matrix"], truth=_truth_matrix(results),
            task_names=names,
            title=f"Kernel surrogate interactions{within} (exact scores, mean "
                  "target); > 0: substitutes, < 0: complements"),
        "heldout.png": lambda: plot_heldout(
            results["heldout"]["true"], results["heldout"]["predicted"],
            title=f"Held-out {subsets}: loss on the mean target"),
    }
    plt = _pyplot()
    paths = []
    for file_name, plot in plots.items():
        fig = plot()
        try:
            paths.append(out_dir / file_name)
            fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
        finally:
            plt.close(fig)
    return paths


def _truth_matrix(results: dict) -> np.ndarray | None:
    """The pair-removal truth's ``[K, K]`` mean-target interactions (0 at
    pairs not retrained), or ``None`` without one."""
    if "interactions" not in results:
        return None
    pairs = np.asarray(results["interactions"]["pairs"], np.int64)
    matrix = np.zeros((len(results["task_names"]),) * 2)
    values = np.asarray(results["interactions"]["true"], np.float64)
    matrix[pairs[:, 0], pairs[:, 1]] = matrix[pairs[:, 1], pairs[:, 0]] = values
    return matrix


def write_report(results: dict, out_dir) -> list[Path]:
    """``results.json`` plus the plots in ``out_dir``; returns the paths."""
    return [write_json(results, Path(out_dir) / "results.json"),
            *write_plots(results, out_dir)]


__all__ = [
    "format_correlation_table",
    "format_table",
    "plot_heldout",
    "plot_interactions",
    "plot_loo_effects",
    "summary",
    "write_json",
    "write_plots",
    "write_report",
]
