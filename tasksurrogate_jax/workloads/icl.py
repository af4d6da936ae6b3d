"""In-context learning: demonstrations as tasks (docs/method.md).

The attribution problem is the paper's: a pool of K candidate demonstrations
(the tasks), T target queries, and prompts made of the demonstrations a mask
selects. A prompt lists its demonstrations in increasing pool order, then the
query; ``F(s)`` per query is the query's loss given the prompt, read at the
prompt's last position: the cross-entropy of its label (a classification head)
or the squared error of a real prediction (a regression head). Nothing is
retrained: each score is one forward pass.

Two layers:

- :class:`ICLWorkload` works with any model through a :class:`PromptScorer`
  (parameters, an embedding function and a head from embeddings to label
  logits or to a real prediction), so a researcher can plug in their own Flax
  model. Prompts are token ids (``[length]`` int, a language model) or real
  input vectors (``[length, input_dim]``, e.g. in-context regression:
  :mod:`tasksurrogate_jax.workloads.icl_regression`).
- :func:`icl_workload` builds the synthetic token workload: it trains its own
  small decoder-only transformer (no weights can be downloaded here) to learn
  in context, and draws the pool and queries from one fixed task.

The estimate linearizes in the prompt's input embeddings around an anchor
prompt (GradSel-style): either the loss itself (``linearize="loss"``:
``L(E₀) + <∇L(E₀), E_s - E₀>``) or the head's output, the loss then taken of
the first-order output (``linearize="output"``: ``ℓ(f(E₀) + J_f(E₀)(E_s -
E₀), y)``, as GradSel does for a language model's output). The anchor is the
pool's mean embedding (``"mean"``), one prompt, or several prompts, each
prompt then estimated at the nearest one in embedding space
(:class:`NearestAnchors`, or ``[num_anchors, shots]`` pool indices).

The synthetic token family (a random token-to-label map with a distractor
feature, where in-context learning is induction-head copying):

- a *task* is a random map ``f`` from ``num_symbols`` symbols to
  ``num_labels`` labels;
- a demonstration is ``[distractor, symbol, label]`` with ``label = f(symbol)``
  (flipped to another label with probability ``train_label_noise``) and a
  distractor token that carries no information; a query is
  ``[distractor, symbol]``, and the model predicts its label at the symbol;
- training sequences hold ``max_demos`` demonstrations of a fresh task and a
  query, with the loss at every label position (0 to ``max_demos`` shots);
- the attribution pool is ``pool_size`` demonstrations of one fixed task
  (``world_seed``), a fraction ``pool_label_noise`` of them with a wrong label,
  so some demonstrations help a query, some hurt it and most do nothing; a
  demonstration helps only queries with its symbol, and two with the same
  symbol are redundant, so demonstrations interact.

Token ids: symbols ``[0, S)``, distractors ``[S, S + D)``, labels
``[S + D, S + D + C)``. The model outputs ``C`` label logits per position.

Presets (:data:`PRESETS`): ``"cpu"`` (trains in about a minute on 2 cores),
``"paper"`` (larger model and pool, for GPU/TPU), ``"tiny"`` (tests,
notebook in CI).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tasksurrogate_jax._checks import check_key, check_positive_int
from tasksurrogate_jax.core.metrics import mean_spearman
from tasksurrogate_jax.core.subsets import fixed_size_masks
from tasksurrogate_jax.losses import softmax_cross_entropy
from tasksurrogate_jax.truth.chunking import map_padded_chunks, pad_rows
from tasksurrogate_jax.truth.fingerprint import (
    array_digest,
    program_digest,
    tree_digest,
)
from tasksurrogate_jax.workloads.base import FixedSizeWorkload, config_from_preset
from tasksurrogate_jax.workloads.transformer import (
    TransformerBlock,
    train_on_fresh_batches,
)

ANCHORS = ("mean",)
LINEARIZE = ("loss", "output")

# ----------------------------------------------------------------------------
# Any model: the prompt scorer and the workload
# ----------------------------------------------------------------------------


class PromptScorer(NamedTuple):
    """A model seen as a scorer of prompts.

    Exactly one head is given: ``label_logits`` (classification: a query's
    loss is the cross-entropy of its label, its accuracy whether the label gets
    the largest logit) or ``prediction`` (regression: a query's loss is the
    squared error ``(prediction - label)²``).

    Attributes:
      params: the model's parameters (any pytree), passed to every function.
      embed: ``embed(params, inputs) -> [length, width]``: the input
        embeddings of a whole prompt (positions included if the model adds
        them there), from ``inputs`` ``[length]`` int32 token ids (token
        prompts) or ``[length, input_dim]`` real vectors (vector prompts). The
        estimation linearizes in this output.
      label_logits: ``label_logits(params, embeddings [length, width]) ->
        [num_labels]``: the logits of the label tokens at the last position
        (for a language model, its next-token logits at the label token ids);
        ``None`` for a regression scorer.
      prediction: ``prediction(params, embeddings [length, width]) -> []``:
        the real prediction of the query's label at the last position;
        ``None`` for a classification scorer.
    """

    params: Any
    embed: Callable
    label_logits: Callable | None = None
    prediction: Callable | None = None


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


class PromptPerformance(NamedTuple):
    """Mean over queries of each prompt's loss and accuracy.

    Attributes:
      loss: ``[num_prompts]`` mean loss of the queries (cross-entropy of the
        labels, or squared error of a regression scorer's predictions).
      accuracy: ``[num_prompts]`` fraction of queries whose label gets the
        largest logit; ``None`` for a regression scorer.
    """

    loss: np.ndarray
    accuracy: np.ndarray | None


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


def _int_array(x, name: str, ndim: int, what: str = "token ids") -> np.ndarray:
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integer {what}, got dtype {arr.dtype}.")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}.")
    if arr.size == 0:
        raise ValueError(f"{name} must be non-empty, got shape {arr.shape}.")
    return arr.astype(np.int32)


def _prompt_inputs(x, name: str) -> np.ndarray:
    """Token ids ``[n, length]`` (int32) or input vectors ``[n, length, dim]``
    (floating, finite), or a clear error."""
    arr = np.asarray(x)
    tokens = np.issubdtype(arr.dtype, np.integer) and arr.ndim == 2
    vectors = np.issubdtype(arr.dtype, np.floating) and arr.ndim == 3
    if not (tokens or vectors):
        raise TypeError(
            f"{name} must hold integer token ids [num, length] or real input "
            f"vectors [num, length, input_dim], got dtype {arr.dtype} and shape "
            f"{arr.shape}."
        )
    if arr.size == 0:
        raise ValueError(f"{name} must be non-empty, got shape {arr.shape}.")
    if tokens:
        return arr.astype(np.int32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite, found "
                         f"{int((~np.isfinite(arr)).sum())} non-finite values.")
    return arr


class ICLWorkload(FixedSizeWorkload):
    """Demonstration attribution for any prompt scorer.

    Args:
      scorer: a :class:`PromptScorer` (a classification or a regression head).
      demonstrations: the pool: ``[num_tasks, demo_length]`` int token ids, or
        ``[num_tasks, demo_length, input_dim]`` real input vectors.
      queries: the target queries, of the demonstrations' kind:
        ``[num_targets, query_length]`` token ids or ``[num_targets,
        query_length, input_dim]`` vectors.
      query_labels: ``[num_targets]``: a classification scorer's label index
        (into its label logits) of each query, or a regression scorer's real
        target.
      max_length: the model's context: the longest prompt it accepts
        (positions: tokens or input vectors).
      heldout_queries, heldout_labels: optional queries kept out of the
        targets, to judge a chosen prompt (:meth:`prompt_performance`).
      task_names: names of the demonstrations (default ``"demo0"``, ...).
      description: what the targets are.
      chunk_size: prompts per compiled call.
      anchor: the default anchor of the estimates (:meth:`anchor_embeddings`):
        ``"mean"`` or a :class:`NearestAnchors` (index anchors depend on the
        number of shots: pass them per call).
      linearize: the default of the estimates: ``"loss"`` or ``"output"``
        (:meth:`estimated_scores`).
    """

    name: ClassVar[str] = "icl"

    def __init__(self, scorer: PromptScorer, demonstrations, queries, query_labels,
                 *, max_length: int, heldout_queries=None, heldout_labels=None,
                 task_names: Sequence[str] | None = None,
                 description: str | None = None, chunk_size: int = 256,
                 anchor: str | NearestAnchors = "mean", linearize: str = "loss"):
        if not isinstance(scorer, PromptScorer):
            raise TypeError(
                f"scorer must be a PromptScorer, got {type(scorer).__name__}."
            )
        if (scorer.label_logits is None) == (scorer.prediction is None):
            raise ValueError(
                "scorer must have exactly one head: label_logits (classification) "
                "or prediction (regression), got "
                + ("both." if scorer.label_logits is not None else "neither.")
            )
        self.scorer = scorer
        self.head = "classification" if scorer.label_logits is not None else \
            "regression"
        self.demonstrations = _prompt_inputs(demonstrations, "demonstrations")
        self.max_length = check_positive_int(max_length, "max_length")
        self.chunk_size = check_positive_int(chunk_size, "chunk_size")
        if not (isinstance(anchor, NearestAnchors)
                or (isinstance(anchor, str) and anchor in ANCHORS)):
            raise ValueError(
                f"the default anchor must be 'mean' or a NearestAnchors (index "
                f"anchors depend on the number of shots), got {anchor!r}.")
        if linearize not in LINEARIZE:
            raise ValueError(
                f"linearize must be 'loss' or 'output', got {linearize!r}.")
        self.anchor, self.linearize = anchor, linearize
        self.queries, self.query_labels = self._check_queries(
            queries, query_labels, "queries", "query_labels")
        if (heldout_queries is None) != (heldout_labels is None):
            raise ValueError("heldout_queries and heldout_labels go together.")
        self.heldout = None
        if heldout_queries is not None:
            self.heldout = self._check_queries(
                heldout_queries, heldout_labels, "heldout_queries", "heldout_labels")
        num_tasks = self.demonstrations.shape[0]
        if task_names is None:
            task_names = tuple(f"demo{i}" for i in range(num_tasks))
        if len(task_names) != num_tasks:
            raise ValueError(
                f"task_names has {len(task_names)} names, expected one per "
                f"demonstration ({num_tasks})."
            )
        self._task_names = tuple(str(n) for n in task_names)
        loss = ("label cross-entropy" if self.head == "classification"
                else "squared error")
        self._description = description or (
            f"per-query {loss} of {self.queries.shape[0]} queries")
        self._compiled = {}

    @property
    def vector_inputs(self) -> bool:
        """Whether prompts are real input vectors (else token ids)."""
        return self.demonstrations.ndim == 3

    @property
    def _unit(self) -> str:
        return "input vectors" if self.vector_inputs else "tokens"

    def _check_queries(self, queries, labels, qname, lname):
        queries = _prompt_inputs(queries, qname)
        if queries.ndim != self.demonstrations.ndim or (
                self.vector_inputs
                and queries.shape[2] != self.demonstrations.shape[2]):
            raise ValueError(
                f"{qname} must be of the demonstrations' kind ("
                + (f"input vectors [num, length, {self.demonstrations.shape[2]}]"
                   if self.vector_inputs else "token ids [num, length]")
                + f"), got shape {queries.shape}."
            )
        if self.vector_inputs:
            queries = queries.astype(self.demonstrations.dtype)
        length = self.demonstrations.shape[1] + queries.shape[1]
        if length > self.max_length:
            raise ValueError(
                f"a one-demonstration prompt is {length} {self._unit}, longer than "
                f"the model's context max_length={self.max_length}."
            )
        num_labels = self._check_scorer(length)
        if self.head == "classification":
            labels = _int_array(labels, lname, 1, "label indices")
        else:
            labels = np.asarray(labels)
            if not (np.issubdtype(labels.dtype, np.integer)
                    or np.issubdtype(labels.dtype, np.floating)):
                raise TypeError(f"{lname} of a regression scorer must be real "
                                f"numbers, got dtype {labels.dtype}.")
            if labels.ndim != 1:
                raise ValueError(f"{lname} must be 1-D, got shape {labels.shape}.")
            if not np.isfinite(labels).all():
                raise ValueError(f"{lname} must be finite.")
            labels = labels.astype(np.result_type(labels.dtype, np.float32))
        if labels.shape[0] != queries.shape[0]:
            raise ValueError(
                f"{lname} has {labels.shape[0]} labels, expected one per query "
                f"({queries.shape[0]})."
            )
        if num_labels is not None and (labels.min() < 0
                                       or labels.max() >= num_labels):
            raise ValueError(
                f"{lname} must lie in [0, {num_labels}) (the scorer's label "
                f"logits), got values in [{labels.min()}, {labels.max()}]."
            )
        return queries, labels

    def _check_scorer(self, length: int) -> int | None:
        """Checks the scorer's output shapes on a prompt of ``length``
        positions; returns the number of labels (``None``: regression)."""
        s = self.scorer
        if self.vector_inputs:
            inputs = jax.ShapeDtypeStruct(
                (length, self.demonstrations.shape[2]), self.demonstrations.dtype)
            what = f"input vectors [{length}, {self.demonstrations.shape[2]}]"
        else:
            inputs = jax.ShapeDtypeStruct((length,), jnp.int32)
            what = f"tokens [{length}]"
        emb = jax.eval_shape(s.embed, s.params, inputs)
        if not (hasattr(emb, "shape") and len(emb.shape) == 2
                and emb.shape[0] == length
                and jnp.issubdtype(emb.dtype, jnp.floating)):
            raise ValueError(
                f"scorer.embed must map {what} to floating embeddings "
                f"[{length}, width], got {getattr(emb, 'shape', emb)}."
            )
        if self.head == "regression":
            out = jax.eval_shape(s.prediction, s.params, emb)
            if not (hasattr(out, "shape") and out.shape == ()
                    and jnp.issubdtype(out.dtype, jnp.floating)):
                raise ValueError(
                    "scorer.prediction must return one real number (shape ()) "
                    f"for one prompt, got {getattr(out, 'shape', out)}."
                )
            return None
        out = jax.eval_shape(s.label_logits, s.params, emb)
        if not (hasattr(out, "shape") and len(out.shape) == 1 and out.shape[0] >= 2):
            raise ValueError(
                "scorer.label_logits must return [num_labels] logits (at least 2) "
                f"for one prompt, got {getattr(out, 'shape', out)}."
            )
        return out.shape[0]

    # -- the interface ------------------------------------------------------

    @property
    def task_names(self) -> tuple[str, ...]:
        return self._task_names

    @property
    def num_targets(self) -> int:
        return self.queries.shape[0]

    @property
    def target_description(self) -> str:
        return self._description

    def fingerprint(self) -> dict:
        """Digests of everything that determines this workload's scores (JSON):
        the scorer's parameters, the pool, the queries and their labels (target
        and held out), and the scoring program (the jaxpr of one query's loss
        through ``embed`` and the head, at a one-demonstration prompt's
        shapes), with the estimation's anchor and linearization."""
        inputs = self.prompt_inputs(np.zeros(1, np.int32), self.queries[0])
        program = program_digest(self._loss_and_correct, self.scorer.params,
                                 inputs, self.query_labels[0])
        return {"workload": self.name, "description": self.target_description,
                "task_names": list(self.task_names), "head": self.head,
                "params": tree_digest(self.scorer.params),
                "demonstrations": array_digest(self.demonstrations),
                "target": array_digest(self.queries, self.query_labels),
                "heldout": None if self.heldout is None else array_digest(
                    *self.heldout),
                "program": program, "max_length": self.max_length,
                "anchor": (self.anchor if isinstance(self.anchor, str)
                           else list(self.anchor)),
                "linearize": self.linearize}

    @property
    def max_demos(self) -> int:
        """The most demonstrations a prompt can hold within ``max_length``."""
        demo, query = self.demonstrations.shape[1], self.queries.shape[1]
        return (self.max_length - query) // demo

    def sample_prompts(self, key, num_prompts: int, *, shots: int = 4) -> jax.Array:
        """``num_prompts`` distinct random ``shots``-demonstration prompts.

        Returns:
          ``[num_prompts, num_tasks]`` masks.
        """
        shots = check_positive_int(shots, "shots")
        if shots > self.num_tasks:
            raise ValueError(
                f"shots must be <= the pool of {self.num_tasks} demonstrations, "
                f"got {shots}."
            )
        self._check_shots(shots, "shots")
        return fixed_size_masks(key, num_prompts, self.num_tasks, subset_size=shots,
                                unique=True)

    def _check_shots(self, shots: int, name: str):
        if shots > self.max_demos:
            length = shots * self.demonstrations.shape[1] + self.queries.shape[1]
            raise ValueError(
                f"{name}: a prompt of {shots} demonstrations is {length} "
                f"{self._unit}, longer than the model's context "
                f"max_length={self.max_length} (at most {self.max_demos} "
                "demonstrations fit)."
            )

    def _groups(self, masks):
        """Validated masks -> ``{shots: (rows [m_n], indices [m_n, shots])}``."""
        masks = np.asarray(self.check_masks(masks))
        counts = masks.sum(1).astype(int)
        empty = np.nonzero(counts == 0)[0]
        if empty.size:
            raise ValueError(
                f"masks rows {empty[:10].tolist()} select no demonstration; a "
                "prompt needs at least one."
            )
        self._check_shots(int(counts.max()), "masks")
        groups = {}
        for shots in np.unique(counts):
            rows = np.nonzero(counts == shots)[0]
            groups[int(shots)] = (rows, _pool_order(masks[rows], int(shots)))
        return groups, masks.shape[0]

    def prompt_inputs(self, indices, query):
        """The model input of one prompt: the demonstrations ``indices``
        ``[shots]`` (in that order), then ``query``: ``[length]`` token ids or
        ``[length, input_dim]`` vectors."""
        return self._prompt(jnp.asarray(self.demonstrations),
                            jnp.asarray(indices, jnp.int32), jnp.asarray(query))

    def _prompt(self, demonstrations, indices, query):
        demos = demonstrations[indices]
        return jnp.concatenate([demos.reshape((-1,) + demos.shape[2:]), query])

    def _per_prompt(self, name, masks, queries, labels, query_fn, extra=None):
        """Maps ``query_fn`` over prompts and queries, chunk by chunk.

        ``query_fn(params, inputs, label, *per_query_extra) -> outputs``;
        returns each output stacked to ``[num_subsets, num_queries]``.
        """
        groups, num_rows = self._groups(masks)
        results = None
        for shots, (rows, indices) in groups.items():
            step = self._compiled_step(name, shots, query_fn)
            per_shots = extra(shots) if extra is not None else ()
            # Power-of-two chunks up to chunk_size: few compiled shapes.
            size = min(self.chunk_size, 1 << (len(rows) - 1).bit_length())
            outs = map_padded_chunks(
                lambda chunk, step=step, extra=per_shots: step(
                    self.scorer.params, self.demonstrations, chunk, queries, labels,
                    *extra),
                pad_rows(indices, size), size)
            num = len(rows)
            outs = jax.tree.map(lambda o, n=num: np.asarray(o)[:n], outs)
            if results is None:
                results = jax.tree.map(
                    lambda o: np.zeros((num_rows,) + o.shape[1:], o.dtype), outs)
            for res, out in zip(jax.tree.leaves(results), jax.tree.leaves(outs),
                                strict=True):
                res[rows] = out
        return results

    def _compiled_step(self, name, shots, query_fn):
        """``query_fn`` over ``[chunk]`` prompts x ``[T]`` queries, jitted once
        per ``(name, shots)``."""
        def step(params, demonstrations, indices, queries, labels, *extra):
            def one_prompt(idx):
                def one_query(query, label, *query_extra):
                    inputs = self._prompt(demonstrations, idx, query)
                    return query_fn(params, inputs, label, *query_extra)
                return jax.vmap(one_query)(queries, labels, *extra)
            return jax.vmap(one_prompt)(indices)

        return self._jitted((name, shots), step)

    # -- the head and its loss ----------------------------------------------

    def _output(self, params, embeddings):
        """The head's output: label logits ``[C]`` or a prediction ``[]``."""
        s = self.scorer
        head = s.label_logits if self.head == "classification" else s.prediction
        return head(params, embeddings)

    def _output_loss(self, output, label):
        if self.head == "classification":
            return softmax_cross_entropy(output, label)
        return jnp.square(output - label)

    def _embedding_loss(self, params, embeddings, label):
        return self._output_loss(self._output(params, embeddings), label)

    def _loss_and_correct(self, params, inputs, label):
        """``(loss, correct)`` (classification) or ``(loss,)`` (regression)."""
        output = self._output(params, self.scorer.embed(params, inputs))
        loss = self._output_loss(output, label)
        if self.head == "classification":
            return loss, jnp.argmax(output) == label
        return (loss,)

    def _finite(self, scores, what):
        bad = ~np.isfinite(scores)
        if bad.any():
            rows = np.unique(np.nonzero(bad)[0])
            head = ("label_logits" if self.head == "classification"
                    else "prediction")
            raise ValueError(
                f"the scorer returned {int(bad.sum())} non-finite {what} (prompts "
                f"{rows[:10].tolist()}); check scorer.{head}."
            )
        return scores

    def exact_scores(self, masks, *, key=None) -> jax.Array:
        """Per-query loss of each prompt, by forward passes.

        Deterministic: the same masks give the same scores.

        Args:
          masks: ``[num_subsets, num_tasks]``; each row's demonstrations, in
            pool order, followed by the query, make a prompt.
          key: unused (forward passes draw no randomness); accepted so that
            every workload's ``exact_scores`` takes a key.

        Returns:
          ``[num_subsets, num_targets]`` losses.
        """
        loss = self._per_prompt("exact", masks, self.queries, self.query_labels,
                                self._loss_and_correct)[0]
        return jnp.asarray(self._finite(loss, "losses"))

    def prompt_performance(self, masks, *, split: str = "heldout") -> PromptPerformance:
        """Mean loss and accuracy of each prompt over a set of queries.

        Args:
          masks: ``[num_prompts, num_tasks]``.
          split: ``"heldout"`` (the held-out queries) or ``"targets"``.
        """
        if split == "heldout":
            if self.heldout is None:
                raise ValueError("this workload has no held-out queries.")
            queries, labels = self.heldout
        elif split == "targets":
            queries, labels = self.queries, self.query_labels
        else:
            raise ValueError(f"split must be 'heldout' or 'targets', got {split!r}.")
        outs = self._per_prompt("exact", masks, queries, labels,
                                self._loss_and_correct)
        loss = self._finite(outs[0], "losses")
        accuracy = outs[1].mean(1) if self.head == "classification" else None
        return PromptPerformance(loss=loss.mean(1), accuracy=accuracy)

    # -- embedding-space linearization ------------------------------------

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

    def _jitted(self, name, fn):
        """``jax.jit(fn)``, made once per workload (compiled once per shape)."""
        if name not in self._compiled:
            self._compiled[name] = jax.jit(fn)
        return self._compiled[name]

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
                self.anchor_prompts(shots, anchor)[0], linearize))
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


