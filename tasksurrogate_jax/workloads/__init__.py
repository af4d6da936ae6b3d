"""Workloads: subset-score oracles over K tasks (see ``base.Workload``)."""

from tasksurrogate_jax.workloads.base import Workload
from tasksurrogate_jax.workloads.digits import (
    DigitsConfig,
    DigitsWorkload,
    digits_workload,
)
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
from tasksurrogate_jax.workloads.supervised import (
    REGIMES,
    SupervisedWorkload,
    TrainSettings,
    nnx_model_functions,
)

__all__ = [
    "REGIMES",
    "DigitsConfig",
    "DigitsWorkload",
    "ICLConfig",
    "ICLWorkload",
    "ModularConfig",
    "ModularWorkload",
    "PromptScorer",
    "RLConfig",
    "RLWorkload",
    "SupervisedWorkload",
    "SyntheticICLWorkload",
    "TrainSettings",
    "Workload",
    "digits_workload",
    "icl_workload",
    "modular_workload",
    "nnx_model_functions",
    "rl_workload",
]
