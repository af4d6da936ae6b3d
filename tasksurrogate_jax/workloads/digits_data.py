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
  in its order; every training example belongs to exactly one task (the
  ``"interactions"`` sources append copies and blends after them).
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

  - ``"interactions"``: sources with planted pairwise interactions of known
    sign (:func:`planted_interactions`), in the convention of
    :mod:`tasksurrogate_jax.downstream.interactions`: ``I_ij = F(−i−j) − F(−i) − F(−j)
    + F(full)`` on the target losses, ``> 0`` substitutes, ``< 0``
    complements or conflict. With ``C`` the ``conflict_classes`` (by default
    the 8 classes other than the blend classes) and ``a, b`` the
    ``blend_classes``, ``X`` is a random ``conflict_fraction`` of the training
    images of ``C``. The training images outside ``X`` are partitioned at
    random into the clean tasks 5, ... (``"clean-05"``, ...), which thus hold
    the rest of ``C`` and every image of ``a, b``. Tasks 1-4 are appended after
    the training split, so an image may be a row of several tasks.

    - Tasks 0 ``"twin-a"`` and 1 ``"twin-b"``: exact duplicates, ``X`` with
      its true labels.
    - Task 2 ``"swapped"``: the same images ``X``, each labelled with the
      next class of ``conflict_classes`` (cyclically; for two classes a swap).
    - Tasks 3 ``"blend-a"`` and 4 ``"blend-b"``: ``blend_size`` images each,
      ``(1 − blend_weight) x_a + blend_weight x_b`` for a random training image
      ``x_a`` of ``a`` and ``x_b`` of ``b`` (standardized inputs; each task
      draws its own), labelled ``a`` in task 3 and ``b`` in task 4.

    Planted signs (the mechanisms in :func:`planted_interactions`): twins
    ``(0, 1)`` **+1** (redundancy); each twin against the swapped copy,
    ``(0, 2)`` and ``(1, 2)``, **−1** (conflicting labels on the same
    inputs); the blends ``(3, 4)`` **−1** (complements: each harmful alone,
    neutral together). Measured with the ``digits`` preset ``"interactions"``
    (fine-tuning with batches of 256 for 200 steps), 8 replicates of the
    pair-removal truth: every planted sign right in every replicate for 5
    keys, ceiling of the target-mean interactions over all 45 pairs 0.94-0.97
    (per target 0.78-0.82); ``benchmarks/bench_interactions.py``.

- Model: :class:`DigitsMLP`, 64 -> ``hidden`` (``depth`` times, GELU) -> 10
  logits, in Flax NNX with ``nnx.Param`` state only.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np
from flax import nnx

from tasksurrogate_jax._checks import check_positive_int
from tasksurrogate_jax.data import (
    TargetData,
    TaskData,
    make_target_data,
    make_task_data,
)

SOURCE_KINDS = ("random", "planted", "interactions")
NUM_FEATURES = 64
NUM_CLASSES = 10
STD_FLOOR = 1e-2
PLANTED_NAMES = ("noisy-labels", "flipped-labels", "input-noise", "class-imbalance")
INTERACTION_NAMES = ("twin-a", "twin-b", "swapped", "blend-a", "blend-b")
# Fields read only by the "interactions" sources.
INTERACTION_FIELDS = ("conflict_classes", "conflict_fraction", "blend_classes",
                      "blend_size", "blend_weight")
MIN_TASK_SIZE = NUM_CLASSES  # training examples per task, at least (num_tasks cap)


