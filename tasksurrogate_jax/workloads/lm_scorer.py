"""Your own causal language model as a prompt scorer (docs/method.md).

:class:`~tasksurrogate_jax.workloads.icl.ICLWorkload` scores prompts through a
:class:`~tasksurrogate_jax.workloads.icl.PromptScorer`: an embedding function
and a function from embeddings to the label logits at the last position. A
causal language model gives both once it is split in two:

- ``embed_fn(params, tokens [length] int32) -> [length, width]``: the input
  embeddings (token embeddings, plus position embeddings if the model adds
  them there, as GPT-2 does; a rotary model such as Llama adds none here);
- ``logits_fn(params, embeddings [length, width]) -> [length, vocab_size]``:
  the rest of the model, the next-token logits at every position.

:func:`causal_lm_scorer` makes the scorer from these two functions and the
token ids of the label verbalizers (``" positive"``, ``" negative"``, ...);
:func:`nnx_causal_lm_scorer` does the same for a Flax NNX model with two
methods. :func:`lm_icl_workload` builds the workload from tokenised
demonstrations and queries (ragged token lists are left-padded), and
:func:`tiny_gpt` is a small randomly initialised GPT-shaped model for tests
(no pretrained weights can be downloaded here).

Label logits. With one token per verbalizer (``label_token_ids`` of shape
``[num_labels]``), the label logits are the model's next-token logits at the
last position, at the verbalizer ids: the cross-entropy over them is that of
the label among the verbalizers (the softmax over the labels only, as in the
paper). With several tokens per verbalizer (``[num_labels, max_tokens]``,
ragged rows padded with ``-1`` at the end), a label's logit is the summed
log-probability of its whole verbalizer given the prompt (teacher-forced:
one forward pass per label over the prompt and the verbalizer's tokens but
its last; no length normalisation), and the cross-entropy is again that of
the label among the verbalizers. The verbalizers' own embeddings then come
from ``embed_fn`` at the positions after the prompt, which assumes that
``embed_fn`` is position-wise (row ``i`` depends on token ``i`` and the
position ``i`` only), true of token-plus-position embeddings. A prompt then
needs ``max_tokens - 1`` positions of context more than its own length
(:func:`lm_icl_workload` takes them off ``max_length``).

Padding. A prompt of :class:`ICLWorkload` is a fixed number of fixed-length
demonstration blocks and a query, so ragged token lists are left-padded with
``pad_id`` to a common length: each query then ends at the position whose
next-token logits predict its label, and each demonstration ends with its
verbalizer (and separator). The pad tokens are ordinary input to the model
(no attention mask): choose a token that reads as filler between
demonstrations, such as the tokenizer's newline or space token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tasksurrogate_jax._checks import check_key, check_positive_int
from tasksurrogate_jax.workloads.icl import ICLWorkload, PromptScorer

__all__ = [
    "CausalSelfAttention",
    "GPTBlock",
    "LabelTokenLogits",
    "TinyGPT",
    "causal_lm_scorer",
    "left_pad",
    "lm_icl_workload",
    "nnx_causal_lm_scorer",
    "tiny_gpt",
]

# ----------------------------------------------------------------------------
# The adapter
# ----------------------------------------------------------------------------


def _label_token_table(label_token_ids) -> np.ndarray:
    """``label_token_ids`` -> ``[num_labels, max_tokens]`` int32, ``-1`` padded."""
    name = "label_token_ids"
    try:
        arr = np.asarray(label_token_ids)
    except ValueError as err:  # ragged nested lists
        raise ValueError(
            f"{name} must be [num_labels] token ids or [num_labels, max_tokens] "
            "(ragged verbalizers padded with -1 at the end); got ragged lists."
        ) from err
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integer token ids, got dtype {arr.dtype}.")
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(
            f"{name} must be [num_labels] token ids or [num_labels, max_tokens] "
            f"(ragged verbalizers padded with -1 at the end), got shape "
            f"{np.shape(label_token_ids)}."
        )
    if arr.shape[0] < 2:
        raise ValueError(
            f"{name} must name at least 2 labels, got {arr.shape[0]} "
            f"(shape {np.shape(label_token_ids)})."
        )
    arr = arr.astype(np.int64)
    valid = arr >= 0
    bad = (arr < -1) | (valid[:, 1:] & ~valid[:, :-1]).any(1, keepdims=True) \
        | ~valid[:, :1]
    if bad.any():
        row = int(np.nonzero(bad.any(1))[0][0])
        raise ValueError(
            f"{name} row {row} is {arr[row].tolist()}: token ids must be >= 0, "
            "each verbalizer non-empty, padded with -1 at the end only."
        )
    rows = [tuple(r[r >= 0].tolist()) for r in arr]
    seen = {}
    for i, r in enumerate(rows):
        if r in seen:
            raise ValueError(
                f"{name} gives labels {seen[r]} and {i} the same verbalizer "
                f"{list(r)}; each label needs its own."
            )
        seen[r] = i
    # Trailing columns of -1 only add nothing.
    width = int(valid.sum(1).max())
    return arr[:, :width].astype(np.int32)


class LabelTokenLogits:
    """``label_logits(params, embeddings [length, width]) -> [num_labels]`` of a
    causal language model (made by :func:`causal_lm_scorer`).

    Attributes:
      label_token_ids: ``[num_labels, max_tokens]`` int32, ``-1`` padded.
      vocab_size: the model's logits dimension.
      extra_length: ``max_tokens - 1``: the positions a prompt needs after its
        own for a teacher-forced multi-token verbalizer (0 for one token).
    """

    def __init__(self, embed_fn: Callable, logits_fn: Callable,
                 label_token_ids: np.ndarray, vocab_size: int):
        self.embed_fn, self.logits_fn = embed_fn, logits_fn
        self.label_token_ids = label_token_ids
        self.vocab_size = vocab_size
        self.extra_length = label_token_ids.shape[1] - 1

    @property
    def num_labels(self) -> int:
        return self.label_token_ids.shape[0]

    def verbalizer(self, label: int) -> np.ndarray:
        """The token ids of ``label``'s verbalizer (padding dropped)."""
        row = self.label_token_ids[label]
        return row[row >= 0]

    def __call__(self, params, embeddings):
        ids = self.label_token_ids
        if self.extra_length == 0:
            return self.logits_fn(params, embeddings)[-1, ids[:, 0]]
        length = embeddings.shape[0]
        valid = jnp.asarray(ids >= 0)
        ids = jnp.asarray(np.maximum(ids, 0))  # padded slots: any valid token

        def verbalizer_log_prob(tokens, valid):
            # Teacher forcing: the prompt, then the verbalizer but its last token.
            # Its embeddings are those of embed_fn at positions length, ...
            # (position-wise; the dummy prefix is discarded).
            filler = jnp.zeros(length, jnp.int32)
            tail = self.embed_fn(params, jnp.concatenate([filler, tokens[:-1]]))
            x = jnp.concatenate([embeddings, tail[length:].astype(embeddings.dtype)])
            logits = self.logits_fn(params, x)[length - 1:]  # [max_tokens, vocab]
            log_probs = jax.nn.log_softmax(logits, axis=-1)
            picked = jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]
            return jnp.sum(jnp.where(valid, picked, 0.0))

        return jax.vmap(verbalizer_log_prob)(ids, valid)


