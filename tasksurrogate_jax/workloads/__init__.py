"""Workloads: subset-score oracles over K tasks (see ``base.Workload``)."""

from tasksurrogate_jax.workloads.base import Workload
from tasksurrogate_jax.workloads.digits import (
    DigitsConfig,
    DigitsWorkload,
    digits_workload,
)
from tasksurrogate_jax.workloads.icl import (
    ICLWorkload,
    NearestAnchors,
    PromptScorer,
)
from tasksurrogate_jax.workloads.icl_regression import (
    ICLRegressionConfig,
    ICLRegressionWorkload,
    icl_regression_workload,
)
from tasksurrogate_jax.workloads.icl_synthetic import (
    ICLConfig,
    SyntheticICLWorkload,
    icl_workload,
)
from tasksurrogate_jax.workloads.lm_scorer import (
    causal_lm_scorer,
    lm_icl_workload,
    nnx_causal_lm_scorer,
    tiny_gpt,
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
    "ICLRegressionConfig",
    "ICLRegressionWorkload",
    "ICLWorkload",
    "ModularConfig",
    "ModularWorkload",
    "NearestAnchors",
    "PromptScorer",
    "RLConfig",
    "RLWorkload",
    "SupervisedWorkload",
    "SyntheticICLWorkload",
    "TrainSettings",
    "Workload",
    "causal_lm_scorer",
    "digits_workload",
    "icl_regression_workload",
    "icl_workload",
    "lm_icl_workload",
    "modular_workload",
    "nnx_causal_lm_scorer",
    "nnx_model_functions",
    "rl_workload",
    "tiny_gpt",
]
