"""The workload contracts: subset-score oracles over K tasks with T targets.

Everything downstream (surrogates, attribution, the pipeline) sees a workload
only through these classes. :class:`Workload` is what every workload has:

- ``task_names`` (the K mask columns), ``num_targets`` and
  ``target_description`` (the T score columns);
- ``fingerprint() -> dict``: digests of what determines the scores, the key
  of every stored result;
- ``estimation``: the settings of its first-order estimate (a frozen
  dataclass, or ``None``), fixed when it is built; :meth:`Workload.
  with_estimation` returns a copy with other settings;
- ``pipeline_defaults``: the :class:`~tasksurrogate_jax.pipeline.
  PipelineConfig` fields it fills in when a config leaves them ``None``.

The pipeline runs one protocol per contract, chosen by ``protocol``:

- :class:`LeaveOneOutWorkload` (``"loo"``): a model trained on all tasks
  (``base_params``), scores of retrained models in paired replicates
  (``replicate_scores``), first-order estimates around ``θ*``
  (``estimated_scores``), and optionally attribution baselines at ``θ*``
  (``baselines``, ``baseline_scores``). Supervised models and RL.
- :class:`FixedSizeWorkload` (``"fixed_size"``): every subset holds exactly
  ``shots`` tasks (prompts of demonstrations): ``sample_prompts``, exact
  ``exact_scores`` (deterministic) and ``estimated_scores``. In-context
  learning.

Implement one of the two and :func:`~tasksurrogate_jax.pipeline.run_pipeline`
runs it; nothing else is asked of it. Every option is an explicit keyword
argument: an unknown option is a ``TypeError``, never silently ignored.

Scores are losses: lower is better, and the LOO effect of task ``i`` is
``F(s* - e_i) - F(s*)``.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import jax

from tasksurrogate_jax._checks import check_masks

# The training of a LeaveOneOutWorkload's ground truth: from the
# initialisation ("scratch") or fine-tuning θ* ("finetune").
REGIMES = ("scratch", "finetune")


def config_from_preset(presets: Mapping[str, Any], preset: str, overrides: Mapping):
    """``presets[preset]`` (a dataclass) with ``overrides`` applied, or a clear
    error naming the unknown preset or fields."""
    if preset not in presets:
        raise ValueError(f"preset must be one of {sorted(presets)}, got {preset!r}.")
    base = presets[preset]
    fields = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(
            f"unknown {type(base).__name__} fields {unknown}; valid fields: "
            f"{sorted(fields)}."
        )
    return dataclasses.replace(base, **overrides)


class Workload(abc.ABC):
    """What every workload has (see the module docstring).

    Attributes:
      name: the workload's name (results and stores record it).
      protocol: the pipeline protocol it follows (set by the two contracts).
      presets: named configurations of the workloads a factory builds.
      pipeline_defaults: :class:`~tasksurrogate_jax.pipeline.PipelineConfig`
        fields this workload fills in when the config leaves them ``None``
        (a class default, which a factory may replace per instance).
      estimation: the settings of :meth:`estimated_scores` (a frozen
        dataclass), or ``None`` when it has none.
      planted_interactions: ``{(i, j): sign}`` interactions known by
        construction (``+1`` substitutes, ``-1`` complements; see
        :mod:`tasksurrogate_jax.downstream.interactions`), checked by the pipeline's
        ``"pairs"`` protocol; ``{}`` when none are known.
    """

    name: ClassVar[str] = "workload"
    protocol: ClassVar[str] = ""
    presets: ClassVar[Mapping[str, Any]] = {}
    pipeline_defaults: Mapping[str, Any] = {}
    estimation: Any = None
    planted_interactions: Mapping[tuple[int, int], int] = {}

    @property
    @abc.abstractmethod
    def task_names(self) -> tuple[str, ...]:
        """The K task names, in mask-column order."""

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    @abc.abstractmethod
    def num_targets(self) -> int:
        """T, the number of score columns."""

    @property
    @abc.abstractmethod
    def target_description(self) -> str:
        """What the T score columns are."""

    @abc.abstractmethod
    def fingerprint(self) -> dict:
        """JSON digests of everything that determines the scores (data,
        targets, parameters, and the programs: :mod:`tasksurrogate_jax.
        fingerprint`). Results stored for one fingerprint are never handed to
        a workload with another."""

    def with_estimation(self, settings) -> Workload:
        """A copy of this workload whose :meth:`estimated_scores` use
        ``settings`` (of the type of :attr:`estimation`); caches are shared."""
        if self.estimation is None:
            raise ValueError(f"workload {self.name!r} has no estimation settings "
                             "to change.")
        if type(settings) is not type(self.estimation):
            raise TypeError(f"settings must be a {type(self.estimation).__name__}, "
                            f"got {type(settings).__name__}.")
        copied = copy.copy(self)
        copied.estimation = settings
        return copied

    def estimation_record(self, base_params) -> dict:
        """JSON: the estimation settings as run on ``base_params`` (defaults
        resolved), recorded in the results; ``{}`` without settings."""
        del base_params  # resolved settings may depend on the model's size
        return {} if self.estimation is None else dataclasses.asdict(self.estimation)

    def check_masks(self, masks, name: str = "masks") -> jax.Array:
        """Validates ``[num_subsets, num_tasks]`` 0/1 masks for this workload."""
        return check_masks(masks, name, num_tasks=self.num_tasks)


class LeaveOneOutWorkload(Workload):
    """The ``"loo"`` contract: a model trained on all tasks and retrained on
    subsets. Its ground truth is leave-one-out from the full set.

    Attributes:
      baselines: names of the attribution baselines :meth:`baseline_scores`
        computes (``()``: none).
    """

    protocol: ClassVar[str] = "loo"
    pipeline_defaults: Mapping[str, Any] = {
        "regime": "finetune", "num_subsets": 96, "num_heldout": 32,
        "design": "fixed", "drop": 3}
    baselines: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def base_params(self, *, key):
        """``θ*``, the model trained on all tasks from ``key`` (a pytree of
        arrays; stored by the pipeline, so deterministic in ``key``)."""

    def params_like(self, *, key):
        """The structure of ``base_params(key=key)`` (shapes and dtypes, e.g.
        ``jax.ShapeDtypeStruct`` leaves), to read a stored ``θ*`` back without
        training. Default: ``jax.eval_shape(self.init_fn, key)``; a workload
        without an ``init_fn(key)`` overrides this."""
        init_fn = getattr(self, "init_fn", None)
        if init_fn is None:
            raise NotImplementedError(
                f"{type(self).__name__} needs init_fn(key) or its own params_like.")
        return jax.eval_shape(init_fn, key)

    @abc.abstractmethod
    def replicate_scores(self, masks, *, key, regime: str, replicates: int,
                         base_params, chunk_size: int, store_dir: Path | None,
                         progress: bool) -> jax.Array:
        """True scores ``[replicates, num_subsets, num_targets]`` of models
        retrained on each subset, in paired replicates.

        Args:
          masks: ``[num_subsets, num_tasks]`` 0/1.
          key: the key of :meth:`base_params`; replicates draw from it.
          regime: ``"finetune"`` (from ``base_params``) or ``"scratch"``.
          replicates: ``R >= 1``; within a replicate only the mask differs.
          base_params: ``θ*``.
          chunk_size: subsets per compiled call.
          store_dir: folder to keep finished chunks in and resume from, or
            ``None``.
          progress: show progress.
        """

    @abc.abstractmethod
    def estimated_scores(self, masks, *, key, base_params) -> jax.Array:
        """First-order estimates ``[num_subsets, num_targets]`` around
        ``base_params`` without retraining, with :attr:`estimation`."""

    def baseline_scores(self, base_params, *, names: tuple[str, ...], key,
                        settings) -> tuple[dict, dict]:
        """Attribution baselines at ``θ*``: ``({name: [num_tasks, num_targets]
        scores, > 0 = the task helps}, {name: JSON of the settings used}``).

        Args:
          base_params: ``θ*``.
          names: among :attr:`baselines`.
          key: of any randomness (projections).
          settings: :class:`~tasksurrogate_jax.estimate.baselines.BaselineSettings`.
        """
        del base_params, key, settings
        if names:
            raise ValueError(f"workload {self.name!r} has no baselines, got "
                             f"{list(names)}.")
        return {}, {}


class FixedSizeWorkload(Workload):
    """The ``"fixed_size"`` contract: every subset is a prompt of exactly
    ``shots`` tasks, scored by forward passes (deterministic)."""

    protocol: ClassVar[str] = "fixed_size"
    pipeline_defaults: Mapping[str, Any] = {
        "shots": 4, "num_subsets": 80, "num_heldout": 120, "truth_prompts": 20_000}

    @property
    @abc.abstractmethod
    def max_demos(self) -> int:
        """The most demonstrations a prompt holds."""

    @abc.abstractmethod
    def sample_prompts(self, key, num_prompts: int, *, shots: int) -> jax.Array:
        """``[num_prompts, num_tasks]`` distinct random masks of ``shots`` ones."""

    @abc.abstractmethod
    def exact_scores(self, masks) -> jax.Array:
        """True scores ``[num_subsets, num_targets]`` of the prompts."""

    @abc.abstractmethod
    def estimated_scores(self, masks, *, key) -> jax.Array:
        """First-order estimates ``[num_subsets, num_targets]`` of the prompts'
        scores."""
