"""One end-to-end attribution run on a workload, resumable from its folder.

Stages (each timed; the expensive ones stored as they finish and reused by a
rerun with the same configuration):

1. ``base``: ``θ*``, the model trained on all tasks.
2. ``loo``: the ground truth of the full set and of every leave-one-out set,
   ``[R, K + 1, T]``: ``R`` paired replicates in the configured regime
   (``"finetune"`` from ``θ*`` or ``"scratch"``); the effects are
   ``F(1 − e_i) − F(1)`` averaged over replicates.
3. ``subsets``: ``num_subsets + num_heldout`` random subsets, each dropping
   ``drop`` tasks; their ground truth ``[R, m, T]`` in the same regime.
4. ``estimated``: first-order estimates of the same subsets' scores from
   ``θ*`` (no retraining).
5. ``baselines``: influence functions, TracIn and TRAK at ``θ*``.
6. surrogates (linear, kernel with cross-validated ``(γ, λ)``) on the exact
   and on the estimated scores of the fitting subsets; attribution; metrics,
   each with a bootstrap interval, beside the ground truth's own ``ceiling``
   (its split-half reliability across the replicates, Spearman-Brown
   corrected: :mod:`tasksurrogate_jax.reliability`).

All randomness derives from ``jax.random.key(config.seed)``. The results are a
plain dict (see :func:`run_pipeline`), written by :mod:`report`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from tasksurrogate_jax import attribution, baselines, metrics, reliability, surrogates
from tasksurrogate_jax.estimation import EstimationSettings
from tasksurrogate_jax.store import ChunkStore, config_hash
from tasksurrogate_jax.subsets import fixed_size_masks, leave_one_out_masks
from tasksurrogate_jax.workloads.digits import PRESETS as DIGITS_PRESETS
from tasksurrogate_jax.workloads.digits import digits_workload
from tasksurrogate_jax.workloads.modular import PRESETS as MODULAR_PRESETS
from tasksurrogate_jax.workloads.modular import modular_workload
from tasksurrogate_jax.workloads.supervised import REGIMES, SupervisedWorkload


class WorkloadEntry(NamedTuple):
    """A workload the command line knows by name.

    Attributes:
      factory: ``factory(preset, **overrides) -> SupervisedWorkload``.
      presets: its presets by name.
      drop: tasks each random subset drops, unless the config says.
    """

    factory: Callable[..., SupervisedWorkload]
    presets: dict
    drop: int


WORKLOADS: dict[str, WorkloadEntry] = {
    "digits": WorkloadEntry(digits_workload, DIGITS_PRESETS, drop=4),
    "modular": WorkloadEntry(modular_workload, MODULAR_PRESETS, drop=3),
}
BASELINES = ("influence", "tracin", "trak")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything that determines a run's results (JSON-able).

    Attributes:
      workload: a name in :data:`WORKLOADS` (or the name of the workload
        instance given to :func:`run_pipeline`).
      preset: the workload's preset.
      seed: the run's PRNG seed.
      regime: the ground truth's training: ``"finetune"`` (from ``θ*``, what
        the first-order estimates approximate) or ``"scratch"``.
      replicates: paired replicates of the ground truth (``>= 2``: the ceiling
        is their split-half agreement).
      num_subsets: random subsets the surrogates are fit on.
      num_heldout: random subsets held out to evaluate them.
      drop: tasks dropped from each random subset (``None``: the workload's
        default in :data:`WORKLOADS`).
      estimation_method: ``"finetune"`` (linearized fine-tuning) or ``"solve"``
        (the convex solve); see :class:`~tasksurrogate_jax.estimation.
        EstimationSettings` for this and the next four fields.
      proj_dim: projection dimension of the estimation.
      estimation_ridge: ridge of the convex solve, a number or ``"auto"``.
      output_mode: ``"logits"`` or ``"margin"``.
      estimation_difference: anchor the estimates at one real fine-tuning on
        all tasks.
      cv_method: ``"loo"`` or ``"kfold"`` selection of the kernel's ``(γ, λ)``.
      cv_criterion: ``"mse"`` or ``"spearman"``.
      baselines: names in :data:`BASELINES` to compute.
      influence_damping: ``λ`` of ``(H + λI)^{-1}``.
      influence_hessian: ``"gauss_newton"`` (positive semi-definite, safe for
        conjugate gradients on non-convex models) or ``"exact"``.
      trak_proj_dim: projection dimension of TRAK's features.
      value_samples: sampled coalitions for the kernel surrogate's Banzhaf
        values (0 = skip).
      confidence_level: of the bootstrap intervals.
      bootstrap_resamples: resamples per interval.
      chunk_size: (subset, replicate) rows per retraining chunk (each finished
        chunk is stored).
      overrides: workload configuration fields to change (e.g. ``num_steps``).
    """

    workload: str = "digits"
    preset: str = "cpu"
    seed: int = 0
    regime: str = "finetune"
    replicates: int = 4
    num_subsets: int = 96
    num_heldout: int = 32
    drop: int | None = None
    estimation_method: str = "finetune"
    proj_dim: int = 512
    estimation_ridge: float | str = "auto"
    output_mode: str = "logits"
    estimation_difference: bool = False
    cv_method: str = "loo"
    cv_criterion: str = "spearman"
    baselines: tuple[str, ...] = BASELINES
    influence_damping: float = 1.0
    influence_hessian: str = "gauss_newton"
    trak_proj_dim: int = 512
    value_samples: int = 1000
    confidence_level: float = 0.95
    bootstrap_resamples: int = 1000
    chunk_size: int = 64
    overrides: tuple[tuple[str, object], ...] = ()

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["baselines"] = list(self.baselines)
        out["overrides"] = {k: v for k, v in self.overrides}
        return out


