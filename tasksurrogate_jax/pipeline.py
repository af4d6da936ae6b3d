"""One end-to-end attribution run on a workload, resumable from its folder.

The pipeline takes any workload that implements one of the contracts of
:mod:`tasksurrogate_jax.workloads.base` and runs the protocol it names
(``workload.protocol``, a key of :data:`PROTOCOL_STAGES`); it knows no
workload by name (the bundled ones are built by
:mod:`tasksurrogate_jax.workloads.registry`).

``"loo"`` (:class:`~tasksurrogate_jax.workloads.base.LeaveOneOutWorkload`:
digits, modular, rl, your own supervised model): the ground truth is leave-one-out from the
full set. Stages (each timed; the expensive ones stored as they finish and
reused by a rerun with the same configuration):

1. ``base``: ``θ*``, the model trained on all tasks.
2. ``loo``: the ground truth of the full set and of every leave-one-out set,
   ``[R, K + 1, T]``: ``R`` paired replicates in the configured regime
   (``"finetune"`` from ``θ*`` or ``"scratch"``); the effects are
   ``F(1 − e_i) − F(1)`` averaged over replicates.
3. ``subsets``: ``num_subsets + num_heldout`` distinct random subsets of the
   config's ``design`` (``"fixed"``: each drops ``drop`` tasks; ``"uniform"``,
   the RL workload's default: uniform over the subsets neither empty, full nor
   leave-one-out; ``"bernoulli"``: each task kept with probability ``keep``);
   their ground truth ``[R, m, T]`` in the same regime, from training streams
   independent of the ``loo`` stage's (the surrogates never see the LOO
   truth's noise, so they are bounded by its ceiling like any method).
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
    interactions,
    metrics,
    nystrom,
    reliability,
    surrogates,
)
from tasksurrogate_jax.compilation import enable_compilation_cache
from tasksurrogate_jax.report import write_json
from tasksurrogate_jax.store import ChunkStore, StoreMismatchError, config_hash
from tasksurrogate_jax.subsets import (
    bernoulli_masks,
    fixed_size_masks,
    leave_one_out_masks,
    size_range_masks,
)
from tasksurrogate_jax.workloads.base import (
    FixedSizeWorkload,
    LeaveOneOutWorkload,
    Workload,
)
from tasksurrogate_jax.workloads.supervised import REGIMES

BASELINES = baselines.BASELINES
BASELINE_SETTINGS = "_settings"
CV_METHODS = ("loo", "kfold")
CV_CRITERIA = ("spearman", "mse")
PROTOCOLS = ("loo", "fixed_size", "pairs")
DESIGNS = ("fixed", "uniform", "bernoulli")
# Counts a config may leave None (the workload's default).
OPTIONAL_COUNTS = ("num_subsets", "num_heldout", "drop", "shots", "truth_prompts")
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
        :mod:`tasksurrogate_jax.interactions`), and each method's
        interactions compared with it beside its ceiling.
      regime: the ground truth's training (``"loo"`` protocol):
        ``"finetune"`` (from ``θ*``, what the first-order estimates
        approximate) or ``"scratch"``.
      replicates: paired replicates of the ground truth (``>= 2``: the ceiling
        is their split-half agreement); for the ``"fixed_size"`` protocol, the
        groups of a sampled truth (unused when every prompt is scored).
      num_subsets: random subsets the surrogates are fit on.
      num_heldout: random subsets held out to evaluate them.
      design: the random subsets of the ``"loo"`` protocol: ``"fixed"``
        (each drops ``drop`` tasks), ``"uniform"`` (uniform over the subsets
        neither empty, full nor leave-one-out) or ``"bernoulli"`` (each task
        kept with probability ``keep``; never empty). Subsets of mixed sizes
        identify pairwise interactions that a fixed size cannot (see
        ``benchmarks/bench_interactions.py``).
      drop: tasks dropped from each random subset (``design="fixed"``).
      keep: the keep probability of ``design="bernoulli"``, in (0, 1).
      shots: tasks in every subset (``"fixed_size"`` protocol: demonstrations
        per prompt, ``>= 2``).
      truth_prompts: the most prompts the ``"fixed_size"`` truth scores: every
        ``shots``-prompt when there are no more, else this many random ones.
      estimation_method: the first-order estimate's method (supervised:
        ``"finetune"``, linearized fine-tuning, or ``"solve"``, the convex
        solve; RL: ``"pg"`` or ``"awr"``). This and the next four fields set
        the workload's estimation settings (:data:`ESTIMATION_FIELDS`: its
        :class:`~tasksurrogate_jax.estimation.EstimationSettings` or
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
      cv_criterion: ``"mse"`` or ``"spearman"``.
      baselines: names in :data:`BASELINES` to compute (among the workload's
        ``baselines``; ``None``: all of them).
      influence_damping: λ of influence, a number >= 0 or ``"auto"`` (0.05 ×
        the curvature's largest eigenvalue). This and the next two fields are
        the baselines' :class:`~tasksurrogate_jax.baselines.BaselineSettings`;
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
    replicates: int = 4
    num_subsets: int | None = None
    num_heldout: int | None = None
    design: str | None = None
    drop: int | None = None
    keep: float = 0.7
    shots: int | None = None
    truth_prompts: int | None = None
    estimation_method: str | None = None
    proj_dim: int | str | None = None
    estimation_ridge: float | str | None = None
    output_mode: str | None = None
    estimation_difference: bool | None = None
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
        if not (isinstance(self.keep, (float, int)) and not isinstance(self.keep, bool)
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
            dataclasses.replace(settings, **changes)
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
        if getattr(config, field) is None and field != "drop"})
    if workload.protocol == "loo":
        config = _check_design(config, defaults.get("drop"))
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


def _check_design(config: PipelineConfig, default_drop) -> PipelineConfig:
    """``drop`` (its default filled in) with ``design="fixed"`` only, ``keep``
    with ``"bernoulli"`` only."""
    if config.design != "bernoulli" and config.keep != PipelineConfig().keep:
        raise ValueError(f"keep applies to design 'bernoulli' only, got keep="
                         f"{config.keep} with design {config.design!r}.")
    if config.design == "fixed":
        return config if config.drop is not None else dataclasses.replace(
            config, drop=default_drop)
    if config.drop is not None:
        raise ValueError(f"drop applies to design 'fixed' only, got drop="
                         f"{config.drop} with design {config.design!r}.")
    return config


def configured_workload(config: PipelineConfig, workload: Workload) -> Workload:
    """``workload`` with the config's estimation fields applied to its
    estimation settings (:func:`check_applies` first)."""
    check_applies(config, workload)
    changes = config.estimation_changes()
    if not changes:
        return workload
    return workload.with_estimation(dataclasses.replace(workload.estimation,
                                                        **changes))


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


def fit_truth_key(keys: dict):
    """The training key of the ``subsets`` stage's ground truth:
    ``fold_in(keys["subsets"], 3)``, independent of the ``loo`` stage's
    ``keys["base"]`` (which also trains ``θ*``)."""
    return jax.random.fold_in(keys["subsets"], 3)


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
    "subsets": ("regime", "replicates", "num_subsets", "num_heldout", "design",
                "drop", "keep", "chunk_size"),
    "estimated": ("num_subsets", "num_heldout", "design", "drop", "keep",
                  "estimation_settings"),
    "baselines": ("baselines", "influence_damping", "influence_hessian",
                  "trak_proj_dim"),
}
FIXED_SIZE_STAGE_FIELDS = {
    "prompts": ("shots", "num_subsets", "num_heldout"),
    "truth": ("shots", "truth_prompts", "replicates"),
    "estimated": ("shots", "num_subsets", "num_heldout"),
}
PAIRS_STAGE_FIELDS = {**STAGE_FIELDS,
                      "pairs": ("regime", "replicates", "chunk_size", "max_pairs")}
PROTOCOL_STAGES = {"loo": STAGE_FIELDS, "fixed_size": FIXED_SIZE_STAGE_FIELDS,
                   "pairs": PAIRS_STAGE_FIELDS}


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
      pairs: ``[P, 2]`` the pairs of the ``"pairs"`` protocol, else ``None``.
      pair_scores: ``[R, P, T]`` the ground truth of the full set without
        each pair, per replicate (``"pairs"`` protocol), else ``None``.
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
    pairs: np.ndarray | None = None
    pair_scores: np.ndarray | None = None


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
    distinct, of the config's ``design`` (see :class:`PipelineConfig`)."""
    count = config.num_subsets + config.num_heldout
    if config.design == "uniform":
        masks = size_range_masks(key, count, num_tasks, min_size=1,
                                 max_size=num_tasks - 2, unique=True)
    elif config.design == "bernoulli":
        # Distinct rows hold at most one empty set: draw one more, drop it.
        masks = np.asarray(bernoulli_masks(key, count + 1, num_tasks, p=config.keep,
                                           unique=True))
        nonempty = masks[masks.sum(1) > 0]
        masks = nonempty[:count]
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


