"""One end-to-end attribution run on a workload, resumable from its folder.

Every registered workload follows a protocol its registry entry declares
(:attr:`WorkloadEntry.protocol`, a key of :data:`PROTOCOL_STAGES`).

``"loo"`` (digits, modular, rl): the ground truth is leave-one-out from the
full set. Stages (each timed; the expensive ones stored as they finish and
reused by a rerun with the same configuration):

1. ``base``: ``θ*``, the model trained on all tasks.
2. ``loo``: the ground truth of the full set and of every leave-one-out set,
   ``[R, K + 1, T]``: ``R`` paired replicates in the configured regime
   (``"finetune"`` from ``θ*`` or ``"scratch"``); the effects are
   ``F(1 − e_i) − F(1)`` averaged over replicates.
3. ``subsets``: ``num_subsets + num_heldout`` random subsets, each dropping
   ``drop`` tasks (``drop=None``, the RL workload's default: uniform over the
   subsets that are neither empty, full nor leave-one-out); their ground truth
   ``[R, m, T]`` in the same regime.
4. ``estimated``: first-order estimates of the same subsets' scores from
   ``θ*`` (no retraining).
5. ``baselines``: influence functions, TracIn and TRAK at ``θ*`` (supervised
   workloads).
6. surrogates (linear, kernel with cross-validated ``(γ, λ)``) on the exact
   and on the estimated scores of the fitting subsets; attribution; metrics,
   each with a bootstrap interval, beside the ground truth's own ``ceiling``
   (its split-half reliability across the replicates, Spearman-Brown
   corrected: :mod:`tasksurrogate_jax.reliability`).

``"fixed_size"`` (icl): every subset holds exactly ``shots`` tasks (a prompt of
``shots`` demonstrations), so there is no full set to leave one out of. Stages:

1. ``prompts``: ``num_subsets + num_heldout`` distinct random ``shots``-prompts
   and their exact scores (forward passes: deterministic).
2. ``truth``: the effect of including each demonstration in a prompt,
   :func:`~tasksurrogate_jax.attribution.fixed_size_effects_from_scores`: the
   mean loss of the prompts without it minus the mean loss of those with it
   (scaled by ``(K − k)/(K − k + 1)``), over every ``shots``-prompt when there
   are at most ``truth_prompts`` of them: exact and deterministic, ceiling 1.
   Otherwise over ``truth_prompts`` random prompts in ``replicates`` equal
   groups: the truth is the mean of the groups' effects and the ceiling their
   split-half reliability.
3. ``estimated``: first-order estimates of the prompts' scores.
4. surrogates as above; each method's effects are read with
   :func:`~tasksurrogate_jax.attribution.fixed_size_effects` (the same
   quantity, from ``value_samples`` random contexts of the surrogate) and the
   interactions with ``fixed_size_interactions``; metrics with intervals
   beside the ceiling (held-out prompts: 1, their scores being exact).

All randomness derives from ``jax.random.key(config.seed)``
(:func:`stage_keys`). The results are a plain dict (see :func:`run_pipeline`),
written by :mod:`report`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
import numpy as np

from tasksurrogate_jax import (
    __version__,
    attribution,
    baselines,
    metrics,
    nystrom,
    reliability,
    surrogates,
)
from tasksurrogate_jax.compilation import enable_compilation_cache
from tasksurrogate_jax.estimation import EstimationSettings
from tasksurrogate_jax.projection import num_parameters
from tasksurrogate_jax.report import write_json
from tasksurrogate_jax.store import ChunkStore, StoreMismatchError, config_hash
from tasksurrogate_jax.subsets import (
    fixed_size_masks,
    leave_one_out_masks,
    size_range_masks,
)
from tasksurrogate_jax.workloads.digits import PRESETS as DIGITS_PRESETS
from tasksurrogate_jax.workloads.digits import digits_workload
from tasksurrogate_jax.workloads.icl import PRESETS as ICL_PRESETS
from tasksurrogate_jax.workloads.icl import SyntheticICLWorkload, icl_workload
from tasksurrogate_jax.workloads.icl_regression import PRESETS as ICL_REGRESSION_PRESETS
from tasksurrogate_jax.workloads.icl_regression import (
    ICLRegressionWorkload,
    icl_regression_workload,
)
from tasksurrogate_jax.workloads.modular import PRESETS as MODULAR_PRESETS
from tasksurrogate_jax.workloads.modular import modular_workload
from tasksurrogate_jax.workloads.rl import PRESETS as RL_PRESETS
from tasksurrogate_jax.workloads.rl import RLWorkload, rl_workload
from tasksurrogate_jax.workloads.supervised import REGIMES, SupervisedWorkload

BASELINES = ("influence", "tracin", "trak")
BASELINE_SETTINGS = "_settings"
CV_METHODS = ("loo", "kfold")
CV_CRITERIA = ("spearman", "mse")


def _estimate_supervised(workload, masks, *, key, base_params, config):
    return workload.estimated_scores(masks, key=key, base_params=base_params,
                                     settings=estimation_settings(config))


def _estimate_rl(workload, masks, *, key, base_params, config):
    return workload.estimated_scores(masks, key=key, base_params=base_params,
                                     proj_dim=config.proj_dim)


def _estimate_icl(workload, masks, *, key, base_params, config):
    del base_params, config  # a prompt's estimate has no θ* and no settings here
    return workload.estimated_scores(masks, key=key)


class WorkloadEntry(NamedTuple):
    """A workload the pipeline and the command line know by name.

    Attributes:
      factory: ``factory(preset, **overrides)``, the workload.
      presets: its presets by name.
      drop: tasks each random subset drops unless the config says (``None``:
        uniform over the subsets neither empty, full nor leave-one-out; unused
        by the ``"fixed_size"`` protocol).
      protocol: ``"loo"`` or ``"fixed_size"`` (see the module docstring).
      kind: the class of its workloads (an instance of it may be passed to
        :func:`collect` in place of building one).
      baselines: the baselines it supports (a subset of :data:`BASELINES`),
        all computed by default.
      defaults: :class:`PipelineConfig` fields left ``None`` by the config,
        for every preset.
      preset_defaults: per preset, fields over ``defaults``.
      unused: :class:`PipelineConfig` fields that do not apply to it: they must
        keep their defaults.
      estimate: ``estimate(workload, masks, *, key, base_params, config)``:
        the workload's first-order estimates with the config's settings.
    """

    factory: Callable[..., Any]
    presets: dict
    drop: int | None
    protocol: str = "loo"
    kind: type = SupervisedWorkload
    baselines: tuple[str, ...] = BASELINES
    defaults: Mapping[str, Any] = MappingProxyType({})
    preset_defaults: Mapping[str, Mapping[str, Any]] = MappingProxyType({})
    unused: tuple[str, ...] = ()
    estimate: Callable = _estimate_supervised


# Fields of the first-order estimate and the baselines of a supervised model.
_SUPERVISED_ONLY = ("estimation_method", "estimation_ridge", "output_mode",
                    "estimation_difference", "influence_damping",
                    "influence_hessian", "trak_proj_dim")
_SUPERVISED = {
    "defaults": MappingProxyType({"regime": "finetune", "num_subsets": 96,
                                  "num_heldout": 32, "proj_dim": "auto"}),
    "unused": ("shots", "truth_prompts"),
}
# The prompt workloads' shared settings (the ``fixed_size`` protocol).
_ICL_ENTRY = MappingProxyType({
    "defaults": MappingProxyType({"shots": 4, "num_subsets": 80, "num_heldout": 120,
                                  "truth_prompts": 20_000}),
    "preset_defaults": MappingProxyType({"tiny": {"num_subsets": 30,
                                                  "num_heldout": 30}}),
    "unused": ("regime", "drop", "proj_dim", "chunk_size", *_SUPERVISED_ONLY),
    "estimate": _estimate_icl,
})

WORKLOADS: dict[str, WorkloadEntry] = {
    "digits": WorkloadEntry(digits_workload, DIGITS_PRESETS, drop=4, **_SUPERVISED),
    "modular": WorkloadEntry(modular_workload, MODULAR_PRESETS, drop=3,
                             **_SUPERVISED),
    "icl": WorkloadEntry(
        icl_workload, ICL_PRESETS, drop=None, protocol="fixed_size",
        kind=SyntheticICLWorkload, baselines=(),
        **_ICL_ENTRY),
    # The smooth family: in-context regression, where the first-order model of
    # the prediction around the nearest anchor prompt holds.
    "icl_regression": WorkloadEntry(
        icl_regression_workload, ICL_REGRESSION_PRESETS, drop=None,
        protocol="fixed_size", kind=ICLRegressionWorkload, baselines=(),
        **_ICL_ENTRY),
    "rl": WorkloadEntry(
        rl_workload, RL_PRESETS, drop=None, kind=RLWorkload, baselines=(),
        defaults=MappingProxyType({"regime": "finetune", "num_subsets": 60,
                                   "num_heldout": 20, "proj_dim": 128}),
        preset_defaults=MappingProxyType({"tiny": {"num_subsets": 7,
                                                   "num_heldout": 3}}),
        unused=("shots", "truth_prompts", *_SUPERVISED_ONLY), estimate=_estimate_rl),
}
# A SupervisedWorkload instance under a name the registry does not hold.
_INSTANCE = WorkloadEntry(None, {}, drop=3, **_SUPERVISED)


def workload_entry(name: str, workload=None) -> WorkloadEntry:
    """The registry entry a run of workload ``name`` follows.

    Args:
      name: ``config.workload``.
      workload: the workload instance given to the run, if any: an instance of
        the registered kind under a registered name, or any
        :class:`~tasksurrogate_jax.workloads.supervised.SupervisedWorkload`
        (the ``"loo"`` protocol, ``drop`` 3 by default) under another name.
    """
    if workload is None:
        if name not in WORKLOADS:
            raise ValueError(f"workload must be one of {sorted(WORKLOADS)}, got "
                             f"{name!r}.")
        return WORKLOADS[name]
    if name in WORKLOADS and isinstance(workload, WORKLOADS[name].kind):
        return WORKLOADS[name]
    if isinstance(workload, SupervisedWorkload):
        return _INSTANCE
    kinds = sorted({e.kind.__name__ for e in WORKLOADS.values()})
    raise TypeError(
        f"workload must be a SupervisedWorkload, or one of {kinds} under its "
        f"registered name, got {type(workload).__name__} for {name!r}.")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything that determines a run's results (JSON-able).

    Fields left ``None`` take the workload's default
    (:attr:`WorkloadEntry.defaults`; :func:`check_config` fills them in); a
    field the workload does not use (:attr:`WorkloadEntry.unused`) must keep
    its default.

    Attributes:
      workload: a name in :data:`WORKLOADS` (or the name of the workload
        instance given to :func:`run_pipeline`).
      preset: the workload's preset.
      seed: the run's PRNG seed.
      regime: the ground truth's training (``"loo"`` protocol):
        ``"finetune"`` (from ``θ*``, what the first-order estimates
        approximate) or ``"scratch"``.
      replicates: paired replicates of the ground truth (``>= 2``: the ceiling
        is their split-half agreement); for the ``"fixed_size"`` protocol, the
        groups of a sampled truth (unused when every prompt is scored).
      num_subsets: random subsets the surrogates are fit on.
      num_heldout: random subsets held out to evaluate them.
      drop: tasks dropped from each random subset (``"loo"`` protocol; see
        :attr:`WorkloadEntry.drop`).
      shots: tasks in every subset (``"fixed_size"`` protocol: demonstrations
        per prompt, ``>= 2``).
      truth_prompts: the most prompts the ``"fixed_size"`` truth scores: every
        ``shots``-prompt when there are no more, else this many random ones.
      estimation_method: ``"finetune"`` (linearized fine-tuning) or ``"solve"``
        (the convex solve); see :class:`~tasksurrogate_jax.estimation.
        EstimationSettings` for this and the next four fields (supervised
        workloads).
      proj_dim: projection dimension of the estimation: an int, ``"full"``
        (the full parameter space) or ``"auto"`` (supervised workloads'
        default: :meth:`~tasksurrogate_jax.estimation.EstimationSettings.
        resolved_proj_dim`); ``None`` takes the workload's default.
      estimation_ridge: ridge of the convex solve, a number or ``"auto"``.
      output_mode: ``"logits"`` or ``"margin"``.
      estimation_difference: anchor the estimates at one real fine-tuning on
        all tasks.
      cv_method: ``"loo"`` or ``"kfold"`` selection of the kernel's ``(γ, λ)``.
      cv_criterion: ``"mse"`` or ``"spearman"``.
      baselines: names in :data:`BASELINES` to compute (among those the
        workload supports).
      influence_damping: ``λ`` of ``(H + λI)^{-1}``, a number >= 0 or
        ``"auto"`` (:func:`~tasksurrogate_jax.baselines.influence_damping`:
        ``DAMPING_FRACTION`` × the curvature's largest eigenvalue).
      influence_hessian: ``"gauss_newton"`` (positive semi-definite, safe for
        conjugate gradients on non-convex models) or ``"exact"``.
      trak_proj_dim: projection dimension of TRAK's features: an int,
        ``"full"`` (no projection) or ``"auto"``
        (:func:`~tasksurrogate_jax.baselines.trak_proj_dim`). TRAK's damping
        is its ``"auto"``. What each baseline used is in the results'
        ``baseline_settings``.
      value_samples: sampled coalitions for the kernel surrogate's Banzhaf
        values (``"loo"`` protocol; 0 = skip), or sampled contexts of each
        method's fixed-size effects (``"fixed_size"`` protocol; >= 1).
      confidence_level: of the bootstrap intervals.
      bootstrap_resamples: resamples per interval.
      chunk_size: (subset, replicate) rows per retraining chunk (each finished
        chunk is stored).
      overrides: workload configuration fields to change (e.g. ``num_steps``).
    """

    workload: str = "digits"
    preset: str = "cpu"
    seed: int = 0
    regime: str | None = None
    replicates: int = 4
    num_subsets: int | None = None
    num_heldout: int | None = None
    drop: int | None = None
    shots: int | None = None
    truth_prompts: int | None = None
    estimation_method: str = "finetune"
    proj_dim: int | str | None = None
    estimation_ridge: float | str = "auto"
    output_mode: str = "logits"
    estimation_difference: bool = False
    cv_method: str = "loo"
    cv_criterion: str = "spearman"
    baselines: tuple[str, ...] | None = None
    influence_damping: float | str = "auto"
    influence_hessian: str = "gauss_newton"
    trak_proj_dim: int | str = "auto"
    value_samples: int = 1000
    confidence_level: float = 0.95
    bootstrap_resamples: int = 1000
    chunk_size: int = 64
    overrides: tuple[tuple[str, object], ...] = ()

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["baselines"] = None if self.baselines is None else list(self.baselines)
        out["overrides"] = {k: v for k, v in self.overrides}
        return out


