"""A causal language model as a prompt scorer: the adapter against the model's
own forward pass, the workload against a loop of forward passes, the
embedding linearization, the tiny GPT's causality, and bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tasksurrogate_jax.workloads.icl import ICLWorkload, PromptScorer
from tasksurrogate_jax.workloads.lm_scorer import (
    LabelTokenLogits,
    causal_lm_scorer,
    left_pad,
    lm_icl_workload,
    nnx_causal_lm_scorer,
    tiny_gpt,
)

VOCAB, MAX_LENGTH = 64, 48
LABEL_IDS = np.array([50, 51, 57])  # one verbalizer token per label
PAD, SEP = 0, 1


@functools.cache
def make_model(seed=0):
    return tiny_gpt(jax.random.key(seed), vocab_size=VOCAB, width=16, depth=2,
                    heads=2, max_length=MAX_LENGTH, param_dtype=jnp.float32)


@functools.cache
def forward(model):
    """``tokens [length] -> [length, vocab]``: the model's plain forward pass
    (jitted once per model and length)."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda tokens: nnx.merge(graphdef, state)(tokens))


@functools.cache
def make_workload():
    """The tiny GPT's workload over :func:`problem` (shared: its compiled
    programs are reused across tests)."""
    demos, demo_labels, queries, query_labels = problem()
    scorer = nnx_causal_lm_scorer(make_model(), label_token_ids=LABEL_IDS)
    return lm_icl_workload(scorer, demos, queries, query_labels,
                           demo_labels=demo_labels, separator=[SEP], pad_id=PAD,
                           max_length=MAX_LENGTH, chunk_size=4)


def scorer_label_logits(scorer):
    """``tokens [length] -> [num_labels]`` through the scorer (jitted)."""
    return jax.jit(lambda p, t: scorer.label_logits(p, scorer.embed(p, t)))


def problem(num_demos=10, num_queries=3, seed=0):
    """Ragged demonstration inputs (2-4 tokens) with labels, ragged queries."""
    rng = np.random.default_rng(seed)
    demos = [rng.integers(2, 48, rng.integers(2, 5)) for _ in range(num_demos)]
    demo_labels = rng.integers(0, len(LABEL_IDS), num_demos)
    queries = [rng.integers(2, 48, rng.integers(2, 4)) for _ in range(num_queries)]
    query_labels = rng.integers(0, len(LABEL_IDS), num_queries)
    return demos, demo_labels, queries, query_labels


def four_shot_masks(num_demos, num, seed=0):
    rng = np.random.default_rng(seed)
    masks = np.zeros((num, num_demos), np.float32)
    for row in masks:
        row[rng.choice(num_demos, 4, replace=False)] = 1
    return masks


def test_label_logits_equal_the_forward_pass_at_the_label_ids():
    model = make_model()
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, 11), jnp.int32)
    full = forward(model)(tokens)  # [11, vocab]
    scorer = nnx_causal_lm_scorer(model, label_token_ids=LABEL_IDS)
    assert isinstance(scorer, PromptScorer)
    got = scorer_label_logits(scorer)(scorer.params, tokens)
    np.testing.assert_allclose(got, full[-1, LABEL_IDS], rtol=1e-12, atol=1e-12)
    # The same through two plain functions of the parameters.
    graphdef, params = nnx.split(model, nnx.Param)
    plain = causal_lm_scorer(
        params,
        embed_fn=lambda p, t: nnx.merge(graphdef, p).embed_tokens(t),
        logits_fn=lambda p, e: nnx.merge(graphdef, p).logits_from_embeddings(e),
        label_token_ids=LABEL_IDS.tolist(), vocab_size=VOCAB)
    got = scorer_label_logits(plain)(plain.params, tokens)
    np.testing.assert_allclose(got, full[-1, LABEL_IDS], rtol=1e-12, atol=1e-12)
    assert plain.label_logits.vocab_size == VOCAB
    assert plain.label_logits.extra_length == 0