def _pool_order(masks: np.ndarray, shots: int) -> np.ndarray:
    """``[m, num_tasks]`` masks of ``shots`` ones -> ``[m, shots]`` int32 pool
    indices in increasing pool order (the fixed order of a prompt)."""
    order = np.argsort(1 - np.asarray(masks), axis=1, kind="stable")
    return np.sort(order[:, :shots], axis=1).astype(np.int32)


# ----------------------------------------------------------------------------
# The synthetic workload: its own transformer, trained to learn in context
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ICLConfig:
    """Configuration of the synthetic in-context-learning workload.

    Attributes:
      num_symbols: S, the symbols a task maps to labels.
      num_distractors: D, distractor tokens (no information about the label).
      num_labels: C, the labels.
      max_demos: demonstrations per training sequence (the context holds
        ``3 * max_demos + 2`` tokens).
      train_label_noise: probability that a training demonstration's label is
        flipped to another one.
      depth, width, heads, mlp_ratio: the transformer.
      learning_rate, warmup_steps, weight_decay, batch_size, num_steps:
        AdamW with linear warm-up and cosine decay.
      seed: model initialisation and training sequences.
      pool_size: K, the candidate demonstrations (the tasks).
      pool_label_noise: fraction of the pool with a wrong label (rounded).
      num_targets: T, target queries.
      num_heldout_queries: queries kept out of the targets.
      world_seed: the fixed task, the pool and the queries.
    """

    num_symbols: int = 8
    num_distractors: int = 8
    num_labels: int = 2
    max_demos: int = 8
    train_label_noise: float = 0.1
    depth: int = 2
    width: int = 64
    heads: int = 4
    mlp_ratio: int = 4
    learning_rate: float = 3e-3
    warmup_steps: int = 200
    weight_decay: float = 0.01
    batch_size: int = 64
    num_steps: int = 2500
    seed: int = 0
    pool_size: int = 50
    pool_label_noise: float = 0.2
    num_targets: int = 32
    num_heldout_queries: int = 256
    world_seed: int = 1

    @property
    def vocab_size(self) -> int:
        return self.num_symbols + self.num_distractors + self.num_labels

    @property
    def max_length(self) -> int:
        return 3 * self.max_demos + 2