def check_config(config: PipelineConfig, *, workload=None) -> PipelineConfig:
    """Validates names and counts; raises ``ValueError`` naming the field.

    Args:
      config: the :class:`PipelineConfig`.
      workload: the workload instance given to the run, if any (see
        :func:`workload_entry`).

    Returns:
      ``config`` with the fields left ``None`` set to the workload's defaults.
    """
    if not isinstance(config, PipelineConfig):
        raise TypeError(
            f"config must be a PipelineConfig, got {type(config).__name__}.")
    entry = workload_entry(config.workload, workload)
    name = config.workload
    if entry is not _INSTANCE and config.preset not in entry.presets:
        raise ValueError(f"preset must be one of {sorted(entry.presets)} for workload "
                         f"{name!r}, got {config.preset!r}.")
    blank = PipelineConfig()
    for field in entry.unused:
        if getattr(config, field) != getattr(blank, field):
            raise ValueError(
                f"{field} does not apply to workload {name!r} ({entry.protocol} "
                f"protocol), got {getattr(config, field)!r}.")
    defaults = {**entry.defaults, **entry.preset_defaults.get(config.preset, {}),
                "baselines": entry.baselines, "drop": entry.drop}
    config = dataclasses.replace(config, **{
        field: value for field, value in defaults.items()
        if getattr(config, field) is None and field not in entry.unused})
    for field in ("seed", "replicates"):
        value = getattr(config, field)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{field} must be an int, got {value!r}.")
    for field, choices in (("cv_method", CV_METHODS),
                           ("cv_criterion", CV_CRITERIA)):
        if getattr(config, field) not in choices:
            raise ValueError(f"{field} must be one of {choices}, got "
                             f"{getattr(config, field)!r}.")
    if config.regime is not None and config.regime not in REGIMES:
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
    unknown = sorted(set(config.baselines) - set(entry.baselines))
    if unknown and not entry.baselines:
        raise ValueError(f"workload {name!r} has no baselines, got {unknown}.")
    if unknown:
        raise ValueError(f"baselines must be among {entry.baselines}, got {unknown}.")
    damping = config.influence_damping
    if not (damping == "auto" or (
            isinstance(damping, (int, float, np.number))
            and not isinstance(damping, bool) and math.isfinite(damping)
            and damping >= 0)):
        raise ValueError("influence_damping must be 'auto' or a finite number >= 0, "
                         f"got {damping!r}.")
    if isinstance(config.trak_proj_dim, str) and config.trak_proj_dim not in (
            "auto", "full"):
        raise ValueError("trak_proj_dim must be a positive int, 'auto' or 'full', "
                         f"got {config.trak_proj_dim!r}.")
    if config.influence_hessian not in baselines.HESSIANS:
        raise ValueError(f"influence_hessian must be one of {baselines.HESSIANS}, "
                         f"got {config.influence_hessian!r}.")
    for field in ("proj_dim", "trak_proj_dim", "chunk_size", "bootstrap_resamples",
                  "truth_prompts"):
        value = getattr(config, field)
        if value is None or (isinstance(value, str) and field.endswith("proj_dim")):
            continue  # names ("auto", "full") are checked where they are used
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{field} must be an int, got {value!r}.")
        if value < 1:
            raise ValueError(f"{field} must be >= 1, got {value}.")
    if entry.estimate is _estimate_rl and not isinstance(config.proj_dim, int):
        raise ValueError(f"proj_dim must be an int for workload {name!r} (its "
                         f"policy-gradient estimate projects), got "
                         f"{config.proj_dim!r}.")
    if config.drop is not None and config.drop < 1:
        raise ValueError(f"drop must be >= 1, got {config.drop}.")
    if config.shots is not None and config.shots < 2:
        raise ValueError(f"shots must be >= 2 (interactions need pairs), got "
                         f"{config.shots}.")
    minimum = 1 if entry.protocol == "fixed_size" else 0
    if config.value_samples < minimum:
        raise ValueError(f"value_samples must be >= {minimum} for the "
                         f"{entry.protocol} protocol, got {config.value_samples}.")
    if not 0.0 < config.confidence_level < 1.0:
        raise ValueError("confidence_level must be in (0, 1), got "
                         f"{config.confidence_level}.")
    if "estimation_method" not in entry.unused:
        try:
            estimation_settings(config)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"estimation settings (estimation_method, proj_dim, "
                f"estimation_ridge, output_mode, estimation_difference): "
                f"{err}") from err
    return config