def test_multi_token_verbalizers_score_their_teacher_forced_log_probability():
    model = make_model()
    fwd = forward(model)
    tokens = np.random.default_rng(2).integers(0, VOCAB, 9)
    ids = [[50, 51, 52], [53, -1, -1], [50, 54, -1]]  # ragged, -1 padded
    scorer = nnx_causal_lm_scorer(model, label_token_ids=ids)
    head = scorer.label_logits
    assert isinstance(head, LabelTokenLogits) and head.extra_length == 2
    got = np.asarray(scorer_label_logits(scorer)(scorer.params, jnp.asarray(tokens)))
    # Each verbalizer after the prompt, filled to one length (one compiled
    # forward pass; causality makes the filler irrelevant).
    expected = []
    for row in ids:
        verbalizer = [t for t in row if t >= 0]
        filled = np.concatenate([tokens, verbalizer, np.full(3 - len(verbalizer), 9)])
        log_probs = jax.nn.log_softmax(fwd(jnp.asarray(filled)), axis=-1)
        expected.append(sum(float(log_probs[8 + j, t])
                            for j, t in enumerate(verbalizer)))
    # One batched float32 forward pass against one per verbalizer: log-probs
    # ~ -5 summed over 3 tokens, rounded at eps32 (1.2e-7) x logits' scale.
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # A workload keeps room for the verbalizer after the longest prompt.
    demos, demo_labels, queries, query_labels = problem()
    workload = lm_icl_workload(scorer, demos, queries, query_labels,
                               demo_labels=demo_labels, pad_id=PAD,
                               max_length=MAX_LENGTH)
    assert workload.max_length == MAX_LENGTH - 2
    assert workload.demonstrations.shape[1] == 4 + 3  # longest input + verbalizer


@pytest.mark.slow
def test_exact_scores_equal_a_loop_of_forward_passes_and_cross_entropy():
    demos, demo_labels, queries, query_labels = problem()
    workload = make_workload()
    assert isinstance(workload, ICLWorkload) and workload.num_tasks == len(demos)
    # Left-padded blocks: input, verbalizer, separator, right-aligned.
    blocks = [np.concatenate([d, [LABEL_IDS[c], SEP]])
              for d, c in zip(demos, demo_labels, strict=True)]
    width = max(b.size for b in blocks)
    blocks = [np.concatenate([np.full(width - b.size, PAD), b]) for b in blocks]
    np.testing.assert_array_equal(workload.demonstrations, blocks)
    q_width = max(q.size for q in queries)
    padded_queries = [np.concatenate([np.full(q_width - q.size, PAD), q])
                      for q in queries]
    np.testing.assert_array_equal(workload.queries, padded_queries)
    assert workload.task_names[0] == f"demo0 (label {demo_labels[0]})"

    masks = four_shot_masks(len(demos), 6)
    scores = np.asarray(workload.exact_scores(masks))
    fwd = forward(make_model())
    expected = np.zeros_like(scores)
    for i, row in enumerate(masks):
        prompt = np.concatenate([blocks[j] for j in np.nonzero(row)[0]])
        for t, (query, label) in enumerate(
                zip(padded_queries, query_labels, strict=True)):
            logits = fwd(jnp.asarray(np.concatenate([prompt, query])))[-1, LABEL_IDS]
            expected[i, t] = jax.nn.logsumexp(logits) - logits[label]
    # Batched against one forward pass per prompt, float32 (eps 1.2e-7) losses ~1.
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_linearization_is_exact_at_the_anchor_and_equals_the_jvp():
    workload = make_workload()
    scorer = workload.scorer
    anchor = np.array([1, 4, 6, 8])
    masks = four_shot_masks(workload.num_tasks, 4, seed=1)
    masks[0] = 0
    masks[0, anchor] = 1  # the anchor prompt itself
    estimated = np.asarray(workload.estimated_scores(masks, anchor=anchor))
    # At the anchor prompt, the first-order estimate is the exact loss.
    np.testing.assert_allclose(estimated[0], workload.exact_scores(masks)[0],
                               rtol=1e-5)  # two float32 programs (above)
    # Elsewhere, it is L(E0) + jvp(L, E0)(E_s - E0).
    e0 = workload.anchor_embeddings(4, anchor)

    def loss(embeddings, label):
        logits = scorer.label_logits(scorer.params, embeddings)
        return jax.nn.logsumexp(logits) - logits[label]

    @jax.jit
    def first_order(tokens, anchor, label):
        e = scorer.embed(scorer.params, tokens)
        value, slope = jax.jvp(lambda x: loss(x, label), (anchor,), (e - anchor,))
        return value + slope

    for i, row in enumerate(masks):
        prompt = workload.demonstrations[np.nonzero(row)[0]].reshape(-1)
        for t, (query, label) in enumerate(
                zip(workload.queries, workload.query_labels, strict=True)):
            tokens = jnp.asarray(np.concatenate([prompt, query]))
            np.testing.assert_allclose(estimated[i, t],
                                       first_order(tokens, e0[t], label),
                                       rtol=1e-5, atol=1e-6)  # float32 (above)