PRESETS: dict[str, ICLConfig] = {
    # 58-80 s of training on 2 cores; 4-shot query accuracy near the
    # best a learner can reach with 10% label noise (benchmarks/README.md).
    "cpu": ICLConfig(),
    # Larger model, vocabulary and pool, for GPU/TPU.
    "paper": ICLConfig(
        num_symbols=16, num_distractors=16, max_demos=16, depth=4, width=128,
        heads=4, batch_size=128, num_steps=20_000, learning_rate=1e-3,
        pool_size=100, num_targets=128, num_heldout_queries=1024,
    ),
    # Tests and the notebook in CI: about 15 seconds of training.
    "tiny": ICLConfig(
        width=32, num_steps=1000, learning_rate=5e-3, pool_size=20,
        num_targets=16, num_heldout_queries=128,
    ),
}


class ICLTransformer(nnx.Module):
    """Decoder-only transformer: tokens ``[..., length]`` -> label logits
    ``[..., length, num_labels]`` at every position.

    Split in two for the linearization: :meth:`embed_tokens` (token plus
    learned position embeddings) and :meth:`logits_from_embeddings`.
    """

    def __init__(self, config: ICLConfig, *, rngs: nnx.Rngs):
        c = config
        self.embed = nnx.Embed(c.vocab_size, c.width, rngs=rngs)
        self.pos = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (c.max_length, c.width),
                                     jnp.float32))
        self.blocks = nnx.List(
            [TransformerBlock(c.width, c.heads, c.mlp_ratio, rngs=rngs)
             for _ in range(c.depth)])
        self.ln_f = nnx.LayerNorm(c.width, rngs=rngs)
        self.unembed = nnx.Linear(c.width, c.num_labels, rngs=rngs)

    def embed_tokens(self, tokens):
        """``[..., length]`` int -> ``[..., length, width]``."""
        return self.embed(tokens) + self.pos[: tokens.shape[-1]]

    def logits_from_embeddings(self, x):
        """``[..., length, width]`` -> ``[..., length, num_labels]`` (causal)."""
        mask = nnx.make_causal_mask(x[..., 0])
        for block in self.blocks:
            x = block(x, mask)
        return self.unembed(self.ln_f(x))

    def __call__(self, tokens):
        return self.logits_from_embeddings(self.embed_tokens(tokens))