def estimation_settings(config: PipelineConfig) -> EstimationSettings:
    """The estimation settings of ``config`` (validated)."""
    return EstimationSettings(
        method=config.estimation_method, proj_dim=config.proj_dim,
        output_mode=config.output_mode, ridge=config.estimation_ridge,
        difference=config.estimation_difference)


def _available(config: PipelineConfig, num_tasks: int) -> tuple[int, str]:
    """How many distinct random subsets the config's design has, and what."""
    if config.shots is not None:
        return math.comb(num_tasks, config.shots), (
            f"prompts of {config.shots} of {num_tasks} demonstrations")
    if config.drop is None:
        return 2 ** num_tasks - num_tasks - 2, (
            f"subsets of {num_tasks} tasks neither empty, full nor leave-one-out")
    return math.comb(num_tasks, config.drop), (
        f"subsets dropping {config.drop} of {num_tasks} tasks")


def check_workload_fits(config: PipelineConfig, workload) -> None:
    """The config (checked by :func:`check_config`) must fit the workload: its
    number of tasks and, for prompts, its context."""
    num_tasks = workload.num_tasks
    if config.drop is not None and config.drop >= num_tasks:
        raise ValueError(f"drop must be < the workload's {num_tasks} tasks, got "
                         f"{config.drop}.")
    if config.shots is not None:
        if config.shots >= num_tasks:
            raise ValueError(f"shots must be < the pool of {num_tasks} "
                             f"demonstrations, got {config.shots}.")
        if config.shots > workload.max_demos:
            raise ValueError(f"shots must be <= {workload.max_demos}, the most "
                             "demonstrations a prompt fits in the model's context, "
                             f"got {config.shots}.")
    available, what = _available(config, num_tasks)
    wanted = config.num_subsets + config.num_heldout
    if wanted > available:
        raise ValueError(
            f"num_subsets + num_heldout = {wanted} distinct {what} were asked for, "
            f"but only {available} exist; lower them"
            + (" or change drop." if config.shots is None else "."))
    if (config.shots is not None and available > config.truth_prompts
            and config.truth_prompts < 2 * config.replicates):
        raise ValueError(
            f"truth_prompts must be >= 2 * replicates = {2 * config.replicates} "
            f"when the truth samples prompts (there are {available}), got "
            f"{config.truth_prompts}.")


