"""The dense layers of a user's model, found in its jaxpr, and the
interpreter that records their inputs and output gradients.

:func:`find_dense_layers` traces
``apply_fn(params, x[None])`` for one example to a jaxpr and interprets it:
every ``dot_general`` whose right operand is a 2-D parameter leaf (possibly
cast or transposed) and whose left operand is an activation contracted on its
last axis is a dense layer (its *tap*); a 1-D parameter leaf broadcast along
the last axis and added to a tap's output is that layer's bias. This is what
Flax NNX ``nnx.Linear`` (so :class:`~tasksurrogate_jax.workloads.digits_data.
DigitsMLP` and the ``apply_fn`` of ``SupervisedWorkload.from_nnx``), Flax Linen
``nn.Dense`` and plain JAX ``x @ W + b`` / ``x @ W.T + b`` compile to, through
any nesting of ``jax.jit`` and ``jax.checkpoint``. No hook, no change to the
model: the same ``apply_fn(params, inputs)`` as everywhere in the package.

Features are then computed by interpreting the same jaxpr with a zero
*perturbation* added to every tap's output and the tap's input recorded: one
forward pass gives the outputs and every layer's input ``x``, and one
vector-Jacobian product per output class (vmapped over the C classes) with
respect to the perturbations gives every ``g_c = ∂f_c/∂y``. Examples are
vmapped one at a time (a batch of one, as :mod:`tasksurrogate_jax.estimate.linearize`
does), so the model never mixes examples.

What is not covered: a parameter used any other way (a LayerNorm scale, a
convolution kernel, an embedding lookup, a kernel inside ``lax.scan``, a
``custom_jvp`` function or a ``dot_general`` whose parameter is on the left)
is reported by :func:`find_dense_layers`, which raises (``other="error"``,
the default) or leaves it out (``other="freeze"``: the features are then those
of the model with that parameter held fixed, and a kernel left out takes its
bias with it). A kernel used by several taps (weight sharing) is supported:
its features sum over the taps.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

OTHER_CHOICES = ("error", "freeze")

# Primitives whose sub-jaxpr is interpreted in place (semantically transparent).
_CALL_PRIMITIVES = ("jit", "pjit", "closed_call", "core_call", "checkpoint", "remat",
                    "remat2")
# One-operand primitives a parameter may pass through on its way to a layer.
_VIEW_PRIMITIVES = ("convert_element_type", "copy", "copy_p", "reshape",
                    "broadcast_in_dim", "transpose", "sharding_constraint", "pvary")


@dataclasses.dataclass(frozen=True)
class DenseLayer:
    """One dense layer (a kernel leaf and its bias), static.

    Attributes:
      kernel: index of the kernel leaf in ``jax.tree.leaves(params)``.
      kernel_path: its ``jax.tree_util.keystr`` path.
      bias: index of the bias leaf, or ``None``.
      bias_path: its path, or ``None``.
      fan_in: ``a``, input width.
      fan_out: ``o``, output width.
      transposed: the kernel leaf is stored ``[o, a]`` (``x @ W.T``).
      taps: indices of the taps (uses) of this kernel, in trace order.
    """

    kernel: int
    kernel_path: str
    bias: int | None
    bias_path: str | None
    fan_in: int
    fan_out: int
    transposed: bool
    taps: tuple[int, ...]

    @property
    def input_rows(self) -> int:
        """Rows of ``P_in``: ``a`` plus one for the bias."""
        return self.fan_in + (self.bias is not None)

    @property
    def num_params(self) -> int:
        return self.input_rows * self.fan_out


@dataclasses.dataclass(frozen=True)
class Tap:
    """One use of a dense kernel in the traced model, static.

    Attributes:
      layer: index into :attr:`DenseStructure.layers`, or ``None`` for a
        frozen kernel's tap (``other="freeze"``).
      has_bias: the layer's bias is added to this tap's output.
      input_shape: shape of the tap's input activation (per example, with the
        leading batch axis of one).
      output_shape: shape of its output.
      output_dtype: dtype name of its output.
    """

    layer: int | None
    has_bias: bool
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    output_dtype: str


@dataclasses.dataclass(frozen=True)
class DenseStructure:
    """The dense layers :func:`find_dense_layers` found (hashable, static).

    Attributes:
      layers: the layers, ordered by kernel leaf.
      taps: every ``dot_general`` of a parameter kernel, in trace order.
      num_outputs: C, outputs per example.
      example_shape, example_dtype: one example's input.
      leaf_shapes: shapes of ``jax.tree.leaves(params)``.
      frozen: paths of the parameter leaves left out (``other="freeze"``).
      unused: paths of the leaves the outputs do not depend on (exact zeros).
    """

    layers: tuple[DenseLayer, ...]
    taps: tuple[Tap, ...]
    num_outputs: int
    example_shape: tuple[int, ...]
    example_dtype: str
    leaf_shapes: tuple[tuple[int, ...], ...]
    frozen: tuple[str, ...] = ()
    unused: tuple[str, ...] = ()

    @property
    def num_params(self) -> int:
        """Parameters covered by the layers."""
        return sum(layer.num_params for layer in self.layers)


@dataclasses.dataclass(frozen=True)
class _Param:
    """Provenance of a value that is a view of parameter leaf ``leaf``.

    ``kind``: ``"full"`` (the leaf, maybe cast), ``"T"`` (a 2-D leaf
    transposed) or ``"row"`` (a 1-D leaf along the last axis of a broadcast).
    """

    leaf: int
    kind: str


@dataclasses.dataclass(frozen=True)
class _Out:
    """Provenance of a tap's output (before any bias)."""

    tap: int


