"""Handwritten digits: a real-data image workload (scikit-learn's bundled set).

The data, the sources (tasks) and the model are in :mod:`.digits_data`; this
module adds the training programs and presets, and builds the
:class:`~tasksurrogate_jax.workloads.supervised.SupervisedWorkload`.

- ``"scratch"`` regime (and ``θ*``): Adam from the initialisation.
- ``"finetune"`` regime: from ``θ*``, plain gradient descent (SGD) at a
  small learning rate: an update that stays near ``θ*``, where a first-order
  model of the network is meant to hold.

Presets (:data:`PRESETS`), with the test accuracy of ``θ*`` (measured with
``key(0)``): ``"cpu"``, the planted sources (83%: the corrupted sources cost
accuracy), replicates affordable on 2 cores (``benchmarks/README.md``);
``"random"``, the paper's protocol of random groups (98%); ``"tiny"`` for
tests (8 sources, 64 targets; 88%).
"""

from __future__ import annotations

import dataclasses

import optax

from tasksurrogate_jax.workloads.base import config_from_preset
from tasksurrogate_jax.workloads.digits_data import (
    DigitsDataConfig,
    DigitsMLP,
    digits_data,
)
from tasksurrogate_jax.workloads.supervised import (
    SupervisedWorkload,
    TrainSettings,
    nnx_model_functions,
)


@dataclasses.dataclass(frozen=True)
class DigitsConfig(DigitsDataConfig):
    """Data and model (:class:`DigitsDataConfig`) plus the training programs.

    Attributes:
      learning_rate: Adam learning rate of training from scratch.
      num_steps: Adam steps from scratch.
      batch_size: mini-batch size (``None`` = full batch), both regimes.
      finetune_learning_rate: SGD learning rate of the ``"finetune"`` regime.
      finetune_steps: SGD steps of the ``"finetune"`` regime.
      precision: ``"float32"`` or ``"float64"`` (see
        :class:`~tasksurrogate_jax.workloads.supervised.SupervisedWorkload`).
    """

    learning_rate: float = 1e-2
    num_steps: int = 300
    batch_size: int | None = 128
    finetune_learning_rate: float = 0.1
    finetune_steps: int = 100
    precision: str = "float32"


PRESETS: dict[str, DigitsConfig] = {
    "cpu": DigitsConfig(),
    "random": DigitsConfig(sources="random"),
    "tiny": DigitsConfig(num_tasks=8, hidden=16, num_targets=64, num_steps=100,
                         batch_size=64, finetune_steps=20),
}


class DigitsWorkload(SupervisedWorkload):
    """The digits workload of a :class:`DigitsConfig` (see the module docstring)."""

    name = "digits"
    presets = PRESETS

    def __init__(self, config: DigitsConfig):
        if not isinstance(config, DigitsConfig):
            raise TypeError(
                f"config must be a DigitsConfig, got {type(config).__name__}.")
        self.config = config
        data, target = digits_data(config)
        apply_fn, init_fn = nnx_model_functions(
            lambda rngs: DigitsMLP(config, rngs=rngs))
        super().__init__(
            apply_fn=apply_fn, init_fn=init_fn, data=data, target=target,
            train=TrainSettings(optax.adam(config.learning_rate), config.num_steps,
                                config.batch_size),
            finetune=TrainSettings(optax.sgd(config.finetune_learning_rate),
                                   config.finetune_steps, config.batch_size),
            description=dataclasses.asdict(config), precision=config.precision)


def digits_workload(preset: str = "cpu", **overrides) -> DigitsWorkload:
    """Builds the digits workload from a preset.

    Args:
      preset: one of :data:`PRESETS`.
      **overrides: :class:`DigitsConfig` fields to change.
    """
    return DigitsWorkload(config_from_preset(PRESETS, preset, overrides))


__all__ = ["PRESETS", "DigitsConfig", "DigitsWorkload", "digits_workload"]
