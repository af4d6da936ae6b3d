"""Modular arithmetic: the paper's first setting (docs/method.md).

- Examples: all ``p²`` pairs ``(a, b)``, label ``(a + b) mod p``
  (``operation="add"``) or ``(a² + ab + b²) mod p`` (``operation="quad"``).
  A pair is the token sequence ``[a, b, =]`` (token ``p`` is ``=``); the model
  predicts the label at the last position.
- Split: a random 90/10 split of the ``p²`` pairs (``split_seed``).
- Tasks: the ``grid × grid`` blocks of ``(a // block, b // block)`` with
  ``block = ceil(p / grid)``; task ``i * grid + j`` holds the training pairs
  with ``a // block == i`` and ``b // block == j`` (for ``p = 97``, ``grid = 5``:
  blocks of 20, as in the paper). 25 tasks by default.
- Targets: the per-example cross-entropy on the test pairs (all of them, or a
  fixed random subset of ``num_targets``, ``target_seed``).
- Model: a small decoder-only transformer (pre-LayerNorm blocks, causal
  attention, learned positions) in Flax NNX, entering the retraining core
  through ``nnx.split``/``nnx.merge``.
- Training: AdamW, mini-batches from the kept examples (``truth/retraining.py``).

Presets (:data:`PRESETS`): ``"cpu"`` (small, tuned for a 2-core CPU: see
``benchmarks/RETRAINING_RESULTS.md``), ``"paper"`` (the paper's sizes, for
GPU/TPU), ``"tiny"`` (tests).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tasksurrogate_jax._checks import check_positive_int
from tasksurrogate_jax.data import make_target_data, make_task_data
from tasksurrogate_jax.estimate.estimation import EstimationSettings
from tasksurrogate_jax.estimate.finetune import Adam
from tasksurrogate_jax.workloads.base import config_from_preset
from tasksurrogate_jax.workloads.supervised import (
    SupervisedWorkload,
    TrainSettings,
    nnx_model_functions,
)
from tasksurrogate_jax.workloads.transformer import TransformerBlock

OPERATIONS = ("add", "quad")
# Points of the full set's fine-tuning path the estimate linearizes at
# (EstimationSettings.linearization_points): on the cpu preset 5 against 1
# (θ* alone) cut the median relative error from 52.7% to 8.3% and raised the
# Spearman across subsets of the mean target from 0.690 to 0.894.
MODULAR_LINEARIZATION_POINTS = 5


@dataclasses.dataclass(frozen=True)
class ModularConfig:
    """Configuration of the modular-arithmetic workload (JSON-able, hashable).

    Attributes:
      p: the modulus (a prime in the paper: 97).
      operation: ``"add"`` for ``(a + b) mod p``, ``"quad"`` for
        ``(a² + ab + b²) mod p``.
      grid: tasks are the ``grid × grid`` blocks of ``(a, b)``.
      train_fraction: fraction of the ``p²`` pairs used for training.
      split_seed: seed of the train/test split.
      num_targets: number of test pairs used as targets (``None`` = all).
      target_seed: seed of the target subset.
      depth: transformer blocks.
      width: model width.
      heads: attention heads.
      mlp_ratio: MLP hidden width / model width.
      learning_rate: AdamW learning rate.
      weight_decay: AdamW weight decay.
      b1: AdamW beta 1.
      b2: AdamW beta 2.
      batch_size: mini-batch size (``None`` = full batch).
      num_steps: optimizer steps per subset.
      finetune_steps: steps of the ``"finetune"`` regime (``None``: a quarter
        of ``num_steps``).
      finetune_learning_rate: its AdamW learning rate, without weight decay
        (``None``: a tenth of ``learning_rate``).
      precision: ``"float32"`` or ``"float64"`` (see
        :class:`~tasksurrogate_jax.workloads.supervised.SupervisedWorkload`).
    """

    p: int = 97
    operation: str = "add"
    grid: int = 5
    train_fraction: float = 0.9
    split_seed: int = 0
    num_targets: int | None = None
    target_seed: int = 1
    depth: int = 2
    width: int = 128
    heads: int = 4
    mlp_ratio: int = 4
    learning_rate: float = 1e-3
    weight_decay: float = 1.0
    b1: float = 0.9
    b2: float = 0.98
    batch_size: int | None = 512
    num_steps: int = 5000
    finetune_steps: int | None = None
    finetune_learning_rate: float | None = None
    precision: str = "float32"

    @property
    def block(self) -> int:
        """Side of a task block: ``ceil(p / grid)``."""
        return -(-self.p // self.grid)


PRESETS: dict[str, ModularConfig] = {
    # The paper's sizes (GPU/TPU). The paper trains "long" (grokking) without
    # a step count; 5000 steps of batch 512 is our choice.
    "paper": ModularConfig(),
    # Small enough for a 2-core CPU: see benchmarks/RETRAINING_RESULTS.md for
    # its accuracy, LOO spread and timings.
    # p = 41 (1513 training pairs, 168 test pairs, blocks of 9), one block of
    # width 32: 100% test accuracy; 90 runs in about 3 minutes on 2 cores.
    "cpu": ModularConfig(
        p=41, depth=1, width=32, heads=4, mlp_ratio=4, learning_rate=3e-3,
        weight_decay=1.0, batch_size=128, num_steps=600,
    ),
    # For tests: trains above chance in a few seconds; 16 tasks.
    "tiny": ModularConfig(
        p=11, grid=4, depth=1, width=16, heads=2, mlp_ratio=2, learning_rate=1e-2,
        weight_decay=0.0, batch_size=None, num_steps=150,
    ),
}


def modular_examples(p: int, operation: str):
    """All ``p²`` pairs as tokens ``[a, b, p]`` ``[p², 3]`` and labels ``[p²]``."""
    a, b = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
    a, b = a.ravel(), b.ravel()
    if operation == "add":
        labels = (a + b) % p
    elif operation == "quad":
        labels = (a * a + a * b + b * b) % p
    else:
        raise ValueError(f"operation must be one of {OPERATIONS}, got {operation!r}.")
    tokens = np.stack([a, b, np.full_like(a, p)], axis=1).astype(np.int32)
    return tokens, labels.astype(np.int32)


def block_task_ids(tokens, *, p: int, grid: int) -> np.ndarray:
    """Task of each pair: ``(a // block) * grid + b // block``, ``[n]`` int32."""
    block = -(-p // grid)
    tokens = np.asarray(tokens)
    return ((tokens[:, 0] // block) * grid + tokens[:, 1] // block).astype(np.int32)


class ModularTransformer(nnx.Module):
    """Decoder-only transformer: tokens ``[batch, 3]`` -> logits ``[batch, p]``.

    The logits are read at the last position (the ``=`` token).
    """

    def __init__(self, config: ModularConfig, *, rngs: nnx.Rngs):
        c = config
        self.embed = nnx.Embed(c.p + 1, c.width, rngs=rngs)
        self.pos = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (3, c.width), jnp.float32)
        )
        self.blocks = nnx.List(
            [TransformerBlock(c.width, c.heads, c.mlp_ratio, rngs=rngs)
             for _ in range(c.depth)]
        )
        self.ln_f = nnx.LayerNorm(c.width, rngs=rngs)
        self.unembed = nnx.Linear(c.width, c.p, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.pos[...]
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.unembed(self.ln_f(x[:, -1]))


class ModularWorkload(SupervisedWorkload):
    """Modular arithmetic over ``grid²`` block tasks (see the module docstring).

    Args:
      config: a :class:`ModularConfig` (see :data:`PRESETS`).

    Attributes:
      config: the configuration (and everything of
        :class:`~tasksurrogate_jax.workloads.supervised.SupervisedWorkload`).
    """

    name: ClassVar[str] = "modular"
    presets: ClassVar[dict[str, ModularConfig]] = PRESETS

    def __init__(self, config: ModularConfig):
        if not isinstance(config, ModularConfig):
            raise TypeError(
                f"config must be a ModularConfig, got {type(config).__name__}."
            )
        c = config
        check_positive_int(c.p, "p", minimum=2)
        check_positive_int(c.grid, "grid")
        if c.grid > c.p:
            raise ValueError(f"grid must be <= p={c.p}, got {c.grid}.")
        if c.operation not in OPERATIONS:
            raise ValueError(
                f"operation must be one of {OPERATIONS}, got {c.operation!r}."
            )
        if not 0.0 < c.train_fraction < 1.0:
            raise ValueError(
                f"train_fraction must be in (0, 1), got {c.train_fraction}."
            )
        if c.width % c.heads:
            raise ValueError(
                f"width must be divisible by heads, got width={c.width}, "
                f"heads={c.heads}."
            )
        self.config = c

        tokens, labels = modular_examples(c.p, c.operation)
        order = np.asarray(
            jax.random.permutation(jax.random.key(c.split_seed), c.p * c.p)
        )
        num_train = int(round(c.train_fraction * c.p * c.p))
        train, test = order[:num_train], order[num_train:]
        task_ids = block_task_ids(tokens[train], p=c.p, grid=c.grid)
        empty = np.nonzero(np.bincount(task_ids, minlength=c.grid * c.grid) == 0)[0]
        if empty.size:
            raise ValueError(
                f"grid={c.grid} with p={c.p} leaves tasks {empty.tolist()} without "
                f"training examples (blocks of ceil(p / grid) = {c.block} values); "
                "choose a grid whose last block is not empty."
            )
        block = c.block
        names = tuple(
            f"a[{i * block},{min((i + 1) * block, c.p)})"
            f"xb[{j * block},{min((j + 1) * block, c.p)})"
            for i in range(c.grid)
            for j in range(c.grid)
        )
        data = make_task_data(
            tokens[train], labels[train], task_ids, num_tasks=c.grid * c.grid,
            task_names=names, num_classes=c.p,
        )
        if c.num_targets is not None:
            check_positive_int(c.num_targets, "num_targets")
            if c.num_targets > test.size:
                raise ValueError(
                    f"num_targets must be <= the {test.size} test pairs, got "
                    f"{c.num_targets}."
                )
            pick = np.asarray(
                jax.random.choice(
                    jax.random.key(c.target_seed), test.size, (c.num_targets,),
                    replace=False,
                )
            )
            test = test[np.sort(pick)]
        desc = (
            f"per-example test cross-entropy of {test.size} held-out pairs of "
            f"{'(a + b)' if c.operation == 'add' else '(a² + ab + b²)'} mod {c.p}"
        )
        target = make_target_data(
            tokens[test], labels[test], num_classes=c.p, description=desc
        )

        apply_fn, init_fn = nnx_model_functions(
            lambda rngs: ModularTransformer(c, rngs=rngs))
        super().__init__(
            apply_fn=apply_fn, init_fn=init_fn, data=data, target=target,
            train=TrainSettings(optax.adamw(c.learning_rate, b1=c.b1, b2=c.b2,
                                            weight_decay=c.weight_decay),
                                c.num_steps, c.batch_size),
            # finetune.Adam: optax.adam's training, with hyperparameters the
            # Adam-preconditioned estimator reads.
            finetune=TrainSettings(
                Adam(self._finetune_learning_rate(), b1=c.b1, b2=c.b2),
                self._finetune_steps(), c.batch_size),
            description=dataclasses.asdict(c), precision=c.precision)
        # Fine-tuning moves far from θ*: where the estimate runs in the full
        # space (the tiny and cpu presets), re-linearize along the full set's
        # path (cpu: median relative error 52.7% -> 8.3%).
        relinearized = EstimationSettings(
            linearization_points=MODULAR_LINEARIZATION_POINTS)
        structure = self.params_like(key=jax.random.key(0))
        if self._resolved_space(relinearized, structure)[2] is None:
            self.estimation = relinearized

    def _finetune_steps(self) -> int:
        c = self.config
        if c.finetune_steps is None:
            return max(1, c.num_steps // 4)
        return c.finetune_steps

    def _finetune_learning_rate(self) -> float:
        c = self.config
        return (c.learning_rate / 10 if c.finetune_learning_rate is None
                else c.finetune_learning_rate)


def modular_workload(preset: str = "cpu", **overrides) -> ModularWorkload:
    """Builds the modular-arithmetic workload from a preset.

    Args:
      preset: one of :data:`PRESETS` (``"cpu"``, ``"paper"``, ``"tiny"``).
      **overrides: :class:`ModularConfig` fields to change.

    Returns:
      The :class:`ModularWorkload`.
    """
    return ModularWorkload(config_from_preset(PRESETS, preset, overrides))


__all__ = [
    "OPERATIONS",
    "PRESETS",
    "ModularConfig",
    "ModularTransformer",
    "ModularWorkload",
    "block_task_ids",
    "modular_examples",
    "modular_workload",
]