def make_workload(config: PipelineConfig):
    """The configured workload."""
    return WORKLOADS[config.workload].factory(config.preset, **dict(config.overrides))


def stage_keys(seed: int) -> dict:
    """The PRNG keys of a run's stages: ``{"base", "subsets", "estimated",
    "baselines"}`` (the ``"fixed_size"`` protocol draws its prompts from
    ``"subsets"`` and a sampled truth from ``fold_in(subsets, 1)``)."""
    names = ("base", "subsets", "estimated", "baselines")
    return dict(zip(names, jax.random.split(jax.random.key(seed), 4), strict=True))


# The configuration fields each stage's result depends on. A run folder holds
# one workload identity, the workload's fingerprint included (its data, target
# and programs: refused otherwise, naming what differs); within it, each stage
# is stored under a hash of its own fields, so changing, say, the influence
# damping recomputes the baselines only, and earlier settings stay reusable.
IDENTITY_FIELDS = ("workload", "preset", "seed", "overrides", "fingerprint",
                   "version")
STAGE_FIELDS = {
    "base": (),
    "loo": ("regime", "replicates", "chunk_size"),
    "subsets": ("regime", "replicates", "num_subsets", "num_heldout", "drop",
                "chunk_size"),
    "estimated": ("num_subsets", "num_heldout", "drop", "proj_dim",
                  "estimation_settings"),
    "baselines": ("baselines", "influence_damping", "influence_hessian",
                  "trak_proj_dim"),
}
FIXED_SIZE_STAGE_FIELDS = {
    "prompts": ("shots", "num_subsets", "num_heldout"),
    "truth": ("shots", "truth_prompts", "replicates"),
    "estimated": ("shots", "num_subsets", "num_heldout"),
}
PROTOCOL_STAGES = {"loo": STAGE_FIELDS, "fixed_size": FIXED_SIZE_STAGE_FIELDS}


