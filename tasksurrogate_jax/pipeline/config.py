"""The pipeline's configuration: :class:`PipelineConfig`, validated when
built, and made concrete for a workload (its defaults, what applies to it,
what fits it)."""

from __future__ import annotations

import dataclasses
import math
from types import MappingProxyType

import numpy as np

from tasksurrogate_jax.estimate import baselines
from tasksurrogate_jax.estimate.estimation import full_space_finetune
from tasksurrogate_jax.workloads.base import REGIMES, Workload

BASELINES = baselines.BASELINES
BASELINE_SETTINGS = "_settings"
CV_METHODS = ("loo", "kfold")
CV_CRITERIA = ("spearman", "mse")
PROTOCOLS = ("loo", "fixed_size", "pairs")
DESIGNS = ("fixed", "uniform", "bernoulli")
# The field of each design's one parameter, and a default where a workload
# declares none.
DESIGN_FIELDS = MappingProxyType({"drop": "fixed", "keep": "bernoulli"})
DESIGN_FALLBACKS = MappingProxyType({"keep": 0.7})
# Counts a config may leave None (the workload's default).
OPTIONAL_COUNTS = ("replicates", "num_subsets", "num_heldout", "drop", "shots",
                   "truth_prompts")
# Replicates when neither the config nor the workload sets them: a pair
# interaction is a second difference of four scores, noisier than a LOO effect
# (digits "cpu", per-target interaction ceiling 0.680 with 4 replicates, 0.790
# with 8), so the "pairs" protocol takes twice as many.
DEFAULT_REPLICATES = 4
PAIRS_REPLICATES = 8
# PipelineConfig fields that set the workload's estimation settings, and the
# field of the settings each sets (a field the workload's settings lack does
# not apply to it).
ESTIMATION_FIELDS = MappingProxyType({
    "estimation_method": "method", "proj_dim": "proj_dim",
    "estimation_ridge": "ridge", "output_mode": "output_mode",
    "estimation_difference": "difference"})
# Fields only some protocols use (the others' must keep their defaults).
PROTOCOL_ONLY_FIELDS = MappingProxyType({
    "loo": ("regime", "design", "drop", "keep", "chunk_size"),
    "fixed_size": ("shots", "truth_prompts"),
    "pairs": ("max_pairs",)})
# The protocols a workload's own protocol can run ("pairs" extends "loo").
RUNNABLE_PROTOCOLS = MappingProxyType({"loo": ("loo", "pairs"),
                                       "fixed_size": ("fixed_size",)})