@dataclasses.dataclass
class _TapRecord:
    leaf: int
    transposed: bool
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    output_dtype: str


@dataclasses.dataclass
class _State:
    """What one interpretation collects: taps, biases, other uses, inputs."""

    perturbations: Sequence | None = None
    taps: list = dataclasses.field(default_factory=list)
    inputs: list = dataclasses.field(default_factory=list)
    biases: dict = dataclasses.field(default_factory=dict)  # tap -> [leaves]
    other_uses: dict = dataclasses.field(default_factory=dict)  # leaf -> {prims}

    def other_use(self, prov, name):
        if isinstance(prov, _Param):
            self.other_uses.setdefault(prov.leaf, set()).add(name)


def _shape(v):
    return tuple(v.aval.shape)


def _view_provenance(eqn, prov: _Param, leaf_shapes) -> _Param | None:
    """Provenance of the output of a view primitive, ``None`` if not a view."""
    name = eqn.primitive.name
    in_shape, out_shape = _shape(eqn.invars[0]), _shape(eqn.outvars[0])
    leaf_shape = leaf_shapes[prov.leaf]
    if name == "transpose":
        if prov.kind in ("full", "T") and len(leaf_shape) == 2 \
                and tuple(eqn.params["permutation"]) == (1, 0):
            return _Param(prov.leaf, "T" if prov.kind == "full" else "full")
        return None
    if out_shape == in_shape and name != "broadcast_in_dim":
        return prov  # a cast, a copy, an identity reshape
    is_vector = prov.kind == "row" or (prov.kind == "full" and len(leaf_shape) == 1)
    if not is_vector or not out_shape or out_shape[-1] != leaf_shape[0]:
        return None
    if name == "reshape":
        ones = all(s == 1 for s in out_shape[:-1])
        return _Param(prov.leaf, "row") if ones and (
            prov.kind == "full" or all(s == 1 for s in in_shape[:-1])) else None
    if name == "broadcast_in_dim":
        dims = tuple(eqn.params["broadcast_dimensions"])
        last_to_last = bool(dims) and dims[-1] == len(out_shape) - 1
        others_one = all(s == 1 for s in in_shape[:-1])
        return _Param(prov.leaf, "row") if last_to_last and others_one else None
    return None


