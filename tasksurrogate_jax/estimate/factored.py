"""Kronecker-factored projected Jacobians of dense layers, never ``[n, p]``.

A dense layer ``y = x W + b`` (``x`` ``[a]``, ``W`` ``[a, o]``) has the
per-example Jacobian of output ``c`` with respect to ``[W; b]``
``x̃ ⊗ g_c``, with ``x̃ = [x, 1]`` and ``g_c = ∂f_c/∂y`` (summed over positions
when the layer is applied at several, e.g. tokens: ``Σ_t x̃_t ⊗ g_{c,t}``).
Projecting ``vec([W; b])`` by the Kronecker product ``P = P_in ⊗ P_out``
(``P_in`` ``[a + 1, d_in]``, ``P_out`` ``[o, d_out]``) gives

    J_c(x) P = Σ_t (x̃_t P_in) ⊗ (g_{c,t} P_out)        (``d_in · d_out`` numbers)

without forming the ``a · o`` gradient: per example and layer it costs
``a d_in + C o d_out + C d_in d_out`` multiply-adds instead of the dense
projection's ``C a o d``. This is LoGra's projection (Choe et al. 2024, arXiv
2405.13954). Every layer has its own ``P_in``, ``P_out`` (independent:
disjoint slices of one draw, entries ``±1/√k`` or ``N(0, 1/k)`` for a side of
dimension ``k``), so ``E[P P^T] = I`` as for
:mod:`tasksurrogate_jax.estimate.projection`, and inner products of features are
unbiased estimates of inner products of Jacobians: ``E[Φ Φ^T] = J J^T``.
A side no wider than its requested dimension is kept whole (identity, exact).
The features of all layers are concatenated: ``d = Σ_layers d_in d_out``.

**The layers** are found in the user's own ``apply_fn`` by
:func:`~tasksurrogate_jax.estimate.dense_layers.find_dense_layers` (re-exported
here), which also computes the features: one forward pass records every
layer's input ``x``, and one vector-Jacobian product per output class with
respect to zero perturbations of the layers' outputs gives every
``g_c = ∂f_c/∂y``. A per-parameter scale (the Adam preconditioner's
``diag(S)``) is not Kronecker-factored and is not supported.

The estimator uses it through ``finetune.linearized_finetune_scores(...,
projection="factored")`` (``EstimationSettings.projection``; ``"auto"``
picks it for a model of more than 100,000 parameters that are all dense
layers): :func:`find_dense_layers`, :func:`allocate_dims` at ``proj_dim`` on
64 training examples, :func:`factored_linearized_examples` once at ``θ*``,
then ``finetune.shared_linearized_finetune`` for the subsets and
:func:`factored_update_norms` for their update norms.

Main entry points:

- :func:`make_factored_projection` (``key, apply_fn, params, inputs, dims``)
  -> :class:`FactoredProjection` (a pytree: its key is data, the layer
  structure and dimensions static);
- :func:`factored_jacobians` -> outputs ``[n, C]`` and features ``[n, C, d]``;
- :func:`factored_linearized_examples` -> an
  :class:`~tasksurrogate_jax.estimate.features.Linearized` (``"logits"`` or
  ``"margin"``), the drop-in for ``features.linearized_examples``;
- :func:`factored_unproject` (``w -> Δθ``, ``ΔK̃ = P_in w P_out^T`` per layer)
  and :func:`factored_update_norms` (``||Δθ||`` from ``d_in x d_in`` and
  ``d_out x d_out`` Gram matrices, never ``[m, p]``);
- :func:`layer_factors` (the unprojected ``x̃`` and ``g`` of every layer) and
  :func:`exact_kernels` (the exact ``J J^T`` per layer from them, without J);
- :func:`predicted_kernel_error` and :func:`allocate_dims`: the expected
  kernel error of given dimensions (Gaussian sides, one position per layer)
  and the per-layer ``(d_in, d_out)`` that minimise it under a budget d.

**Choosing the dimensions.** At equal d a factored projection is less
accurate than a dense one (a product of two estimates of dimensions ``d_in``
and ``d_out``: its relative error falls like ``1/√k`` per side, not
``1/√d``), but it costs so little that d can be far larger. Measured on the
digits MLP 64-1024-1024-10 (``benchmarks/bench_factored.py``): the relative
Frobenius error of ``Φ Φ^T`` (48 training examples x 10 outputs) is 0.39
with a dense d = 512 and 0.34 with d = 672; with factored features allocated
by :func:`allocate_dims` it is 0.49 / 0.39 / 0.28 / 0.17 / 0.10 at d = 512 /
672 / 2,362 / 8,831 / 25,945 (0.54 / 0.45 / 0.26 / 0.17 with the same ``k``
= 16 / 32 / 64 / 128 on every side, d = 672 / 2,368 / 8,832 / 25,984), for
0.3 s (d = 512) to 1.7 s (d = 25,945) for all 1,797 examples on 2 CPU cores,
against about 280 s for the dense d = 512 (scaled from 64 examples).
Linearized fine-tuning on allocated factored features tracks real
fine-tuning's LOO effects with Spearman 0.87 / 0.94 / 0.99 at d = 672 /
2,366 / 8,823 (full-space linearization: 0.99; ``--estimate``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from tasksurrogate_jax._checks import as_typed_key, check_positive_int
from tasksurrogate_jax.estimate.dense_layers import (
    DenseStructure,
    find_dense_layers,
    run_with_taps,
)
from tasksurrogate_jax.estimate.features import Linearized, check_output_mode
from tasksurrogate_jax.estimate.projection import KINDS, random_entries
from tasksurrogate_jax.losses import margin
from tasksurrogate_jax.truth.chunking import chunked_vmap

# -- the factored projection ------------------------------------------------------


@functools.partial(jax.tree_util.register_dataclass, data_fields=["key"],
                   meta_fields=["structure", "dims", "kind", "identity"])
@dataclasses.dataclass(frozen=True)
class FactoredProjection:
    """``P = ⊕_layers P_in ⊗ P_out`` (a pytree: passes ``jit``).

    Attributes:
      key: PRNG key; every drawn side comes from one draw of it
        (:func:`projection_factors`).
      structure: the model's :class:`DenseStructure` (static).
      dims: ``((d_in, d_out), ...)`` per layer (static); a side whose dimension
        equals its width and that :attr:`identity` marks is kept whole.
      kind: ``"rademacher"`` or ``"gaussian"`` (static).
      identity: ``((in_whole, out_whole), ...)`` per layer (static).
    """

    key: jax.Array
    structure: DenseStructure
    dims: tuple[tuple[int, int], ...]
    kind: str = "rademacher"
    identity: tuple[tuple[bool, bool], ...] = ()

    @property
    def proj_dim(self) -> int:
        """d, the feature dimension: ``Σ d_in d_out``."""
        return sum(a * b for a, b in self.dims)


def make_factored_projection(
    key, apply_fn: Callable | None = None, params=None, inputs=None, *,
    dims: int | Sequence[tuple[int, int]] = 16, kind: str = "rademacher",
    structure: DenseStructure | None = None, keep_small_sides: bool = True,
    other: str = "error",
) -> FactoredProjection:
    """A validated :class:`FactoredProjection` for a model.

    Args:
      key: PRNG key.
      apply_fn, params, inputs: the model, to find its layers
        (:func:`find_dense_layers`); or pass ``structure`` instead.
      dims: ``k``, the dimension of every side (``d_in = d_out = k``, so
        ``k²`` features per layer, as LoGra), or one ``(d_in, d_out)`` pair per
        layer in the order of ``structure.layers``.
      kind: ``"rademacher"`` (entries ``±1/√k``) or ``"gaussian"``
        (``N(0, 1/k)``).
      structure: a :class:`DenseStructure` from :func:`find_dense_layers`.
      keep_small_sides: a side of width at most its requested dimension is kept
        whole (identity: exact, and no wider than the side); ``False`` projects
        every side to exactly the requested dimension (for checks of the
        projection's statistics).
      other: as for :func:`find_dense_layers`.
    """
    key = as_typed_key(key)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    if structure is None:
        if apply_fn is None or params is None or inputs is None:
            raise ValueError("pass apply_fn, params and inputs, or structure.")
        structure = find_dense_layers(apply_fn, params, inputs, other=other)
    elif not isinstance(structure, DenseStructure):
        raise TypeError(f"structure must be a DenseStructure, got "
                        f"{type(structure).__name__}.")
    layers = structure.layers
    if isinstance(dims, bool):
        raise TypeError("dims must be an int or a sequence of (d_in, d_out) pairs.")
    if isinstance(dims, int):
        check_positive_int(dims, "dims")
        requested = [(dims, dims)] * len(layers)
    else:
        requested = [tuple(pair) for pair in dims]
        if len(requested) != len(layers) or any(len(p) != 2 for p in requested):
            raise ValueError(f"dims must hold one (d_in, d_out) pair per layer "
                             f"({len(layers)}), got {dims!r}.")
        for pair in requested:
            for value in pair:
                check_positive_int(value, "dims entries")
    out_dims, identity = [], []
    for layer, (d_in, d_out) in zip(layers, requested, strict=True):
        whole_in = keep_small_sides and layer.input_rows <= d_in
        whole_out = keep_small_sides and layer.fan_out <= d_out
        out_dims.append((layer.input_rows if whole_in else int(d_in),
                         layer.fan_out if whole_out else int(d_out)))
        identity.append((bool(whole_in), bool(whole_out)))
    return FactoredProjection(key, structure, tuple(out_dims), kind, tuple(identity))


def _factor_shapes(projection):
    """``[((rows, dim) or None, (rows, dim) or None), ...]``: the drawn sides."""
    shapes = []
    for layer, (d_in, d_out), (whole_in, whole_out) in zip(
            projection.structure.layers, projection.dims, projection.identity,
            strict=True):
        shapes.append((None if whole_in else (layer.input_rows, d_in),
                       None if whole_out else (layer.fan_out, d_out)))
    return shapes


def projection_factors(projection: FactoredProjection, dtype=jnp.float32,
                       *, explicit: bool = True):
    """``[(P_in [a(+1), d_in], P_out [o, d_out]), ...]`` per layer.

    All drawn entries come from one draw of ``projection.key`` (one random
    program, whatever the number of layers), laid out layer by layer, ``P_in``
    then ``P_out``, each row-major; each side is scaled by ``1/√dim``. With
    ``explicit=False`` a side kept whole is ``None`` instead of an identity.
    """
    shapes = _factor_shapes(projection)
    total = sum(math.prod(shape) for pair in shapes for shape in pair
                if shape is not None)
    if total:
        flat = random_entries(projection.key, (total,), projection.kind, dtype)
    factors, offset = [], 0
    for layer, pair in zip(projection.structure.layers, shapes, strict=True):
        sides = []
        for rows, shape in zip((layer.input_rows, layer.fan_out), pair, strict=True):
            if shape is None:
                sides.append(jnp.eye(rows, dtype=dtype) if explicit else None)
                continue
            size = math.prod(shape)
            sides.append(flat[offset:offset + size].reshape(shape)
                         / jnp.sqrt(jnp.asarray(shape[1], dtype)))
            offset += size
        factors.append(tuple(sides))
    return factors


def _apply(x, factor):
    return x if factor is None else x @ factor


# -- features -------------------------------------------------------------------


def _check_projection(projection, params):
    if not isinstance(projection, FactoredProjection):
        raise TypeError(f"projection must be a FactoredProjection, got "
                        f"{type(projection).__name__}.")
    shapes = tuple(tuple(jnp.shape(leaf)) for leaf in jax.tree.leaves(params))
    if shapes != projection.structure.leaf_shapes:
        raise ValueError("params do not match the projection's structure (leaf "
                         f"shapes {shapes} against "
                         f"{projection.structure.leaf_shapes}).")


def factored_jacobians(apply_fn: Callable, params, inputs, *,
                       projection: FactoredProjection,
                       batch_size: int | None = None):
    """Outputs and factored projected Jacobians ``J(x_n) P`` of every example.

    Args:
      apply_fn: batched model ``(params, inputs[b, ...]) -> outputs[b, C]``,
        the one the projection was made for.
      params: ``θ*``.
      inputs: ``[n, ...]``.
      projection: a :class:`FactoredProjection` of this model.
      batch_size: examples per chunk (``None``: all at once).

    Returns:
      ``(outputs [n, C], features [n, C, d])``, features in the parameters'
      dtype.
    """
    _check_feature_args(projection, params, inputs, batch_size)
    return _factored_jacobians(apply_fn, params, inputs, None, projection,
                               batch_size, False)


def _check_feature_args(projection, params, inputs, batch_size):
    _check_projection(projection, params)
    if tuple(jnp.shape(inputs)[1:]) != projection.structure.example_shape:
        raise ValueError(f"inputs must be [n, *{projection.structure.example_shape}]"
                         f", got shape {jnp.shape(inputs)}.")
    if batch_size is not None:
        check_positive_int(batch_size, "batch_size")


def _example_factors(apply_fn, params, x, structure, dtype):
    """One example: outputs ``[C]`` and per layer ``(X̃ [T, a(+1)], G [C, T, o])``,
    the positions of all the layer's taps stacked (``Σ_t x̃_t ⊗ g_t`` is its
    Jacobian)."""
    num_outputs = structure.num_outputs
    zeros = [jnp.zeros(t.output_shape, t.output_dtype) for t in structure.taps]

    def forward(perturbations):
        out, state = run_with_taps(apply_fn, params, x, perturbations)
        _check_taps(state, structure)
        return out[0], state.inputs

    out, vjp, acts = jax.vjp(forward, zeros, has_aux=True)
    (grads,) = jax.vmap(vjp)(jnp.eye(num_outputs, dtype=out.dtype))
    factors = []
    for layer in structure.layers:
        xs, gs = [], []
        for t in layer.taps:
            act = acts[t].reshape(-1, layer.fan_in).astype(dtype)
            if layer.bias is not None:
                flag = 1.0 if structure.taps[t].has_bias else 0.0
                act = jnp.concatenate(
                    [act, jnp.full((act.shape[0], 1), flag, dtype)], axis=1)
            xs.append(act)
            gs.append(grads[t].reshape(num_outputs, -1, layer.fan_out).astype(dtype))
        factors.append((jnp.concatenate(xs, 0), jnp.concatenate(gs, 1)))
    return out, factors


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _factored_jacobians(apply_fn, params, inputs, labels, projection, batch_size,
                        margins):
    """``(outputs [n, C], features [n, C, d])``, or with ``margins`` the
    correct-class log-odds ``[n]`` and their features ``[n, d]``, contracted
    example by example (never ``[n, C, d]``)."""
    structure = projection.structure
    dtype = jnp.result_type(*jax.tree.leaves(params))
    factors = projection_factors(projection, dtype, explicit=False)

    def one(example):
        x, y = example
        out, layers = _example_factors(apply_fn, params, x, structure, dtype)
        blocks = [jnp.einsum("ti,ctj->cij", _apply(xs, p_in), _apply(gs, p_out)
                             ).reshape(structure.num_outputs, -1)
                  for (xs, gs), (p_in, p_out) in zip(layers, factors, strict=True)]
        features = jnp.concatenate(blocks, axis=-1)
        if not margins:
            return out, features
        value, slope = jax.value_and_grad(margin)(out, y)
        return value, slope.astype(features.dtype) @ features

    return chunked_vmap(one, (inputs, labels), batch_size)


def layer_factors(apply_fn: Callable, params, inputs, *,
                  structure: DenseStructure, batch_size: int | None = None):
    """The unprojected factors of every example's dense-layer Jacobians.

    Layer ``l``'s Jacobian of output ``c`` is ``Σ_t X̃[t] ⊗ G[c, t]``
    (positions ``t`` of all its taps, ``X̃`` with the bias column). Memory is
    ``n (T (a + 1) + C T o)`` per layer: activations, not ``[n, p]``.

    Returns:
      ``(outputs [n, C], [(X̃ [n, T, a(+1)], G [n, C, T, o]), ...])``.
    """
    if not isinstance(structure, DenseStructure):
        raise TypeError(f"structure must be a DenseStructure, got "
                        f"{type(structure).__name__}.")
    return _layer_factors(apply_fn, params, inputs, structure, batch_size)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _layer_factors(apply_fn, params, inputs, structure, batch_size):
    dtype = jnp.result_type(*jax.tree.leaves(params))
    return chunked_vmap(
        lambda x: _example_factors(apply_fn, params, x, structure, dtype),
        inputs, batch_size)


@jax.jit
def exact_kernels(factors) -> list:
    """Per layer, the exact ``J_l J_l^T`` ``[n C, n C]`` from
    :func:`layer_factors` (``Σ_{t, t'} <x̃_t, x̃'_t'> <g_t, g'_t'>``): their sum
    is ``J J^T`` over the layers' parameters, without forming ``J``."""
    kernels = []
    for xs, gs in factors:
        n, num_outputs = gs.shape[:2]
        inner_x = jnp.einsum("nti,msi->ntms", xs, xs)
        inner_g = jnp.einsum("nctj,mdsj->nctmds", gs, gs)
        kernels.append(jnp.einsum("ntms,nctmds->ncmd", inner_x, inner_g).reshape(
            n * num_outputs, n * num_outputs))
    return kernels


def _check_taps(state, structure):
    found = tuple((tuple(r.input_shape), tuple(r.output_shape)) for r in state.taps)
    expected = tuple((t.input_shape, t.output_shape) for t in structure.taps)
    if found != expected:
        raise ValueError("the model's dense layers differ from the projection's "
                         "structure: make the projection for this apply_fn and "
                         "input shape.")


def factored_linearized_examples(
    apply_fn: Callable, params, inputs, labels, *, projection: FactoredProjection,
    output_mode: str = "logits", batch_size: int | None = None,
) -> Linearized:
    """``features.linearized_examples`` with factored features.

    Args:
      apply_fn, params, inputs, projection, batch_size: as for
        :func:`factored_jacobians`.
      labels: ``[n]`` integer labels.
      output_mode: ``"logits"`` (outputs ``[n, C]``, features ``[n, C, d]``) or
        ``"margin"`` (correct-class log-odds ``[n]`` and their features
        ``[n, d] = Σ_c ∂m/∂z_c Φ_c``).

    Returns:
      :class:`~tasksurrogate_jax.estimate.features.Linearized`. Margin features are
      contracted example by example: memory ``[n, d]``, never ``[n, C, d]``.
    """
    check_output_mode(output_mode)
    labels = jnp.asarray(labels)
    if output_mode == "logits":
        return Linearized(*factored_jacobians(apply_fn, params, inputs,
                                              projection=projection,
                                              batch_size=batch_size), labels)
    _check_feature_args(projection, params, inputs, batch_size)
    if jnp.shape(labels) != jnp.shape(inputs)[:1]:
        raise ValueError(f"labels must be [n] with n = {jnp.shape(inputs)[0]}, got "
                         f"shape {jnp.shape(labels)}.")
    return Linearized(*_factored_jacobians(apply_fn, params, inputs, labels,
                                           projection, batch_size, True), labels)


# -- choosing the dimensions ---------------------------------------------------------


def _error_coefficients(factors):
    """Per layer ``(c_out, c_in, c_both, ||K_l||²)``: with Gaussian sides of
    dimensions ``k_in``, ``k_out`` the expected squared Frobenius error of the
    layer's kernel is ``c_out / k_out + c_in / k_in + c_both / (k_in k_out)``
    (a side kept whole drops its terms). One position per layer."""
    coefficients = []
    for xs, gs in factors:
        n, num_outputs, positions, _ = gs.shape
        if positions != 1 or xs.shape[1] != 1:
            raise ValueError("the error model assumes one position per layer "
                             f"(a dense layer applied once); got {positions}.")
        xs = jnp.repeat(xs[:, 0], num_outputs, axis=0)     # [n C, a(+1)]
        gs = gs[:, :, 0].reshape(n * num_outputs, -1)      # [n C, o]
        alpha, beta = xs @ xs.T, gs @ gs.T
        sq_x, sq_g = jnp.sum(xs ** 2, 1), jnp.sum(gs ** 2, 1)
        s_a = jnp.outer(sq_x, sq_x) + alpha ** 2
        s_b = jnp.outer(sq_g, sq_g) + beta ** 2
        coefficients.append(tuple(float(v) for v in (
            jnp.sum(alpha ** 2 * s_b), jnp.sum(beta ** 2 * s_a), jnp.sum(s_a * s_b),
            jnp.sum((alpha * beta) ** 2))))
    return coefficients


def _layer_error(coefficient, layer, k_in, k_out, keep_small_sides=True):
    c_out, c_in, c_both, _ = coefficient
    whole_in = keep_small_sides and k_in >= layer.input_rows
    whole_out = keep_small_sides and k_out >= layer.fan_out
    return ((0.0 if whole_out else c_out / k_out) + (0.0 if whole_in else c_in / k_in)
            + (0.0 if whole_in or whole_out else c_both / (k_in * k_out)))


def predicted_kernel_error(structure: DenseStructure, factors, dims, *,
                           keep_small_sides: bool = True) -> float:
    """Predicted relative Frobenius error ``E||Φ Φ^T − J J^T||_F / ||J J^T||_F``
    (root of the expected square) of Gaussian sides of ``dims`` on the
    examples of ``factors`` (:func:`layer_factors`; one position per layer).
    Rademacher sides have at most this error. The relative error counts only
    the dense layers' part of ``J J^T``. ``keep_small_sides`` as for
    :func:`make_factored_projection`."""
    coefficients = _error_coefficients(factors)
    dims = [(dims, dims)] * len(structure.layers) if isinstance(dims, int) else dims
    expected = sum(
        _layer_error(c, layer, k_in, k_out, keep_small_sides)
        for c, layer, (k_in, k_out) in zip(coefficients, structure.layers, dims,
                                           strict=True))
    kernel = sum(exact_kernels(factors))
    return math.sqrt(expected) / float(jnp.linalg.norm(kernel))


def allocate_dims(structure: DenseStructure, factors, proj_dim: int
                  ) -> tuple[tuple[int, int], ...]:
    """``(d_in, d_out)`` per layer with ``Σ d_in d_out <= proj_dim`` that
    (greedily) minimise the predicted kernel error on ``factors``' examples.

    The error model is :func:`predicted_kernel_error`'s: per layer
    ``c_out / k_out + c_in / k_in + c_both / (k_in k_out)``, from a sample of
    examples (:func:`layer_factors`). Starting from ``(1, 1)``, each step
    takes the move with the largest error decrease per added dimension: one
    more dimension on a side, or that side kept whole. Layers whose inputs or
    output gradients are larger get more dimensions (on the digits MLP the
    10-class head, which carries most of ``J J^T``).
    """
    check_positive_int(proj_dim, "proj_dim")
    layers = structure.layers
    if proj_dim < len(layers):
        raise ValueError(f"proj_dim must be >= the number of layers ({len(layers)}).")
    coefficients = _error_coefficients(factors)
    dims = [[1, 1] for _ in layers]
    used = len(layers)
    while True:
        best = None
        for index, (layer, coefficient) in enumerate(zip(layers, coefficients,
                                                         strict=True)):
            k_in, k_out = dims[index]
            now = _layer_error(coefficient, layer, k_in, k_out)
            moves = []
            if k_in < layer.input_rows:
                moves += [(k_in + 1, k_out), (layer.input_rows, k_out)]
            if k_out < layer.fan_out:
                moves += [(k_in, k_out + 1), (k_in, layer.fan_out)]
            for new_in, new_out in moves:
                cost = new_in * new_out - k_in * k_out
                if used + cost > proj_dim:
                    continue
                gain = (now - _layer_error(coefficient, layer, new_in, new_out)) / cost
                if best is None or gain > best[0]:
                    best = (gain, index, new_in, new_out, cost)
        if best is None or best[0] <= 0:
            break
        _, index, new_in, new_out, cost = best
        dims[index] = [new_in, new_out]
        used += cost
    return tuple((int(a), int(b)) for a, b in dims)


# -- back to parameters ---------------------------------------------------------------


def _layer_blocks(projection, w):
    """``w`` ``[..., d]`` split into ``[..., d_in, d_out]`` per layer."""
    offset, blocks = 0, []
    for d_in, d_out in projection.dims:
        size = d_in * d_out
        blocks.append(w[..., offset:offset + size].reshape(
            *w.shape[:-1], d_in, d_out))
        offset += size
    return blocks


def _check_w(projection, w):
    w = jnp.asarray(w)
    if w.ndim not in (1, 2) or w.shape[-1] != projection.proj_dim:
        raise ValueError(f"w must be [proj_dim] or [m, proj_dim] with proj_dim="
                         f"{projection.proj_dim}, got shape {w.shape}.")
    return w


@jax.jit
def factored_unproject(projection: FactoredProjection, w, like):
    """``Δθ = P w`` as a pytree shaped like ``like``.

    Per layer ``ΔK̃ = P_in w_l P_out^T`` (``[a (+1), o]``): the kernel is its
    first ``a`` rows (transposed back where the leaf is stored ``[o, a]``), the
    bias its last row. Leaves outside the layers get zeros. ``J(x) Δθ =
    Φ(x) w`` for every example.

    Args:
      projection: the projection.
      w: ``[d]`` or ``[m, d]``.
      like: a parameter pytree (shapes and dtypes).

    Returns:
      A pytree like ``like`` (with a leading ``m`` axis for 2-D ``w``).
    """
    _check_projection(projection, like)
    w = _check_w(projection, w)
    leaves, treedef = jax.tree.flatten(like)
    dtype = jnp.result_type(*leaves)
    w = w.astype(dtype)
    batch = w.shape[:-1]
    out = [jnp.zeros(batch + tuple(jnp.shape(leaf)), jnp.result_type(leaf))
           for leaf in leaves]
    factors = projection_factors(projection, dtype, explicit=False)
    for layer, block, (p_in, p_out) in zip(projection.structure.layers,
                                           _layer_blocks(projection, w), factors,
                                           strict=True):
        update = block if p_out is None else block @ p_out.T
        update = update if p_in is None else p_in @ update  # [..., a(+1), o]
        kernel = update[..., :layer.fan_in, :]
        if layer.transposed:
            kernel = jnp.swapaxes(kernel, -1, -2)
        out[layer.kernel] = kernel.astype(out[layer.kernel].dtype)
        if layer.bias is not None:
            out[layer.bias] = update[..., layer.fan_in, :].astype(
                out[layer.bias].dtype)
    return jax.tree.unflatten(treedef, out)


@jax.jit
def factored_update_norms(projection: FactoredProjection, w, like=None):
    """``||P w_j||`` per row of ``w`` ``[m, d]`` (or a scalar for ``[d]``).

    ``||P_in W P_out^T||_F² = <G_in W G_out, W>`` with the Gram matrices
    ``G = P^T P`` (``d_in x d_in``, ``d_out x d_out``): no ``[m, p]`` update
    is formed. ``like`` is accepted for symmetry with
    :func:`factored_unproject` and checked when given.
    """
    if like is not None:
        _check_projection(projection, like)
    w = _check_w(projection, w)
    dtype = w.dtype if jnp.issubdtype(w.dtype, jnp.floating) else jnp.float32
    w = w.astype(dtype)
    factors = projection_factors(projection, dtype, explicit=False)
    total = jnp.zeros(w.shape[:-1], dtype)
    for block, (p_in, p_out) in zip(_layer_blocks(projection, w), factors,
                                    strict=True):
        right = block if p_out is None else block @ (p_out.T @ p_out)
        left = right if p_in is None else (p_in.T @ p_in) @ right
        total = total + jnp.sum(left * block, axis=(-2, -1))
    return jnp.sqrt(jnp.maximum(total, 0.0))


def factored_matrix(projection: FactoredProjection, like) -> jax.Array:
    """The dense ``P`` ``[p, d]`` in ``ravel_pytree`` order (small models and
    checks only: ``p x d`` memory)."""
    eye = jnp.eye(projection.proj_dim, dtype=jnp.result_type(*jax.tree.leaves(like)))
    update = factored_unproject(projection, eye, like)
    leaves = jax.tree.leaves(update)
    return jnp.concatenate([leaf.reshape(projection.proj_dim, -1) for leaf in leaves],
                           axis=1).T


__all__ = [
    "allocate_dims",
    "DenseStructure",
    "FactoredProjection",
    "factored_jacobians",
    "factored_linearized_examples",
    "factored_matrix",
    "factored_unproject",
    "factored_update_norms",
    "exact_kernels",
    "find_dense_layers",
    "layer_factors",
    "make_factored_projection",
    "predicted_kernel_error",
    "projection_factors",
]
