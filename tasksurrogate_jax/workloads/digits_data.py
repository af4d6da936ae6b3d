"""Data and model of a real-data image workload: handwritten digits.

- Data: scikit-learn's bundled copy of the test set of the UCI "Optical
  Recognition of Handwritten Digits" data (``sklearn.datasets.load_digits``):
  1,797 real 8x8 grey-level images of the digits 0-9, no download. Pixels
  (0-16) are scaled to ``[0, 1]``, flattened to 64 features and standardized
  with the training split's per-pixel mean and std (std floored at
  :data:`STD_FLOOR`); float32.
- Split: stratified by class, ``test_fraction`` of the images held out
  (``train_test_split(..., stratify=labels, random_state=split_seed)``).
  Rows of the :class:`~tasksurrogate_jax.data.TaskData` are the training split
  in its order; every training example belongs to exactly one task.
- Targets: the per-example test cross-entropy of the held-out images (all of
  them, or a fixed random subset of ``num_targets``, ``target_seed``). Targets
  are never corrupted.
- Sources (tasks), ``num_tasks`` of them, random draws from ``corruption_seed``:

  - ``"random"``: the paper's CIFAR-10 protocol, a random partition of the
    training examples into ``num_tasks`` groups whose sizes differ by at most
    one (``group00``, ``group01``, ...).
  - ``"planted"``: sources that differ in a known way. Task 3
    ``"class-imbalance"`` is built first: ``n_train // num_tasks`` examples
    (fewer if the pool is smaller) drawn from the training examples of 3
    random classes. The rest is partitioned at random into the other tasks, as
    above, and then: task 0 ``"noisy-labels"`` has ``round(label_noise * size)``
    labels replaced by a uniformly random *other* class; task 1
    ``"flipped-labels"`` has every label ``y`` mapped to ``(y + 1) % 10`` (a
    permutation without fixed points); task 2 ``"input-noise"`` has Gaussian
    noise of std ``input_noise`` added to its standardized inputs; tasks 4, ...
    (``"clean-04"``, ...) are untouched. Since task 3 takes part of 3 classes,
    the other tasks hold slightly fewer examples of those classes.

- Model: :class:`DigitsMLP`, 64 -> ``hidden`` (``depth`` times, GELU) -> 10
  logits, in Flax NNX with ``nnx.Param`` state only.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from tasksurrogate_jax._checks import check_positive_int
from tasksurrogate_jax.data import (
    TargetData,
    TaskData,
    make_target_data,
    make_task_data,
)

SOURCE_KINDS = ("random", "planted")
NUM_FEATURES = 64
NUM_CLASSES = 10
STD_FLOOR = 1e-2
PLANTED_NAMES = ("noisy-labels", "flipped-labels", "input-noise", "class-imbalance")
MIN_TASK_SIZE = NUM_CLASSES  # training examples per task, at least (num_tasks cap)


@dataclasses.dataclass(frozen=True)
class DigitsDataConfig:
    """Configuration of the digits data and model (JSON-able, hashable).

    Attributes:
      sources: ``"random"`` or ``"planted"`` (see the module docstring).
      num_tasks: number of tasks ``K`` (``>= 5`` for ``"planted"``).
      test_fraction: fraction of the images held out, in ``(0, 1)``.
      split_seed: seed of the stratified train/test split.
      num_targets: number of test images used as targets (``None`` = all).
      target_seed: seed of the target subset.
      label_noise: fraction of the noisy-labels task's labels replaced by a
        random other class, in ``[0, 1]``.
      input_noise: std of the Gaussian noise added to the input-noise task's
        standardized inputs, ``>= 0``.
      corruption_seed: seed of the task partition and of the corruptions.
      hidden: MLP width.
      depth: MLP hidden layers (0 = multinomial logistic regression).
    """

    sources: str = "planted"
    num_tasks: int = 10
    test_fraction: float = 0.3
    split_seed: int = 0
    num_targets: int | None = None
    target_seed: int = 1
    label_noise: float = 0.5
    input_noise: float = 1.0
    corruption_seed: int = 2
    hidden: int = 64
    depth: int = 1


def _check_real(value, name: str, lo: float, hi: float, *, closed: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}.")
    inside = lo <= value <= hi if closed else lo < value < hi
    if not inside:
        span = f"[{lo}, {hi}]" if closed else f"({lo}, {hi})"
        raise ValueError(f"{name} must be in {span}, got {value}.")
    return float(value)


def _check_config(c: DigitsDataConfig, num_images: int) -> None:
    if not isinstance(c, DigitsDataConfig):
        raise TypeError(f"config must be a DigitsDataConfig, got {type(c).__name__}.")
    if c.sources not in SOURCE_KINDS:
        raise ValueError(f"sources must be one of {SOURCE_KINDS}, got {c.sources!r}.")
    _check_real(c.test_fraction, "test_fraction", 0.0, 1.0, closed=False)
    num_test = math.ceil(c.test_fraction * num_images)  # as train_test_split
    if min(num_test, num_images - num_test) < NUM_CLASSES:
        raise ValueError(
            f"test_fraction={c.test_fraction} leaves {num_test} of {num_images} "
            f"images for testing; both splits need >= {NUM_CLASSES} (one per class)."
        )
    _check_real(c.label_noise, "label_noise", 0.0, 1.0, closed=True)
    _check_real(c.input_noise, "input_noise", 0.0, math.inf, closed=True)
    for name in ("split_seed", "target_seed", "corruption_seed", "depth"):
        check_positive_int(getattr(c, name), name, minimum=0)
    check_positive_int(c.hidden, "hidden")
    minimum = len(PLANTED_NAMES) + 1 if c.sources == "planted" else 2
    check_positive_int(c.num_tasks, "num_tasks", minimum=minimum)
    cap = (num_images - num_test) // MIN_TASK_SIZE
    if c.num_tasks > cap:
        raise ValueError(
            f"num_tasks must be <= {cap} (at least {MIN_TASK_SIZE} training "
            f"examples per task), got {c.num_tasks}."
        )
    if c.num_targets is not None:
        check_positive_int(c.num_targets, "num_targets")
        if c.num_targets > num_test:
            raise ValueError(
                f"num_targets must be <= the {num_test} test images, got "
                f"{c.num_targets}."
            )


def _partition(task_ids, rows, tasks) -> None:
    """Assigns ``rows`` (already shuffled) to ``tasks`` in groups whose sizes
    differ by at most one, writing into ``task_ids``."""
    tasks = list(tasks)
    for t, group in zip(tasks, np.array_split(rows, len(tasks)), strict=True):
        task_ids[group] = t


def _planted_tasks(labels, inputs, c: DigitsDataConfig, rng):
    """Task ids ``[n]`` and corrupted copies of ``labels`` ``[n]`` and
    ``inputs`` ``[n, 64]`` for the ``"planted"`` sources."""
    n, k = labels.shape[0], c.num_tasks
    classes = rng.choice(NUM_CLASSES, 3, replace=False)
    pool = np.flatnonzero(np.isin(labels, classes))
    imbalance = rng.choice(pool, min(n // k, pool.size), replace=False)
    rest = rng.permutation(np.setdiff1d(np.arange(n), imbalance))
    task_ids = np.empty(n, np.int32)
    task_ids[imbalance] = 3
    _partition(task_ids, rest, [t for t in range(k) if t != 3])
    labels, inputs = labels.copy(), inputs.copy()
    noisy = np.flatnonzero(task_ids == 0)
    noisy = rng.choice(noisy, round(c.label_noise * noisy.size), replace=False)
    shift = rng.integers(1, NUM_CLASSES, noisy.size)  # a uniformly random other
    labels[noisy] = (labels[noisy] + shift) % NUM_CLASSES
    flipped = task_ids == 1
    labels[flipped] = (labels[flipped] + 1) % NUM_CLASSES
    noised = task_ids == 2
    inputs[noised] += c.input_noise * rng.standard_normal(inputs[noised].shape)
    names = PLANTED_NAMES + tuple(f"clean-{t:02d}" for t in range(4, k))
    return task_ids, labels, inputs, names


def digits_data(config: DigitsDataConfig) -> tuple[TaskData, TargetData]:
    """Builds the digits training tasks and targets (see the module docstring).

    Args:
      config: a :class:`DigitsDataConfig`.

    Returns:
      ``(data, target)``: :class:`~tasksurrogate_jax.data.TaskData` with inputs
      ``[n_train, 64]`` float32, labels ``[n_train]`` and ``num_tasks`` named
      tasks; :class:`~tasksurrogate_jax.data.TargetData` with inputs
      ``[num_targets, 64]`` and labels ``[num_targets]``.

    Raises:
      TypeError, ValueError: an invalid configuration (the message names the
        field).
    """
    c = config
    digits = load_digits()
    pixels, labels = digits.data / 16.0, digits.target.astype(np.int32)
    _check_config(c, labels.shape[0])
    train, test = train_test_split(
        np.arange(labels.shape[0]), test_size=float(c.test_fraction), stratify=labels,
        random_state=c.split_seed,
    )
    mean = pixels[train].mean(0)
    std = np.maximum(pixels[train].std(0), STD_FLOOR)
    inputs = (pixels - mean) / std
    x, y = inputs[train], labels[train]
    rng = np.random.default_rng(c.corruption_seed)
    if c.sources == "random":
        task_ids = np.empty(train.size, np.int32)
        _partition(task_ids, rng.permutation(train.size), range(c.num_tasks))
        names = tuple(f"group{t:02d}" for t in range(c.num_tasks))
    else:
        task_ids, y, x, names = _planted_tasks(y, x, c, rng)
    data = make_task_data(
        x.astype(np.float32), y, task_ids, num_tasks=c.num_tasks, task_names=names,
        num_classes=NUM_CLASSES,
    )
    if c.num_targets is not None:
        pick = np.random.default_rng(c.target_seed).choice(
            test.size, c.num_targets, replace=False
        )
        test = test[np.sort(pick)]
    target = make_target_data(
        inputs[test].astype(np.float32), labels[test], num_classes=NUM_CLASSES,
        description=f"per-example test cross-entropy of {test.size} held-out digits",
    )
    return data, target


class DigitsMLP(nnx.Module):
    """MLP: inputs ``[batch, 64]`` -> logits ``[batch, 10]``.

    ``depth`` hidden layers of width ``hidden`` with GELU (smooth, which suits
    the first-order model); ``nnx.Param`` state only.
    """

    def __init__(self, config: DigitsDataConfig, *, rngs: nnx.Rngs):
        widths = [NUM_FEATURES] + [config.hidden] * config.depth
        pairs = zip(widths[:-1], widths[1:], strict=True)
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in pairs])
        self.head = nnx.Linear(widths[-1], NUM_CLASSES, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = nnx.gelu(layer(x))
        return self.head(x)


__all__ = [
    "NUM_CLASSES",
    "NUM_FEATURES",
    "PLANTED_NAMES",
    "SOURCE_KINDS",
    "STD_FLOOR",
    "DigitsDataConfig",
    "DigitsMLP",
    "digits_data",
]
