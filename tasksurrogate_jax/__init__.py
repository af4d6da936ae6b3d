"""tasksurrogate_jax: task attribution with kernel surrogate models in JAX."""

__version__ = "0.1.0"

from tasksurrogate_jax.subsets import (
    all_masks,
    bernoulli_masks,
    fixed_size_masks,
    leave_one_out_masks,
    unique_masks,
)

__all__ = [
    "__version__",
    "all_masks",
    "bernoulli_masks",
    "fixed_size_masks",
    "leave_one_out_masks",
    "unique_masks",
]