@dataclasses.dataclass(frozen=True)
class DigitsDataConfig:
    """Configuration of the digits data and model (JSON-able, hashable).

    Attributes:
      sources: ``"random"``, ``"planted"`` or ``"interactions"`` (see the
        module docstring).
      num_tasks: number of tasks ``K`` (``>= 5`` for ``"planted"``, ``>= 7``
        for ``"interactions"``).
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
      conflict_classes: ``"interactions"`` sources: the classes ``(c, d)`` of
        the twins and the swapped task.
      conflict_fraction: ``"interactions"``: the fraction of the images of
        ``c, d`` in the twins and the swapped task, in ``(0, 1]``.
      blend_classes: ``"interactions"``: the classes ``(a, b)`` of the blends
        (distinct from ``conflict_classes``).
      blend_size: ``"interactions"``: images in each blend task.
      blend_weight: ``"interactions"``: weight of the ``b`` image in a blend,
        in ``[0, 1]``.
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
    conflict_classes: tuple[int, ...] = (0, 1, 2, 4, 5, 6, 7, 9)
    conflict_fraction: float = 0.2
    blend_classes: tuple[int, int] = (3, 8)
    blend_size: int = 300
    blend_weight: float = 0.5


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
    _check_interaction_fields(c)
    minimum = {"planted": len(PLANTED_NAMES) + 1,
               "interactions": len(INTERACTION_NAMES) + 1}.get(c.sources, 2)
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


def _check_classes(value, name: str, size: int | None) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
        raise TypeError(f"{name} must be a tuple of class indices, got "
                        f"{type(value).__name__}.")
    if (size is not None and len(value) != size) or not value:
        raise ValueError(f"{name} must hold {size or 'at least 1'} classes, got "
                         f"{len(value)}.")
    for v in value:
        check_positive_int(v, name, minimum=0)
        if v >= NUM_CLASSES:
            raise ValueError(f"{name} must hold classes 0..{NUM_CLASSES - 1}, got {v}.")
    if len(set(value)) != len(value):
        raise ValueError(f"{name} must hold distinct classes, got {tuple(value)}.")
    return tuple(int(v) for v in value)


def _check_interaction_fields(c: DigitsDataConfig) -> None:
    conflict = _check_classes(c.conflict_classes, "conflict_classes", None)
    if len(conflict) < 2:
        raise ValueError(f"conflict_classes must hold at least 2 classes, got "
                         f"{conflict}.")
    blend = _check_classes(c.blend_classes, "blend_classes", 2)
    if set(conflict) & set(blend):
        raise ValueError(f"blend_classes {blend} must differ from conflict_classes "
                         f"{conflict}.")
    _check_real(c.conflict_fraction, "conflict_fraction", 0.0, 1.0, closed=True)
    if c.conflict_fraction == 0:
        raise ValueError("conflict_fraction must be in (0, 1], got 0.")
    check_positive_int(c.blend_size, "blend_size")
    _check_real(c.blend_weight, "blend_weight", 0.0, 1.0, closed=True)


def planted_interactions(config: DigitsDataConfig) -> dict[tuple[int, int], int]:
    """The planted pairs of the ``"interactions"`` sources and the sign of
    their interaction ``I_ij = F(−i−j) − F(−i) − F(−j) + F(full)``; ``{}`` for
    the other source kinds.

    - ``(0, 1): +1``, twins (redundancy): each twin is the other's
      substitute in countering the swapped labels, so removing one costs
      little and removing both a lot.
    - ``(0, 2): -1`` and ``(1, 2): -1``, conflicting labels on the same
      images: a twin is worth most when the swapped copy is there to be
      countered, and the swapped copy hurts least when a twin is there.
    - ``(3, 4): -1``, complements: each blend task alone tilts the boundary
      between ``a`` and ``b`` towards its own class (the loss is convex in the
      tilt: the other class's targets lose more than its own gain); together
      they cancel, so each is harmful without the other.
    """
    if config.sources != "interactions":
        return {}
    return {(0, 1): 1, (0, 2): -1, (1, 2): -1, (3, 4): -1}


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


def _interaction_tasks(labels, inputs, c: DigitsDataConfig, rng):
    """Task ids ``[n']``, labels ``[n']`` and inputs ``[n', 64]`` of the
    ``"interactions"`` sources: the training split (each image in twin-a or a
    clean task), then twin-b, swapped, blend-a and blend-b."""
    n, k = labels.shape[0], c.num_tasks
    a, b = c.blend_classes
    pool = np.flatnonzero(np.isin(labels, c.conflict_classes))
    shared = np.sort(rng.choice(pool, round(c.conflict_fraction * pool.size),
                                replace=False))
    task_ids = np.full(n, -1, np.int32)
    task_ids[shared] = 0
    rest = rng.permutation(np.flatnonzero(task_ids < 0))
    _partition(task_ids, rest, range(len(INTERACTION_NAMES), k))
    order = np.asarray(c.conflict_classes)
    position = np.searchsorted(order, labels[shared], sorter=np.argsort(order))
    position = np.argsort(order)[position]  # index of each label in order
    swapped = order[(position + 1) % order.size].astype(labels.dtype)
    blends = []
    for _ in range(2):  # blend-a, then blend-b: independent draws
        xa = rng.choice(np.flatnonzero(labels == a), c.blend_size)
        xb = rng.choice(np.flatnonzero(labels == b), c.blend_size)
        blends.append((1.0 - c.blend_weight) * inputs[xa] + c.blend_weight * inputs[xb])
    size = shared.size
    ids = np.concatenate([task_ids, np.full(size, 1), np.full(size, 2),
                          np.full(c.blend_size, 3), np.full(c.blend_size, 4)])
    y = np.concatenate([labels, labels[shared], swapped,
                        np.full(c.blend_size, a), np.full(c.blend_size, b)])
    x = np.concatenate([inputs, inputs[shared], inputs[shared], *blends])
    names = INTERACTION_NAMES + tuple(f"clean-{t:02d}" for t in
                                      range(len(INTERACTION_NAMES), k))
    return ids.astype(np.int32), y.astype(labels.dtype), x, names


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
    # scikit-learn ships the images; imported here, where they are read.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

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
    elif c.sources == "interactions":
        task_ids, y, x, names = _interaction_tasks(y, x, c, rng)
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
    "INTERACTION_FIELDS",
    "INTERACTION_NAMES",
    "NUM_CLASSES",
    "NUM_FEATURES",
    "PLANTED_NAMES",
    "SOURCE_KINDS",
    "STD_FLOOR",
    "DigitsDataConfig",
    "DigitsMLP",
    "digits_data",
    "planted_interactions",
]
