"""Workloads: subset-score oracles over K tasks (see ``base.Workload``)."""

from tasksurrogate_jax.workloads.base import Workload
from tasksurrogate_jax.workloads.modular import (
    ModularConfig,
    ModularWorkload,
    modular_workload,
)

__all__ = ["ModularConfig", "ModularWorkload", "Workload", "modular_workload"]
