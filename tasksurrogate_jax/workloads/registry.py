"""The workloads known by name: what the command line and a config's
``workload`` and ``preset`` fields build.

The pipeline itself takes any workload that follows one of the contracts of
:mod:`tasksurrogate_jax.workloads.base`; this registry only maps names to the
factories of the bundled ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from tasksurrogate_jax.estimate.estimation import METHODS as SUPERVISED_METHODS
from tasksurrogate_jax.workloads.base import Workload
from tasksurrogate_jax.workloads.digits import DigitsWorkload, digits_workload
from tasksurrogate_jax.workloads.icl_regression import (
    ICLRegressionWorkload,
    icl_regression_workload,
)
from tasksurrogate_jax.workloads.icl_synthetic import (
    SyntheticICLWorkload,
    icl_workload,
)
from tasksurrogate_jax.workloads.modular import ModularWorkload, modular_workload
from tasksurrogate_jax.workloads.rl import RLWorkload, rl_workload
from tasksurrogate_jax.workloads.rl_estimation import ESTIMATORS as RL_METHODS


class RegisteredWorkload(NamedTuple):
    """A bundled workload.

    Attributes:
      factory: ``factory(preset, **overrides) -> Workload``.
      kind: the class it builds (its ``presets``, ``protocol`` and
        ``pipeline_defaults``).
    """

    factory: Callable[..., Workload]
    kind: type[Workload]

    @property
    def presets(self) -> Mapping[str, Any]:
        return self.kind.presets

    @property
    def protocol(self) -> str:
        return self.kind.protocol


WORKLOADS: dict[str, RegisteredWorkload] = {
    "digits": RegisteredWorkload(digits_workload, DigitsWorkload),
    "modular": RegisteredWorkload(modular_workload, ModularWorkload),
    "icl": RegisteredWorkload(icl_workload, SyntheticICLWorkload),
    # The smooth family: in-context regression, where the first-order model of
    # the prediction around the nearest anchor prompt holds.
    "icl_regression": RegisteredWorkload(icl_regression_workload,
                                         ICLRegressionWorkload),
    "rl": RegisteredWorkload(rl_workload, RLWorkload),
}

# Every ``estimation_method`` a bundled workload takes (the CLI's choices).
ESTIMATION_METHODS: tuple[str, ...] = SUPERVISED_METHODS + RL_METHODS


def registered(name: str) -> RegisteredWorkload:
    """The bundled workload ``name``, or a ``ValueError`` listing them."""
    if name not in WORKLOADS:
        raise ValueError(f"workload must be one of {sorted(WORKLOADS)}, got {name!r}.")
    return WORKLOADS[name]


def make_workload(name: str, preset: str,
                  overrides: Mapping[str, Any] | None = None) -> Workload:
    """The bundled workload ``name`` built from ``preset`` with ``overrides``
    (fields of its preset's configuration)."""
    entry = registered(name)
    if preset not in entry.presets:
        raise ValueError(f"preset must be one of {sorted(entry.presets)} for "
                         f"workload {name!r}, got {preset!r}.")
    return entry.factory(preset, **dict(overrides or {}))


__all__ = ["WORKLOADS", "RegisteredWorkload", "make_workload", "registered"]
