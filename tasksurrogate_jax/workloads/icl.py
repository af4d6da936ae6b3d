"""In-context learning: demonstrations as tasks (docs/method.md).

The attribution problem is the paper's: a pool of K candidate demonstrations
(the tasks), T target queries, and prompts made of the demonstrations a mask
selects. A prompt lists its demonstrations in increasing pool order, then the
query; ``F(s)`` per query is the query's loss given the prompt, read at the
prompt's last position: the cross-entropy of its label (a classification head)
or the squared error of a real prediction (a regression head). Nothing is
retrained: each score is one forward pass.

Three modules:

- here, :class:`ICLWorkload` works with any model through a
  :class:`PromptScorer` (parameters, an embedding function and a head from
  embeddings to label logits or to a real prediction), so a researcher can
  plug in their own Flax model. Prompts are token ids (``[length]`` int, a
  language model) or real input vectors (``[length, input_dim]``, e.g.
  in-context regression: :mod:`tasksurrogate_jax.workloads.icl_regression`).
  It samples prompts, scores them exactly by forward passes and measures a
  prompt's performance on held-out queries.
- :mod:`tasksurrogate_jax.workloads.icl_estimation`: the first-order estimate
  that :class:`ICLWorkload` inherits, linearized in the prompt's input
  embeddings around one or several anchor prompts (:class:`NearestAnchors`).
- :mod:`tasksurrogate_jax.workloads.icl_synthetic`: :func:`icl_workload`
  builds the synthetic token workload: it trains its own small decoder-only
  transformer (no weights can be downloaded here) to learn in context, and
  draws the pool and queries from one fixed task.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tasksurrogate_jax._checks import check_positive_int
from tasksurrogate_jax.core.subsets import fixed_size_masks
from tasksurrogate_jax.losses import softmax_cross_entropy
from tasksurrogate_jax.truth.chunking import map_chunks
from tasksurrogate_jax.truth.fingerprint import (
    array_digest,
    program_digest,
    tree_digest,
)
from tasksurrogate_jax.workloads.base import FixedSizeWorkload
from tasksurrogate_jax.workloads.icl_estimation import (
    ANCHORS,
    LINEARIZE,
    EmbeddingLinearization,
    NearestAnchors,
    _pool_order,
)
from tasksurrogate_jax.workloads.icl_estimation import (
    EmbeddingEstimate as EmbeddingEstimate,  # re-exported
)

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


class ICLWorkload(EmbeddingLinearization, FixedSizeWorkload):
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
        """Maps ``query_fn`` over prompts and queries, chunk by chunk
        (:func:`~tasksurrogate_jax.truth.chunking.map_chunks`, one map per
        number of shots).

        ``query_fn(params, inputs, label, *per_query_extra) -> outputs`` (one
        array or a tuple); returns a tuple with each output stacked to
        ``[num_subsets, num_queries]``.
        """
        groups, num_rows = self._groups(masks)
        results = {}
        for shots, (rows, indices) in groups.items():
            step = self._compiled_step(name, shots, query_fn)
            per_shots = extra(shots) if extra is not None else ()

            def chunk_outputs(chunk, step=step, indices=indices, extra=per_shots):
                outs = step(self.scorer.params, self.demonstrations, indices[chunk],
                            queries, labels, *extra)
                return {str(i): out for i, out in enumerate(jax.tree.leaves(outs))}

            # Power-of-two chunks up to chunk_size: few compiled shapes.
            size = min(self.chunk_size, 1 << (len(rows) - 1).bit_length())
            outs = map_chunks(chunk_outputs, len(rows), chunk_size=size)
            for out_name, out in outs.items():
                if out_name not in results:
                    results[out_name] = np.zeros((num_rows,) + out.shape[1:],
                                                 out.dtype)
                results[out_name][rows] = out
        return tuple(results[str(i)] for i in range(len(results)))

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

    def _jitted(self, name, fn):
        """``jax.jit(fn)``, made once per workload (compiled once per shape)."""
        if name not in self._compiled:
            self._compiled[name] = jax.jit(fn)
        return self._compiled[name]