def _bind(eqn, invals):
    params = eqn.primitive.get_bind_params(eqn.params)
    ctx = getattr(eqn, "ctx", None)
    manager = getattr(ctx, "manager", None) or contextlib.nullcontext()
    with manager:
        out = eqn.primitive.bind(*invals, **params)
    return out if eqn.primitive.multiple_results else [out]


def _sub_jaxpr(eqn):
    sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if isinstance(sub, jex_core.ClosedJaxpr):
        return sub.jaxpr, sub.consts
    return sub, ()


def _interpret(jaxpr, consts, args, provs, state: _State, leaf_shapes):
    """Evaluates ``jaxpr`` while tracking parameter provenance (see module doc)."""
    env, prov = {}, {}

    def read(v):
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    def read_prov(v):
        return None if isinstance(v, jex_core.Literal) else prov.get(v)

    for v, c in zip(jaxpr.constvars, consts, strict=True):
        env[v] = c
    for v, a, p in zip(jaxpr.invars, args, provs, strict=True):
        env[v] = a
        if p is not None:
            prov[v] = p

    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        inprovs = [read_prov(v) for v in eqn.invars]
        name = eqn.primitive.name
        outprovs = [None] * len(eqn.outvars)
        if not any(p is not None for p in inprovs):
            outvals = _bind(eqn, invals)
        elif name in _CALL_PRIMITIVES and _sub_jaxpr(eqn)[0] is not None:
            sub, sub_consts = _sub_jaxpr(eqn)
            outvals, outprovs = _interpret(sub, sub_consts, invals, inprovs, state,
                                           leaf_shapes)
        elif name in _VIEW_PRIMITIVES and isinstance(inprovs[0], _Param) \
                and all(p is None for p in inprovs[1:]):
            outvals = _bind(eqn, invals)
            view = _view_provenance(eqn, inprovs[0], leaf_shapes)
            if view is None:
                state.other_use(inprovs[0], name)
            outprovs = [view]
        elif name == "dot_general" and _is_tap(eqn, inprovs, leaf_shapes):
            (outvals,) = [_bind(eqn, invals)]
            index = len(state.taps)
            kernel = inprovs[1]
            (_, (contract,)), _ = eqn.params["dimension_numbers"]
            state.taps.append(_TapRecord(
                leaf=kernel.leaf, transposed=(contract == 1) != (kernel.kind == "T"),
                input_shape=_shape(eqn.invars[0]), output_shape=_shape(eqn.outvars[0]),
                output_dtype=str(eqn.outvars[0].aval.dtype)))
            state.inputs.append(invals[0])
            if state.perturbations is not None:
                outvals = [outvals[0] + state.perturbations[index]]
            outprovs = [_Out(index)]
        elif name == "add" and _bias_pair(eqn, inprovs, leaf_shapes) is not None:
            tap, leaf = _bias_pair(eqn, inprovs, leaf_shapes)
            state.biases.setdefault(tap, []).append(leaf)
            outvals = _bind(eqn, invals)
        else:
            outvals = _bind(eqn, invals)
            for p in inprovs:
                state.other_use(p, name)
        for v, val, p in zip(eqn.outvars, outvals, outprovs, strict=True):
            if isinstance(v, jex_core.DropVar):
                continue
            env[v] = val
            if p is not None:
                prov[v] = p
    outs = [read(v) for v in jaxpr.outvars]
    return outs, [read_prov(v) for v in jaxpr.outvars]


def _is_tap(eqn, inprovs, leaf_shapes) -> bool:
    lhs, rhs = inprovs
    if isinstance(lhs, _Param) or not isinstance(rhs, _Param):
        return False
    if rhs.kind not in ("full", "T") or len(leaf_shapes[rhs.leaf]) != 2:
        return False
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = \
        eqn.params["dimension_numbers"]
    lhs_ndim = len(_shape(eqn.invars[0]))
    return (tuple(lhs_batch) == () and tuple(rhs_batch) == ()
            and tuple(lhs_contract) == (lhs_ndim - 1,)
            and len(rhs_contract) == 1 and lhs_ndim >= 1)


