"""tasksurrogate_jax: task attribution with kernel surrogate models in JAX.

Data flows one way: workload -> (masks, scores) -> surrogate -> attribution ->
report. ``masks`` are ``[num_subsets, num_tasks]`` arrays of 0/1 and ``scores``
are ``[num_subsets, num_targets]`` (lower = better, e.g. target losses).
"""

__version__ = "0.1.0"

# The subpackages, along the data flow, as attributes (``ts.core``); modules
# are reached by their path (``tasksurrogate_jax.core.surrogates``).
from tasksurrogate_jax import (  # noqa: F401
    core,
    data,
    downstream,
    estimate,
    losses,
    pipeline,
    truth,
    workloads,
)
from tasksurrogate_jax.core.kernels import KERNELS, gram
from tasksurrogate_jax.core.metrics import (
    LOOCorrelation,
    loo_correlation,
    mean_spearman,
    normalized_error,
    pearson,
    pooled_normalized_error,
    relative_error,
    spearman,
)
from tasksurrogate_jax.core.nystrom import (
    NystromFit,
    fit_nystrom_surrogate,
    select_nystrom_hyperparameters,
)
from tasksurrogate_jax.core.subsets import (
    all_masks,
    bernoulli_masks,
    fixed_size_masks,
    leave_one_out_masks,
    size_range_masks,
    unique_masks,
)
from tasksurrogate_jax.core.surrogates import (
    HyperparameterSearch,
    KernelSurrogate,
    LinearSurrogate,
    fit_kernel_surrogate,
    fit_linear_surrogate,
    predict,
    select_kernel_hyperparameters,
)
from tasksurrogate_jax.data import (
    TargetData,
    TaskData,
    make_target_data,
    make_task_data,
)
from tasksurrogate_jax.downstream.attribution import (
    banzhaf_values,
    interaction_matrix,
    loo_scores,
    shapley_values,
)
from tasksurrogate_jax.downstream.selection import (
    SelectionResult,
    select_subset,
    surrogate_objective,
)
from tasksurrogate_jax.downstream.uncertainty.calibration import calibrate_kappa
from tasksurrogate_jax.downstream.uncertainty.objectives import (
    lcb_objective,
    trust_region_objective,
)
from tasksurrogate_jax.downstream.uncertainty.posterior import (
    KernelPosterior,
    fit_posterior,
)
from tasksurrogate_jax.downstream.uncertainty.sequential import (
    CandidatePool,
    ConfidenceBound,
    SurrogateFit,
    sequential_selection,
)
from tasksurrogate_jax.estimate.baselines import (
    influence_scores,
    tracin_scores,
    trak_scores,
)
from tasksurrogate_jax.estimate.convex import SolverSettings, estimate_scores
from tasksurrogate_jax.estimate.estimation import EstimationResult, EstimationSettings
from tasksurrogate_jax.estimate.estimation_check import (
    EstimationCheck,
    check_estimation,
)
from tasksurrogate_jax.estimate.finetune import Adam, linearized_finetune_scores
from tasksurrogate_jax.pipeline import PipelineConfig, run_pipeline
from tasksurrogate_jax.pipeline.report import (
    format_correlation_table,
    plot_heldout,
    plot_interactions,
    plot_loo_effects,
)
from tasksurrogate_jax.truth.retraining import (
    RetrainResult,
    TrainSpec,
    make_train_spec,
    retrain,
)
from tasksurrogate_jax.workloads import (
    ICLWorkload,
    PromptScorer,
    SupervisedWorkload,
    TrainSettings,
    Workload,
    digits_workload,
    icl_workload,
    modular_workload,
    rl_workload,
)
from tasksurrogate_jax.workloads.base import FixedSizeWorkload, LeaveOneOutWorkload

# What a user calls. The modules (and their lower-level functions) stay
# importable by path, e.g. ``from tasksurrogate_jax import interactions``.
__all__ = [
    "__version__",
    # workloads: the contracts and the bundled ones
    "Workload",
    "LeaveOneOutWorkload",
    "FixedSizeWorkload",
    "SupervisedWorkload",
    "TrainSettings",
    "ICLWorkload",
    "PromptScorer",
    "TargetData",
    "TaskData",
    "make_target_data",
    "make_task_data",
    "digits_workload",
    "icl_workload",
    "modular_workload",
    "rl_workload",
    # the end-to-end run
    "PipelineConfig",
    "run_pipeline",
    # ground truth and estimation
    "RetrainResult",
    "TrainSpec",
    "make_train_spec",
    "retrain",
    "Adam",
    "EstimationCheck",
    "EstimationResult",
    "EstimationSettings",
    "SolverSettings",
    "check_estimation",
    "estimate_scores",
    "linearized_finetune_scores",
    # subsets
    "all_masks",
    "bernoulli_masks",
    "fixed_size_masks",
    "leave_one_out_masks",
    "size_range_masks",
    "unique_masks",
    # surrogates
    "KERNELS",
    "gram",
    "HyperparameterSearch",
    "KernelSurrogate",
    "LinearSurrogate",
    "NystromFit",
    "fit_kernel_surrogate",
    "fit_linear_surrogate",
    "fit_nystrom_surrogate",
    "predict",
    "select_kernel_hyperparameters",
    "select_nystrom_hyperparameters",
    # attribution, selection and baselines
    "banzhaf_values",
    "interaction_matrix",
    "loo_scores",
    "shapley_values",
    "SelectionResult",
    "select_subset",
    "surrogate_objective",
    "KernelPosterior",
    "calibrate_kappa",
    "fit_posterior",
    "lcb_objective",
    "sequential_selection",
    "ConfidenceBound",
    "SurrogateFit",
    "CandidatePool",
    "trust_region_objective",
    "influence_scores",
    "tracin_scores",
    "trak_scores",
    # metrics
    "LOOCorrelation",
    "loo_correlation",
    "mean_spearman",
    "normalized_error",
    "pearson",
    "pooled_normalized_error",
    "relative_error",
    "spearman",
    # plots and tables from plain arrays
    "format_correlation_table",
    "plot_heldout",
    "plot_interactions",
    "plot_loo_effects",
]
