"""Workloads: subset-score oracles over K tasks (see ``base.Workload``)."""

from tasksurrogate_jax.workloads.base import Workload
from tasksurrogate_jax.workloads.icl import (
    ICLConfig,
    ICLWorkload,
    PromptScorer,
    SyntheticICLWorkload,
    icl_workload,
)
from tasksurrogate_jax.workloads.modular import (
    ModularConfig,
    ModularWorkload,
    modular_workload,
)
from tasksurrogate_jax.workloads.rl import RLConfig, RLWorkload, rl_workload

__all__ = [
    "ICLConfig",
    "ICLWorkload",
    "ModularConfig",
    "ModularWorkload",
    "PromptScorer",
    "RLConfig",
    "RLWorkload",
    "SyntheticICLWorkload",
    "Workload",
    "icl_workload",
    "modular_workload",
    "rl_workload",
]