class _Stages:
    """Stage outputs stored under ``out/stages`` (one npz per finished stage)."""

    def __init__(self, out_dir: Path | None, config: dict, log: Callable,
                 stage_fields: dict):
        self.out_dir, self.config, self.log = out_dir, config, log
        self.stage_fields = stage_fields
        identity = {k: config[k] for k in IDENTITY_FIELDS}
        if out_dir is not None:  # refuses a folder of another workload identity
            try:
                ChunkStore(out_dir / "stages", identity)
            except StoreMismatchError as err:
                raise StoreMismatchError(
                    f"out_dir {str(out_dir)!r} holds a run of another workload, "
                    f"data or program: {err}") from err
        self.seconds: dict[str, float] = {}

    def fields(self, name: str) -> dict:
        """The configuration fields stage ``name`` depends on."""
        return {k: self.config[k] for k in IDENTITY_FIELDS + self.stage_fields[name]}

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

    Above ``surrogates.AUTO_EXACT_MAX_SUBSETS`` subsets the kernel surrogate is
    the Nyström one, its hyperparameters chosen on a held-out fifth
    (``cv_method="loo"``) or by k-fold on the approximate model.

    Returns:
      ``{"linear": LinearSurrogate (least squares), "kernel": KernelSurrogate
      (RBF, (gamma, ridge) cross-validated with ``cv_method`` on
      ``cv_criterion``), "search": HyperparameterSearch}``.
    """
    linear = surrogates.fit_linear_surrogate(fit_masks, fit_scores)
    # The default ridge grids (ridges=None) leave out ridges below the rounding
    # error of the kernel's eigenvalues in the dtype the fit computes in.
    key = jax.random.key(seed)
    if fit_masks.shape[0] > surrogates.AUTO_EXACT_MAX_SUBSETS:
        search = nystrom.select_nystrom_hyperparameters(
            fit_masks, fit_scores, key=key, criterion=cv_criterion,
            method="holdout" if cv_method == "loo" else "kfold")
    else:
        search = surrogates.select_kernel_hyperparameters(
            fit_masks, fit_scores, method=cv_method, criterion=cv_criterion,
            key=key)
    kernel = surrogates.fit_kernel_surrogate(
        fit_masks, fit_scores, gamma=float(search.gamma), ridge=float(search.ridge),
        solver="auto")
    return {"linear": linear, "kernel": kernel, "search": search}


def _effect_metrics(effects, true_effects, config: PipelineConfig,
                    prefix: str) -> dict:
    """Agreement of ``[K, T]`` task effects with the true ones (``prefix``
    ``"loo"`` or ``"effect"``), each Spearman with its interval."""
    pair = {"true_effects": true_effects, "predicted_effects": effects}
    spear = metrics.loo_correlation(**pair, method="spearman")
    pear = metrics.loo_correlation(**pair, method="pearson")
    interval = _interval_settings(config)
    return {f"{prefix}_spearman": float(spear.mean),
            f"{prefix}_spearman_interval": reliability.interval_over_targets(
                np.asarray(spear.per_target), **interval),
            f"{prefix}_spearman_mean_target": float(spear.mean_target),
            f"{prefix}_spearman_mean_target_interval":
                reliability.loo_spearman_interval(effects, true_effects, **interval),
            f"{prefix}_pearson": float(pear.mean),
            f"{prefix}_pearson_mean_target": float(pear.mean_target)}


def _heldout_metrics(surrogate, masks, true_scores, config: PipelineConfig) -> dict:
    predicted = np.asarray(surrogate.predict(masks))
    per_target = np.asarray(metrics.spearman(true_scores, predicted))
    return {"heldout_spearman": float(np.nanmean(per_target)),
            "heldout_spearman_interval": reliability.interval_over_targets(
                per_target, **_interval_settings(config)),
            "heldout_spearman_mean_target": float(metrics.spearman(
                true_scores.mean(1), predicted.mean(1))),
            "normalized_error": float(metrics.pooled_normalized_error(
                true=true_scores, predicted=predicted)),
            "_heldout_predicted_mean": predicted.mean(1)}


def _interval_settings(config: PipelineConfig) -> dict:
    return {"level": config.confidence_level,
            "num_resamples": config.bootstrap_resamples, "seed": config.seed}


class RunScores(NamedTuple):
    """Everything a ``"loo"`` run computes before the surrogates (see
    :func:`collect`).

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
      baseline_settings: ``{name: settings}``, what each baseline used
        (damping, its rule, projection dimension, conjugate-gradient
        residual: ``baselines.InfluenceInfo`` / ``TrakInfo`` as dicts).
    """

    workload: Any
    theta: Any
    loo_scores: np.ndarray
    masks: np.ndarray
    exact: np.ndarray
    estimated: np.ndarray
    baselines: dict
    seconds: dict
    baseline_settings: dict = MappingProxyType({})


class PromptRunScores(NamedTuple):
    """Everything a ``"fixed_size"`` run computes before the surrogates.

    Attributes:
      workload: the workload object.
      masks: ``[num_subsets + num_heldout, K]`` random ``shots``-prompts
        (fitting rows first).
      exact: ``[num_subsets + num_heldout, T]`` their exact scores.
      estimated: ``[num_subsets + num_heldout, T]`` their first-order estimates.
      truth_effects: ``[G, K, T]`` the true fixed-size effects (one group when
        every prompt was scored, else ``replicates`` groups of random prompts);
        the truth is their mean.
      num_truth_prompts: prompts the truth scored.
      truth_exhaustive: whether they were every ``shots``-prompt.
      seconds: ``{stage: seconds}`` (stored stages report their first run).
    """

    workload: Any
    masks: np.ndarray
    exact: np.ndarray
    estimated: np.ndarray
    truth_effects: np.ndarray
    num_truth_prompts: int
    truth_exhaustive: bool
    seconds: dict


def loo_effects(loo_scores) -> np.ndarray:
    """The true leave-one-out effects ``[K, T]``: ``F(1 − e_i) − F(1)`` averaged
    over the replicates of ``loo_scores`` ``[R, K + 1, T]`` (full set first)."""
    loo = np.asarray(loo_scores)
    return (loo[:, 1:] - loo[:, :1]).mean(0)


def loo_protocol_masks(key, config: PipelineConfig, num_tasks: int) -> np.ndarray:
    """The ``"loo"`` protocol's random subsets ``[num_subsets + num_heldout, K]``,
    distinct: each dropping ``config.drop`` tasks, or (``drop=None``) uniform
    over those with 1 to ``K - 2`` tasks."""
    count = config.num_subsets + config.num_heldout
    if config.drop is None:
        masks = size_range_masks(key, count, num_tasks, min_size=1,
                                 max_size=num_tasks - 2, unique=True)
    else:
        masks = fixed_size_masks(key, count, num_tasks,
                                 subset_size=num_tasks - config.drop, unique=True)
    return np.asarray(masks)


def all_fixed_size_masks(num_tasks: int, size: int) -> np.ndarray:
    """Every subset of ``size`` of ``num_tasks`` tasks, ``[C(K, size), K]``, in
    lexicographic order of their tasks."""
    rows = np.array(list(itertools.combinations(range(num_tasks), size)), np.int64)
    masks = np.zeros((len(rows), num_tasks), np.float32)
    np.put_along_axis(masks, rows, 1.0, axis=1)
    return masks


def fixed_size_truth(workload, *, shots: int, max_prompts: int, groups: int,
                     key) -> dict:
    """The ``"fixed_size"`` protocol's ground truth from exact scores.

    Returns:
      ``{"effects": [G, K, T], "num_prompts", "exhaustive"}``: over every
      ``shots``-prompt when there are at most ``max_prompts`` (``G = 1``), else
      over ``max_prompts`` distinct random ones split into ``groups`` equal
      groups (the remainder dropped).
    """
    num_tasks = workload.num_tasks
    exhaustive = math.comb(num_tasks, shots) <= max_prompts
    if exhaustive:
        masks, groups = all_fixed_size_masks(num_tasks, shots), 1
    else:
        masks = np.asarray(fixed_size_masks(key, max_prompts, num_tasks,
                                            subset_size=shots, unique=True))
    scores = np.asarray(workload.exact_scores(masks))
    size = masks.shape[0] // groups
    effects = np.stack([attribution.fixed_size_effects_from_scores(
        masks[g * size:(g + 1) * size], scores[g * size:(g + 1) * size])
        for g in range(groups)])
    return {"effects": effects, "num_prompts": groups * size,
            "exhaustive": exhaustive}


def collect(config: PipelineConfig, *, workload=None, out_dir=None,
            log: Callable = print, progress: bool = True):
    """Runs the expensive stages (stored under ``out_dir``, reused on rerun).

    Args:
      config: the :class:`PipelineConfig`.
      workload: a workload instance (your own
        :class:`~tasksurrogate_jax.workloads.supervised.SupervisedWorkload`, or
        one of a registered workload's kind, e.g. an ``icl_workload`` already
        trained); ``None`` builds ``config.workload`` from :data:`WORKLOADS`.
      out_dir: folder for stored stages and retraining chunks (resume); ``None``
        keeps nothing on disk. A folder of another configuration is refused.
      log: called with one line per stage.
      progress: progress bars on the retraining stages.

    Returns:
      :class:`RunScores` (``"loo"`` protocol) or :class:`PromptRunScores`
      (``"fixed_size"``).
    """
    entry = workload_entry(config.workload, workload)
    config = check_config(config, workload=workload)
    out_dir = None if out_dir is None else Path(out_dir)
    seconds: dict[str, float] = {}
    if workload is None:
        workload = _timed(seconds, "workload", lambda: make_workload(config))
    check_workload_fits(config, workload)
    # Besides the config: what the workload computes, the estimation's settings
    # with the library's defaults filled in, and the library's version.
    identity = {**config.to_json(), "fingerprint": workload.fingerprint(),
                "version": __version__,
                "estimation_settings": None if "estimation_method" in entry.unused
                else dataclasses.asdict(estimation_settings(config))}
    stages = _Stages(out_dir, identity, log, PROTOCOL_STAGES[entry.protocol])
    stages.seconds.update(seconds)
    keys = stage_keys(config.seed)
    if entry.protocol == "fixed_size":
        return _collect_fixed_size(config, entry, workload, stages, keys)
    return _collect_loo(config, entry, workload, stages, keys, progress)


def _collect_loo(config, entry, workload, stages, keys, progress) -> RunScores:
    num_tasks = workload.num_tasks

    def ground_truth(name, masks):
        return {"scores": workload.replicate_scores(
            masks, key=keys["base"], regime=config.regime,
            replicates=config.replicates, base_params=theta,
            store_dir=stages.folder("retraining", name),
            chunk_size=config.chunk_size, progress=progress)}

    # Drawn before any training.
    masks = loo_protocol_masks(keys["subsets"], config, num_tasks)
    like = jax.eval_shape(workload.init_fn, keys["base"])  # structure only
    theta = _params_from_arrays(stages.run(
        "base", lambda: _params_arrays(workload.base_params(key=keys["base"]))), like)
    loo_masks = leave_one_out_masks(num_tasks)
    loo = stages.run("loo", lambda: ground_truth("loo", loo_masks))["scores"]
    exact = stages.run("subsets", lambda: ground_truth("subsets", masks))["scores"]
    estimated = stages.run("estimated", lambda: {"scores": entry.estimate(
        workload, masks, key=keys["estimated"], base_params=theta,
        config=config)})["scores"]

    def compute_baselines():
        out, used = {}, {}
        if not config.baselines:
            return out
        args = (workload.apply_fn, theta, workload.data, workload.target)
        loss_fn = workload.loss_fn
        if "influence" in config.baselines:
            out["influence"], info = baselines.influence_scores(
                *args, loss_fn=loss_fn, damping=config.influence_damping,
                hessian=config.influence_hessian, return_info=True)
            used["influence"] = info._asdict()
        if "tracin" in config.baselines:
            out["tracin"] = baselines.tracin_scores(
                workload.apply_fn, [theta], *args[2:], loss_fn=loss_fn)
        if "trak" in config.baselines:
            proj_dim = None if config.trak_proj_dim == "full" else config.trak_proj_dim
            out["trak"], info = baselines.trak_scores(
                *args, key=keys["baselines"], proj_dim=proj_dim, loss_fn=loss_fn,
                return_info=True)
            used["trak"] = info._asdict()
        # Plain arrays only in a stage: the settings as a JSON string.
        return {**out, BASELINE_SETTINGS: np.asarray(json.dumps(used))}

    baseline_effects = stages.run("baselines", compute_baselines)
    used = json.loads(str(baseline_effects.pop(BASELINE_SETTINGS, "{}")))
    return RunScores(workload, theta, loo, masks, exact, estimated, baseline_effects,
                     stages.seconds, used)


def _collect_fixed_size(config, entry, workload, stages, keys) -> PromptRunScores:
    masks = np.asarray(workload.sample_prompts(
        keys["subsets"], config.num_subsets + config.num_heldout, shots=config.shots))
    exact = stages.run("prompts", lambda: {
        "scores": workload.exact_scores(masks)})["scores"]
    truth = stages.run("truth", lambda: fixed_size_truth(
        workload, shots=config.shots, max_prompts=config.truth_prompts,
        groups=config.replicates, key=jax.random.fold_in(keys["subsets"], 1)))
    estimated = stages.run("estimated", lambda: {"scores": entry.estimate(
        workload, masks, key=keys["estimated"], base_params=None,
        config=config)})["scores"]
    return PromptRunScores(workload, masks, exact, estimated, truth["effects"],
                           int(truth["num_prompts"]), bool(truth["exhaustive"]),
                           stages.seconds)


def _attainable(values: dict) -> dict:
    """``sqrt`` of each ceiling: the most a noise-free method can expect
    against one ground truth (correction for attenuation)."""
    return {k: float(np.sqrt(max(v, 0.0))) for k, v in values.items()}


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
    values = {"loo_spearman_per_target": loo.mean,
              "loo_spearman_mean_target": loo.mean_target,
              "heldout_spearman": held.mean}
    return {**values, "num_replicates": loo.num_replicates,
            "attainable": _attainable(values)}


def fixed_size_ceiling(truth_effects, *, exhaustive: bool, seed: int = 0) -> dict:
    """The ``"fixed_size"`` truth's reliability.

    Args:
      truth_effects: ``[G, K, T]`` the truth's effects per group of prompts.
      exhaustive: whether the truth scored every prompt (``G = 1``).
      seed: of the random splits of the groups.

    Returns:
      ``{"effect_spearman_per_target", "effect_spearman_mean_target",
      "heldout_spearman", "num_replicates", "deterministic", "attainable"}``.
      Exact scores are forward passes, so a truth over every prompt and the
      held-out prompts' scores are deterministic: ceiling 1. A truth over
      sampled prompts has the split-half reliability of its ``G`` groups
      (:func:`~tasksurrogate_jax.reliability.subset_reliability` across tasks).
    """
    effects = np.asarray(truth_effects)
    if exhaustive:
        values = {"effect_spearman_per_target": 1.0,
                  "effect_spearman_mean_target": 1.0}
    else:
        reliable = reliability.subset_reliability(effects, seed=seed)
        values = {"effect_spearman_per_target": reliable.mean,
                  "effect_spearman_mean_target": reliable.mean_target}
    values["heldout_spearman"] = 1.0
    return {**values, "num_replicates": int(effects.shape[0]),
            "deterministic": bool(exhaustive), "attainable": _attainable(values)}


def _fit_exact_and_estimated(config, masks, exact, estimated, timed) -> dict:
    """:func:`fit_surrogates` on the exact and on the estimated scores of the
    fitting rows: ``{"exact": ..., "estimated": ...}``."""
    m = config.num_subsets
    cv = {"cv_method": config.cv_method, "cv_criterion": config.cv_criterion,
          "seed": config.seed}
    return timed("surrogates", lambda: {
        "exact": fit_surrogates(masks[:m], exact[:m], **cv),
        "estimated": fit_surrogates(masks[:m], estimated[:m], **cv)})


def _estimation_errors(true_scores, estimated, truth: str) -> dict:
    """The estimates' errors against the ground truth of the same subsets."""
    return {
        "truth": truth,
        # Median, NaNs left out: a target the model fits perfectly has F = 0
        # in float32 (and F̂ = 0 gives 0 / 0).
        "median_relative_error": float(np.nanmedian(
            metrics.relative_error(true=true_scores, predicted=estimated))),
        "mean_target_relative_error": float(np.mean(metrics.relative_error(
            true=true_scores.mean(1), predicted=estimated.mean(1)))),
        "spearman_across_subsets": float(metrics.mean_spearman(true_scores,
                                                               estimated)),
        "spearman_mean_target": float(metrics.spearman(true_scores.mean(1),
                                                       estimated.mean(1))),
    }