BASELINE_FIELDS = ("influence_damping", "influence_hessian", "trak_proj_dim")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything that determines a run's results (JSON-able), validated when
    it is built (a bad field raises, naming it).

    Fields left ``None`` take the workload's default (its
    ``pipeline_defaults``: :func:`check_config` fills them in); a field the
    workload does not use must keep its default.

    Attributes:
      workload: the workload's name: a bundled one
        (:data:`~tasksurrogate_jax.workloads.registry.WORKLOADS`), or any name
        for the workload instance given to :func:`run_pipeline`.
      preset: the bundled workload's preset (recorded only, for an instance).
      seed: the run's PRNG seed.
      protocol: ``None`` runs the workload's own protocol; ``"pairs"`` (a
        :class:`~tasksurrogate_jax.workloads.base.LeaveOneOutWorkload`) adds
        a pair-removal ground truth of the interactions to ``"loo"``: every
        ``F(full − i − j)`` in the same paired replicates (see
        :mod:`tasksurrogate_jax.downstream.interactions`), and each method's
        interactions compared with it beside its ceiling.
      regime: the ground truth's training (``"loo"`` protocol):
        ``"finetune"`` (from ``θ*``, what the first-order estimates
        approximate) or ``"scratch"``.
      replicates: paired replicates of the ground truth (``>= 2``: the ceiling
        is their split-half agreement); for the ``"fixed_size"`` protocol, the
        groups of a sampled truth (unused when every prompt is scored).
        ``None``: the workload's default, else :data:`PAIRS_REPLICATES` (8)
        with ``protocol="pairs"`` and :data:`DEFAULT_REPLICATES` (4) otherwise.
      num_subsets: random subsets the surrogates are fit on.
      num_heldout: random subsets held out to evaluate them.
      design: the random subsets of the ``"loo"`` protocol: ``"fixed"``
        (each drops ``drop`` tasks), ``"uniform"`` (uniform over the subsets
        neither empty, full nor leave-one-out) or ``"bernoulli"`` (each task
        kept with probability ``keep``; never empty). Subsets of mixed sizes
        identify pairwise interactions that a fixed size cannot (see
        ``benchmarks/bench_interactions.py``).
      drop: tasks dropped from each random subset (``design="fixed"``).
      keep: the keep probability of ``design="bernoulli"``, in (0, 1)
        (``None``: the workload's, else 0.7).
      shots: tasks in every subset (``"fixed_size"`` protocol: demonstrations
        per prompt, ``>= 2``).
      truth_prompts: the most prompts the ``"fixed_size"`` truth scores: every
        ``shots``-prompt when there are no more, else this many random ones.
      estimation_method: the first-order estimate's method (supervised:
        ``"finetune"``, linearized fine-tuning, or ``"solve"``, the convex
        solve; RL: ``"pg"`` or ``"awr"``). This and the next four fields set
        the workload's estimation settings (:data:`ESTIMATION_FIELDS`: its
        :class:`~tasksurrogate_jax.estimate.estimation.EstimationSettings` or
        :class:`~tasksurrogate_jax.workloads.rl.RLEstimation`); ``None``
        keeps the workload's.
      proj_dim: the estimate's projection dimension: an int, ``"full"`` (no
        projection) or ``"auto"`` (the full space up to 100,000 parameters).
      estimation_ridge: the ridge of the convex solve, a number or ``"auto"``
        (RL: of the policy-gradient step).
      output_mode: ``"logits"`` or ``"margin"`` (supervised).
      estimation_difference: anchor the estimates at one real fine-tuning on
        all tasks (supervised).
      cv_method: ``"loo"`` or ``"kfold"`` selection of the kernel's ``(γ, λ)``.
      cv_criterion: ``"mse"`` (default) or ``"spearman"`` (see
        :func:`~tasksurrogate_jax.core.surrogates.select_kernel_hyperparameters`:
        a rank criterion keeps large ridges that flatten the interactions).
      baselines: names in :data:`BASELINES` to compute (among the workload's
        ``baselines``; ``None``: all of them).
      influence_damping: λ of influence, a number >= 0 or ``"auto"`` (0.05 ×
        the curvature's largest eigenvalue). This and the next two fields are
        the baselines' :class:`~tasksurrogate_jax.estimate.baselines.BaselineSettings`;
        what each baseline used is in the results' ``baseline_settings``.
      influence_hessian: ``"gauss_newton"`` or ``"exact"``.
      trak_proj_dim: TRAK's projection dimension: an int, ``"full"`` or
        ``"auto"`` (``min(p, 8 n C_h, 8192)``).
      value_samples: sampled coalitions for the kernel surrogate's Banzhaf
        values (``"loo"`` protocol; 0 = skip), or sampled contexts of each
        method's fixed-size effects (``"fixed_size"`` protocol; >= 1).
      confidence_level: of the bootstrap intervals.
      bootstrap_resamples: resamples per interval.
      chunk_size: (subset, replicate) rows per retraining chunk (each finished
        chunk is stored).
      max_pairs: the ``"pairs"`` protocol retrains every pair when there are at
        most this many, else this many random pairs.
      overrides: configuration fields of the bundled workload's preset to
        change (e.g. ``num_steps``).
    """

    workload: str = "digits"
    preset: str = "cpu"
    seed: int = 0
    protocol: str | None = None
    regime: str | None = None
    replicates: int | None = None
    num_subsets: int | None = None
    num_heldout: int | None = None
    design: str | None = None
    drop: int | None = None
    keep: float | None = None
    shots: int | None = None
    truth_prompts: int | None = None
    estimation_method: str | None = None
    proj_dim: int | str | None = None
    estimation_ridge: float | str | None = None
    output_mode: str | None = None
    estimation_difference: bool | None = None
    cv_method: str = "loo"
    cv_criterion: str = "mse"
    baselines: tuple[str, ...] | None = None
    influence_damping: float | str = "auto"
    influence_hessian: str = "gauss_newton"
    trak_proj_dim: int | str = "auto"
    value_samples: int = 1000
    confidence_level: float = 0.95
    bootstrap_resamples: int = 1000
    chunk_size: int = 64
    max_pairs: int = 190
    overrides: tuple[tuple[str, object], ...] = ()

    def __post_init__(self):
        for field in ("workload", "preset"):
            if not isinstance(getattr(self, field), str):
                raise TypeError(f"{field} must be a str, got "
                                f"{getattr(self, field)!r}.")
        if self.protocol not in (None, *PROTOCOLS):
            raise ValueError(f"protocol must be None or one of {PROTOCOLS}, got "
                             f"{self.protocol!r}.")
        minimums = {"seed": None, "replicates": 2, "num_subsets": 4, "max_pairs": 3,
                    "num_heldout": 3, "drop": 1, "shots": 2, "truth_prompts": 1,
                    "value_samples": 0, "bootstrap_resamples": 1, "chunk_size": 1}
        why = {"replicates": " (a ceiling needs at least 2 replicates)",
               "num_subsets": " (to fit and cross-validate the surrogates)",
               "num_heldout": " (for a held-out Spearman)",
               "shots": " (interactions need pairs)"}
        for field, minimum in minimums.items():
            value = getattr(self, field)
            if value is None and field in OPTIONAL_COUNTS:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{field} must be an int, got {value!r}.")
            if minimum is not None and value < minimum:
                raise ValueError(f"{field} must be >= {minimum}{why.get(field, '')}, "
                                 f"got {value}.")
        for field, choices in (("cv_method", CV_METHODS),
                               ("cv_criterion", CV_CRITERIA)):
            if getattr(self, field) not in choices:
                raise ValueError(f"{field} must be one of {choices}, got "
                                 f"{getattr(self, field)!r}.")
        if self.design is not None and self.design not in DESIGNS:
            raise ValueError(f"design must be one of {DESIGNS}, got {self.design!r}.")
        if self.keep is not None and not (
                isinstance(self.keep, (float, int)) and not isinstance(self.keep, bool)
                and 0.0 < self.keep < 1.0):
            raise ValueError(f"keep must be in (0, 1), got {self.keep!r}.")
        if self.regime is not None and self.regime not in REGIMES:
            raise ValueError(f"regime must be one of {REGIMES}, got {self.regime!r}.")
        if self.baselines is not None:
            if isinstance(self.baselines, str) or not all(
                    isinstance(b, str) for b in self.baselines):
                raise TypeError("baselines must be a tuple of names, got "
                                f"{self.baselines!r}.")
            unknown = sorted(set(self.baselines) - set(BASELINES))
            if unknown:
                raise ValueError(f"baselines must be among {BASELINES}, got "
                                 f"{unknown}.")
        self.baseline_settings()  # validates the baselines' fields
        if not (isinstance(self.confidence_level, (float, int))
                and 0.0 < self.confidence_level < 1.0):
            raise ValueError("confidence_level must be in (0, 1), got "
                             f"{self.confidence_level}.")
        if not isinstance(self.overrides, tuple) or not all(
                isinstance(o, tuple) and len(o) == 2 and isinstance(o[0], str)
                for o in self.overrides):
            raise TypeError("overrides must be a tuple of (field, value) pairs, got "
                            f"{self.overrides!r}.")

    def baseline_settings(self) -> baselines.BaselineSettings:
        """The baselines' settings (validated)."""
        return baselines.BaselineSettings(
            influence_damping=self.influence_damping,
            influence_hessian=self.influence_hessian,
            trak_proj_dim=self.trak_proj_dim)

    def estimation_changes(self) -> dict:
        """``{settings field: value}`` of the estimation fields set (not
        ``None``)."""
        return {setting: getattr(self, field)
                for field, setting in ESTIMATION_FIELDS.items()
                if getattr(self, field) is not None}

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["baselines"] = None if self.baselines is None else list(self.baselines)
        out["overrides"] = {k: v for k, v in self.overrides}
        return out


def check_applies(config: PipelineConfig, workload: Workload | type[Workload],
                  ) -> None:
    """Every field ``config`` sets must apply to ``workload`` (an instance, or
    its class: what it declares at class level is enough): the other
    protocol's fields, estimation fields its settings lack (their values are
    checked too) and baseline fields without baselines keep their defaults.
    Raises ``ValueError`` naming the field."""
    name, own = config.workload, workload.protocol
    if own not in RUNNABLE_PROTOCOLS:
        raise ValueError(f"a workload's protocol must be one of "
                         f"{tuple(RUNNABLE_PROTOCOLS)}, got {own!r}: implement "
                         "LeaveOneOutWorkload or FixedSizeWorkload.")
    protocol = run_protocol(config, workload)
    blank = PipelineConfig()

    def must_keep_default(field, why):
        if getattr(config, field) != getattr(blank, field):
            raise ValueError(f"{field} does not apply to workload {name!r} ({why}), "
                             f"got {getattr(config, field)!r}.")

    used = {field for p in (own, protocol) for field in PROTOCOL_ONLY_FIELDS[p]}
    for fields in PROTOCOL_ONLY_FIELDS.values():
        for field in set(fields) - used:
            must_keep_default(field, f"{protocol} protocol")
    supported = tuple(workload.baselines) if own == "loo" else ()
    if not supported:
        for field in BASELINE_FIELDS:
            must_keep_default(field, "it has no baselines")
    unknown = sorted(set(config.baselines or ()) - set(supported))
    if unknown:
        raise ValueError(f"workload {name!r} has no baselines, got {unknown}."
                         if not supported else
                         f"baselines must be among {supported}, got {unknown}.")
    changes = config.estimation_changes()
    settings = workload.estimation
    names = set() if settings is None else {
        f.name for f in dataclasses.fields(settings)}
    for field, setting in ESTIMATION_FIELDS.items():
        if setting in changes and setting not in names:
            must_keep_default(field, "it has no estimation settings"
                              if settings is None else
                              f"its {type(settings).__name__} has no {setting!r}")
    if changes:
        try:
            dataclasses.replace(settings, **_path_points_reset(settings, changes))
        except (TypeError, ValueError) as err:
            fields = [f for f, s in ESTIMATION_FIELDS.items() if s in changes]
            raise ValueError(f"estimation settings ({', '.join(fields)}): "
                             f"{err}") from err


def run_protocol(config: PipelineConfig, workload: Workload | type[Workload]) -> str:
    """The protocol a run of ``config`` follows: ``config.protocol``, or the
    workload's own; ``ValueError`` where the workload cannot run it."""
    own = workload.protocol
    protocol = own if config.protocol is None else config.protocol
    if protocol not in RUNNABLE_PROTOCOLS.get(own, ()):
        raise ValueError(f"protocol {protocol!r} does not apply to workload "
                         f"{config.workload!r} ({own} protocol; it runs "
                         f"{RUNNABLE_PROTOCOLS.get(own, ())}).")
    return protocol


def check_config(config: PipelineConfig, workload: Workload) -> PipelineConfig:
    """``config`` made concrete for ``workload``: the fields it leaves ``None``
    set to the workload's ``pipeline_defaults``; raises ``ValueError`` naming
    a field that does not apply to the workload (:func:`check_applies`) or
    does not fit it."""
    if not isinstance(config, PipelineConfig):
        raise TypeError(
            f"config must be a PipelineConfig, got {type(config).__name__}.")
    if not isinstance(workload, Workload):
        raise TypeError(
            "workload must implement a workload contract (a subclass of "
            "tasksurrogate_jax.workloads.base.LeaveOneOutWorkload or "
            f"FixedSizeWorkload), got {type(workload).__name__}.")
    check_applies(config, workload)
    defaults = {**workload.pipeline_defaults,
                "baselines": tuple(getattr(workload, "baselines", ()))}
    config = dataclasses.replace(config, **{
        field: value for field, value in defaults.items()
        if getattr(config, field) is None and field not in DESIGN_FIELDS})
    if config.replicates is None:
        config = dataclasses.replace(config, replicates=PAIRS_REPLICATES if (
            config.protocol == "pairs") else DEFAULT_REPLICATES)
    if workload.protocol == "loo":
        config = _check_design(config, defaults)
    needed = ["num_subsets", "num_heldout"] + (
        ["shots", "truth_prompts"] if workload.protocol == "fixed_size"
        else ["regime", "design"] + (["drop"] if config.design == "fixed" else []))
    missing = [field for field in needed if getattr(config, field) is None]
    if missing:
        raise ValueError(f"{missing} must be set: workload {config.workload!r} has "
                         "no default for them (its pipeline_defaults).")
    if workload.protocol == "fixed_size" and config.value_samples < 1:
        raise ValueError("value_samples must be >= 1 for the fixed_size protocol, "
                         f"got {config.value_samples}.")
    _check_fits(config, workload)
    return config


def _check_design(config: PipelineConfig, defaults) -> PipelineConfig:
    """``drop`` with ``design="fixed"`` only, ``keep`` with ``"bernoulli"``
    only; the one that applies filled in from ``defaults`` (the workload's)."""
    for field, design in DESIGN_FIELDS.items():
        if config.design == design:
            if getattr(config, field) is None:
                value = defaults.get(field, DESIGN_FALLBACKS.get(field))
                config = dataclasses.replace(config, **{field: value})
        elif getattr(config, field) is not None:
            raise ValueError(f"{field} applies to design {design!r} only, got "
                             f"{field}={getattr(config, field)} with design "
                             f"{config.design!r}.")
    return config


def configured_workload(config: PipelineConfig, workload: Workload) -> Workload:
    """``workload`` with the config's estimation fields applied to its
    estimation settings (:func:`check_applies` first). An
    ``estimation_method`` or ``proj_dim`` that leaves full-space linearized
    fine-tuning also sets ``linearization_points`` to 1 (``θ*`` only)."""
    check_applies(config, workload)
    changes = config.estimation_changes()
    if not changes:
        return workload
    return workload.with_estimation(dataclasses.replace(
        workload.estimation, **_path_points_reset(workload.estimation, changes)))


def _path_points_reset(settings, changes: dict) -> dict:
    """``changes``, with ``linearization_points=1`` added where they take
    ``settings`` (points on the fine-tuning path) out of full-space
    linearized fine-tuning: another estimator linearizes at ``θ*`` only."""
    if getattr(settings, "linearization_points", 1) == 1 or full_space_finetune(
            changes.get("method", settings.method),
            changes.get("proj_dim", settings.proj_dim), settings.projection):
        return changes
    return {**changes, "linearization_points": 1}


def _available(config: PipelineConfig, num_tasks: int) -> tuple[int, str]:
    """How many distinct random subsets the config's design has, and what."""
    if config.shots is not None:
        return math.comb(num_tasks, config.shots), (
            f"prompts of {config.shots} of {num_tasks} demonstrations")
    if config.design == "uniform":
        return 2 ** num_tasks - num_tasks - 2, (
            f"subsets of {num_tasks} tasks neither empty, full nor leave-one-out")
    if config.design == "bernoulli":
        return 2 ** num_tasks - 1, f"non-empty subsets of {num_tasks} tasks"
    return math.comb(num_tasks, config.drop), (
        f"subsets dropping {config.drop} of {num_tasks} tasks")


def _check_fits(config: PipelineConfig, workload: Workload) -> None:
    """The config must fit the workload: its number of tasks and, for
    prompts, its context."""
    num_tasks = workload.num_tasks
    if config.design == "fixed" and config.drop >= num_tasks:
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


def make_workload(config: PipelineConfig) -> Workload:
    """The bundled workload ``config`` names (its preset and overrides)."""
    from tasksurrogate_jax.workloads import registry  # the names, not the contract

    return registry.make_workload(config.workload, config.preset,
                                  dict(config.overrides))


