"""Fingerprints of what a result depends on: arrays and the programs themselves.

A stored result may be reused only by a run that would compute the same
numbers. Arrays are compared by their bytes (:func:`array_digest`). Functions
and optax transformations cannot be compared by name or identity, so a
program is compared by **what it computes**: :func:`program_digest` traces it
at the real shapes (``jax.make_jaxpr``) and hashes the jaxpr, every nested
jaxpr (``jit``, ``scan``, ``cond``, custom derivatives) and every constant it
closes over. A learning rate, a schedule, a loss, a layer, the number of steps
or the batch size each change the jaxpr; an array captured by a closure
changes a constant. Names of variables and memory addresses do not enter the
digest, so the same program gives the same digest in another process.

What a digest cannot see: Python side effects at trace time, and code run
outside the traced function (say, data loaded inside ``init_fn`` from a file
that changed is seen only through the parameters it produces). A new JAX
version may trace the same code to another jaxpr: stores written by one JAX
version are then refused by another, which is the safe side.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable

import jax
import numpy as np
from jax.extend import core as jcore

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def array_digest(*arrays) -> str:
    """SHA-256 of arrays' dtypes, shapes and bytes (PRNG keys by their data)."""
    h = hashlib.sha256()
    for a in arrays:
        if isinstance(a, jax.Array) and jax.dtypes.issubdtype(
                a.dtype, jax.dtypes.prng_key):
            a = jax.random.key_data(a)
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def tree_digest(tree) -> str:
    """SHA-256 of a pytree of arrays: its structure and every leaf's bytes."""
    leaves, treedef = jax.tree.flatten(tree)
    return hashlib.sha256(
        (str(treedef) + array_digest(*leaves)).encode()).hexdigest()


def program_digest(fn: Callable, *args) -> str:
    """SHA-256 of what ``fn(*args)`` computes: its jaxpr at ``args``' shapes.

    Args:
      fn: a traceable function (no static arguments: close over them).
      *args: example arguments, arrays or ``jax.ShapeDtypeStruct`` (only their
        shapes and dtypes matter).

    Returns:
      A hex digest equal for two functions exactly when they trace to the same
      operations on the same shapes with the same literals and constants.
    """
    closed = jax.make_jaxpr(fn)(*args)
    return _Hasher().closed(closed)


class _Hasher:
    """Canonical serialisation of jaxprs: variables are numbered in order of
    appearance, sub-jaxprs are hashed in place (memoised by identity), and
    constants by their bytes."""

    def __init__(self):
        self._memo: dict[int, str] = {}

    def closed(self, closed) -> str:
        return self.jaxpr(closed.jaxpr, closed.consts)

    def jaxpr(self, jaxpr, consts=()) -> str:
        memo_key = id(jaxpr)
        if not consts and memo_key in self._memo:
            return self._memo[memo_key]
        names: dict = {}

        def var(v) -> str:
            if isinstance(v, jcore.Literal):
                return f"lit:{self.value(v.val)}:{v.aval}"
            if v not in names:
                names[v] = len(names)
            return f"v{names[v]}:{v.aval}"

        parts = ["const:" + ",".join(var(v) for v in jaxpr.constvars),
                 "consts:" + ",".join(self.value(c) for c in consts),
                 "in:" + ",".join(var(v) for v in jaxpr.invars)]
        for eqn in jaxpr.eqns:
            params = ",".join(f"{k}={self.param(eqn.params[k])}"
                              for k in sorted(eqn.params))
            parts.append(f"{eqn.primitive.name}[{params}]("
                         + ",".join(var(v) for v in eqn.invars) + ")->"
                         + ",".join(var(v) for v in eqn.outvars))
        parts.append("out:" + ",".join(var(v) for v in jaxpr.outvars))
        digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()
        if not consts:
            self._memo[memo_key] = digest
        return digest

    def param(self, value) -> str:
        if isinstance(value, jcore.ClosedJaxpr):
            return "closed:" + self.closed(value)
        if isinstance(value, jcore.Jaxpr):
            return "jaxpr:" + self.jaxpr(value)
        if isinstance(value, (tuple, list)):
            return "(" + ",".join(self.param(v) for v in value) + ")"
        if isinstance(value, dict):
            return "{" + ",".join(f"{k}:{self.param(value[k])}"
                                  for k in sorted(value, key=str)) + "}"
        if isinstance(value, (np.ndarray, jax.Array, np.generic)):
            return self.value(value)
        if callable(value) and hasattr(value, "__qualname__"):
            return f"fn:{getattr(value, '__module__', '')}.{value.__qualname__}"
        return _ADDRESS.sub("", repr(value))

    @staticmethod
    def value(x) -> str:
        if isinstance(x, (bool, int, float, complex)) and not isinstance(
                x, np.generic):
            return f"{type(x).__name__}:{x!r}"
        return array_digest(x)


__all__ = ["array_digest", "program_digest", "tree_digest"]