def _resolved_proj_dim(config: PipelineConfig, entry: WorkloadEntry, theta):
    """The estimation's projection dimension as run: an int, or ``"full"``."""
    if entry.estimate is not _estimate_supervised:
        return config.proj_dim
    resolved = estimation_settings(config).resolved_proj_dim(
        num_parameters(theta))
    return "full" if resolved is None else resolved


def _hyperparameters(fits: dict) -> dict:
    return {scores_name: {"gamma": float(f["search"].gamma),
                          "ridge": float(f["search"].ridge)}
            for scores_name, f in fits.items()}


def evaluate(config: PipelineConfig, run) -> dict:
    """Surrogates, attribution and metrics from collected scores (cheap).

    Args:
      config: the run's :class:`PipelineConfig`.
      run: what :func:`collect` returned (or your own :class:`RunScores` /
        :class:`PromptRunScores`, e.g. with more methods in ``baselines``).

    Returns:
      A dict with ``config``, ``protocol``, ``task_names``,
      ``target_description``, ``ceiling`` (:func:`ceiling` or
      :func:`fixed_size_ceiling`), ``methods`` (per method: ``effects`` ``[K]``
      on the mean target, their Spearman/Pearson with the true effects per
      target and on the mean target, and held-out Spearman and normalized error
      for surrogates; each Spearman with its bootstrap ``*_interval``; keys
      ``loo_*`` for the ``"loo"`` protocol, ``effect_*`` for
      ``"fixed_size"``), ``true_effects`` ``[K]``, ``interactions`` ``[K, K]``
      (kernel surrogate on exact scores, mean target), ``heldout`` (true and
      predicted mean-target scores), ``estimation`` (errors of the estimates
      against the ground truth), ``surrogate_hyperparameters`` and ``seconds``
      per stage; ``"loo"`` runs add ``regime`` and ``full_set_loss``,
      ``"fixed_size"`` runs ``shots``, ``truth`` and ``mean_prompt_loss``.
    """
    entry = workload_entry(config.workload, run.workload)
    if entry.protocol == "fixed_size":
        return _evaluate_fixed_size(check_config(config, workload=run.workload), run)
    if config.drop is None and entry.drop is not None:
        # The run's masks say what was dropped.
        config = dataclasses.replace(
            config, drop=int(run.masks.shape[1] - run.masks[0].sum()))
    config = check_config(config, workload=run.workload)
    seconds = dict(run.seconds)

    def timed(name, compute):
        return _timed(seconds, name, compute)

    m = config.num_subsets
    loo = np.asarray(run.loo_scores)
    true_effects = loo_effects(loo)  # [K, T]
    exact = np.asarray(run.exact).mean(0)
    estimated = np.asarray(run.estimated)
    heldout_masks = run.masks[m:]
    fits = _fit_exact_and_estimated(config, run.masks, exact, estimated, timed)

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
                             **_effect_metrics(effects, true_effects, config, "loo"),
                             **held}
    for name, effects in run.baselines.items():
        methods[name] = {"effects": effects.mean(1),
                         **_effect_metrics(effects, true_effects, config, "loo")}

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
            **_effect_metrics(banzhaf, true_effects, config, "loo")}
    reliable = timed("ceiling", lambda: ceiling(loo, np.asarray(run.exact)[:, m:],
                                                seed=config.seed))
    workload = run.workload
    return {
        "config": config.to_json(),
        "protocol": entry.protocol,
        "registered": entry is not _INSTANCE,
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
        "estimation": {**_estimation_errors(exact[:m], estimated[:m],
                                            f"{config.regime} ground truth"),
                       "proj_dim": _resolved_proj_dim(config, entry, run.theta)},
        "surrogate_hyperparameters": _hyperparameters(fits),
        "baseline_settings": dict(run.baseline_settings),
        "seconds": seconds,
    }


