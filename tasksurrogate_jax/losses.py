"""Per-example losses and read-outs, defined once for the whole package.

Each takes model outputs with any leading batch shape (or none) and labels
of that batch shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def softmax_cross_entropy(outputs, labels):
    """Cross-entropy of integer ``labels`` ``[...]`` under logits ``outputs``
    ``[..., classes]`` -> ``[...]``."""
    return optax.softmax_cross_entropy_with_integer_labels(outputs, labels)


def argmax_accuracy(outputs, labels):
    """0/1 correctness of ``argmax(outputs, -1)`` -> ``[...]``."""
    return (jnp.argmax(outputs, axis=-1) == labels).astype(outputs.dtype)


def squared_error(outputs, labels):
    """Per-example ``0.5 * ||outputs - labels||²``: ``[batch, ...]`` -> ``[batch]``
    (regression)."""
    diff = outputs - labels
    return 0.5 * jnp.sum(diff.reshape(diff.shape[0], -1) ** 2, axis=-1)


def margin(logits, label):
    """Correct-class log-odds ``z_y - logsumexp(z_{-y})`` of one example
    (``logits`` ``[classes]``); the cross-entropy is ``softplus(-margin)``."""
    others = jnp.where(jnp.arange(logits.shape[-1]) == label, -jnp.inf, logits)
    return logits[label] - jax.nn.logsumexp(others)


__all__ = ["argmax_accuracy", "margin", "softmax_cross_entropy", "squared_error"]
