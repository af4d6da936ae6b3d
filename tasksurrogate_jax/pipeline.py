"""One end-to-end attribution run on a workload, resumable from its folder.

Stages (each timed; the expensive ones stored as they finish and reused by a
rerun with the same configuration):

1. ``base``: ``θ*``, the model trained on all tasks.
2. ``loo``: exact scores of the full set and of every leave-one-out set, the
   ground truth ``F(1 − e_i) − F(1)`` (retraining; chunks stored);
   ``loo_replicate``: the same with another seed, the ground truth's own
   reproducibility.
3. ``subsets``: ``num_subsets + num_heldout`` random subsets, each dropping
   ``drop`` tasks (the paper's protocol); exact scores (chunks stored).
4. ``estimated``: first-order estimates of the same subsets' scores from
   ``θ*`` (no retraining).
5. ``baselines``: influence functions, TracIn and TRAK at ``θ*``.
6. surrogates (linear, kernel with cross-validated ``(γ, λ)``) on the exact
   and on the estimated scores of the fitting subsets; attribution; metrics.

All randomness derives from ``jax.random.key(config.seed)``. The results are a
plain dict (see :func:`run_pipeline`), written by :mod:`report`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from tasksurrogate_jax import attribution, baselines, metrics, surrogates
from tasksurrogate_jax.store import ChunkStore, config_hash
from tasksurrogate_jax.subsets import fixed_size_masks, leave_one_out_masks
from tasksurrogate_jax.workloads.modular import PRESETS as MODULAR_PRESETS
from tasksurrogate_jax.workloads.modular import modular_workload

WORKLOADS: dict[str, tuple[Callable, dict]] = {
    "modular": (modular_workload, MODULAR_PRESETS),
}
BASELINES = ("influence", "tracin", "trak")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything that determines a run's results (JSON-able).

    Attributes:
      workload: a name in :data:`WORKLOADS`.
      preset: the workload's preset.
      seed: the run's PRNG seed.
      num_subsets: random subsets the surrogates are fit on.
      num_heldout: random subsets held out to evaluate them.
      drop: tasks dropped from each random subset.
      proj_dim: projection dimension of the estimation.
      estimation_ridge: ridge of the per-subset linearized problems.
      output_mode: ``"margin"`` or ``"logits"`` (see :mod:`estimation`).
      cv_method: ``"loo"`` or ``"kfold"`` selection of the kernel's ``(γ, λ)``.
      cv_criterion: ``"mse"`` or ``"spearman"``.
      baselines: names in :data:`BASELINES` to compute.
      influence_damping: ``λ`` of ``(H + λI)^{-1}``.
      influence_hessian: ``"gauss_newton"`` (positive semi-definite, safe for
        conjugate gradients on non-convex models) or ``"exact"``.
      trak_proj_dim: projection dimension of TRAK's features.
      value_samples: sampled coalitions for the kernel surrogate's Banzhaf
        values (0 = skip).
      replicate_loo: retrain the LOO sets with another seed too: how well the
        ground truth agrees with itself (the ceiling of every method).
      chunk_size: subsets per retraining chunk (each finished chunk is stored).
      overrides: workload configuration fields to change (e.g. ``num_steps``).
    """

    workload: str = "modular"
    preset: str = "cpu"
    seed: int = 0
    num_subsets: int = 96
    num_heldout: int = 32
    drop: int = 3
    proj_dim: int = 128
    estimation_ridge: float = 10.0
    output_mode: str = "margin"
    cv_method: str = "loo"
    cv_criterion: str = "spearman"
    baselines: tuple[str, ...] = BASELINES
    influence_damping: float = 1.0
    influence_hessian: str = "gauss_newton"
    trak_proj_dim: int = 512
    value_samples: int = 1000
    replicate_loo: bool = True
    chunk_size: int = 32
    overrides: tuple[tuple[str, object], ...] = ()

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["baselines"] = list(self.baselines)
        out["overrides"] = {k: v for k, v in self.overrides}
        return out


