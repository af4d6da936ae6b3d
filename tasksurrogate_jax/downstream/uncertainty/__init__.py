"""Predictive uncertainty of kernel surrogates, and selection that uses it.

Kernel ridge regression is the posterior mean of a Gaussian process; its
posterior variance says where the surrogate is unsure. The pieces, one module
each (every name is also importable from here):

- :mod:`~tasksurrogate_jax.downstream.uncertainty.posterior`: the GP
  posterior of an exact kernel surrogate (:func:`fit_posterior`,
  :class:`KernelPosterior`: mean, variance and std at any mask, from the
  fit's Cholesky factor; the conventions for the signal variance).
- :mod:`~tasksurrogate_jax.downstream.uncertainty.objectives`: objectives for
  :func:`~tasksurrogate_jax.downstream.selection.select_subset`:
  :func:`lcb_objective` (the weighted prediction plus or minus ``kappa``
  posterior stds; ``mode="pessimistic"`` avoids masks the surrogate is
  unsure about, ``"optimistic"`` explores them) and
  :func:`trust_region_objective` (the prediction of any surrogate, masks far
  from the fitting ones penalised).
- :mod:`~tasksurrogate_jax.downstream.uncertainty.calibration`:
  :func:`calibrate_kappa`, the ``kappa`` whose bound covers a stated fraction
  of the closed-form leave-one-out residuals.
- :mod:`~tasksurrogate_jax.downstream.uncertainty.sequential`:
  :func:`sequential_selection`, rounds of fit, propose by the bound, score the
  proposals with the user's true scoring, refit.

Scores are losses: lower is better.
"""

from tasksurrogate_jax.downstream.uncertainty.calibration import (
    TAILS,
    KappaCalibration,
    calibrate_kappa,
)
from tasksurrogate_jax.downstream.uncertainty.objectives import (
    MODES,
    ConfidenceBoundObjective,
    TrustRegionObjective,
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
    RoundRecord,
    SequentialResult,
    SurrogateFit,
    sequential_selection,
)

__all__ = [
    "MODES",
    "TAILS",
    "CandidatePool",
    "ConfidenceBound",
    "ConfidenceBoundObjective",
    "KappaCalibration",
    "KernelPosterior",
    "RoundRecord",
    "SequentialResult",
    "SurrogateFit",
    "TrustRegionObjective",
    "calibrate_kappa",
    "fit_posterior",
    "lcb_objective",
    "sequential_selection",
    "trust_region_objective",
]
