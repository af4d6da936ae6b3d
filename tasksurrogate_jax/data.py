"""Multi-task training data and target data.

A training set is a list of examples, each belonging to one of ``K`` tasks.
:class:`TaskData` holds it as padded arrays so that every subset of tasks has
the same shapes (one compiled program serves every subset):

- ``inputs``: ``[num_examples, ...]``;
- ``labels``: ``[num_examples]`` integer class labels (or ``[num_examples, ...]``
  regression targets);
- ``task_ids``: ``[num_examples]`` int32 in ``0 .. K - 1``, or ``-1`` for padding
  rows, which never enter the loss.

A subset mask ``s`` (``[num_tasks]`` of 0/1) becomes per-example weights
``w_n = s[task_ids[n]]`` (0 for padding): see :func:`mask_to_weights`.
Training on the subset is then training with those weights (see
``truth/retraining.py``), with no change of shapes.

:class:`TargetData` is the evaluation set: ``inputs`` ``[num_targets, ...]``
and ``labels`` ``[num_targets]``; each target example is one column of the
subset scores ``F(s)``.

Both are immutable pytrees (``jax.tree_util.register_dataclass``) whose array
fields are leaves and whose counts and names are static, so they pass through
``jit`` and ``vmap``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tasksurrogate_jax._checks import (
    as_array,
    as_float_array,
    check_masks,
    check_positive_int,
    is_concrete,
)

PAD_TASK_ID = -1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TaskData:
    """Padded multi-task training data.

    Attributes:
      inputs: ``[num_examples, ...]`` model inputs.
      labels: ``[num_examples]`` integer labels (or ``[num_examples, ...]``
        regression targets).
      task_ids: ``[num_examples]`` int32 task of each example; ``-1`` marks
        padding rows.
      num_tasks: number of tasks ``K`` (static).
      task_names: ``K`` task names (static).
      num_classes: number of classes for integer labels, or ``None`` (static).
    """

    inputs: jax.Array
    labels: jax.Array
    task_ids: jax.Array
    num_tasks: int = dataclasses.field(metadata=dict(static=True))
    task_names: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))
    num_classes: int | None = dataclasses.field(
        default=None, metadata=dict(static=True)
    )

    @property
    def num_examples(self) -> int:
        """Number of rows, padding included."""
        return int(self.task_ids.shape[0])

    def task_sizes(self) -> np.ndarray:
        """``[num_tasks]`` number of (non-padding) examples in each task."""
        ids = np.asarray(self.task_ids)
        return np.bincount(ids[ids >= 0], minlength=self.num_tasks)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TargetData:
    """Target (evaluation) examples; each is one column of ``F(s)``.

    Attributes:
      inputs: ``[num_targets, ...]`` model inputs.
      labels: ``[num_targets]`` integer labels (or regression targets).
      description: what the targets are (static).
    """

    inputs: jax.Array
    labels: jax.Array
    description: str = dataclasses.field(default="", metadata=dict(static=True))

    @property
    def num_targets(self) -> int:
        return int(self.labels.shape[0])


def _numeric(x, name: str) -> jax.Array:
    """``x`` as a real or integer (or bool) array, or an error naming it;
    concrete floating values must be finite."""
    arr = as_array(x, name)
    if not (jnp.issubdtype(arr.dtype, jnp.integer)
            or jnp.issubdtype(arr.dtype, jnp.floating) or arr.dtype == jnp.bool_):
        raise TypeError(f"{name} must have a real or integer dtype, got {arr.dtype}.")
    if jnp.issubdtype(arr.dtype, jnp.floating) and is_concrete(arr):
        finite = np.isfinite(np.asarray(arr))
        if not finite.all():
            raise ValueError(f"{name} must be finite, found {int((~finite).sum())} "
                             "NaN or infinite values.")
    return arr


def _check_labels(labels, name: str, num_rows: int, num_classes: int | None):
    arr = _numeric(labels, name)
    if arr.ndim == 0 or arr.shape[0] != num_rows:
        raise ValueError(
            f"{name} must have one row per input ({num_rows}), got shape "
            f"{arr.shape}."
        )
    if num_classes is not None:
        if not jnp.issubdtype(arr.dtype, jnp.integer):
            raise TypeError(
                f"{name} must be integer class labels when num_classes is given, "
                f"got dtype {arr.dtype}."
            )
        if is_concrete(arr) and arr.size:
            host = np.asarray(arr)  # NumPy: never staged into a caller's trace
            lo, hi = int(host.min()), int(host.max())
            if lo < 0 or hi >= num_classes:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"{name} must lie in [0, {num_classes}) for num_classes="
                    f"{num_classes}, found {bad}."
                )
        arr = arr.astype(jnp.int32)
    return arr


def make_task_data(
    inputs,
    labels,
    task_ids,
    *,
    num_tasks: int | None = None,
    task_names: Sequence[str] | None = None,
    num_classes: int | None = None,
) -> TaskData:
    """Builds validated :class:`TaskData`.

    Args:
      inputs: ``[num_examples, ...]`` inputs.
      labels: ``[num_examples]`` integer labels (checked against
        ``num_classes`` when given) or regression targets.
      task_ids: ``[num_examples]`` integers in ``0 .. num_tasks - 1``, or ``-1``
        for padding rows.
      num_tasks: ``K``; defaults to ``max(task_ids) + 1`` (or ``len(task_names)``).
      task_names: ``K`` names; defaults to ``"task_0"``, ``"task_1"``, ...
      num_classes: number of classes for integer labels; ``None`` for
        regression targets.

    Returns:
      The :class:`TaskData`.

    Raises:
      ValueError: mismatched lengths, task ids out of range, labels out of range,
        non-finite floating inputs or labels, or names that are not
        ``num_tasks`` distinct ones.
      TypeError: non-numeric (e.g. string or complex) inputs or labels, or
        non-integer task ids.
    """
    inputs = _numeric(inputs, "inputs")
    if inputs.ndim == 0:
        raise ValueError("inputs must be [num_examples, ...], got a scalar.")
    n = inputs.shape[0]
    ids = np.asarray(task_ids)
    if ids.shape != (n,):
        raise ValueError(
            f"task_ids must have shape ({n},) (one per input), got {ids.shape}."
        )
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"task_ids must be integers, got dtype {ids.dtype}.")
    if num_classes is not None:
        num_classes = check_positive_int(num_classes, "num_classes")
    if num_tasks is None:
        if task_names is not None:
            num_tasks = len(task_names)
        else:
            num_tasks = int(ids.max()) + 1 if ids.size else 0
    num_tasks = check_positive_int(num_tasks, "num_tasks")
    if ids.size and (ids.min() < PAD_TASK_ID or ids.max() >= num_tasks):
        bad = ids.min() if ids.min() < PAD_TASK_ID else ids.max()
        raise ValueError(
            f"task_ids must lie in [0, {num_tasks}) (or be -1 for padding), "
            f"found {int(bad)}."
        )
    if task_names is None:
        task_names = tuple(f"task_{i}" for i in range(num_tasks))
    if isinstance(task_names, (str, bytes)):
        raise TypeError("task_names must be a sequence of names, got a single "
                        f"string {task_names!r}.")
    task_names = tuple(str(t) for t in task_names)
    if len(task_names) != num_tasks:
        raise ValueError(
            f"task_names must have num_tasks={num_tasks} entries, got "
            f"{len(task_names)}."
        )
    repeated = sorted({t for t in task_names if task_names.count(t) > 1})
    if repeated:
        raise ValueError(
            f"task_names must be distinct (reports and plots are keyed by them), "
            f"got {repeated[:10]} more than once."
        )
    labels = _check_labels(labels, "labels", n, num_classes)
    return TaskData(
        inputs=inputs,
        labels=labels,
        task_ids=jnp.asarray(ids, jnp.int32),
        num_tasks=num_tasks,
        task_names=task_names,
        num_classes=num_classes,
    )


def make_target_data(
    inputs, labels, *, num_classes: int | None = None, description: str = ""
) -> TargetData:
    """Builds validated :class:`TargetData` (``inputs`` ``[T, ...]``, ``labels``
    ``[T]``; integer labels are checked against ``num_classes`` when given,
    floating inputs and labels must be finite)."""
    inputs = _numeric(inputs, "target inputs")
    if inputs.ndim == 0 or inputs.shape[0] == 0:
        raise ValueError(
            f"target inputs must be [num_targets, ...] with num_targets >= 1, got "
            f"shape {inputs.shape}."
        )
    if num_classes is not None:
        num_classes = check_positive_int(num_classes, "num_classes")
    labels = _check_labels(labels, "target labels", inputs.shape[0], num_classes)
    return TargetData(inputs=inputs, labels=labels, description=str(description))


def check_target_matches(data: TaskData, target: TargetData) -> None:
    """Raises when ``target`` cannot be evaluated by a model trained on ``data``.

    The target inputs must have the training inputs' trailing shape and dtype
    kind, the labels the same trailing shape, and integer labels must lie in
    ``[0, data.num_classes)``.
    """
    if not isinstance(target, TargetData):
        raise TypeError(f"target must be a TargetData, got {type(target).__name__}.")
    if target.inputs.shape[1:] != data.inputs.shape[1:]:
        raise ValueError(
            f"target inputs have per-example shape {target.inputs.shape[1:]}, "
            f"expected {data.inputs.shape[1:]} (the training inputs' shape)."
        )
    if target.labels.shape[1:] != data.labels.shape[1:]:
        raise ValueError(
            f"target labels have per-example shape {target.labels.shape[1:]}, "
            f"expected {data.labels.shape[1:]} (the training labels' shape)."
        )
    int_in = jnp.issubdtype(data.inputs.dtype, jnp.integer)
    if int_in != jnp.issubdtype(target.inputs.dtype, jnp.integer):
        raise TypeError(
            f"target inputs have dtype {target.inputs.dtype}, expected the kind of "
            f"the training inputs' dtype {data.inputs.dtype}."
        )
    if data.num_classes is not None:
        _check_labels(
            target.labels, "target labels", target.num_targets, data.num_classes
        )


def mask_to_weights(masks, task_ids) -> jax.Array:
    """Per-example weights of one mask or a batch of masks.

    Args:
      masks: ``[num_tasks]`` or ``[num_subsets, num_tasks]`` 0/1 masks.
      task_ids: ``[num_examples]`` task ids (``-1`` = padding).

    Returns:
      ``[num_examples]`` or ``[num_subsets, num_examples]`` weights: the mask
      value of each example's task, 0 for padding rows.

    Raises:
      ValueError / TypeError: masks that are not 0/1, non-integer task ids, or
        (concrete) task ids outside ``[-1, num_tasks)``.
    """
    checked = as_float_array(masks, "masks")
    if checked.ndim not in (1, 2):
        raise ValueError(
            f"masks must be [num_tasks] or [num_subsets, num_tasks], got shape "
            f"{checked.shape}."
        )
    check_masks(checked.reshape(-1, checked.shape[-1]), "masks")
    num_tasks = checked.shape[-1]
    if isinstance(task_ids, (str, bytes)) or task_ids is None:
        raise TypeError(f"task_ids must be an integer array, got {task_ids!r}.")
    task_ids = jnp.asarray(task_ids)
    if not jnp.issubdtype(task_ids.dtype, jnp.integer):
        raise TypeError(f"task_ids must be integers, got dtype {task_ids.dtype}.")
    if task_ids.ndim != 1:
        raise ValueError(
            f"task_ids must be 1-D [num_examples], got shape {task_ids.shape}."
        )
    if is_concrete(task_ids) and task_ids.size:
        # NumPy, not jnp: inside a trace (a jitted caller's closure) jnp would
        # stage the reduction.
        host_ids = np.asarray(task_ids)
        lo, hi = int(host_ids.min()), int(host_ids.max())
        if lo < PAD_TASK_ID or hi >= num_tasks:
            raise ValueError(
                f"task_ids must lie in [0, {num_tasks}) (the masks' num_tasks) or be "
                f"{PAD_TASK_ID} for padding, found {lo if lo < PAD_TASK_ID else hi}."
            )
    masks = jnp.asarray(masks)
    safe = jnp.maximum(task_ids, 0)
    weights = jnp.take(masks, safe, axis=-1)
    return jnp.where(task_ids >= 0, weights, jnp.zeros((), weights.dtype))


def check_nonempty_masks(masks, data: TaskData, name: str = "masks") -> jax.Array:
    """Validates concrete masks ``[m, K]`` against ``data``.

    Every row must keep at least one example: a subset with no training data
    has no defined training loss.

    Returns:
      The masks as a floating array.
    """
    arr = check_masks(masks, name, num_tasks=data.num_tasks)
    if is_concrete(arr):
        counts = np.asarray(arr) @ data.task_sizes()
        empty = np.nonzero(counts == 0)[0]
        if empty.size:
            raise ValueError(
                f"{name} rows {empty[:10].tolist()} keep no training examples (an "
                "all-zero mask, or only empty tasks); every subset needs at least "
                "one example to train on. Drop those rows."
            )
    return arr


def filter_task_data(data: TaskData, mask) -> TaskData:
    """The examples of the tasks kept by one mask, padding removed (NumPy).

    Not jittable (the output size depends on the mask). Used as an independent
    reference: training on ``filter_task_data(data, s)`` must equal training on
    ``data`` with the weights of ``s`` in full-batch mode.

    Args:
      data: the training data.
      mask: ``[num_tasks]`` 0/1.

    Returns:
      A :class:`TaskData` with only the kept examples.
    """
    mask = check_masks(jnp.asarray(mask)[None], "mask", num_tasks=data.num_tasks)[0]
    keep = np.asarray(mask_to_weights(mask, data.task_ids)) > 0
    return dataclasses.replace(
        data,
        inputs=data.inputs[keep],
        labels=data.labels[keep],
        task_ids=data.task_ids[keep],
    )


def pad_task_data(data: TaskData, num_examples: int) -> TaskData:
    """Pads ``data`` with padding rows (task id ``-1``) up to ``num_examples``.

    Padding rows copy the first example's inputs and labels and never enter
    the loss (weight 0).
    """
    num_examples = check_positive_int(num_examples, "num_examples")
    n = data.num_examples
    if num_examples < n:
        raise ValueError(
            f"num_examples must be >= the current {n} rows, got {num_examples}."
        )
    extra = num_examples - n

    def pad(x, fill=None):
        rows = jnp.repeat(x[:1], extra, axis=0) if fill is None else jnp.full(
            (extra,) + x.shape[1:], fill, x.dtype
        )
        return jnp.concatenate([x, rows], axis=0)

    return dataclasses.replace(
        data,
        inputs=pad(data.inputs),
        labels=pad(data.labels),
        task_ids=pad(data.task_ids, PAD_TASK_ID),
    )


def leading_rows_spec(inputs, rows: int = 1) -> jax.ShapeDtypeStruct:
    """The shape and dtype of ``inputs[:rows]``, for ``jax.eval_shape``, with no
    slice computed (an eager slice uploads its bounds)."""
    return jax.ShapeDtypeStruct((rows, *inputs.shape[1:]), inputs.dtype)