def sample_sequences(key, config: ICLConfig, batch_size: int, *, num_demos=None):
    """Training sequences of fresh random tasks.

    Returns:
      ``(tokens [batch, 3 n + 2], shown [batch, n + 1], clean [batch, n + 1])``
      with ``n = num_demos`` (default ``max_demos``): the token ids, the label
      shown for each demonstration (noisy) and the task's true labels; position
      ``3 j + 1`` predicts label ``j`` (``j = n`` is the query).
    """
    c = config
    n = c.max_demos if num_demos is None else num_demos
    k_map, k_sym, k_dis, k_flip, k_shift = jax.random.split(key, 5)
    task = jax.random.randint(k_map, (batch_size, c.num_symbols), 0, c.num_labels)
    symbols = jax.random.randint(k_sym, (batch_size, n + 1), 0, c.num_symbols)
    distractors = jax.random.randint(k_dis, (batch_size, n + 1), 0, c.num_distractors)
    clean = jnp.take_along_axis(task, symbols, axis=1)
    flip = jax.random.bernoulli(k_flip, c.train_label_noise, (batch_size, n + 1))
    shift = jax.random.randint(k_shift, (batch_size, n + 1), 1, c.num_labels)
    shown = jnp.where(flip, (clean + shift) % c.num_labels, clean)
    tokens = jnp.stack(
        [c.num_symbols + distractors, symbols,
         c.num_symbols + c.num_distractors + shown], axis=-1,
    ).reshape(batch_size, -1)[:, :-1]
    return tokens.astype(jnp.int32), shown, clean