def check_config(config: PipelineConfig) -> PipelineConfig:
    """Validates names and counts; raises ``ValueError`` naming the field."""
    if not isinstance(config, PipelineConfig):
        raise TypeError(
            f"config must be a PipelineConfig, got {type(config).__name__}.")
    if config.workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {sorted(WORKLOADS)}, got "
                         f"{config.workload!r}.")
    presets = WORKLOADS[config.workload][1]
    if config.preset not in presets:
        raise ValueError(f"preset must be one of {sorted(presets)} for workload "
                         f"{config.workload!r}, got {config.preset!r}.")
    if config.num_subsets < 4:
        raise ValueError("num_subsets must be >= 4 to fit and cross-validate the "
                         f"surrogates, got {config.num_subsets}.")
    if config.num_heldout < 3:
        raise ValueError("num_heldout must be >= 3 for a held-out Spearman, got "
                         f"{config.num_heldout}.")
    unknown = sorted(set(config.baselines) - set(BASELINES))
    if unknown:
        raise ValueError(f"baselines must be among {BASELINES}, got {unknown}.")
    if config.influence_hessian not in baselines.HESSIANS:
        raise ValueError(f"influence_hessian must be one of {baselines.HESSIANS}, "
                         f"got {config.influence_hessian!r}.")
    for name in ("proj_dim", "trak_proj_dim", "drop", "chunk_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}.")
    if config.value_samples < 0:
        raise ValueError(f"value_samples must be >= 0, got {config.value_samples}.")
    return config


def make_workload(config: PipelineConfig):
    """The configured workload."""
    factory, _ = WORKLOADS[config.workload]
    return factory(config.preset, **dict(config.overrides))


# The configuration fields each stage's result depends on. A run folder holds
# one workload identity (refused otherwise); within it, each stage is stored
# under a hash of its own fields, so changing, say, the influence damping
# recomputes the baselines only, and earlier settings stay reusable.
IDENTITY_FIELDS = ("workload", "preset", "seed", "overrides")
STAGE_FIELDS = {
    "base": (),
    "loo": ("chunk_size",),
    "loo_replicate": ("chunk_size",),
    "subsets": ("num_subsets", "num_heldout", "drop", "chunk_size"),
    "estimated": ("num_subsets", "num_heldout", "drop", "proj_dim",
                  "estimation_ridge", "output_mode"),
    "baselines": ("baselines", "influence_damping", "influence_hessian",
                  "trak_proj_dim"),
}


class _Stages:
    """Stage outputs stored under ``out/stages`` (one npz per finished stage)."""

    def __init__(self, out_dir: Path | None, config: dict, log: Callable):
        self.out_dir, self.config, self.log = out_dir, config, log
        identity = {k: config[k] for k in IDENTITY_FIELDS}
        if out_dir is not None:  # refuses a folder of another workload identity
            ChunkStore(out_dir / "stages", identity)
        self.seconds: dict[str, float] = {}

    def fields(self, name: str) -> dict:
        """The configuration fields stage ``name`` depends on."""
        return {k: self.config[k] for k in IDENTITY_FIELDS + STAGE_FIELDS[name]}

    def folder(self, parent: str, name: str) -> Path | None:
        """``out/<parent>/<name>-<hash of the stage's fields>``, or ``None``."""
        if self.out_dir is None:
            return None
        return self.out_dir / parent / f"{name}-{config_hash(self.fields(name))[:12]}"

    def run(self, name: str, compute: Callable[[], dict]) -> dict:
        folder = self.folder("stages", name)
        store = None if folder is None else ChunkStore(folder, self.fields(name))
        if store is not None and store.has_chunk(0):
            arrays = store.load_chunk(0)
            self.seconds[name] = float(arrays.pop("_seconds"))
            self.log(f"[{name}] reused from {store.chunk_path(0)}")
            return arrays
        self.log(f"[{name}] ...")
        start = time.perf_counter()
        arrays = {k: np.asarray(v) for k, v in compute().items()}
        self.seconds[name] = time.perf_counter() - start
        self.log(f"[{name}] done in {self.seconds[name]:.1f} s")
        if store is not None:
            store.save_chunk(0, {**arrays, "_seconds": self.seconds[name]})
        return arrays

    def timed(self, name: str, compute: Callable):
        return _timed(self.seconds, name, compute)