def _evaluate_fixed_size(config: PipelineConfig, run: PromptRunScores) -> dict:
    seconds = dict(run.seconds)

    def timed(name, compute):
        return _timed(seconds, name, compute)

    m, shots = config.num_subsets, config.shots
    exact, estimated = np.asarray(run.exact), np.asarray(run.estimated)
    true_effects = np.asarray(run.truth_effects).mean(0)  # [K, T]
    heldout_masks, heldout_true = run.masks[m:], exact[m:]
    fits = _fit_exact_and_estimated(config, run.masks, exact, estimated, timed)
    key = jax.random.key(config.seed)
    methods, heldout_predicted = {}, {}

    def read_effects():
        for scores_name, fitted in fits.items():
            for kind in ("linear", "kernel"):
                surrogate = fitted[kind]
                name = f"{kind} surrogate ({scores_name})"
                effects = np.asarray(attribution.fixed_size_effects(
                    surrogate, key=jax.random.fold_in(key, 9), size=shots,
                    num_samples=config.value_samples))
                held = _heldout_metrics(surrogate, heldout_masks, heldout_true,
                                        config)
                heldout_predicted[name] = held.pop("_heldout_predicted_mean")
                methods[name] = {
                    "effects": effects.mean(1),
                    **_effect_metrics(effects, true_effects, config, "effect"),
                    **held}

    timed("attribution_values", read_effects)
    interactions = timed("attribution", lambda: np.asarray(
        attribution.fixed_size_interactions(
            fits["exact"]["kernel"], key=jax.random.fold_in(key, 10),
            size=shots)).mean(-1))
    reliable = timed("ceiling", lambda: fixed_size_ceiling(
        run.truth_effects, exhaustive=run.truth_exhaustive, seed=config.seed))
    truth = (f"forward passes of all {run.num_truth_prompts} {shots}-prompts"
             if run.truth_exhaustive else
             f"forward passes of {run.num_truth_prompts} random {shots}-prompts in "
             f"{config.replicates} groups")
    workload = run.workload
    return {
        "config": config.to_json(),
        "protocol": "fixed_size",
        "shots": shots,
        "truth": truth,
        "task_names": list(workload.task_names),
        "target_description": workload.target_description,
        "num_targets": int(workload.num_targets),
        "mean_prompt_loss": float(exact.mean()),
        "ceiling": reliable,
        "true_effects": true_effects.mean(1),
        "methods": methods,
        "interactions": interactions,
        "heldout": {"true": heldout_true.mean(1), "predicted": heldout_predicted},
        "estimation": _estimation_errors(exact[:m], estimated[:m], "forward passes"),
        "surrogate_hyperparameters": _hyperparameters(fits),
        "seconds": seconds,
    }


