"""In-context learning: the first-order estimate in the prompt embeddings.

:class:`~tasksurrogate_jax.workloads.icl.ICLWorkload` inherits its estimate
from :class:`EmbeddingLinearization`, defined here (docs/method.md).

The estimate linearizes in the prompt's input embeddings around an anchor
prompt (GradSel-style): either the loss itself (``linearize="loss"``:
``L(E₀) + <∇L(E₀), E_s - E₀>``) or the head's output, the loss then taken of
the first-order output (``linearize="output"``: ``ℓ(f(E₀) + J_f(E₀)(E_s -
E₀), y)``, as GradSel does for a language model's output). The anchor is the
pool's mean embedding (``"mean"``), one prompt, or several prompts, each
prompt then estimated at the nearest one in embedding space
(:class:`NearestAnchors`, or ``[num_anchors, shots]`` pool indices).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tasksurrogate_jax._checks import check_positive_int
from tasksurrogate_jax.core.metrics import mean_spearman
from tasksurrogate_jax.core.subsets import fixed_size_masks

ANCHORS = ("mean",)
LINEARIZE = ("loss", "output")


class NearestAnchors(NamedTuple):
    """Several random anchor prompts: each prompt is estimated at the one
    nearest to it (squared Euclidean distance of the prompts' embeddings, per
    query), as with ``[num_anchors, shots]`` anchor indices.

    Attributes:
      num_anchors: distinct random prompts of the estimated prompts' number of
        shots, drawn uniformly from the pool (demonstrations in pool order).
      seed: of the draw (``jax.random.key(seed)``); the same seed gives the
        same anchors.
    """

    num_anchors: int
    seed: int = 0


class EmbeddingEstimate(NamedTuple):
    """Exact and embedding-linearized scores of the same prompts.

    Attributes:
      exact: ``[num_subsets, num_targets]`` forward-pass losses.
      estimated: ``[num_subsets, num_targets]`` first-order estimates.
      relative_error: mean over all entries of ``|estimated - exact| / |exact|``.
      spearman: mean over targets of the Spearman correlation across subsets.
    """

    exact: jax.Array
    estimated: jax.Array
    relative_error: float
    spearman: float


def _pool_order(masks: np.ndarray, shots: int) -> np.ndarray:
    """``[m, num_tasks]`` masks of ``shots`` ones -> ``[m, shots]`` int32 pool
    indices in increasing pool order (the fixed order of a prompt)."""
    order = np.argsort(1 - np.asarray(masks), axis=1, kind="stable")
    return np.sort(order[:, :shots], axis=1).astype(np.int32)


class EmbeddingLinearization:
    """The first-order estimate of an ICL workload, linearized in the prompt
    embeddings (see the module docstring).

    A mixin: it relies on the workload's scorer, pool, queries, default
    ``anchor`` and ``linearize``, prompt assembly (``_prompt``), chunked map
    over prompts (``_per_prompt``), head (``_output``, ``_output_loss``,
    ``_embedding_loss``), compiled-function cache (``_jitted``) and checks
    (``_check_shots``, ``_finite``), and on ``exact_scores``.
    """

    def anchor_prompts(self, shots: int, anchor=None) -> tuple[np.ndarray, bool]:
        """The prompts behind an anchor.

        Args:
          shots: demonstrations per prompt.
          anchor: see :meth:`anchor_embeddings` (``None``: the default).

        Returns:
          ``(groups [num_anchors, P, shots], single)``: each anchor's embedding
          is the mean of its ``P`` prompts' embeddings (``P = num_tasks`` for
          ``"mean"``, 1 for real prompts); ``single`` when there is one anchor
          and no nearest-anchor choice.
        """
        shots = check_positive_int(shots, "shots")
        self._check_shots(shots, "shots")
        anchor = self.anchor if anchor is None else anchor
        k = self.num_tasks
        if isinstance(anchor, str):
            if anchor not in ANCHORS:
                raise ValueError(
                    f"anchor must be 'mean', [shots] or [num_anchors, shots] pool "
                    f"indices, or a NearestAnchors, got {anchor!r}."
                )
            prompts = (np.arange(k)[:, None] + np.arange(shots)[None, :]) % k
            return prompts[None].astype(np.int32), True
        if isinstance(anchor, NearestAnchors):
            num = check_positive_int(anchor.num_anchors, "NearestAnchors.num_anchors")
            if not isinstance(anchor.seed, (int, np.integer)):
                raise TypeError(f"NearestAnchors.seed must be an int, got "
                                f"{anchor.seed!r}.")
            masks = np.asarray(fixed_size_masks(jax.random.key(int(anchor.seed)), num,
                                                k, subset_size=shots, unique=True))
            return _pool_order(masks, shots)[:, None, :], False
        idx = np.asarray(anchor)
        if (idx.ndim not in (1, 2) or idx.shape[-1] != shots or idx.size == 0
                or not np.issubdtype(idx.dtype, np.integer)
                or idx.min() < 0 or idx.max() >= k):
            raise ValueError(
                f"anchor must be 'mean' or {shots} pool indices in [0, {k}) (one "
                f"prompt), [num_anchors, {shots}] of them (several prompts) or a "
                f"NearestAnchors, got {anchor!r}."
            )
        if idx.ndim == 1:
            return idx[None, None, :].astype(np.int32), True
        return idx[:, None, :].astype(np.int32), False

    def anchor_embeddings(self, shots: int, anchor=None) -> jax.Array:
        """The anchor prompts' embeddings ``E₀`` for each target query.

        Args:
          shots: demonstrations per prompt.
          anchor: ``"mean"``: at every position, the mean embedding over the
            pool (the average of ``num_tasks`` prompts whose slot ``j`` holds
            demonstration ``(r + j) mod num_tasks``, ``r = 0..num_tasks-1``);
            ``[shots]`` pool indices of one anchor prompt (in that slot
            order); ``[num_anchors, shots]`` indices of several anchor
            prompts, or a :class:`NearestAnchors` (random ones): a prompt is
            then estimated at the anchor nearest to it. ``None``: the
            workload's default (``self.anchor``).

        Returns:
          ``[num_targets, length, width]``, or ``[num_targets, num_anchors,
          length, width]`` with several anchors.
        """
        groups, single = self.anchor_prompts(shots, anchor)
        e0 = self._anchor_stack(groups)
        return e0[:, 0] if single else e0

    def _anchor_stack(self, groups) -> jax.Array:
        return self._jitted("anchor_embedding", self._anchor_embedding)(
            self.scorer.params, jnp.asarray(self.demonstrations),
            jnp.asarray(groups, jnp.int32), jnp.asarray(self.queries))

    def _anchor_embedding(self, params, demonstrations, groups, queries):
        """``[T, A, length, width]``: per query and anchor, the mean embedding
        of the anchor's prompts (``groups [A, P, shots]``)."""
        def one_query(query):
            def one_anchor(prompts):
                def one_prompt(idx):
                    return self.scorer.embed(
                        params, self._prompt(demonstrations, idx, query))
                return jax.vmap(one_prompt)(prompts).mean(0)
            return jax.vmap(one_anchor)(groups)
        return jax.vmap(one_query)(queries)


    def _check_linearize(self, linearize) -> str:
        if linearize is None:
            return self.linearize
        if linearize not in LINEARIZE:
            raise ValueError(
                f"linearize must be 'loss' or 'output', got {linearize!r}.")
        return linearize

    def linearization(self, shots: int, anchor=None, *, linearize=None):
        """The first-order model of each query around the anchor(s).

        Args:
          shots: demonstrations per prompt.
          anchor: see :meth:`anchor_embeddings` (``None``: the default).
          linearize: ``"loss"`` (the query's loss) or ``"output"`` (the head's
            output: label logits or prediction); ``None``: the default.

        Returns:
          ``(anchor_embeddings, values, slopes)``: ``E₀ [T, length, width]``;
          ``"loss"``: the losses ``L(E₀) [T]`` and gradients ``∇_E L(E₀) [T,
          length, width]``; ``"output"``: the outputs ``f(E₀) [T, *out]`` and
          Jacobians ``[T, *out, length, width]`` (``out = (num_labels,)`` or
          ``()``). With several anchors, an anchor axis follows ``T`` in each.
        """
        groups, single = self.anchor_prompts(shots, anchor)
        out = self._linearization_stack(groups, self._check_linearize(linearize))
        return jax.tree.map(lambda x: x[:, 0], out) if single else out

    def _linearization_stack(self, groups, linearize):
        """``(E₀ [T, A, L, W], values [T, A, ...], slopes [T, A, ..., L, W])``."""
        e0 = self._anchor_stack(groups)
        if linearize == "loss":
            fn = jax.value_and_grad(self._embedding_loss, 1)
        else:
            def fn(params, embeddings, label):
                del label
                jac, out = jax.jacrev(
                    lambda e: (self._output(params, e),) * 2, has_aux=True)(
                    embeddings)
                return out, jac
        per_anchor = jax.vmap(fn, in_axes=(None, 0, None))
        stack = self._jitted(("linearize", linearize),
                             jax.vmap(per_anchor, in_axes=(None, 0, 0)))
        values, slopes = stack(self.scorer.params, e0, jnp.asarray(self.query_labels))
        return e0, values, slopes

    def estimated_scores(self, masks, *, key=None, anchor=None,
                         linearize=None) -> jax.Array:
        """First-order estimates of the scores, linearized in the embeddings.

        ``linearize="loss"``: ``L(E₀) + <∇_E L(E₀), E_s - E₀>``;
        ``linearize="output"``: the loss of the first-order output,
        ``ℓ(f(E₀) + J_f(E₀)(E_s - E₀), y)`` (GradSel). The gradient (or
        Jacobian) is taken once per query and anchor (and number of shots);
        each prompt then costs one embedding lookup and inner products, no
        forward pass through the model. With several anchors each prompt (and
        query) is expanded around the anchor nearest in embedding space.

        Args:
          masks: ``[num_subsets, num_tasks]``.
          key: unused (the linearization draws no randomness); accepted so
            that every workload's ``estimated_scores`` takes a key.
          anchor: see :meth:`anchor_embeddings` (``None``: ``self.anchor``).
          linearize: ``"loss"`` or ``"output"`` (``None``: ``self.linearize``).

        Returns:
          ``[num_subsets, num_targets]`` estimated losses.
        """
        linearize = self._check_linearize(linearize)
        # The anchors enter the compiled program as arguments (E₀, values, ∇).
        estimates = self._per_prompt(
            f"first_order_{linearize}", masks, self.queries, self.query_labels,
            self._first_order_loss if linearize == "loss"
            else self._first_order_output,
            lambda shots: self._linearization_stack(
                self.anchor_prompts(shots, anchor)[0], linearize))[0]
        return jnp.asarray(self._finite(estimates, "estimates"))

    def _nearest(self, embeddings, e0):
        """Index of the anchor ``e0 [A, L, W]`` nearest to ``embeddings``."""
        if e0.shape[0] == 1:
            return 0
        # ||E - E_a||² up to ||E||², without an [A, L, W] difference.
        distance = (jnp.sum(jnp.square(e0), axis=(1, 2))
                    - 2.0 * jnp.einsum("lw,alw->a", embeddings, e0))
        return jnp.argmin(distance)

    def _first_order_loss(self, params, inputs, label, e0, loss0, grad):
        embeddings = self.scorer.embed(params, inputs)
        a = self._nearest(embeddings, e0)
        return loss0[a] + jnp.vdot(grad[a], embeddings - e0[a])

    def _first_order_output(self, params, inputs, label, e0, out0, jac):
        embeddings = self.scorer.embed(params, inputs)
        a = self._nearest(embeddings, e0)
        delta = embeddings - e0[a]
        output = out0[a] + jnp.tensordot(jac[a], delta, axes=delta.ndim)
        return self._output_loss(output, label)

    def estimation_error(self, masks, *, anchor=None,
                         linearize=None) -> EmbeddingEstimate:
        """Exact and estimated scores of ``masks`` and the estimate's error."""
        exact = self.exact_scores(masks)
        estimated = self.estimated_scores(masks, anchor=anchor, linearize=linearize)
        rel = float(jnp.mean(jnp.abs(estimated - exact) / jnp.abs(exact)))
        rho = float(mean_spearman(exact, estimated)) if exact.shape[0] > 2 else np.nan
        return EmbeddingEstimate(exact=exact, estimated=estimated,
                                 relative_error=rel, spearman=rho)