def _bias_pair(eqn, inprovs, leaf_shapes):
    """``(tap, bias leaf)`` when ``eqn`` adds a bias to a tap's output."""
    if len(inprovs) != 2:
        return None
    for out_i, bias_i in ((0, 1), (1, 0)):
        out, bias = inprovs[out_i], inprovs[bias_i]
        if not (isinstance(out, _Out) and isinstance(bias, _Param)):
            continue
        leaf_shape = leaf_shapes[bias.leaf]
        out_shape = _shape(eqn.invars[out_i])
        is_row = bias.kind == "row" or (bias.kind == "full" and len(leaf_shape) == 1)
        if (is_row and len(leaf_shape) == 1 and out_shape
                and out_shape[-1] == leaf_shape[0]
                and _broadcasts_to(_shape(eqn.invars[bias_i]), out_shape)):
            return out.tap, bias.leaf
    return None


def _broadcasts_to(shape, target) -> bool:
    """``shape`` (a bias view) broadcasts to ``target`` by size-1 axes."""
    return len(shape) == len(target) and all(
        s in (1, t) for s, t in zip(shape, target, strict=True))


def _trace(apply_fn, params, example):
    """The closed jaxpr of ``apply_fn(params, example[None])``."""
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a),
                                                           jnp.result_type(a)),
                            (params, example))
    return jax.make_jaxpr(lambda p, x: apply_fn(p, x[None]))(*abstract)


def run_with_taps(apply_fn, params, example, perturbations=None):
    """Interprets the model on one example: ``(outputs, state)``; ``state``
    holds the taps found in order, each tap's input, the biases and the other
    uses of parameters, and ``perturbations`` (one per tap, or ``None``) are
    added to the taps' outputs."""
    closed = _trace(apply_fn, params, example)
    leaves = jax.tree.leaves(params)
    leaf_shapes = tuple(tuple(jnp.shape(leaf)) for leaf in leaves)
    provs = [_Param(i, "full") for i in range(len(leaves))] + [None]
    state = _State(perturbations=perturbations)
    if len(closed.jaxpr.invars) != len(leaves) + 1:
        raise ValueError("the example input must be a single array.")
    outs, _ = _interpret(closed.jaxpr, closed.consts, [*leaves, example], provs,
                         state, leaf_shapes)
    if len(outs) != 1:
        raise ValueError(f"apply_fn must return one array, got {len(outs)}.")
    return outs[0], state