def run_pipeline(config: PipelineConfig, *, workload=None, out_dir=None,
                 log: Callable = print, progress: bool = True) -> dict:
    """:func:`collect` then :func:`evaluate`: the results dict of a whole run.

    Pass ``workload`` to run on your own workload instance (``config.workload``
    then only names it, unless it is registered and the instance of its kind).
    Compiled programs are kept on disk for the next run
    (:func:`~tasksurrogate_jax.compilation.enable_compilation_cache`; opt out
    with ``TASKSURROGATE_COMPILATION_CACHE=0``). With ``out_dir``, the results
    are also written to ``out_dir/results.json``
    (:func:`~tasksurrogate_jax.report.write_json`; the plots are
    :func:`~tasksurrogate_jax.report.write_report`'s).
    """
    config = check_config(config, workload=workload)
    enable_compilation_cache()
    results = evaluate(config, collect(config, workload=workload, out_dir=out_dir,
                                       log=log, progress=progress))
    if out_dir is not None:
        write_json(results, Path(out_dir) / "results.json")
    return results


__all__ = ["BASELINES", "FIXED_SIZE_STAGE_FIELDS", "PROTOCOL_STAGES",
           "STAGE_FIELDS", "WORKLOADS", "PipelineConfig", "PromptRunScores",
           "RunScores", "WorkloadEntry", "all_fixed_size_masks", "ceiling",
           "check_config", "check_workload_fits", "collect", "evaluate",
           "fixed_size_ceiling", "fixed_size_truth", "loo_effects",
           "loo_protocol_masks", "make_workload", "run_pipeline", "stage_keys",
           "workload_entry"]
