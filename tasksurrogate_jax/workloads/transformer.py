"""The pre-LayerNorm transformer block shared by the workloads' small models,
and their training loop on freshly sampled batches."""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax
from flax import nnx


class TransformerBlock(nnx.Module):
    """Pre-LayerNorm block: causal self-attention, then a ReLU MLP.

    Args:
      width: model width.
      heads: attention heads (``width`` divisible by ``heads``).
      mlp_ratio: MLP hidden width / ``width``.
      rngs: parameter initialisation keys.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: int, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(width, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=heads, in_features=width, decode=False, keep_rngs=False,
            rngs=rngs,
        )
        self.ln2 = nnx.LayerNorm(width, rngs=rngs)
        self.fc1 = nnx.Linear(width, mlp_ratio * width, rngs=rngs)
        self.fc2 = nnx.Linear(mlp_ratio * width, width, rngs=rngs)

    def __call__(self, x, mask):
        """``x [..., length, width]``, ``mask [..., 1, length, length]``."""
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.fc2(jax.nn.relu(self.fc1(self.ln2(x))))


def train_on_fresh_batches(params, batch_loss: Callable, optimizer, *,
                           num_steps: int, key):
    """Minimises ``batch_loss(params, step_key) -> scalar`` with ``optimizer``,
    each step on the batch its own key draws (one compiled ``lax.scan``).

    Returns:
      ``(params, losses [num_steps])``: the trained parameters and the loss of
      every step.
    """

    def step(carry, step_key):
        p, state = carry
        loss, grads = jax.value_and_grad(batch_loss)(p, step_key)
        updates, state = optimizer.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), loss

    @jax.jit
    def train(params, key):
        (p, _), losses = jax.lax.scan(step, (params, optimizer.init(params)),
                                      jax.random.split(key, num_steps))
        return p, losses

    return train(params, key)