def collect(config: PipelineConfig, *, workload: Workload | None = None,
            out_dir=None, log: Callable = print, progress: bool = True):
    """Runs the expensive stages (stored under ``out_dir``, reused on rerun).

    Args:
      config: the :class:`PipelineConfig`.
      workload: any workload that implements a contract of
        :mod:`tasksurrogate_jax.workloads.base` (your own, or a bundled one
        already built); ``None`` builds the bundled ``config.workload``
        (:func:`make_workload`).
      out_dir: folder for stored stages and retraining chunks (resume); ``None``
        keeps nothing on disk. A folder of another configuration is refused.
      log: called with one line per stage.
      progress: progress bars on the retraining stages.

    Returns:
      :class:`RunScores` (``"loo"`` protocol) or :class:`PromptRunScores`
      (``"fixed_size"``).
    """
    out_dir = None if out_dir is None else Path(out_dir)
    seconds: dict[str, float] = {}
    if workload is None:
        workload = _timed(seconds, "workload", lambda: make_workload(config))
    config = check_config(config, workload)
    workload = configured_workload(config, workload)
    # Besides the config: what the workload computes, its estimation settings
    # with their defaults filled in, and the library's version.
    identity = {**config.to_json(), "fingerprint": workload.fingerprint(),
                "version": __version__,
                "estimation_settings": None if workload.estimation is None
                else dataclasses.asdict(workload.estimation)}
    protocol = run_protocol(config, workload)
    stages = _Stages(out_dir, identity, log, PROTOCOL_STAGES[protocol])
    stages.seconds.update(seconds)
    keys = stage_keys(config.seed)
    if protocol == "fixed_size":
        return _collect_fixed_size(config, workload, stages, keys)
    return _collect_loo(config, workload, stages, keys, progress,
                        with_pairs=protocol == "pairs")