def _shape_of(fn, name, *args):
    try:
        return jax.eval_shape(fn, *args)
    except Exception as err:  # the user's function, traced on abstract inputs
        raise ValueError(f"{name} failed on abstract inputs: {err}") from err


def causal_lm_scorer(params, *, embed_fn: Callable, logits_fn: Callable,
                     label_token_ids, vocab_size: int | None = None) -> PromptScorer:
    """A causal language model, split in two functions, as a :class:`PromptScorer`.

    Args:
      params: the model's parameters (any pytree), passed to both functions.
      embed_fn: ``embed_fn(params, tokens [length] int32) -> [length, width]``:
        the input embeddings, positions included if the model adds them there.
        The workload's estimates are first-order in this output.
      logits_fn: ``logits_fn(params, embeddings [length, width]) ->
        [length, vocab_size]``: next-token logits at every position (causal).
      label_token_ids: ``[num_labels]`` the token id of each label's verbalizer,
        or ``[num_labels, max_tokens]`` for verbalizers of several tokens
        (ragged rows padded with ``-1`` at the end); see the module docstring.
      vocab_size: if given, ``logits_fn``'s last dimension must equal it.

    Returns:
      A :class:`PromptScorer` whose ``label_logits`` is a
      :class:`LabelTokenLogits` (its attributes hold the label map). The shapes
      are checked once here, with ``jax.eval_shape``, on a one-token prompt.

    Raises:
      TypeError, ValueError: naming the argument at fault.
    """
    for name, fn in (("embed_fn", embed_fn), ("logits_fn", logits_fn)):
        if not callable(fn):
            raise TypeError(f"{name} must be callable, got {type(fn).__name__}.")
    if vocab_size is not None:
        vocab_size = check_positive_int(vocab_size, "vocab_size", minimum=2)
    table = _label_token_table(label_token_ids)
    extra = table.shape[1] - 1

    length = 1 + extra  # a one-token prompt and its teacher-forced verbalizer
    tokens = jax.ShapeDtypeStruct((length,), jnp.int32)
    emb = _shape_of(embed_fn, "embed_fn(params, tokens)", params, tokens)
    if not (isinstance(emb, jax.ShapeDtypeStruct) and len(emb.shape) == 2
            and emb.shape[0] == length and jnp.issubdtype(emb.dtype, jnp.floating)):
        raise ValueError(
            f"embed_fn must map tokens [{length}] int32 to floating embeddings "
            f"[{length}, width] (2-D), got {_describe(emb)}."
        )
    logits = _shape_of(logits_fn, "logits_fn(params, embeddings)", params, emb)
    if not (isinstance(logits, jax.ShapeDtypeStruct) and len(logits.shape) == 2
            and logits.shape[0] == length
            and jnp.issubdtype(logits.dtype, jnp.floating)):
        raise ValueError(
            f"logits_fn must map embeddings {tuple(emb.shape)} to floating "
            f"next-token logits [{length}, vocab_size] (2-D), got "
            f"{_describe(logits)}."
        )
    vocab = logits.shape[1]
    if vocab_size is not None and vocab != vocab_size:
        raise ValueError(
            f"logits_fn returns {vocab} logits per position, but vocab_size="
            f"{vocab_size}."
        )
    if table.max() >= vocab:
        raise ValueError(
            f"label_token_ids must lie in [0, {vocab}) (logits_fn's vocabulary), "
            f"got {table.max()}."
        )
    label_logits = LabelTokenLogits(embed_fn, logits_fn, table, vocab)
    out = _shape_of(label_logits, "label_logits", params,
                    jax.ShapeDtypeStruct((1, emb.shape[1]), emb.dtype))
    if out.shape != (table.shape[0],):  # pragma: no cover - by construction
        raise ValueError(f"label logits have shape {out.shape}, expected "
                         f"({table.shape[0]},).")
    return PromptScorer(params, embed_fn, label_logits)