def train_icl_transformer(config: ICLConfig):
    """Trains the transformer on fresh random tasks (one compiled scan).

    Returns:
      ``(params, losses [num_steps])``: an ``nnx.State`` of the parameters and
      the training loss of every step.
    """
    c = config
    key = jax.random.key(c.seed)
    model = ICLTransformer(c, rngs=nnx.Rngs(params=jax.random.fold_in(key, 0)))
    graphdef, params = nnx.split(model, nnx.Param)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, c.learning_rate, min(c.warmup_steps, c.num_steps), c.num_steps)
    optimizer = optax.adamw(schedule, weight_decay=c.weight_decay)

    def batch_loss(p, step_key):
        tokens, shown, _ = sample_sequences(step_key, c, c.batch_size)
        logits = nnx.merge(graphdef, p)(tokens)[:, 1::3]
        return softmax_cross_entropy(logits, shown).mean()

    return train_on_fresh_batches(params, batch_loss, optimizer,
                                  num_steps=c.num_steps, key=jax.random.fold_in(key, 1))


class SyntheticICLWorkload(ICLWorkload):
    """The synthetic workload of :func:`icl_workload` (see the module docstring).

    Attributes:
      config: the :class:`ICLConfig`.
      model_params: the trained transformer's parameters (``nnx.State``).
      training_losses: ``[num_steps]`` training loss per step.
      world_task: ``[num_symbols]`` the fixed task's label of each symbol.
      pool_flipped: ``[pool_size]`` bool, demonstrations shown with a wrong label.
    """

    presets: ClassVar[dict[str, ICLConfig]] = PRESETS

    def __init__(self, config: ICLConfig):
        if not isinstance(config, ICLConfig):
            raise TypeError(
                f"config must be an ICLConfig, got {type(config).__name__}.")
        _check_config(config)
        c = self.config = config
        params, losses = train_icl_transformer(c)
        self.model_params, self.training_losses = params, np.asarray(losses)
        graphdef = nnx.graphdef(
            nnx.eval_shape(lambda: ICLTransformer(c, rngs=nnx.Rngs(0))))
        self._graphdef = graphdef

        def embed(p, tokens):
            return nnx.merge(graphdef, p).embed_tokens(tokens)

        def label_logits(p, embeddings):
            return nnx.merge(graphdef, p).logits_from_embeddings(embeddings)[-1]

        world = _world(c)
        self.world_task, self.pool_flipped = world["task"], world["flipped"]
        super().__init__(
            PromptScorer(params, embed, label_logits),
            world["pool"], world["queries"], world["query_labels"],
            max_length=c.max_length, heldout_queries=world["heldout"],
            heldout_labels=world["heldout_labels"], task_names=world["names"],
            description=(
                f"label cross-entropy of {c.num_targets} queries of one random "
                f"{c.num_symbols}-symbol task"),
        )

    def store_config(self) -> dict:
        """JSON description of the workload, for a results store."""
        return {"workload": self.name, **dataclasses.asdict(self.config)}

    def in_context_accuracy(self, key, *, num_sequences: int = 2000) -> np.ndarray:
        """Query accuracy against the true label after 0 to ``max_demos`` shots,
        on fresh tasks from the training distribution.

        Returns:
          ``[max_demos + 1]`` accuracy by number of demonstrations shown.
        """
        key = check_key(key)
        num_sequences = check_positive_int(num_sequences, "num_sequences")
        tokens, _, clean = sample_sequences(key, self.config, num_sequences)
        logits = nnx.merge(self._graphdef, self.model_params)(tokens)[:, 1::3]
        return np.asarray(jnp.mean(jnp.argmax(logits, -1) == clean, axis=0))


