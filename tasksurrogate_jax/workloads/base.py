"""The workload interface: a subset-score oracle over K tasks with T targets.

Everything downstream (surrogates, attribution, pipeline) sees a workload only
through this interface:

- ``num_tasks``, ``task_names``: the K training tasks (mask columns);
- ``num_targets``, ``target_description``: the T target columns of the scores;
- ``exact_scores(masks, *, key) -> [num_subsets, num_targets]``: the true
  ``F(s)`` (retraining, re-prompting, ...);
- ``estimated_scores(masks, *, key) -> [num_subsets, num_targets]``: the
  first-order estimate without retraining (docs/method.md);
- ``fingerprint() -> dict``: digests of what determines the scores, the key
  of every stored result;
- ``presets``: named configurations (``"cpu"`` small, ``"paper"`` full size).

Both scoring methods take ``key`` (the PRNG key of any randomness: training,
batches, projections; a workload without randomness accepts it and documents
it as unused) and name every other option as an explicit keyword argument: an
unknown option is a ``TypeError``, never silently ignored.

Scores are losses: lower is better, and the LOO effect of task ``i`` is
``F(s* - e_i) - F(s*)``.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax

from tasksurrogate_jax._checks import check_masks


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
    """Base class of the workloads (see the module docstring)."""

    name: ClassVar[str] = "workload"
    presets: ClassVar[Mapping[str, Any]] = {}

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
    def exact_scores(self, masks, *, key) -> jax.Array:
        """True subset scores ``[num_subsets, num_targets]`` (lower = better).

        Subclasses add their options as explicit keyword-only arguments."""

    @abc.abstractmethod
    def estimated_scores(self, masks, *, key) -> jax.Array:
        """First-order estimates ``[num_subsets, num_targets]`` of the subset
        scores, without retraining (docs/method.md).

        Subclasses add their options as explicit keyword-only arguments."""

    @abc.abstractmethod
    def fingerprint(self) -> dict:
        """JSON digests of everything that determines the scores (data,
        targets, parameters, and the programs: :mod:`tasksurrogate_jax.
        fingerprint`). Results stored for one fingerprint are never handed to
        a workload with another."""

    def check_masks(self, masks, name: str = "masks") -> jax.Array:
        """Validates ``[num_subsets, num_tasks]`` 0/1 masks for this workload."""
        return check_masks(masks, name, num_tasks=self.num_tasks)