def _describe(x) -> str:
    if isinstance(x, jax.ShapeDtypeStruct):
        return f"shape {tuple(x.shape)} {x.dtype}"
    return f"a {type(x).__name__}"


def nnx_causal_lm_scorer(model: nnx.Module, *, label_token_ids,
                         embed_method: str = "embed_tokens",
                         logits_method: str = "logits_from_embeddings",
                         vocab_size: int | None = None) -> PromptScorer:
    """A Flax NNX causal language model as a :class:`PromptScorer`.

    The model needs two methods (names configurable): ``embed_tokens(tokens
    [length]) -> [length, width]`` and ``logits_from_embeddings(x [length,
    width]) -> [length, vocab_size]``, with ``logits_from_embeddings(
    embed_tokens(tokens))`` its forward pass. :class:`TinyGPT` and the
    synthetic workload's ``ICLTransformer`` have them.

    The scorer's ``params`` is the model's whole ``nnx.State`` (``nnx.split``);
    each call merges it back, so the model is never mutated. Put the model in
    its deterministic (evaluation) mode first, e.g. ``model.eval()``: a scorer
    must be a deterministic function.

    Args:
      model: the ``nnx.Module``.
      label_token_ids, vocab_size: as in :func:`causal_lm_scorer`.
      embed_method, logits_method: the names of the two methods.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}.")
    for arg, method in (("embed_method", embed_method),
                        ("logits_method", logits_method)):
        if not isinstance(method, str) or not callable(getattr(model, method, None)):
            raise ValueError(
                f"{arg}={method!r}: {type(model).__name__} has no such method; "
                "name the method that maps tokens to input embeddings "
                "(embed_method) and the one that maps them to next-token logits "
                "(logits_method)."
            )
    graphdef, state = nnx.split(model)

    def embed_fn(p, tokens):
        return getattr(nnx.merge(graphdef, p), embed_method)(tokens)

    def logits_fn(p, embeddings):
        return getattr(nnx.merge(graphdef, p), logits_method)(embeddings)

    return causal_lm_scorer(state, embed_fn=embed_fn, logits_fn=logits_fn,
                            label_token_ids=label_token_ids, vocab_size=vocab_size)


# ----------------------------------------------------------------------------
# The workload from tokenised demonstrations and queries
# ----------------------------------------------------------------------------


def _token_rows(x, name: str) -> list[np.ndarray]:
    """A 2-D integer array or a sequence of 1-D integer sequences -> rows."""
    if isinstance(x, (str, bytes)) or x is None:
        raise TypeError(f"{name} must hold integer token ids, got {type(x).__name__}.")
    if isinstance(x, np.ndarray | jax.Array):
        arr = np.asarray(x)
        if arr.ndim != 2:
            raise ValueError(
                f"{name} must be 2-D [n, length] or a list of token-id lists, got "
                f"shape {arr.shape}.")
        rows = list(arr)
    else:
        rows = [np.asarray(r) for r in x]
    if not rows:
        raise ValueError(f"{name} must be non-empty.")
    for i, r in enumerate(rows):
        if r.ndim != 1 or r.size == 0:
            raise ValueError(
                f"{name}[{i}] must be a non-empty 1-D sequence of token ids, got "
                f"shape {r.shape}.")
        if not np.issubdtype(r.dtype, np.integer):
            raise TypeError(
                f"{name}[{i}] must hold integer token ids, got dtype {r.dtype}.")
        if r.min() < 0:
            raise ValueError(f"{name}[{i}] holds a negative token id ({r.min()}).")
    return [r.astype(np.int32) for r in rows]


def left_pad(sequences, *, pad_id: int | None = None, length: int | None = None,
             name: str = "sequences") -> np.ndarray:
    """Left-pads token-id sequences to one length.

    Args:
      sequences: a 2-D integer array or a sequence of 1-D integer sequences.
      pad_id: the filler token (needed only where lengths differ or ``length``
        is longer than the longest).
      length: the common length (default: the longest sequence's).
      name: the argument's name in error messages.

    Returns:
      ``[n, length]`` int32, each sequence right-aligned.
    """
    rows = _token_rows(sequences, name)
    longest = max(r.size for r in rows)
    length = longest if length is None else check_positive_int(length, "length")
    if length < longest:
        raise ValueError(
            f"{name}: the longest sequence has {longest} tokens, more than "
            f"length={length}.")
    if pad_id is None:
        if any(r.size != length for r in rows):
            sizes = sorted({r.size for r in rows})
            raise ValueError(
                f"{name} have different lengths ({sizes[0]} to {sizes[-1]} tokens "
                f"for a common {length}); pass pad_id to left-pad them.")
    elif isinstance(pad_id, bool) or not isinstance(pad_id, int | np.integer) \
            or pad_id < 0:
        raise ValueError(f"pad_id must be a non-negative token id, got {pad_id!r}.")
    out = np.full((len(rows), length), -1 if pad_id is None else pad_id, np.int32)
    for i, r in enumerate(rows):
        out[i, length - r.size:] = r
    return out


def lm_icl_workload(scorer: PromptScorer, demo_tokens, query_tokens, query_labels, *,
                    max_length: int, demo_labels=None, label_token_ids=None,
                    separator: Sequence[int] = (), pad_id: int | None = None,
                    heldout_tokens=None, heldout_labels=None,
                    task_names: Sequence[str] | None = None,
                    description: str | None = None,
                    chunk_size: int = 256) -> ICLWorkload:
    """The demonstration-attribution workload of a causal language model.

    A prompt is its demonstrations (in pool order) followed by a query, and a
    query's score is the cross-entropy of its label over the label logits at
    the prompt's last position (the paper's setting: ``workload.sample_prompts(
    key, 200, shots=4)`` draws 4-shot prompts from the pool, e.g. of 50).

    Args:
      scorer: from :func:`causal_lm_scorer` / :func:`nnx_causal_lm_scorer`
        (or any :class:`PromptScorer`, with ``label_token_ids`` given here when
        ``demo_labels`` is).
      demo_tokens: the pool, ``[num_tasks]`` token-id sequences (ragged lists or
        a 2-D array). Without ``demo_labels``, each is a whole demonstration
        (input text, then the label's verbalizer); with it, the input text only
        (e.g. ``"Review: ...\\nSentiment:"``) and the verbalizer is appended.
      query_tokens: ``[num_targets]`` token-id sequences, each ending where the
        label's verbalizer would follow (e.g. ``"...\\nSentiment:"``).
      query_labels: ``[num_targets]`` label index of each query (a row of
        ``label_token_ids``).
      max_length: the model's context length. With verbalizers of several
        tokens, the workload's prompts are kept ``max_tokens - 1`` shorter.
      demo_labels: optional ``[num_tasks]`` label index of each demonstration;
        its verbalizer's tokens are appended to its input tokens.
      label_token_ids: the label map when ``scorer`` is not one of this
        module's (default: the scorer's).
      separator: token ids appended to every demonstration (after the
        verbalizer), e.g. the tokenizer's ``"\\n\\n"``.
      pad_id: the filler token that left-pads ragged demonstrations and queries
        to a common length (see the module docstring); required when lengths
        differ.
      heldout_tokens, heldout_labels: optional held-out queries (padded to the
        target queries' length) for ``workload.prompt_performance``.
      task_names: names of the demonstrations (default ``"demo{i}"``, with the
        label when ``demo_labels`` is given).
      description, chunk_size: as in :class:`ICLWorkload`.

    Returns:
      The :class:`ICLWorkload`; its ``demonstrations`` and ``queries`` hold
      the padded token ids.
    """
    if not isinstance(scorer, PromptScorer):
        raise TypeError(f"scorer must be a PromptScorer, got {type(scorer).__name__}.")
    max_length = check_positive_int(max_length, "max_length")
    head = scorer.label_logits if isinstance(scorer.label_logits,
                                             LabelTokenLogits) else None
    if label_token_ids is not None:
        table = _label_token_table(label_token_ids)
        if head is not None and not np.array_equal(table, head.label_token_ids):
            raise ValueError(
                "label_token_ids differ from the scorer's label map; leave it out "
                "(the scorer's is used) or build the scorer with these ids.")
    else:
        table = None if head is None else head.label_token_ids
    extra = 0 if head is None else head.extra_length
    vocab = None if head is None else head.vocab_size

    demos = _token_rows(demo_tokens, "demo_tokens")
    sep = (_token_rows([separator], "separator")[0] if len(separator)
           else np.zeros(0, np.int32))
    names = None
    if demo_labels is not None:
        if table is None:
            raise ValueError(
                "demo_labels needs the label map: pass label_token_ids, or a scorer "
                "made by causal_lm_scorer / nnx_causal_lm_scorer.")
        labels = np.asarray(demo_labels)
        if labels.shape != (len(demos),) or not np.issubdtype(labels.dtype,
                                                               np.integer):
            raise ValueError(
                f"demo_labels must be [{len(demos)}] integer label indices (one per "
                f"demonstration), got shape {labels.shape} {labels.dtype}.")
        if labels.min() < 0 or labels.max() >= table.shape[0]:
            raise ValueError(
                f"demo_labels must lie in [0, {table.shape[0]}) (rows of "
                f"label_token_ids), got values in [{labels.min()}, {labels.max()}].")
        demos = [np.concatenate([d, table[c][table[c] >= 0]])
                 for d, c in zip(demos, labels, strict=True)]
        names = tuple(f"demo{i} (label {c})" for i, c in enumerate(labels.tolist()))
    if sep.size:
        demos = [np.concatenate([d, sep]) for d in demos]
    demonstrations = left_pad(demos, pad_id=pad_id, name="demo_tokens")

    queries = _token_rows(query_tokens, "query_tokens")
    heldout = None
    if heldout_tokens is not None:
        heldout = _token_rows(heldout_tokens, "heldout_tokens")
    q_length = max(r.size for r in queries + (heldout or []))
    queries = left_pad(queries, pad_id=pad_id, length=q_length, name="query_tokens")
    if heldout is not None:
        heldout = left_pad(heldout, pad_id=pad_id, length=q_length,
                           name="heldout_tokens")

    if vocab is not None:
        for name, arr in (("demo_tokens", demonstrations), ("query_tokens", queries),
                          ("heldout_tokens", heldout)):
            if arr is not None and arr.max() >= vocab:
                raise ValueError(
                    f"{name} hold token id {arr.max()}, outside the model's "
                    f"vocabulary [0, {vocab}) (pad_id and separator included).")
    if extra >= max_length:
        raise ValueError(
            f"max_length={max_length} leaves no room for the verbalizers' "
            f"{extra + 1} tokens.")
    return ICLWorkload(
        scorer, demonstrations, queries, query_labels, max_length=max_length - extra,
        heldout_queries=heldout, heldout_labels=heldout_labels,
        task_names=task_names if task_names is not None else names,
        description=description, chunk_size=chunk_size)


# ----------------------------------------------------------------------------
# A small GPT-shaped model for tests
# ----------------------------------------------------------------------------


class CausalSelfAttention(nnx.Module):
    """Multi-head causal self-attention (GPT-2's: fused query/key/value
    projection, output projection), computed in the input's dtype throughout.

    (``nnx.MultiHeadAttention`` goes through ``jax.nn.dot_product_attention``,
    whose softmax is always float32, so a float64 model built on it is not a
    float64 reference.)
    """

    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.qkv = nnx.Linear(width, 3 * width, rngs=rngs)
        self.out = nnx.Linear(width, width, rngs=rngs)

    def __call__(self, x):
        """``[..., length, width]`` -> ``[..., length, width]``."""
        *batch, length, width = x.shape
        q, k, v = jnp.split(
            self.qkv(x).reshape(*batch, length, 3, self.heads, width // self.heads),
            3, axis=-3)
        q, k, v = q[..., 0, :, :], k[..., 0, :, :], v[..., 0, :, :]
        logits = jnp.einsum("...qhd,...khd->...hqk", q, k) / np.sqrt(q.shape[-1])
        causal = jnp.tril(jnp.ones((length, length), bool))
        logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
        weights = jax.nn.softmax(logits, axis=-1)
        y = jnp.einsum("...hqk,...khd->...qhd", weights, v)
        return self.out(y.reshape(*batch, length, width))


class GPTBlock(nnx.Module):
    """Pre-LayerNorm GPT-2 block: causal self-attention, then a GELU MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(width, rngs=rngs)
        self.attn = CausalSelfAttention(width, heads, rngs=rngs)
        self.ln2 = nnx.LayerNorm(width, rngs=rngs)
        self.fc1 = nnx.Linear(width, mlp_ratio * width, rngs=rngs)
        self.fc2 = nnx.Linear(mlp_ratio * width, width, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nnx.Module):
    """GPT-2-shaped causal language model: token and learned position
    embeddings, pre-LayerNorm causal blocks, a final LayerNorm and an
    unembedding tied to the token embeddings.

    ``__call__(tokens [..., length]) -> [..., length, vocab_size]``, split as
    :meth:`embed_tokens` and :meth:`logits_from_embeddings`.
    """

    def __init__(self, *, vocab_size: int, width: int, depth: int, heads: int,
                 max_length: int, mlp_ratio: int = 4, rngs: nnx.Rngs):
        init = nnx.initializers.normal(stddev=width ** -0.5)  # see tiny_gpt
        self.max_length = max_length
        self.wte = nnx.Embed(vocab_size, width, embedding_init=init, rngs=rngs)
        self.wpe = nnx.Embed(max_length, width, embedding_init=init, rngs=rngs)
        self.blocks = nnx.List(
            [GPTBlock(width, heads, mlp_ratio, rngs=rngs) for _ in range(depth)])
        self.ln_f = nnx.LayerNorm(width, rngs=rngs)

    def embed_tokens(self, tokens):
        """``[..., length]`` int -> ``[..., length, width]`` (position-wise)."""
        length = tokens.shape[-1]
        if length > self.max_length:
            raise ValueError(
                f"tokens has length {length}, longer than the model's context "
                f"max_length={self.max_length}.")
        return self.wte.embedding[...][tokens] + self.wpe.embedding[:length]

    def logits_from_embeddings(self, x):
        """``[..., length, width]`` -> ``[..., length, vocab_size]`` (causal)."""
        for block in self.blocks:
            x = block(x)
        # Tied unembedding (``nnx.Embed.attend`` would compute in the dtype the
        # table had at construction).
        return self.ln_f(x) @ self.wte.embedding[...].T

    def __call__(self, tokens):
        return self.logits_from_embeddings(self.embed_tokens(tokens))


def tiny_gpt(key, *, vocab_size: int = 64, width: int = 32, depth: int = 2,
             heads: int = 4, max_length: int = 64, mlp_ratio: int = 4,
             param_dtype: Any = jnp.float32) -> TinyGPT:
    """A randomly initialised :class:`TinyGPT` (weights from ``key``).

    Args:
      key: a JAX PRNG key.
      vocab_size, width, depth, heads, max_length, mlp_ratio: the model
        (``width`` divisible by ``heads``).
      param_dtype: the parameters' dtype (``jnp.float64`` for reference tests
        with x64 on); the computation follows it.
    """
    key = check_key(key)
    for name, value in (("vocab_size", vocab_size), ("width", width),
                        ("depth", depth), ("heads", heads),
                        ("max_length", max_length), ("mlp_ratio", mlp_ratio)):
        check_positive_int(value, name)
    if width % heads:
        raise ValueError(
            f"width must be divisible by heads, got width={width}, heads={heads}.")
    if not jnp.issubdtype(param_dtype, jnp.floating):
        raise TypeError(f"param_dtype must be a floating dtype, got {param_dtype}.")

    def build(rngs):
        return TinyGPT(vocab_size=vocab_size, width=width, depth=depth, heads=heads,
                       max_length=max_length, mlp_ratio=mlp_ratio, rngs=rngs)

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(0))))
    # GPT-2-like initialisation from one draw (compiling a random draw per
    # parameter would cost seconds): embeddings and kernels normal with
    # standard deviation 1/sqrt(fan-in), biases 0, LayerNorm scales 1.
    paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    sizes = [int(np.prod(leaf.shape)) for _, leaf in paths]
    noise = np.asarray(jax.random.normal(key, (sum(sizes),), param_dtype))
    leaves, start = [], 0
    for (path, leaf), size in zip(paths, sizes, strict=True):
        name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        if name == "bias":
            value = np.zeros(leaf.shape, noise.dtype)
        elif name == "scale":
            value = np.ones(leaf.shape, noise.dtype)
        else:  # "embedding" [rows, width], "kernel" [fan_in, fan_out]
            fan_in = leaf.shape[1] if name == "embedding" else leaf.shape[0]
            value = noise[start:start + size].reshape(leaf.shape) * (
                np.asarray(fan_in, noise.dtype) ** -0.5)
        leaves.append(jnp.asarray(value))
        start += size
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))
