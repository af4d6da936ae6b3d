"""TRAK at ``θ*``, at task level: per-example scores summed over tasks.

TRAK replaces ``H`` by a kernel of projected Jacobians ``Φ_n = J_h(x_n) P``
(``[C_h, d]``) of a per-example output ``h`` (no Hessian), with loss gradients on
both sides, ``ψ_n = Φ_nᵀ ∂ℓ_n/∂h_n = Pᵀ∇ℓ_n`` (chain rule):

    trak[i, t] = ψ_tᵀ (Σ_n ω_n Φ_nᵀ Φ_n + λI)^{-1} Σ_{n ∈ task i} ψ_n,

the influence formula with ``H ≈ Σ ω_n Φ_nᵀΦ_n / W`` (so this λ is ``W`` times an
influence damping; the gradients are not centred; ``ω_n`` and ``W`` as in
:mod:`~tasksurrogate_jax.estimate.baselines`). ``features`` picks ``h``
(:data:`TRAK_FEATURES`):

- ``"margin"`` (TRAK's choice; softmax cross-entropy, integer labels): the
  correct-class margin ``m = z_y − logsumexp(z_{-y})``; ``ℓ = softplus(−m)``, so
  ``ψ_n = −q_n φ_n`` with TRAK's ``q_n = σ(−m_n) = 1 − p_n``.
- ``"outputs"``: the model outputs ``[C]`` (any ``loss_fn``); the kernel is the
  Gauss-Newton matrix with ``∇²_f ℓ`` replaced by ``I`` (the Gauss-Newton matrix
  itself for squared error: then, unprojected, TRAK is influence up to centring).
- ``"loss"``: ``h = ℓ``, ``ψ = φ`` (the projected empirical Fisher; any loss).

**Defaults.** The damping is ``"auto"``, ``DAMPING_FRACTION`` × the largest
eigenvalue of ``ΦᵀΦ`` (the rule of the influence damping); the projection
dimension is ``"auto"``, ``min(p, 8 · n·C_h, 8192)`` (no projection when that
is p; :func:`trak_proj_dim` computes the rule alone). ``return_info=True``
returns what was used (:class:`TrakInfo`).

Memory: ``[n, C_h, d]`` features and the ``[d, d]`` kernel.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tasksurrogate_jax.data import TargetData, TaskData, leading_rows_spec
from tasksurrogate_jax.estimate.baselines.common import (
    AUTO,
    DAMPING_FRACTION,
    check_common,
    check_damping,
    check_finite,
    is_auto,
    params_dtype,
    top_eigenvalue,
)
from tasksurrogate_jax.estimate.linearize import (
    per_example_grads,
    per_task_sums,
    projected_jacobians,
)
from tasksurrogate_jax.estimate.projection import KINDS as PROJECTION_KINDS
from tasksurrogate_jax.estimate.projection import (
    make_projection,
    num_parameters,
    ravel_rows,
)
from tasksurrogate_jax.losses import margin, softmax_cross_entropy
from tasksurrogate_jax.truth.chunking import chunked_vmap

TRAK_FEATURES = ("margin", "outputs", "loss")
# proj_dim="auto" (TRAK): d = min(p, PROJ_DIM_PER_FEATURE × n·C_h, PROJ_DIM_MAX).
PROJ_DIM_PER_FEATURE = 8
PROJ_DIM_MAX = 8192


class TrakInfo(NamedTuple):
    """What :func:`trak_scores` used (``return_info=True``), for a report.

    Attributes:
      proj_dim: d, or ``None`` (no projection: d is the number of parameters).
      proj_dim_rule: ``"auto"`` (:func:`trak_proj_dim`) or ``"given"``.
      damping: the λ added to ``ΦᵀΦ``.
      damping_rule: ``"auto"`` (``DAMPING_FRACTION × top_eigenvalue``) or
        ``"given"``.
      top_eigenvalue: the largest eigenvalue of ``ΦᵀΦ`` (power iteration;
        always computed, it costs ``POWER_MAX_ITER`` products with a
        ``[d, d]`` matrix at most).
      num_features: ``n · C_h``, training examples times the outputs h of each
        (the rank bound of ``ΦᵀΦ``).
    """

    proj_dim: int | None
    proj_dim_rule: str
    damping: float
    damping_rule: str
    top_eigenvalue: float
    num_features: int


# ---------------------------------------------------------------------------
# Public functions.


def trak_scores(
    apply_fn: Callable, params, data: TaskData, target: TargetData, *, key=None,
    proj_dim: int | str | None = AUTO, damping: float | str = AUTO,
    features: str = "margin", projection_kind: str = "rademacher",
    loss_fn: Callable = softmax_cross_entropy, batch_size: int | None = None,
    return_info: bool = False,
):
    """TRAK at task level (module doc), per-example scores summed over tasks.

    Args:
      apply_fn: batched model ``(params, inputs[b, ...]) -> outputs``; ``[b, C]``
        (logits for ``features="margin"``) unless ``features="loss"``.
      params: ``θ*``.
      data: the training data (padding rows are ignored).
      target: the target examples.
      key: PRNG key of the projection (required unless d resolves to
        ``None``).
      proj_dim: d; ``"auto"`` (default): :func:`trak_proj_dim`, ``min(p, 8 ·
        n·C_h, 8192)`` and no projection when that is p; ``None``: no
        projection (the raveled gradients, d = p).
      damping: λ ≥ 0 added to ``ΦᵀΦ``, or ``"auto"`` (default): λ =
        ``DAMPING_FRACTION`` (0.05) × the largest eigenvalue of ``ΦᵀΦ``, the
        rule of the influence damping (see :func:`influence_scores`). A fixed
        λ (the former 1e-3) is on no scale: the kernel is a sum over n
        examples, and once d nears or passes n·C_h its small eigenvalues are
        zero or projection noise that an undamped solve amplifies: that, not
        d itself, made d = 512 score near 0 and d = 64 better. With this λ a
        larger d only did better, and the default was within 0.01 of its
        grid's best on digits and breast cancer (``bench_defaults.py``); like
        the influence rule it knows nothing of the fine-tuning's length.
      features: the output ``h`` whose projected gradients form the kernel:
        ``"margin"`` (correct-class margin; softmax cross-entropy with integer
        labels), ``"outputs"`` (all model outputs) or ``"loss"`` (see the
        module doc).
      projection_kind: ``"rademacher"`` or ``"gaussian"``.
      loss_fn: per-example loss; must be ``softmax_cross_entropy`` with
        ``features="margin"``.
      batch_size: examples per chunk.
      return_info: also return a :class:`TrakInfo` (d, λ, their rules, the
        kernel's largest eigenvalue).

    Returns:
      ``[num_tasks, num_targets]`` (positive = helps); with ``return_info``,
      ``(scores, TrakInfo)``.
    """
    check_common(apply_fn, params, data, target, loss_fn, batch_size)
    auto_damping = is_auto(damping, "damping")
    if not auto_damping:
        damping = check_damping(damping)
    _check_trak_features(apply_fn, params, data, loss_fn, features)
    if projection_kind not in PROJECTION_KINDS:
        raise ValueError(f"projection_kind must be one of {PROJECTION_KINDS}, got "
                         f"{projection_kind!r}.")
    auto_dim = is_auto(proj_dim, "proj_dim", "a positive int, None")
    if auto_dim:
        proj_dim = trak_proj_dim(apply_fn, params, data, features=features)
    projection = None
    if proj_dim is not None:
        if key is None:
            raise ValueError(
                f"key is required for the projection to d={proj_dim} (or set "
                "proj_dim=None).")
        projection = make_projection(key, proj_dim, kind=projection_kind,
                                     num_params=num_parameters(params))
    scores, lam, top = _trak(
        apply_fn, loss_fn, params, data, target, projection,
        DAMPING_FRACTION if auto_damping else damping, features=features,
        relative=auto_damping, batch_size=batch_size)
    scores = check_finite(scores, "TRAK scores", "increase damping")
    if not return_info:
        return scores
    return scores, TrakInfo(
        proj_dim=proj_dim, proj_dim_rule="auto" if auto_dim else "given",
        damping=float(lam), damping_rule="auto" if auto_damping else "given",
        top_eigenvalue=float(top),
        num_features=_num_features(apply_fn, params, data, features))


def trak_proj_dim(apply_fn: Callable, params, data: TaskData, *,
                  features: str = "margin") -> int | None:
    """The d of ``trak_scores(..., proj_dim="auto")``: ``min(p,
    PROJ_DIM_PER_FEATURE · n·C_h, PROJ_DIM_MAX)`` = ``min(p, 8 n C_h, 8192)``,
    and ``None`` (no projection) when that is p.

    Why: with the damping on the kernel's scale (``damping="auto"``), a
    larger d only did better (the projection adds noise to an exact
    computation, and ``d = p`` is exact), so the rule takes the largest d
    that still pays: ``ΦᵀΦ`` has rank at most ``n·C_h`` (n training examples,
    C_h outputs h each), and past about 8× that the projection preserves
    the span of the features well (measured on digits with n = 359, p =
    4810, 3 projection keys: LOO Spearman 0.03 below no projection at d =
    8 n, 0.04 at 4 n, 0.13 at n). The cap of 8192 bounds the ``[d, d]``
    kernel (256 MiB in float32) and its solve. ``d = p`` needs no
    projection at all (and no key).

    Args:
      apply_fn: batched model ``(params, inputs[b, ...]) -> outputs``.
      params: ``θ*`` (its number of parameters p).
      data: the training data (its number of examples n, padding excluded).
      features: ``"margin"`` or ``"loss"`` (C_h = 1) or ``"outputs"`` (C_h = C).

    Returns:
      d, or ``None`` (no projection).
    """
    if features not in TRAK_FEATURES:
        raise ValueError(f"features must be one of {TRAK_FEATURES}, got {features!r}.")
    p = num_parameters(params)
    d = min(p, PROJ_DIM_PER_FEATURE * _num_features(apply_fn, params, data, features),
            PROJ_DIM_MAX)
    return None if d >= p else d


def _num_features(apply_fn, params, data, features) -> int:
    """``n · C_h``: training examples times the outputs h of each."""
    n = int(np.sum(np.asarray(data.task_ids) >= 0))
    if features != "outputs":
        return n
    out = jax.eval_shape(apply_fn, params, leading_rows_spec(data.inputs))
    return n * math.prod(out.shape[1:])


# ---------------------------------------------------------------------------
# Jitted core.


@functools.partial(jax.jit, static_argnums=(0, 1),
                   static_argnames=("features", "relative", "batch_size"))
def _trak(apply_fn, loss_fn, params, data, target, projection, damping, *,
          features, relative, batch_size):
    """``(scores [K, T], λ, largest eigenvalue of ΦᵀΦ)``; with ``relative``,
    ``damping`` is the fraction of that eigenvalue λ is."""
    dtype = params_dtype(params)
    if features == "margin":
        def output(p, x, y):  # h: [1]
            return margin(apply_fn(p, x[None])[0], y)[None]

        def dloss(h, y):  # ∂ℓ/∂h for ℓ = softplus(-m)
            return -jax.nn.sigmoid(-h)
    elif features == "outputs":
        def output(p, x, y):  # h: [C]
            return apply_fn(p, x[None])[0]

        def dloss(h, y):
            return jax.grad(lambda o: loss_fn(o[None], y[None])[0])(h)
    else:
        def output(p, x, y):  # h: [1]
            return loss_fn(apply_fn(p, x[None]), y[None])

        def dloss(h, y):
            return jnp.ones_like(h)

    def features_of(inputs, labels):  # Φ [n, C_h, d], ψ [n, d]
        h = chunked_vmap(lambda xy: output(params, *xy), (inputs, labels), batch_size)
        if features != "outputs":
            grads = per_example_grads(lambda p, x, y: output(p, x, y)[0], params,
                                      inputs, labels, projection=projection,
                                      batch_size=batch_size)
            phi = (grads if projection is not None else ravel_rows(grads))[:, None]
        elif projection is not None:
            phi = projected_jacobians(apply_fn, params, inputs,
                                      projection=projection, batch_size=batch_size)
        else:
            phi = chunked_vmap(lambda x: ravel_rows(jax.jacrev(
                lambda p: apply_fn(p, x[None])[0])(params)), inputs, batch_size)
        return phi, jnp.einsum("nc,ncd->nd", jax.vmap(dloss)(h, labels), phi)

    # Training and target examples in one pass (one compiled body), then split.
    n = data.inputs.shape[0]
    phi, psi = features_of(
        jnp.concatenate([data.inputs, target.inputs.astype(data.inputs.dtype)]),
        jnp.concatenate([data.labels, target.labels.astype(data.labels.dtype)]))
    phi, psi, psi_t = phi[:n], psi[:n], psi[n:]  # [n, C_h, d], [n, d], [T, d]
    weights = (data.task_ids >= 0).astype(dtype)
    kernel = jnp.einsum("n,ncd,nce->de", weights, phi, phi)
    top = top_eigenvalue(lambda v: kernel @ v, kernel.shape[0], dtype)
    lam = damping * top if relative else jnp.asarray(damping, dtype)
    kernel = kernel + lam * jnp.eye(kernel.shape[0], dtype=dtype)
    task = per_task_sums(psi, data.task_ids, data.num_tasks)  # [K, d]
    return task @ jnp.linalg.solve(kernel, psi_t.T), lam, top


# ---------------------------------------------------------------------------
# Validation.


def _check_trak_features(apply_fn, params, data, loss_fn, features):
    if features not in TRAK_FEATURES:
        raise ValueError(f"features must be one of {TRAK_FEATURES}, got {features!r}.")
    if features == "margin":
        if loss_fn is not softmax_cross_entropy:
            raise ValueError(
                "features='margin' assumes loss_fn=softmax_cross_entropy (the loss "
                "is softplus(-margin)); use features='outputs' or 'loss' for other "
                "losses."
            )
        if data.labels.ndim != 1 or not jnp.issubdtype(data.labels.dtype,
                                                       jnp.integer):
            raise ValueError(
                "features='margin' needs integer class labels [num_examples], got "
                f"labels of shape {data.labels.shape} and dtype {data.labels.dtype}."
            )
    if features != "loss":
        out = jax.eval_shape(apply_fn, params, leading_rows_spec(data.inputs))
        if len(out.shape) != 2:
            raise ValueError(
                f"features={features!r} needs apply_fn to return [batch, outputs], "
                f"got output shape {out.shape}; use features='loss'."
            )