def check_config(config: PipelineConfig, *, registered: bool = True) -> PipelineConfig:
    """Validates names and counts; raises ``ValueError`` naming the field.

    Returns:
      ``config`` with ``drop`` resolved to the workload's default when ``None``
      (a workload instance's default is 3).
    """
    if not isinstance(config, PipelineConfig):
        raise TypeError(
            f"config must be a PipelineConfig, got {type(config).__name__}.")
    drop = 3
    if registered:
        if config.workload not in WORKLOADS:
            raise ValueError(f"workload must be one of {sorted(WORKLOADS)}, got "
                             f"{config.workload!r}.")
        presets = WORKLOADS[config.workload].presets
        if config.preset not in presets:
            raise ValueError(f"preset must be one of {sorted(presets)} for workload "
                             f"{config.workload!r}, got {config.preset!r}.")
        drop = WORKLOADS[config.workload].drop
    if config.regime not in REGIMES:
        raise ValueError(f"regime must be one of {REGIMES}, got {config.regime!r}.")
    if config.replicates < 2:
        raise ValueError("replicates must be >= 2: a ceiling needs at least 2 "
                         f"replicates, got {config.replicates}.")
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
    for name in ("proj_dim", "trak_proj_dim", "chunk_size", "bootstrap_resamples"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}.")
    if config.drop is not None and config.drop < 1:
        raise ValueError(f"drop must be >= 1, got {config.drop}.")
    if config.value_samples < 0:
        raise ValueError(f"value_samples must be >= 0, got {config.value_samples}.")
    if not 0.0 < config.confidence_level < 1.0:
        raise ValueError("confidence_level must be in (0, 1), got "
                         f"{config.confidence_level}.")
    try:
        estimation_settings(config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"estimation settings (estimation_method, proj_dim, "
                         f"estimation_ridge, output_mode, estimation_difference): "
                         f"{err}") from err
    if config.drop is None:
        config = dataclasses.replace(config, drop=drop)
    return config


def estimation_settings(config: PipelineConfig) -> EstimationSettings:
    """The estimation settings of ``config`` (validated)."""
    return EstimationSettings(
        method=config.estimation_method, proj_dim=config.proj_dim,
        output_mode=config.output_mode, ridge=config.estimation_ridge,
        difference=config.estimation_difference)


def check_workload_fits(config: PipelineConfig, workload) -> None:
    """The subset counts must fit the workload's number of tasks."""
    num_tasks = workload.num_tasks
    if config.drop >= num_tasks:
        raise ValueError(f"drop must be < the workload's {num_tasks} tasks, got "
                         f"{config.drop}.")
    available = math.comb(num_tasks, config.drop)
    wanted = config.num_subsets + config.num_heldout
    if wanted > available:
        raise ValueError(
            f"num_subsets + num_heldout = {wanted} distinct subsets dropping "
            f"{config.drop} of {num_tasks} tasks were asked for, but only "
            f"{available} exist; lower them or change drop.")


