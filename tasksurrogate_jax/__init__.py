"""tasksurrogate_jax: task attribution with kernel surrogate models in JAX.

Data flows one way: workload -> (masks, scores) -> surrogate -> attribution ->
report. ``masks`` are ``[num_subsets, num_tasks]`` arrays of 0/1 and ``scores``
are ``[num_subsets, num_targets]`` (lower = better, e.g. target losses).
"""

__version__ = "0.1.0"

from tasksurrogate_jax import kernels, metrics, subsets, surrogates
from tasksurrogate_jax.kernels import KERNELS, gram
from tasksurrogate_jax.metrics import (
    LOOCorrelation,
    loo_correlation,
    mean_spearman,
    normalized_error,
    pearson,
    rankdata,
    relative_error,
    spearman,
)
from tasksurrogate_jax.subsets import (
    all_masks,
    bernoulli_masks,
    fixed_size_masks,
    leave_one_out_masks,
    unique_masks,
)
from tasksurrogate_jax.surrogates import (
    HyperparameterSearch,
    KernelSurrogate,
    LinearSurrogate,
    fit_kernel_surrogate,
    fit_linear_surrogate,
    predict,
    select_kernel_hyperparameters,
)

__all__ = [
    "__version__",
    # modules
    "kernels",
    "metrics",
    "subsets",
    "surrogates",
    # subsets
    "all_masks",
    "bernoulli_masks",
    "fixed_size_masks",
    "leave_one_out_masks",
    "unique_masks",
    # kernels
    "KERNELS",
    "gram",
    # surrogates
    "HyperparameterSearch",
    "KernelSurrogate",
    "LinearSurrogate",
    "fit_kernel_surrogate",
    "fit_linear_surrogate",
    "predict",
    "select_kernel_hyperparameters",
    # metrics
    "LOOCorrelation",
    "loo_correlation",
    "mean_spearman",
    "normalized_error",
    "pearson",
    "rankdata",
    "relative_error",
    "spearman",
]