def _timed(seconds: dict, name: str, compute: Callable):
    """``compute()``, its wall time recorded in ``seconds[name]``."""
    start = time.perf_counter()
    out = compute()
    seconds[name] = time.perf_counter() - start
    return out


def _params_arrays(params) -> dict:
    return {f"leaf_{i:04d}": leaf for i, leaf in enumerate(jax.tree.leaves(params))}


def _params_from_arrays(arrays: dict, like):
    leaves = [arrays[f"leaf_{i:04d}"] for i in range(len(jax.tree.leaves(like)))]
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def fit_surrogates(fit_masks, fit_scores, *, cv_method: str = "loo",
                   cv_criterion: str = "spearman", seed: int = 0) -> dict:
    """The pipeline's two surrogates of ``(masks, scores)``.

    Returns:
      ``{"linear": LinearSurrogate (least squares), "kernel": KernelSurrogate
      (RBF, (gamma, ridge) cross-validated with ``cv_method`` on
      ``cv_criterion``), "search": HyperparameterSearch}``.
    """
    linear = surrogates.fit_linear_surrogate(fit_masks, fit_scores)
    # Ridges below the rounding error of the kernel's eigenvalues give
    # meaningless CV errors.
    ridges = surrogates.default_ridge_grid(fit_masks.shape[0],
                                           np.asarray(fit_scores).dtype)
    search = surrogates.select_kernel_hyperparameters(
        fit_masks, fit_scores, method=cv_method, criterion=cv_criterion,
        ridges=ridges, key=jax.random.key(seed))
    kernel = surrogates.fit_kernel_surrogate(
        fit_masks, fit_scores, gamma=float(search.gamma), ridge=float(search.ridge))
    return {"linear": linear, "kernel": kernel, "search": search}


def _loo_metrics(effects, true_effects) -> dict:
    spear = metrics.loo_correlation(effects, true_effects, method="spearman")
    pear = metrics.loo_correlation(effects, true_effects, method="pearson")
    return {"loo_spearman": float(spear.mean),
            "loo_spearman_mean_target": float(spear.mean_target),
            "loo_pearson": float(pear.mean),
            "loo_pearson_mean_target": float(pear.mean_target)}


def _heldout_metrics(surrogate, masks, true_scores) -> dict:
    predicted = np.asarray(surrogate.predict(masks))
    return {"heldout_spearman": float(metrics.mean_spearman(true_scores, predicted)),
            "heldout_spearman_mean_target": float(metrics.spearman(
                true_scores.mean(1), predicted.mean(1))),
            # Pooled over targets (sum of MSEs / sum of variances): targets whose
            # held-out scores barely vary would dominate a mean of ratios.
            "normalized_error": float(np.mean((predicted - true_scores) ** 2)
                                      / np.mean(np.var(true_scores, axis=0))),
            "_heldout_predicted_mean": predicted.mean(1)}


class RunScores(NamedTuple):
    """Everything a run computes before the surrogates (see :func:`collect`).

    Attributes:
      workload: the workload object.
      theta: ``θ*``.
      loo_scores: ``[K + 1, T]`` exact scores of the full set then each LOO set.
      replicate_loo_scores: the same with another seed, or ``None``.
      masks: ``[num_subsets + num_heldout, K]`` random subsets (fitting rows
        first).
      exact: ``[num_subsets + num_heldout, T]`` their exact scores.
      estimated: ``[num_subsets + num_heldout, T]`` their first-order estimates.
      baselines: ``{name: [K, T]}`` baseline LOO-effect predictions.
      seconds: ``{stage: seconds}`` (stored stages report their first run).
    """

    workload: Any
    theta: Any
    loo_scores: np.ndarray
    replicate_loo_scores: np.ndarray | None
    masks: np.ndarray
    exact: np.ndarray
    estimated: np.ndarray
    baselines: dict
    seconds: dict