def make_workload(config: PipelineConfig) -> SupervisedWorkload:
    """The configured workload."""
    return WORKLOADS[config.workload].factory(config.preset, **dict(config.overrides))


# The configuration fields each stage's result depends on. A run folder holds
# one workload identity (refused otherwise); within it, each stage is stored
# under a hash of its own fields, so changing, say, the influence damping
# recomputes the baselines only, and earlier settings stay reusable.
IDENTITY_FIELDS = ("workload", "preset", "seed", "overrides", "description")
STAGE_FIELDS = {
    "base": (),
    "loo": ("regime", "replicates", "chunk_size"),
    "subsets": ("regime", "replicates", "num_subsets", "num_heldout", "drop",
                "chunk_size"),
    "estimated": ("num_subsets", "num_heldout", "drop", "estimation_method",
                  "proj_dim", "estimation_ridge", "output_mode",
                  "estimation_difference"),
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


def _loo_metrics(effects, true_effects, config: PipelineConfig) -> dict:
    """LOO agreement with the ground truth, each figure with its interval."""
    spear = metrics.loo_correlation(effects, true_effects, method="spearman")
    pear = metrics.loo_correlation(effects, true_effects, method="pearson")
    interval = _interval_settings(config)
    return {"loo_spearman": float(spear.mean),
            "loo_spearman_interval": reliability.interval_over_targets(
                np.asarray(spear.per_target), **interval),
            "loo_spearman_mean_target": float(spear.mean_target),
            "loo_spearman_mean_target_interval": reliability.loo_spearman_interval(
                effects, true_effects, **interval),
            "loo_pearson": float(pear.mean),
            "loo_pearson_mean_target": float(pear.mean_target)}


def _heldout_metrics(surrogate, masks, true_scores, config: PipelineConfig) -> dict:
    predicted = np.asarray(surrogate.predict(masks))
    per_target = np.asarray(metrics.spearman(true_scores, predicted))
    return {"heldout_spearman": float(np.nanmean(per_target)),
            "heldout_spearman_interval": reliability.interval_over_targets(
                per_target, **_interval_settings(config)),
            "heldout_spearman_mean_target": float(metrics.spearman(
                true_scores.mean(1), predicted.mean(1))),
            "normalized_error": float(metrics.pooled_normalized_error(
                true_scores, predicted)),
            "_heldout_predicted_mean": predicted.mean(1)}


def _interval_settings(config: PipelineConfig) -> dict:
    return {"level": config.confidence_level,
            "num_resamples": config.bootstrap_resamples, "seed": config.seed}


class RunScores(NamedTuple):
    """Everything a run computes before the surrogates (see :func:`collect`).

    Attributes:
      workload: the workload object.
      theta: ``θ*``.
      loo_scores: ``[R, K + 1, T]`` ground truth of the full set then each LOO
        set, per replicate.
      masks: ``[num_subsets + num_heldout, K]`` random subsets (fitting rows
        first).
      exact: ``[R, num_subsets + num_heldout, T]`` their ground truth, per
        replicate.
      estimated: ``[num_subsets + num_heldout, T]`` their first-order estimates.
      baselines: ``{name: [K, T]}`` baseline LOO-effect predictions.
      seconds: ``{stage: seconds}`` (stored stages report their first run).
    """

    workload: Any
    theta: Any
    loo_scores: np.ndarray
    masks: np.ndarray
    exact: np.ndarray
    estimated: np.ndarray
    baselines: dict
    seconds: dict


def collect(config: PipelineConfig, *, workload: SupervisedWorkload | None = None,
            out_dir=None, log: Callable = print, progress: bool = True) -> RunScores:
    """Runs the expensive stages (stored under ``out_dir``, reused on rerun).

    Args:
      config: the :class:`PipelineConfig`.
      workload: a workload instance (e.g. your own
        :class:`~tasksurrogate_jax.workloads.supervised.SupervisedWorkload`);
        ``None`` builds ``config.workload`` from :data:`WORKLOADS`.
      out_dir: folder for stored stages and retraining chunks (resume); ``None``
        keeps nothing on disk. A folder of another configuration is refused.
      log: called with one line per stage.
      progress: progress bars on the retraining stages.

    Returns:
      :class:`RunScores`.
    """
    config = check_config(config, registered=workload is None)
    if workload is not None and not isinstance(workload, SupervisedWorkload):
        raise TypeError("workload must be a SupervisedWorkload (or None to build "
                        f"config.workload), got {type(workload).__name__}.")
    out_dir = None if out_dir is None else Path(out_dir)
    seconds: dict[str, float] = {}
    if workload is None:
        workload = _timed(seconds, "workload", lambda: make_workload(config))
    identity = {**config.to_json(), "description": config_hash(workload.description)}
    check_workload_fits(config, workload)
    stages = _Stages(out_dir, identity, log)
    stages.seconds.update(seconds)
    key = jax.random.key(config.seed)
    k_base, k_subsets, k_est, k_trak = jax.random.split(key, 4)
    num_tasks = workload.num_tasks

    def ground_truth(name, masks):
        return {"scores": workload.replicate_scores(
            masks, key=k_base, regime=config.regime, replicates=config.replicates,
            base_params=theta, store_dir=stages.folder("retraining", name),
            chunk_size=config.chunk_size, progress=progress)}

    masks = np.asarray(fixed_size_masks(k_subsets, config.num_subsets +
                                        config.num_heldout, num_tasks,
                                        subset_size=num_tasks - config.drop,
                                        unique=True))  # before any training
    like = jax.eval_shape(workload.init_fn, k_base)  # structure only
    theta = _params_from_arrays(stages.run(
        "base", lambda: _params_arrays(workload.base_params(key=k_base))), like)
    loo_masks = leave_one_out_masks(num_tasks)
    loo = stages.run("loo", lambda: ground_truth("loo", loo_masks))["scores"]
    exact = stages.run("subsets", lambda: ground_truth("subsets", masks))["scores"]
    estimated = stages.run("estimated", lambda: {"scores": workload.estimated_scores(
        masks, key=k_est, base_params=theta,
        settings=estimation_settings(config))})["scores"]

    def compute_baselines():
        out = {}
        args = (workload.apply_fn, theta, workload.data, workload.target)
        loss_fn = workload.loss_fn
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
    return RunScores(workload, theta, loo, masks, exact, estimated, baseline_effects,
                     stages.seconds)


def ceiling(loo_scores, heldout_scores, *, seed: int = 0) -> dict:
    """The ground truth's reliability: what any method's agreement with it is
    measured against (:mod:`tasksurrogate_jax.reliability`).

    Args:
      loo_scores: ``[R, K + 1, T]`` full set then LOO sets, per replicate.
      heldout_scores: ``[R, h, T]`` held-out subsets, per replicate.
      seed: of the random splits of the replicates.

    Returns:
      ``{"loo_spearman_per_target", "loo_spearman_mean_target",
      "heldout_spearman", "num_replicates", "attainable"}``: the expected
      agreement of two independent ground truths of ``R`` replicates each, and
      under ``attainable`` the most a noise-free method can expect against one
      (``sqrt`` of it: correction for attenuation).
    """
    loo = reliability.loo_reliability(loo_scores, seed=seed)
    held = reliability.subset_reliability(heldout_scores, seed=seed)
    values = {"loo_spearman_per_target": loo.per_target,
              "loo_spearman_mean_target": loo.mean_target,
              "heldout_spearman": held.per_target}
    return {**values, "num_replicates": loo.num_replicates,
            "attainable": {k: float(np.sqrt(max(v, 0.0))) for k, v in values.items()}}


def evaluate(config: PipelineConfig, run: RunScores) -> dict:
    """Surrogates, attribution and metrics from collected scores (cheap).

    Returns:
      A dict with ``config``, ``regime``, ``task_names``, ``target_description``,
      ``ceiling`` (see :func:`ceiling`), ``methods`` (per method: ``effects``
      ``[K]`` on the mean target, LOO Spearman/Pearson per target and on the
      mean target, and held-out Spearman and normalized error for surrogates;
      each Spearman with its bootstrap ``*_interval``), ``true_effects`` ``[K]``,
      ``interactions`` ``[K, K]`` (kernel surrogate on exact scores, mean
      target), ``heldout`` (true and predicted mean-target scores),
      ``estimation`` (errors of the estimates against the ground truth),
      ``surrogate_hyperparameters`` and ``seconds`` per stage.
    """
    if config.drop is None:  # the run's masks say what was dropped
        config = dataclasses.replace(
            config, drop=int(run.masks.shape[1] - run.masks[0].sum()))
    config = check_config(config, registered=False)
    seconds = dict(run.seconds)

    def timed(name, compute):
        return _timed(seconds, name, compute)

    m = config.num_subsets
    loo = np.asarray(run.loo_scores)
    true_effects = (loo[:, 1:] - loo[:, :1]).mean(0)  # [K, T]
    exact = np.asarray(run.exact).mean(0)
    fit_masks, heldout_masks = run.masks[:m], run.masks[m:]
    cv = {"cv_method": config.cv_method, "cv_criterion": config.cv_criterion,
          "seed": config.seed}
    fits = timed("surrogates", lambda: {
        "exact": fit_surrogates(fit_masks, exact[:m], **cv),
        "estimated": fit_surrogates(fit_masks, run.estimated[:m], **cv)})

    heldout_true = exact[m:]
    methods, heldout_predicted = {}, {}
    for scores_name, fitted in fits.items():
        for kind in ("linear", "kernel"):
            surrogate = fitted[kind]
            name = f"{kind} surrogate ({scores_name})"
            effects = np.asarray(attribution.loo_scores(surrogate))
            held = _heldout_metrics(surrogate, heldout_masks, heldout_true, config)
            heldout_predicted[name] = held.pop("_heldout_predicted_mean")
            methods[name] = {"effects": effects.mean(1),
                             **_loo_metrics(effects, true_effects, config), **held}
    for name, effects in run.baselines.items():
        methods[name] = {"effects": effects.mean(1),
                         **_loo_metrics(effects, true_effects, config)}

    kernel_exact = fits["exact"]["kernel"]
    interactions = timed("attribution", lambda: np.asarray(
        attribution.interaction_matrix(kernel_exact)).mean(-1))
    if config.value_samples:
        banzhaf = timed("attribution_values", lambda: np.asarray(
            attribution.banzhaf_values(
                kernel_exact, key=jax.random.fold_in(jax.random.key(config.seed), 9),
                num_samples=config.value_samples)))
        methods["kernel surrogate (exact), Banzhaf"] = {
            "effects": banzhaf.mean(1),
            **_loo_metrics(banzhaf, true_effects, config)}
    reliable = timed("ceiling", lambda: ceiling(loo, np.asarray(run.exact)[:, m:],
                                                seed=config.seed))

    fit_true, fit_est = exact[:m], run.estimated[:m]
    estimation = {
        "truth": f"{config.regime} ground truth",
        # Median: a target the model fits perfectly has F = 0 in float32.
        "median_relative_error": float(np.median(
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
        "regime": config.regime,
        "task_names": list(workload.task_names),
        "target_description": workload.target_description,
        "num_targets": int(workload.num_targets),
        "full_set_loss": float(loo[:, 0].mean()),
        "ceiling": reliable,
        "true_effects": true_effects.mean(1),
        "methods": methods,
        "interactions": interactions,
        "heldout": {"true": heldout_true.mean(1), "predicted": heldout_predicted},
        "estimation": estimation,
        "surrogate_hyperparameters": hyper,
        "seconds": seconds,
    }


def run_pipeline(config: PipelineConfig, *, workload: SupervisedWorkload | None = None,
                 out_dir=None, log: Callable = print, progress: bool = True) -> dict:
    """:func:`collect` then :func:`evaluate`: the results dict of a whole run.

    Pass ``workload`` to run on your own workload instance (``config.workload``
    then only names it).
    """
    config = check_config(config, registered=workload is None)
    return evaluate(config, collect(config, workload=workload, out_dir=out_dir,
                                    log=log, progress=progress))


__all__ = ["BASELINES", "STAGE_FIELDS", "WORKLOADS", "PipelineConfig", "RunScores",
           "WorkloadEntry", "ceiling", "check_config", "check_workload_fits",
           "collect", "evaluate", "make_workload", "run_pipeline"]