def _collect_loo(config: PipelineConfig, workload: LeaveOneOutWorkload,
                 stages: _Stages, keys: dict, progress: bool, *,
                 with_pairs: bool) -> RunScores:
    num_tasks = workload.num_tasks

    def ground_truth(name, masks, key=keys["base"]):
        return {"scores": workload.replicate_scores(
            masks, key=key, regime=config.regime,
            replicates=config.replicates, base_params=theta,
            store_dir=stages.folder("retraining", name),
            chunk_size=config.chunk_size, progress=progress)}

    # Drawn before any training.
    masks = loo_protocol_masks(keys["subsets"], config, num_tasks)
    like = workload.params_like(key=keys["base"])  # structure only
    theta = _params_from_arrays(stages.run(
        "base", lambda: _params_arrays(workload.base_params(key=keys["base"]))), like)
    loo_masks = leave_one_out_masks(num_tasks)
    loo = stages.run("loo", lambda: ground_truth("loo", loo_masks))["scores"]
    exact = stages.run("subsets", lambda: ground_truth(
        "subsets", masks, key=fit_truth_key(keys)))["scores"]
    estimated = stages.run("estimated", lambda: {
        "scores": workload.estimated_scores(masks, key=keys["estimated"],
                                            base_params=theta)})["scores"]

    def compute_baselines():
        if not config.baselines:
            return {}
        out, used = workload.baseline_scores(
            theta, names=config.baselines, key=keys["baselines"],
            settings=config.baseline_settings())
        # Plain arrays only in a stage: the settings as a JSON string.
        return {**out, BASELINE_SETTINGS: np.asarray(json.dumps(used))}

    baseline_effects = stages.run("baselines", compute_baselines)
    used = json.loads(str(baseline_effects.pop(BASELINE_SETTINGS, "{}")))
    pairs = pair_scores = None
    if with_pairs:
        pairs = truth_pairs(keys["subsets"], num_tasks, config.max_pairs)
        rows = np.asarray(interactions.pair_removal_masks(num_tasks, pairs))
        pair_scores = stages.run("pairs", lambda: ground_truth(
            "pairs", rows[1 + num_tasks:]))["scores"]
    return RunScores(workload, theta, loo, masks, exact, estimated, baseline_effects,
                     stages.seconds, used, pairs, pair_scores)


def truth_pairs(key, num_tasks: int, max_pairs: int) -> np.ndarray:
    """The ``"pairs"`` protocol's pairs ``[P, 2]``: all of them when there are at
    most ``max_pairs``, else ``max_pairs`` drawn with ``fold_in(key, 2)``."""
    if num_tasks * (num_tasks - 1) // 2 <= max_pairs:
        return interactions.all_pairs(num_tasks)
    return interactions.sample_pairs(jax.random.fold_in(key, 2), num_tasks,
                                     max_pairs)