def collect(config: PipelineConfig, *, out_dir=None, log: Callable = print,
            progress: bool = True) -> RunScores:
    """Runs the expensive stages (stored under ``out_dir``, reused on rerun).

    Args:
      config: the :class:`PipelineConfig`.
      out_dir: folder for stored stages and retraining chunks (resume); ``None``
        keeps nothing on disk. A folder of another configuration is refused.
      log: called with one line per stage.
      progress: progress bars on the retraining stages.

    Returns:
      :class:`RunScores`.
    """
    config = check_config(config)
    out_dir = None if out_dir is None else Path(out_dir)
    stages = _Stages(out_dir, config.to_json(), log)
    workload = stages.timed("workload", lambda: make_workload(config))
    key = jax.random.key(config.seed)
    k_base, k_subsets, k_est, k_trak, k_replicate = jax.random.split(key, 5)
    num_tasks = workload.num_tasks
    if config.drop >= num_tasks:
        raise ValueError(f"drop must be < the workload's {num_tasks} tasks, got "
                         f"{config.drop}.")

    def retrained(name, masks, key=k_base):
        store_dir = stages.folder("retraining", name)
        return {"scores": workload.exact_scores(
            masks, key=key, store_dir=store_dir, chunk_size=config.chunk_size,
            progress=progress)}

    like = jax.eval_shape(workload.init_fn, k_base)  # structure only
    theta = _params_from_arrays(stages.run(
        "base", lambda: _params_arrays(workload.base_params(key=k_base))), like)

    loo_masks = leave_one_out_masks(num_tasks)
    loo = stages.run("loo", lambda: retrained("loo", loo_masks))["scores"]
    replicate = None
    if config.replicate_loo:
        replicate = stages.run("loo_replicate", lambda: retrained(
            "loo_replicate", loo_masks, key=k_replicate))["scores"]

    masks = np.asarray(fixed_size_masks(k_subsets, config.num_subsets +
                                        config.num_heldout, num_tasks,
                                        subset_size=num_tasks - config.drop,
                                        unique=True))
    exact = stages.run("subsets", lambda: retrained("subsets", masks))["scores"]
    estimated = stages.run("estimated", lambda: {"scores": workload.estimated_scores(
        masks, key=k_est, base_params=theta, proj_dim=config.proj_dim,
        ridge=config.estimation_ridge, output_mode=config.output_mode)})["scores"]

    def compute_baselines():
        out = {}
        args = (workload.apply_fn, theta, workload.data, workload.target)
        loss_fn = workload.spec.loss_fn
        if "influence" in config.baselines:
            out["influence"] = baselines.influence_scores(
                *args, loss_fn=loss_fn, damping=config.influence_damping,
                hessian=config.influence_hessian)
        if "tracin" in config.baselines:
            out["tracin"] = baselines.tracin_scores(
                workload.apply_fn, [theta], *args[2:], loss_fn=loss_fn)
        if "trak" in config.baselines:
            out["trak"] = baselines.trak_scores(
                *args, key=k_trak, proj_dim=config.trak_proj_dim, loss_fn=loss_fn)
        return out

    baseline_effects = stages.run("baselines", compute_baselines)
    return RunScores(workload, theta, loo, replicate, masks, exact, estimated,
                     baseline_effects, stages.seconds)