def test_tiny_gpt_is_causal():
    model = make_model()
    fwd = forward(model)
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, VOCAB, 12)
    changed_after = tokens.copy()
    changed_after[7:] = (tokens[7:] + 1 + rng.integers(0, VOCAB - 1, 5)) % VOCAB
    base = np.asarray(fwd(jnp.asarray(tokens)))
    after = np.asarray(fwd(jnp.asarray(changed_after)))
    # Positions 0..6 see only tokens 0..6.
    np.testing.assert_array_equal(after[:7], base[:7])
    assert np.abs(after[7:] - base[7:]).max() > 1e-3
    # A change before position t does change the logits at t.
    changed_before = tokens.copy()
    changed_before[2] = (tokens[2] + 1) % VOCAB
    before = np.asarray(fwd(jnp.asarray(changed_before)))
    np.testing.assert_array_equal(before[:2], base[:2])
    assert np.abs(before[2:] - base[2:]).min(axis=1).max() > 0
    assert np.abs(before[2:] - base[2:]).max(axis=1).min() > 1e-6
    with pytest.raises(ValueError, match="max_length=48"):
        model.embed_tokens(jnp.zeros(49, jnp.int32))


def _fns(vocab=VOCAB, width=4, embed_ndim=2, logits_ndim=2):
    table = jnp.ones((vocab, width))

    def embed_fn(p, tokens):
        e = table[tokens]
        return e if embed_ndim == 2 else e[None]

    def logits_fn(p, embeddings):
        out = embeddings @ table.T
        return out if logits_ndim == 2 else out[-1]

    return embed_fn, logits_fn


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(label_token_ids=[3, 64]), ValueError,
     r"label_token_ids must lie in \[0, 64\)"),
    (dict(label_token_ids=[3, 5, 3]), ValueError,
     "label_token_ids gives labels 0 and 2"),
    (dict(label_token_ids=[[3, -1], [3, -1]]), ValueError, "label_token_ids gives"),
    (dict(label_token_ids=[7]), ValueError, "label_token_ids must name at least 2"),
    (dict(label_token_ids=np.zeros((2, 2, 2), int)), ValueError,
     r"label_token_ids must be \[num_labels\]"),
    (dict(label_token_ids=[[3, -1, 4], [5, 6, 7]]), ValueError,
     "label_token_ids row 0"),
    (dict(label_token_ids=[-2, 3]), ValueError, "label_token_ids row 0"),
    (dict(label_token_ids=[1.0, 2.0]), TypeError, "label_token_ids must hold integer"),
    (dict(label_token_ids=[[1, 2], [3]]), ValueError, "label_token_ids .*ragged"),
    (dict(label_token_ids=[1, 2], vocab_size=50), ValueError,
     "logits_fn returns 64 logits per position, but vocab_size=50"),
    (dict(label_token_ids=[1, 2], embed_ndim=3), ValueError,
     r"embed_fn must map tokens \[1\] int32 to floating embeddings"),
    (dict(label_token_ids=[1, 2], logits_ndim=1), ValueError,
     r"logits_fn must map embeddings \(1, 4\)"),
    (dict(label_token_ids=[1, 2], embed_fn=None), TypeError,
     "embed_fn must be callable"),
])
def test_causal_lm_scorer_rejects_bad_input_naming_the_argument(kwargs, error, match):
    embed_fn, logits_fn = _fns(embed_ndim=kwargs.pop("embed_ndim", 2),
                               logits_ndim=kwargs.pop("logits_ndim", 2))
    kwargs = {"embed_fn": embed_fn, "logits_fn": logits_fn, **kwargs}
    with pytest.raises(error, match=match):
        causal_lm_scorer({}, **kwargs)


