"""Shared by the selection benchmarks (ICL, RL): the subset choosers compared,
intervals over independent draws, and the relative gain of kernel over linear.

Choosers (:func:`choose_subsets`), each the lowest predicted weighted loss
over every feasible subset (``selection.select_subset``) under:

- ``"linear"``: the pipeline's least-squares surrogate;
- ``"kernel"``: the pipeline's kernel surrogate (RBF, cross-validated);
- ``"kernel + LCB"``: the same kernel's GP posterior, pessimistic bound
  ``mean + κ·std`` (``uncertainty.lcb_objective``), κ calibrated so the bound
  covers ``coverage`` of the leave-one-out residuals
  (``uncertainty.calibrate_kappa``);
- ``"kernel + trust region"``: the kernel's prediction within a Hamming radius
  of the fitting masks (``uncertainty.trust_region_objective``); the radius is
  the median distance from a fitting mask to its nearest other fitting mask:
  the distance at which the surrogate's leave-one-out validation checked it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.stats

from tasksurrogate_jax import pipeline
from tasksurrogate_jax.downstream import selection, uncertainty

CHOOSERS = ("linear", "kernel", "kernel + LCB", "kernel + trust region")


class SelectionFits(NamedTuple):
    """The surrogates of one draw's fitting data, shared by every target."""

    linear: object
    kernel: object
    gamma: float
    ridge: float
    masks: np.ndarray
    scores: np.ndarray
    trust_radius: float


def nearest_other_distance(masks) -> np.ndarray:
    """``[m]`` Hamming distance from each mask to its nearest other mask."""
    masks = np.asarray(masks, np.int64)
    distance = (masks[:, None, :] != masks[None, :, :]).sum(-1).astype(float)
    np.fill_diagonal(distance, np.inf)
    return distance.min(1)


def fit_selectors(masks, scores, *, seed: int) -> SelectionFits:
    """The pipeline's linear and kernel surrogates of ``masks [m, K]``,
    ``scores [m, T]`` (losses), and the trust radius of the masks."""
    masks = np.asarray(masks, np.float64)
    scores = np.asarray(scores, np.float64)
    fits = pipeline.fit_surrogates(masks, scores, seed=seed)
    return SelectionFits(
        linear=fits["linear"], kernel=fits["kernel"],
        gamma=float(fits["search"].gamma), ridge=float(fits["search"].ridge),
        masks=masks, scores=scores,
        trust_radius=float(np.median(nearest_other_distance(masks))))


def choose_subsets(fits: SelectionFits, num_tasks: int, *, target_weights=None,
                   size: int | None = None, min_size: int = 1,
                   max_size: int | None = None, coverage: float = 0.9) -> dict:
    """The subset each chooser picks.

    Returns:
      ``{chooser: {"mask": [K] 0/1, "indices": [...], "predicted": the
      kernel's (or linear's) predicted weighted loss of the pick, ...}}``;
      ``"kernel + LCB"`` adds ``"kappa"``, ``"kernel + trust region"``
      ``"radius"``.
    """
    bounds = {"size": size, "min_size": min_size, "max_size": max_size}
    calibration = uncertainty.calibrate_kappa(
        fits.masks, fits.scores, gamma=fits.gamma, ridge=fits.ridge,
        coverage=coverage, tail="upper", target_weights=target_weights)
    objectives = {
        "linear": selection.surrogate_objective(fits.linear,
                                                target_weights=target_weights),
        "kernel": selection.surrogate_objective(fits.kernel,
                                                target_weights=target_weights),
        "kernel + LCB": uncertainty.lcb_objective(
            calibration.posterior, kappa=calibration.kappa, mode="pessimistic",
            include_noise=True, target_weights=target_weights),
        "kernel + trust region": uncertainty.trust_region_objective(
            fits.kernel, max_distance=fits.trust_radius, masks=fits.masks,
            target_weights=target_weights),
    }
    chosen = {}
    for name, objective in objectives.items():
        result = selection.select_subset(objective, num_tasks, **bounds)
        mask = np.asarray(result.mask, np.float64)
        predictor = objectives["linear" if name == "linear" else "kernel"]
        chosen[name] = {"mask": mask, "indices": list(map(int, result.indices)),
                        "predicted": float(np.asarray(predictor(mask[None]))[0])}
    chosen["kernel + LCB"]["kappa"] = float(calibration.kappa)
    chosen["kernel + trust region"]["radius"] = fits.trust_radius
    return chosen


def mean_interval(values, level: float = 0.95) -> dict:
    """Mean and Student-t interval of independent draws ``values [n]``."""
    values = np.asarray(values, np.float64).reshape(-1)
    n = values.size
    mean = float(values.mean())
    if n < 2:
        return {"mean": mean, "low": float("nan"), "high": float("nan"), "n": n}
    half = (scipy.stats.t.ppf(0.5 + level / 2, n - 1) * values.std(ddof=1)
            / np.sqrt(n))
    return {"mean": mean, "low": float(mean - half), "high": float(mean + half),
            "n": n}


def format_interval(summary: dict, digits: int = 4) -> str:
    """``"mean [low, high]"``."""
    if not np.isfinite(summary["low"]):
        return f"{summary['mean']:.{digits}f}"
    return (f"{summary['mean']:.{digits}f} [{summary['low']:.{digits}f}, "
            f"{summary['high']:.{digits}f}]")


RELATIVE_GAIN_FORMULA = (
    "relative gain of kernel over linear, per draw: (L_linear - L_kernel) / "
    "L_linear for a loss L (lower is better), (R_kernel - R_linear) / |R_linear| "
    "for a return R; positive means the kernel's pick is better; mean and 95% "
    "Student-t interval over the draws")


def relative_gain(kernel, linear, *, lower_is_better: bool) -> np.ndarray:
    """Per-draw relative gain of the kernel's pick over the linear's
    (:data:`RELATIVE_GAIN_FORMULA`)."""
    kernel, linear = np.asarray(kernel, float), np.asarray(linear, float)
    if lower_is_better:
        return (linear - kernel) / np.abs(linear)
    return (kernel - linear) / np.abs(linear)