def _collect_fixed_size(config: PipelineConfig, workload: FixedSizeWorkload,
                        stages: _Stages, keys: dict) -> PromptRunScores:
    masks = np.asarray(workload.sample_prompts(
        keys["subsets"], config.num_subsets + config.num_heldout, shots=config.shots))
    exact = stages.run("prompts", lambda: {
        "scores": workload.exact_scores(masks)})["scores"]
    truth = stages.run("truth", lambda: fixed_size_truth(
        workload, shots=config.shots, max_prompts=config.truth_prompts,
        groups=config.replicates, key=jax.random.fold_in(keys["subsets"], 1)))
    estimated = stages.run("estimated", lambda: {
        "scores": workload.estimated_scores(masks, key=keys["estimated"])})["scores"]
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
      ``"fixed_size"``), ``true_effects`` ``[K]``, ``interaction_matrix``
      ``[K, K]`` (kernel surrogate on exact scores, mean target), with the
      ``"pairs"`` protocol ``interactions`` (:func:`pair_interaction_results`),
      ``heldout`` (true and
      predicted mean-target scores), ``estimation`` (errors of the estimates
      against the ground truth), ``surrogate_hyperparameters`` and ``seconds``
      per stage; ``"loo"`` runs add ``regime`` and ``full_set_loss``,
      ``"fixed_size"`` runs ``shots``, ``truth`` and ``mean_prompt_loss``.
    """
    config = check_config(config, run.workload)
    if run.workload.protocol == "fixed_size":
        return _evaluate_fixed_size(config, run)
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
    matrix = timed("attribution", lambda: np.asarray(
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
    settings = workload.estimation_record(run.theta)
    return {
        "config": config.to_json(),
        "protocol": workload.protocol,
        "registered": config.preset in workload.presets,
        "regime": config.regime,
        "task_names": list(workload.task_names),
        "target_description": workload.target_description,
        "num_targets": int(workload.num_targets),
        "full_set_loss": float(loo[:, 0].mean()),
        "ceiling": reliable,
        "true_effects": true_effects.mean(1),
        "methods": methods,
        "interaction_matrix": matrix,
        **({} if run.pairs is None else {"interactions": timed(
            "interactions", lambda: pair_interaction_results(config, run, fits))}),
        "heldout": {"true": heldout_true.mean(1), "predicted": heldout_predicted},
        "estimation": {**_estimation_errors(exact[:m], estimated[:m],
                                            f"{config.regime} ground truth"),
                       "settings": settings,
                       "proj_dim": settings.get("proj_dim")},
        "surrogate_hyperparameters": _hyperparameters(fits),
        "baseline_settings": dict(run.baseline_settings),
        "seconds": seconds,
    }


def pair_interaction_results(config: PipelineConfig, run: RunScores,
                             fits: dict) -> dict:
    """The surrogates' pair interactions against the pair-removal truth.

    Args:
      config: the run's (concrete) :class:`PipelineConfig`.
      run: a ``"pairs"`` run's :class:`RunScores`.
      fits: ``{"exact" | "estimated": fit_surrogates(...)}``.

    Returns:
      ``{"pairs" [P, 2], "true" [P] (mean target), "ceiling" (split-half
      reliability of the mean-target interactions over pairs),
      "ceiling_per_target", "attainable" (``sqrt`` of the ceilings),
      "num_replicates", "spearman" {method: Spearman of the mean-target
      interactions}, "spearman_per_target" {method: mean per-target
      Spearman}, "comparison" (:func:`~tasksurrogate_jax.interactions.
      compare_interactions`: Pearson too, with intervals), "pair_removal_error"
      {method: pooled normalized error of the predicted pair-removal losses},
      "planted_signs_correct" {method: [correct, total]} where the workload
      plants interactions}``. Methods: each kernel surrogate's second
      difference at the full set and, with ``value_samples``, the kernel's
      Banzhaf interactions (exact scores). A linear surrogate's interactions
      are 0 by construction (no correlation, no sign): it appears only in
      ``pair_removal_error``, where it is the additive baseline.
    """
    workload, num_tasks, pairs = run.workload, run.workload.num_tasks, run.pairs
    scores = np.concatenate([np.asarray(run.loo_scores),
                             np.asarray(run.pair_scores)], axis=1)
    truth = interactions.pair_interactions(scores, pairs=pairs, num_tasks=num_tasks)
    reliable = interactions.interaction_ceiling(truth, seed=config.seed)
    # A linear surrogate's interactions are 0 by construction: no correlation.
    predicted = {f"kernel surrogate ({name})": np.asarray(
        interactions.surrogate_pair_interactions(fitted["kernel"], pairs))
        for name, fitted in fits.items()}
    if config.value_samples:
        predicted["kernel surrogate (exact), Banzhaf"] = np.asarray(
            interactions.banzhaf_interactions(
                fits["exact"]["kernel"], pairs=pairs,
                key=jax.random.fold_in(jax.random.key(config.seed), 11),
                num_samples=config.value_samples))
    comparison = interactions.compare_interactions(
        truth.mean, predicted, **_interval_settings(config))
    pair_masks = interactions.pair_removal_masks(num_tasks, pairs)[1 + num_tasks:]
    errors = interactions.pair_removal_errors(
        scores.mean(0)[1 + num_tasks:],
        {f"{kind} surrogate ({name})": np.asarray(fitted[kind].predict(pair_masks))
         for name, fitted in fits.items() for kind in ("linear", "kernel")})
    out = {"pairs": pairs, "true": truth.mean.mean(1),
           "ceiling": reliable.mean_target, "ceiling_per_target": reliable.mean,
           "attainable": _attainable({"mean_target": reliable.mean_target,
                                      "per_target": reliable.mean}),
           "num_replicates": reliable.num_replicates,
           "spearman": {k: v["spearman_mean_target"] for k, v in comparison.items()},
           "spearman_per_target": {k: v["spearman"] for k, v in comparison.items()},
           "comparison": comparison, "pair_removal_error": errors}
    if workload.planted_interactions:
        out["planted_signs_correct"] = {
            name: interactions.planted_signs_correct(
                values, workload.planted_interactions, pairs=pairs)
            for name, values in predicted.items()}
    return out


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
    matrix = timed("attribution", lambda: np.asarray(
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
        "registered": config.preset in workload.presets,
        "shots": shots,
        "truth": truth,
        "task_names": list(workload.task_names),
        "target_description": workload.target_description,
        "num_targets": int(workload.num_targets),
        "mean_prompt_loss": float(exact.mean()),
        "ceiling": reliable,
        "true_effects": true_effects.mean(1),
        "methods": methods,
        "interaction_matrix": matrix,
        "heldout": {"true": heldout_true.mean(1), "predicted": heldout_predicted},
        "estimation": _estimation_errors(exact[:m], estimated[:m], "forward passes"),
        "surrogate_hyperparameters": _hyperparameters(fits),
        "seconds": seconds,
    }


def run_pipeline(config: PipelineConfig, *, workload=None, out_dir=None,
                 log: Callable = print, progress: bool = True) -> dict:
    """:func:`collect` then :func:`evaluate`: the results dict of a whole run.

    Pass ``workload`` to run on your own workload (any implementation of a
    contract of :mod:`tasksurrogate_jax.workloads.base`; ``config.workload``
    then only names it); ``None`` builds the bundled ``config.workload``.
    Compiled programs are kept on disk for the next run
    (:func:`~tasksurrogate_jax.compilation.enable_compilation_cache`; opt out
    with ``TASKSURROGATE_COMPILATION_CACHE=0``). With ``out_dir``, the results
    are also written to ``out_dir/results.json``
    (:func:`~tasksurrogate_jax.report.write_json`; the plots are
    :func:`~tasksurrogate_jax.report.write_report`'s).
    """
    enable_compilation_cache()
    results = evaluate(config, collect(config, workload=workload, out_dir=out_dir,
                                       log=log, progress=progress))
    if out_dir is not None:
        write_json(results, Path(out_dir) / "results.json")
    return results


__all__ = ["BASELINES", "DESIGNS", "ESTIMATION_FIELDS", "FIXED_SIZE_STAGE_FIELDS",
           "PAIRS_STAGE_FIELDS", "PROTOCOLS", "PROTOCOL_STAGES", "STAGE_FIELDS",
           "PipelineConfig", "PromptRunScores", "RunScores", "all_fixed_size_masks",
           "ceiling", "check_applies", "check_config", "collect",
           "configured_workload", "evaluate", "fit_truth_key", "fixed_size_ceiling",
           "fixed_size_truth", "loo_effects", "loo_protocol_masks", "make_workload",
           "pair_interaction_results", "run_pipeline", "run_protocol", "stage_keys",
           "truth_pairs"]