def _check_config(c: ICLConfig):
    for name in ("num_symbols", "num_distractors", "max_demos", "depth", "width",
                 "heads", "mlp_ratio", "batch_size", "num_steps", "pool_size",
                 "num_targets", "num_heldout_queries"):
        check_positive_int(getattr(c, name), name)
    check_positive_int(c.num_labels, "num_labels", minimum=2)
    check_positive_int(c.warmup_steps, "warmup_steps", minimum=0)
    if c.width % c.heads:
        raise ValueError(
            f"width must be divisible by heads, got width={c.width}, heads={c.heads}.")
    for name in ("train_label_noise", "pool_label_noise"):
        if not 0.0 <= getattr(c, name) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(c, name)}.")


def _world(c: ICLConfig) -> dict:
    """The fixed task, its demonstration pool and its queries (``world_seed``)."""
    rng = np.random.default_rng(c.world_seed)
    task = rng.integers(0, c.num_labels, c.num_symbols)
    # Every label appears, so the task is not constant.
    task[rng.choice(c.num_symbols, c.num_labels, replace=False)] = np.arange(
        c.num_labels)
    s, d = c.num_symbols, c.num_distractors

    def draw(n):
        symbols = rng.integers(0, s, n)
        distractors = rng.integers(0, d, n)
        return symbols, distractors

    symbols, distractors = draw(c.pool_size)
    flipped = np.zeros(c.pool_size, bool)
    flipped[rng.choice(c.pool_size, int(round(c.pool_label_noise * c.pool_size)),
                       replace=False)] = True
    labels = np.where(flipped, (task[symbols] + rng.integers(1, c.num_labels,
                                                             c.pool_size))
                      % c.num_labels, task[symbols])
    pool = np.stack([s + distractors, symbols, s + d + labels], 1)
    names = tuple(
        f"d{i:02d} s{sym}->{lab}{' (wrong)' if flip else ''}"
        for i, (sym, lab, flip) in enumerate(zip(symbols, labels, flipped,
                                                 strict=True)))

    def queries(n):
        sym, dis = draw(n)
        return np.stack([s + dis, sym], 1), task[sym]

    q, ql = queries(c.num_targets)
    h, hl = queries(c.num_heldout_queries)
    return {"task": task, "flipped": flipped, "pool": pool.astype(np.int32),
            "names": names, "queries": q.astype(np.int32), "query_labels": ql,
            "heldout": h.astype(np.int32), "heldout_labels": hl}


def icl_workload(preset: str = "cpu", **overrides) -> SyntheticICLWorkload:
    """Builds (and trains) the synthetic in-context-learning workload.

    Args:
      preset: one of :data:`PRESETS` (``"cpu"``, ``"paper"``, ``"tiny"``).
      **overrides: :class:`ICLConfig` fields to change.

    Returns:
      The :class:`SyntheticICLWorkload`, its transformer trained.
    """
    return with_preset_defaults(
        SyntheticICLWorkload(config_from_preset(PRESETS, preset, overrides)), preset)


# The pipeline's defaults of the "tiny" presets (fewer prompts, for tests).
PRESET_PIPELINE_DEFAULTS = {"tiny": {"num_subsets": 30, "num_heldout": 30}}


def with_preset_defaults(workload: ICLWorkload, preset: str) -> ICLWorkload:
    """``workload`` with the pipeline defaults of ``preset`` over its class's."""
    workload.pipeline_defaults = {**workload.pipeline_defaults,
                                  **PRESET_PIPELINE_DEFAULTS.get(preset, {})}
    return workload