def find_dense_layers(apply_fn: Callable, params, inputs, *,
                      other: str = "error") -> DenseStructure:
    """The dense layers of ``apply_fn`` (see the module docstring).

    Args:
      apply_fn: batched model ``(params, inputs[b, ...]) -> outputs[b, C]``.
      params: a parameter pytree (only shapes and dtypes are used).
      inputs: ``[n, ...]`` example inputs (only the shape of one is used).
      other: ``"error"``: raise if a parameter is used other than as a dense
        kernel or bias; ``"freeze"``: leave such parameters out (held fixed).

    Returns:
      A :class:`DenseStructure`.
    """
    if other not in OTHER_CHOICES:
        raise ValueError(f"other must be one of {OTHER_CHOICES}, got {other!r}.")
    example = jax.ShapeDtypeStruct(jnp.shape(inputs)[1:], jnp.result_type(inputs))
    abstract_params = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), params)
    holder = {}

    def analyse(p, x):
        out, state = run_with_taps(apply_fn, p, x)
        holder["state"] = state
        return out

    out = jax.eval_shape(analyse, abstract_params, example)
    state = holder["state"]
    if len(out.shape) != 2 or out.shape[0] != 1:
        raise ValueError("apply_fn must return [batch, num_outputs]; for one "
                         f"example it returned shape {out.shape}.")
    paths = [jax.tree_util.keystr(path) for path, _ in
             jax.tree_util.tree_flatten_with_path(params)[0]]
    leaf_shapes = tuple(tuple(jnp.shape(leaf)) for leaf in jax.tree.leaves(params))

    problems = {leaf: sorted(names) for leaf, names in state.other_uses.items()}
    kernel_taps: dict[int, list[int]] = {}
    for index, tap in enumerate(state.taps):
        kernel_taps.setdefault(tap.leaf, []).append(index)
    for leaf, taps in kernel_taps.items():
        if len({state.taps[t].transposed for t in taps}) > 1:
            problems.setdefault(leaf, []).append("dot_general in both orientations")
    bias_of: dict[int, int] = {}  # bias leaf -> kernel leaf
    tap_bias: dict[int, int] = {}
    for tap, leaves in state.biases.items():
        for leaf in leaves:
            kernel = state.taps[tap].leaf
            if len(leaves) > 1 or tap in tap_bias:
                problems.setdefault(leaf, []).append("several biases on one layer")
            elif leaf in kernel_taps:
                problems.setdefault(leaf, []).append("bias and kernel")
            elif bias_of.setdefault(leaf, kernel) != kernel:
                problems.setdefault(leaf, []).append("bias of several kernels")
            else:
                tap_bias[tap] = leaf
    if problems and other == "error":
        lines = "; ".join(f"{paths[leaf]} {leaf_shapes[leaf]} ({', '.join(names)})"
                          for leaf, names in sorted(problems.items()))
        raise ValueError(
            "find_dense_layers: parameters used other than as a dense layer's "
            f"kernel or bias: {lines}. Factored features cover dense layers "
            "only (dot_general of an activation's last axis with a 2-D "
            "parameter, plus a broadcast bias); pass other='freeze' to hold "
            "these parameters fixed.")

    layers, tap_layer = [], {}
    for leaf in sorted(kernel_taps):
        if leaf in problems:
            continue
        taps = tuple(kernel_taps[leaf])
        biases = {tap_bias[t] for t in taps if t in tap_bias}
        bias = next(iter(biases)) if len(biases) == 1 and not (biases & set(problems)) \
            else None
        first = state.taps[taps[0]]
        for t in taps:
            tap_layer[t] = len(layers)
        layers.append(DenseLayer(
            kernel=leaf, kernel_path=paths[leaf], bias=bias,
            bias_path=None if bias is None else paths[bias],
            fan_in=first.input_shape[-1], fan_out=first.output_shape[-1],
            transposed=first.transposed, taps=taps))
    covered = {layer.kernel for layer in layers} | {
        layer.bias for layer in layers if layer.bias is not None}
    used = set(kernel_taps) | set(bias_of) | set(state.other_uses)
    taps = tuple(
        Tap(layer=tap_layer.get(t),
            has_bias=t in tap_layer and tap_bias.get(t) is not None
            and tap_bias.get(t) == layers[tap_layer[t]].bias,
            input_shape=tuple(rec.input_shape), output_shape=tuple(rec.output_shape),
            output_dtype=rec.output_dtype)
        for t, rec in enumerate(state.taps))
    if not layers:
        raise ValueError("find_dense_layers found no dense layer in apply_fn.")
    return DenseStructure(
        layers=tuple(layers), taps=taps, num_outputs=int(out.shape[1]),
        example_shape=tuple(example.shape), example_dtype=str(example.dtype),
        leaf_shapes=leaf_shapes,
        frozen=tuple(paths[i] for i in sorted(used - covered)),
        unused=tuple(paths[i] for i in range(len(paths)) if i not in used))


__all__ = ["DenseLayer", "DenseStructure", "Tap", "find_dense_layers", "run_with_taps"]
