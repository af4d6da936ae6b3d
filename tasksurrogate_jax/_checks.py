"""Argument checks shared by the public functions (private module).

Shape and dtype checks are static, so they also run under ``jax.jit``. Value
checks (0/1 masks, finite scores) need concrete arrays and are skipped for
traced values; the public functions document where that applies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
    """True when ``x`` holds values (not a tracer inside ``jit``/``vmap``)."""
    return not isinstance(x, jax.core.Tracer)


def as_array(x, name: str) -> jax.Array:
    """``jnp.asarray(x)``, or a ``TypeError`` naming ``name`` when ``x`` is not
    an array (a string, ``None``, an object)."""
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name} must be a numeric array, got {type(x).__name__}.")
    try:
        return jnp.asarray(x)
    except TypeError as err:
        raise TypeError(
            f"{name} must be a numeric array, got {type(x).__name__} ({err})."
        ) from err


def as_float_array(x, name: str) -> jax.Array:
    """Converts ``x`` to a floating JAX array, or raises ``TypeError`` naming it."""
    arr = as_array(x, name)
    if arr.dtype == jnp.bool_ or jnp.issubdtype(arr.dtype, jnp.integer):
        arr = arr.astype(jnp.result_type(float))
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        raise TypeError(f"{name} must have a real dtype, got {arr.dtype}.")
    return arr


def check_masks(masks, name: str = "masks", *, num_tasks: int | None = None):
    """Validates subset masks ``[num_subsets, num_tasks]`` of 0/1 values.

    Returns:
      The masks as a floating array.
    """
    arr = as_float_array(masks, name)
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D [num_subsets, num_tasks], got shape {arr.shape}."
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {arr.shape}.")
    if num_tasks is not None and arr.shape[1] != num_tasks:
        raise ValueError(
            f"{name} has {arr.shape[1]} task columns, expected {num_tasks} "
            f"(num_tasks={num_tasks}); got shape {tuple(arr.shape)}."
        )
    if is_concrete(masks):
        values = np.asarray(masks, dtype=float)
        bad = ~((values == 0) | (values == 1))
        if bad.any():
            first = values[bad].flat[0]
            raise ValueError(
                f"{name} must hold only 0 and 1, found {float(first):g} "
                f"({int(bad.sum())} entries are not 0/1)."
            )
    return arr


def check_scores(scores, name: str = "scores", *, num_rows: int | None = None):
    """Validates subset scores ``[num_subsets, num_targets]`` (1-D = one target).

    Returns:
      A 2-D floating array.
    """
    arr = as_float_array(scores, name)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be [num_subsets, num_targets] (or 1-D for one target), "
            f"got shape {arr.shape}."
        )
    if arr.shape[1] == 0:
        raise ValueError(f"{name} must have at least one target column.")
    if num_rows is not None and arr.shape[0] != num_rows:
        raise ValueError(
            f"{name} has {arr.shape[0]} rows but masks has {num_rows}: each subset "
            "needs exactly one row of scores."
        )
    if is_concrete(scores):
        finite = np.isfinite(np.asarray(scores, dtype=float))
        if not finite.all():
            rows = np.unique(np.nonzero(~finite)[0])
            raise ValueError(
                f"{name} must be finite, found {int((~finite).sum())} non-finite "
                f"values in rows {rows[:10].tolist()}."
            )
    return arr


def check_positive_int(value, name: str, *, minimum: int = 1) -> int:
    """Returns ``value`` as an int, or raises naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return int(value)


def as_typed_key(key, name: str = "key") -> jax.Array:
    """Validates ``key`` (see :func:`check_key`) and returns a typed key."""
    key = check_key(key, name)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(key)


def check_key(key, name: str = "key") -> jax.Array:
    """Accepts a typed key (``jax.random.key``) or a raw uint32 ``PRNGKey``."""
    if isinstance(key, (int, np.integer)) or key is None:
        raise TypeError(
            f"{name} must be a JAX PRNG key (jax.random.key(seed)), got "
            f"{type(key).__name__}."
        )
    try:
        arr = key if isinstance(key, jax.Array) else jnp.asarray(key)
    except TypeError:
        raise TypeError(
            f"{name} must be a JAX PRNG key (jax.random.key(seed)), got "
            f"{type(key).__name__}."
        ) from None
    typed = jnp.issubdtype(arr.dtype, jax.dtypes.prng_key)
    if not typed and not (arr.dtype == jnp.uint32 and arr.shape == (2,)):
        raise TypeError(
            f"{name} must be a JAX PRNG key, got an array of shape {arr.shape} "
            f"and dtype {arr.dtype}."
        )
    return arr


def check_bool(value, name: str) -> bool:
    """Returns ``value`` if it is a bool (NumPy's included), else raises naming it.

    A string such as ``"False"`` is truthy: accepting it would silently mean True.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}.")
    return bool(value)


def check_finite_scalar(value, name: str):
    """Raises naming ``name`` unless ``value`` is a real finite number (a traced
    value is only checked for being a scalar). Returns it unchanged."""
    if isinstance(value, (bool, np.bool_, str, bytes)) or value is None:
        raise TypeError(f"{name} must be a number, got {value!r}.")
    if not is_concrete(value):
        return value
    arr = np.asarray(value)
    if arr.ndim != 0 or not (np.issubdtype(arr.dtype, np.integer)
                             or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"{name} must be a real number, got {value!r}.")
    if not np.isfinite(arr):
        raise ValueError(f"{name} must be finite, got {value!r}.")
    return value


def check_float_dtype(dtype, name: str = "dtype"):
    """Returns ``dtype`` if it names a floating dtype, else raises naming it."""
    try:
        resolved = jnp.dtype(dtype)
    except TypeError as err:
        raise TypeError(f"{name} must be a floating dtype, got {dtype!r}.") from err
    if not jnp.issubdtype(resolved, jnp.floating):
        raise TypeError(
            f"{name} must be a floating dtype (masks feed kernels and linear "
            f"models), got {resolved}.")
    return dtype


def num_duplicate_rows(masks) -> int:
    """Rows of concrete ``masks`` equal to an earlier row (0 for traced masks)."""
    if not is_concrete(masks):
        return 0
    arr = np.asarray(masks)
    return int(arr.shape[0] - np.unique(arr, axis=0).shape[0])