def evaluate(config: PipelineConfig, run: RunScores) -> dict:
    """Surrogates, attribution and metrics from collected scores (cheap).

    Returns:
      A dict with ``config``, ``task_names``, ``target_description``,
      ``methods`` (per method: ``effects`` ``[K]`` on the mean target, LOO
      Spearman/Pearson per target and on the mean target, and held-out Spearman
      and normalized error for surrogates), ``true_effects`` ``[K]``,
      ``interactions`` ``[K, K]`` (kernel surrogate on exact scores, mean
      target), ``heldout`` (true and predicted mean-target scores),
      ``estimation`` (errors of the estimates against the exact scores),
      ``surrogate_hyperparameters`` and ``seconds`` per stage.
    """
    seconds = dict(run.seconds)

    def timed(name, compute):
        return _timed(seconds, name, compute)

    m = config.num_subsets
    true_effects = run.loo_scores[1:] - run.loo_scores[0]  # [K, T]
    fit_masks, heldout_masks = run.masks[:m], run.masks[m:]
    cv = {"cv_method": config.cv_method, "cv_criterion": config.cv_criterion,
          "seed": config.seed}
    fits = timed("surrogates", lambda: {
        "exact": fit_surrogates(fit_masks, run.exact[:m], **cv),
        "estimated": fit_surrogates(fit_masks, run.estimated[:m], **cv)})

    heldout_true = run.exact[m:]
    methods, heldout_predicted = {}, {}
    for scores_name, fitted in fits.items():
        for kind in ("linear", "kernel"):
            surrogate = fitted[kind]
            name = f"{kind} surrogate ({scores_name})"
            effects = np.asarray(attribution.loo_scores(surrogate))
            held = _heldout_metrics(surrogate, heldout_masks, heldout_true)
            heldout_predicted[name] = held.pop("_heldout_predicted_mean")
            methods[name] = {"effects": effects.mean(1),
                             **_loo_metrics(effects, true_effects), **held}
    for name, effects in run.baselines.items():
        methods[name] = {"effects": effects.mean(1),
                         **_loo_metrics(effects, true_effects)}

    kernel_exact = fits["exact"]["kernel"]
    interactions = timed("attribution", lambda: np.asarray(
        attribution.interaction_matrix(kernel_exact)).mean(-1))
    if config.value_samples:
        banzhaf = timed("attribution_values", lambda: np.asarray(
            attribution.banzhaf_values(
                kernel_exact, key=jax.random.fold_in(jax.random.key(config.seed), 9),
                num_samples=config.value_samples)))
        methods["kernel surrogate (exact), Banzhaf"] = {
            "effects": banzhaf.mean(1), **_loo_metrics(banzhaf, true_effects)}
    if run.replicate_loo_scores is not None:
        replicate = run.replicate_loo_scores[1:] - run.replicate_loo_scores[0]
        methods["LOO retraining, another seed"] = {
            "effects": replicate.mean(1), **_loo_metrics(replicate, true_effects)}

    fit_true, fit_est = run.exact[:m], run.estimated[:m]
    estimation = {
        "mean_relative_error": float(np.mean(
            metrics.relative_error(fit_est, fit_true))),
        "mean_target_relative_error": float(np.mean(metrics.relative_error(
            fit_est.mean(1), fit_true.mean(1)))),
        "spearman_across_subsets": float(metrics.mean_spearman(fit_true, fit_est)),
        "spearman_mean_target": float(metrics.spearman(fit_true.mean(1),
                                                       fit_est.mean(1))),
    }
    hyper = {scores_name: {"gamma": float(f["search"].gamma),
                           "ridge": float(f["search"].ridge)}
             for scores_name, f in fits.items()}
    workload = run.workload
    return {
        "config": config.to_json(),
        "task_names": list(workload.task_names),
        "target_description": workload.target_description,
        "num_targets": int(workload.num_targets),
        "full_set_loss": float(run.loo_scores[0].mean()),
        "true_effects": true_effects.mean(1),
        "methods": methods,
        "interactions": interactions,
        "heldout": {"true": heldout_true.mean(1), "predicted": heldout_predicted},
        "estimation": estimation,
        "surrogate_hyperparameters": hyper,
        "seconds": seconds,
    }


def run_pipeline(config: PipelineConfig, *, out_dir=None, log: Callable = print,
                 progress: bool = True) -> dict:
    """:func:`collect` then :func:`evaluate`: the results dict of a whole run."""
    config = check_config(config)
    return evaluate(config, collect(config, out_dir=out_dir, log=log,
                                    progress=progress))


__all__ = ["BASELINES", "STAGE_FIELDS", "WORKLOADS", "PipelineConfig", "RunScores",
           "check_config", "collect", "evaluate", "make_workload", "run_pipeline"]