def test_causal_lm_scorer_reports_a_failing_function():
    embed_fn, _ = _fns()

    def logits_fn(p, embeddings):
        return embeddings @ jnp.ones((5, 64))  # width 4 expected

    with pytest.raises(ValueError, match=r"logits_fn\(params, embeddings\) failed"):
        causal_lm_scorer({}, embed_fn=embed_fn, logits_fn=logits_fn,
                         label_token_ids=[1, 2])


def test_nnx_scorer_and_workload_reject_bad_input_naming_the_argument():
    model = make_model()
    with pytest.raises(ValueError, match="embed_method='embed'"):
        nnx_causal_lm_scorer(model, label_token_ids=LABEL_IDS, embed_method="embed")
    with pytest.raises(TypeError, match="model must be an nnx.Module"):
        nnx_causal_lm_scorer(object(), label_token_ids=LABEL_IDS)
    scorer = nnx_causal_lm_scorer(model, label_token_ids=LABEL_IDS)
    demos, demo_labels, queries, query_labels = problem()
    ok = dict(demo_labels=demo_labels, pad_id=PAD, max_length=MAX_LENGTH)
    with pytest.raises(ValueError, match="demo_tokens have different lengths.*pad_id"):
        lm_icl_workload(scorer, demos, queries, query_labels,
                        **{**ok, "pad_id": None})
    with pytest.raises(ValueError, match=r"demo_labels must be \[10\]"):
        lm_icl_workload(scorer, demos, queries, query_labels,
                        **{**ok, "demo_labels": demo_labels[:3]})
    with pytest.raises(ValueError, match=r"demo_labels must lie in \[0, 3\)"):
        lm_icl_workload(scorer, demos, queries, query_labels,
                        **{**ok, "demo_labels": demo_labels + 3})
    with pytest.raises(ValueError, match="query_tokens hold token id 64"):
        lm_icl_workload(scorer, demos, [[1, 64]], [0], **ok)
    with pytest.raises(ValueError, match=r"query_labels must lie in \[0, 3\)"):
        lm_icl_workload(scorer, demos, queries, np.full(3, 3), **ok)
    with pytest.raises(ValueError, match="pad_id must be a non-negative token id"):
        lm_icl_workload(scorer, demos, queries, query_labels, **{**ok, "pad_id": -1})
    with pytest.raises(ValueError, match="label_token_ids differ from the scorer"):
        lm_icl_workload(scorer, demos, queries, query_labels, **ok,
                        label_token_ids=[1, 2, 3])
    with pytest.raises(ValueError, match="8 tokens, longer .* max_length=7"):
        lm_icl_workload(scorer, demos, queries, query_labels,
                        **{**ok, "max_length": 7})
    with pytest.raises(TypeError, match=r"query_tokens\[1\] must hold integer"):
        lm_icl_workload(scorer, demos, [[1, 2], [0.5]], [0, 1], **ok)
    with pytest.raises(TypeError, match=r"separator\[0\] must hold integer"):
        lm_icl_workload(scorer, demos, queries, query_labels, **ok, separator=[0.5])
    plain = PromptScorer(scorer.params, scorer.embed, lambda p, e: jnp.zeros(3))
    with pytest.raises(ValueError, match="demo_labels needs the label map"):
        lm_icl_workload(plain, demos, queries, query_labels, **ok)


def test_left_pad():
    np.testing.assert_array_equal(left_pad([[3, 4], [5]], pad_id=0),
                                  [[3, 4], [0, 5]])
    np.testing.assert_array_equal(left_pad(np.array([[3, 4]]), pad_id=9, length=4),
                                  [[9, 9, 3, 4]])
    with pytest.raises(ValueError, match="longest sequence has 2 tokens"):
        left_pad([[3, 4]], pad_id=0, length=1)
    with pytest.raises(ValueError, match=r"sequences\[0\] holds a negative"):
        left_pad([[-3, 4]], pad_id=0)
