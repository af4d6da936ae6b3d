"""The in-context-learning workload: exact scores, embedding linearization,
the trained model, and bad input."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tasksurrogate_jax.workloads.icl import ICLWorkload, PromptScorer
from tasksurrogate_jax.workloads.icl_synthetic import (
    ICLConfig,
    ICLTransformer,
    icl_workload,
)

CONFIG = ICLConfig(width=16, heads=2, depth=2, max_demos=4)


def transformer_scorer(config=CONFIG, seed=0):
    """An untrained ICLTransformer as a PromptScorer."""
    model = ICLTransformer(config, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)

    def embed(p, tokens):
        return nnx.merge(graphdef, p).embed_tokens(tokens)

    def label_logits(p, embeddings):
        return nnx.merge(graphdef, p).logits_from_embeddings(embeddings)[-1]

    return PromptScorer(params, embed, label_logits), nnx.merge(graphdef, params)


def tanh_scorer(num_labels=3, vocab=12, width=5, max_length=14, seed=0):
    """A user-written scorer with no flax at all: a position-weighted tanh pool."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params = {
        "table": jax.random.normal(k1, (vocab, width)),
        "pos": jax.random.normal(k2, (max_length, width)),
        "out": jax.random.normal(k3, (width, num_labels)),
    }

    def embed(p, tokens):
        return p["table"][tokens] + 0.1 * p["pos"][: tokens.shape[0]]

    def label_logits(p, embeddings):
        h = jnp.tanh(embeddings * embeddings[-1]).sum(0)
        return h @ p["out"]

    return PromptScorer(params, embed, label_logits)


def random_problem(num_tasks=7, num_queries=5, demo_len=3, query_len=2, vocab=12,
                   num_labels=2, seed=0):
    rng = np.random.default_rng(seed)
    demos = rng.integers(0, vocab, (num_tasks, demo_len))
    queries = rng.integers(0, vocab, (num_queries, query_len))
    labels = rng.integers(0, num_labels, num_queries)
    return demos, queries, labels


def mixed_masks(num_tasks, seed=0):
    """Prompts of 1 to 3 demonstrations, in shuffled order."""
    rows = []
    for shots in (1, 2, 3):
        for combo in itertools.islice(itertools.combinations(range(num_tasks), shots),
                                      0, None, 3):
            row = np.zeros(num_tasks, np.float32)
            row[list(combo)] = 1
            rows.append(row)
    rows = np.array(rows)
    return rows[np.random.default_rng(seed).permutation(len(rows))]


def last_logits(model):
    """``tokens [..., length] -> [..., num_labels]``: the model's label logits
    at the last position, by its plain forward pass (jitted per length)."""
    graphdef, params = nnx.split(model)
    return jax.jit(lambda tokens: nnx.merge(graphdef, params)(tokens)[..., -1, :])


def reference_performance(forward, demos, queries, labels, mask):
    """Loss and correctness of one prompt on every query, by forward passes of
    ``[demonstrations in pool order, query]``: ``(losses [Q], correct [Q],
    near_tie [Q])``, ``near_tie`` where the two largest logits are within 1e-4
    (where rounding may decide the argmax)."""
    prompt = demos[np.nonzero(mask)[0]].reshape(-1)
    tokens = np.concatenate(
        [np.broadcast_to(prompt, (len(queries), prompt.size)), queries], axis=1)
    logits = np.asarray(forward(jnp.asarray(tokens, jnp.int32)), np.float64)
    rows = np.arange(len(queries))
    top = logits.max(1)
    losses = top + np.log(np.exp(logits - top[:, None]).sum(1)) - logits[rows, labels]
    ordered = np.sort(logits, axis=1)
    near_tie = ordered[:, -1] - ordered[:, -2] < 1e-4
    return losses, logits.argmax(1) == labels, near_tie


def assert_performance_matches(performance, forward, demos, queries, labels, masks):
    for i, mask in enumerate(masks):
        losses, correct, near_tie = reference_performance(forward, demos, queries,
                                                          labels, mask)
        np.testing.assert_allclose(performance.loss[i], losses.mean(), rtol=1e-5)
        # The accuracy is the fraction of queries whose label has the largest
        # logit; only a near-tie may go either way.
        assert abs(performance.accuracy[i] - correct.mean()) <= near_tie.mean(), i


@pytest.mark.slow
def test_exact_scores_equal_a_loop_of_single_forward_passes():
    scorer, model = transformer_scorer()
    demos, queries, labels = random_problem(vocab=CONFIG.vocab_size)
    workload = ICLWorkload(scorer, demos, queries, labels,
                           max_length=CONFIG.max_length, chunk_size=4)
    masks = mixed_masks(7)
    scores = np.asarray(workload.exact_scores(masks))
    expected = np.zeros_like(scores)
    forward = last_logits(model)
    for i, row in enumerate(masks):
        prompt = demos[np.nonzero(row)[0]].reshape(-1)  # increasing pool order
        for t, (query, label) in enumerate(zip(queries, labels, strict=True)):
            logits = forward(jnp.asarray(np.concatenate([prompt, query])))
            expected[i, t] = jax.nn.logsumexp(logits) - logits[label]
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    # The chunking (and its padding) changes nothing.
    other = ICLWorkload(scorer, demos, queries, labels, max_length=CONFIG.max_length,
                        chunk_size=256)
    np.testing.assert_allclose(np.asarray(other.exact_scores(masks)), scores,
                               rtol=1e-6, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("anchor", ["mean", "indices"])
def test_embedding_linearization_equals_jvp_of_the_loss(anchor):
    scorer = tanh_scorer()
    demos, queries, labels = random_problem(num_labels=3)
    workload = ICLWorkload(scorer, demos, queries, labels, max_length=14)
    masks = mixed_masks(7, seed=1)
    anchors = {}
    for shots in (1, 2, 3):
        anchors[shots] = "mean" if anchor == "mean" else np.arange(shots) + 2
    estimated = np.zeros((len(masks), len(queries)))
    for shots, a in anchors.items():
        rows = np.nonzero(masks.sum(1) == shots)[0]
        estimated[rows] = workload.estimated_scores(masks[rows], anchor=a)

    def loss(embeddings, label):
        logits = scorer.label_logits(scorer.params, embeddings)
        return jax.nn.logsumexp(logits) - logits[label]

    @jax.jit  # compiled once per prompt length
    def first_order(tokens, anchor, label):
        e = scorer.embed(scorer.params, tokens)
        value, slope = jax.jvp(lambda x: loss(x, label), (anchor,), (e - anchor,))
        return value + slope

    for i, row in enumerate(masks):
        shots = int(row.sum())
        e0 = workload.anchor_embeddings(shots, anchors[shots])
        prompt = demos[np.nonzero(row)[0]].reshape(-1)
        for t, (query, label) in enumerate(zip(queries, labels, strict=True)):
            tokens = jnp.asarray(np.concatenate([prompt, query]))
            np.testing.assert_allclose(estimated[i, t],
                                       first_order(tokens, e0[t], label),
                                       rtol=1e-6, atol=1e-6)


def test_output_linearization_at_the_nearest_anchor_equals_jvp_of_the_logits():
    # linearize="output" (GradSel): the cross-entropy of the first-order
    # logits, expanded at the anchor nearest to each prompt.
    scorer = tanh_scorer()
    demos, queries, labels = random_problem(num_labels=3)
    workload = ICLWorkload(scorer, demos, queries, labels, max_length=14)
    anchors = np.array([[0, 1], [2, 5], [3, 6]])
    masks = mixed_masks(7, seed=2)
    masks = masks[masks.sum(1) == 2][:6]
    estimated = np.asarray(workload.estimated_scores(masks, anchor=anchors,
                                                     linearize="output"))
    e0 = np.asarray(workload.anchor_embeddings(2, anchors))  # [T, A, L, W]
    assert e0.shape[:2] == (5, 3)

    @jax.jit
    def first_order(tokens, anchor, label):
        e = scorer.embed(scorer.params, tokens)
        value, slope = jax.jvp(lambda x: scorer.label_logits(scorer.params, x),
                               (anchor,), (e - anchor,))
        logits = value + slope
        return jax.nn.logsumexp(logits) - logits[label]

    for i, row in enumerate(masks):
        prompt = demos[np.nonzero(row)[0]].reshape(-1)
        for t, (query, label) in enumerate(zip(queries, labels, strict=True)):
            tokens = jnp.asarray(np.concatenate([prompt, query]))
            e = np.asarray(scorer.embed(scorer.params, tokens))
            nearest = ((e[None] - e0[t]) ** 2).sum((1, 2)).argmin()
            np.testing.assert_allclose(estimated[i, t],
                                       first_order(tokens, e0[t, nearest], label),
                                       rtol=1e-6, atol=1e-6)
    # Each anchor prompt is its own nearest anchor: estimated = exact there.
    at_anchors = np.zeros((3, 7), np.float32)
    np.put_along_axis(at_anchors, anchors, 1.0, axis=1)
    np.testing.assert_allclose(
        np.asarray(workload.estimated_scores(at_anchors, anchor=anchors,
                                             linearize="output")),
        np.asarray(workload.exact_scores(at_anchors)), rtol=1e-6)


def test_mean_anchor_averages_the_pool_at_every_slot():
    scorer = tanh_scorer()
    demos, queries, labels = random_problem(num_labels=3)
    workload = ICLWorkload(scorer, demos, queries, labels, max_length=14)
    e0 = np.asarray(workload.anchor_embeddings(2, "mean"))
    # The embedding is position-wise: slot j's mean is the pool's mean.
    table, pos = np.asarray(scorer.params["table"]), np.asarray(scorer.params["pos"])
    pool_mean = table[demos].mean(0)  # [demo_len, width]
    expected_demo = np.concatenate([pool_mean, pool_mean]) + 0.1 * pos[:6]
    expected = np.broadcast_to(expected_demo, e0[:, :6].shape)
    np.testing.assert_allclose(e0[:, :6], expected, rtol=1e-5, atol=1e-6)


def test_estimate_is_exact_at_the_anchor_prompt():
    scorer = tanh_scorer()
    demos, queries, labels = random_problem(num_labels=3)
    workload = ICLWorkload(scorer, demos, queries, labels, max_length=14)
    mask = np.zeros((1, 7), np.float32)
    mask[0, [1, 4]] = 1
    np.testing.assert_allclose(
        np.asarray(workload.estimated_scores(mask, anchor=np.array([1, 4]))),
        np.asarray(workload.exact_scores(mask)), rtol=1e-6)
    check = workload.estimation_error(mask, anchor=np.array([1, 4]))
    assert check.relative_error < 1e-6


def test_prompt_performance_equals_forward_passes_on_held_out_queries():
    scorer, model = transformer_scorer()
    demos, queries, labels = random_problem(vocab=CONFIG.vocab_size)
    _, heldout, heldout_labels = random_problem(num_queries=40,
                                                vocab=CONFIG.vocab_size, seed=3)
    workload = ICLWorkload(scorer, demos, queries, labels,
                           max_length=CONFIG.max_length, heldout_queries=heldout,
                           heldout_labels=heldout_labels)
    masks = mixed_masks(7)
    masks = masks[masks.sum(1) == 2][:5]  # one prompt length: one compilation
    assert_performance_matches(workload.prompt_performance(masks), last_logits(model),
                               demos, heldout, heldout_labels, masks)


@pytest.fixture(scope="module")
def tiny():
    return icl_workload("tiny")  # trains for about 15 s: slow tier


@pytest.mark.slow
def test_trained_tiny_model_learns_in_context(tiny):
    accuracy = tiny.in_context_accuracy(jax.random.key(0), num_sequences=2000)
    assert accuracy.shape == (tiny.config.max_demos + 1,)
    assert abs(accuracy[0] - 0.5) < 0.05  # no demonstration: chance
    # 4 shots: the query's symbol is shown with probability 1 - (7/8)^4 = 0.41.
    assert accuracy[4] > accuracy[0] + 0.08
    assert tiny.training_losses[-100:].mean() < tiny.training_losses[:100].mean()


@pytest.mark.slow
def test_tiny_workload_prompts_and_performance(tiny):
    masks = tiny.sample_prompts(jax.random.key(1), 30, shots=4)
    assert masks.shape == (30, tiny.config.pool_size)
    np.testing.assert_array_equal(np.asarray(masks).sum(1), 4)
    assert len(np.unique(np.asarray(masks), axis=0)) == 30
    scores = np.asarray(tiny.exact_scores(masks))
    assert scores.shape == (30, tiny.num_targets) and np.isfinite(scores).all()
    target = tiny.prompt_performance(masks, split="targets")
    np.testing.assert_allclose(target.loss, scores.mean(1), rtol=1e-5)
    # Held-out loss and accuracy of the trained transformer, against its plain
    # forward pass on [4 demonstrations, query] for every held-out query.
    model = ICLTransformer(tiny.config, rngs=nnx.Rngs(0))
    nnx.update(model, tiny.model_params)
    heldout_queries, heldout_labels = tiny.heldout
    some = np.asarray(masks)[:4]
    assert_performance_matches(tiny.prompt_performance(some), last_logits(model),
                               tiny.demonstrations, heldout_queries,
                               heldout_labels, some)
    # The prompts differ in what they teach: their held-out losses differ.
    assert np.ptp(tiny.prompt_performance(masks).loss) > 0.01
    # The names mark the demonstrations shown with a wrong label.
    assert len(tiny.task_names) == tiny.num_tasks
    assert sum(" (wrong)" in n for n in tiny.task_names) == tiny.pool_flipped.sum()


def test_prompt_order_is_the_pool_order():
    scorer, _ = transformer_scorer()
    demos, queries, labels = random_problem(vocab=CONFIG.vocab_size)
    workload = ICLWorkload(scorer, demos, queries, labels, max_length=CONFIG.max_length)
    swapped = demos.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    other = ICLWorkload(scorer, swapped, queries, labels, max_length=CONFIG.max_length)
    mask = np.zeros((1, 7), np.float32)
    mask[0, [0, 1]] = 1
    # Swapping two pool entries swaps their slots in the prompt.
    assert not np.allclose(workload.exact_scores(mask), other.exact_scores(mask))


# -- bad input ---------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    scorer, _ = transformer_scorer()
    demos, queries, labels = random_problem(vocab=CONFIG.vocab_size)
    return ICLWorkload(scorer, demos, queries, labels, max_length=CONFIG.max_length)


def test_shots_larger_than_the_pool(small):
    with pytest.raises(ValueError, match="shots must be <= the pool of 7"):
        small.sample_prompts(jax.random.key(0), 3, shots=8)


def test_empty_prompts(small):
    masks = np.zeros((3, 7), np.float32)
    masks[0, 0] = 1
    with pytest.raises(ValueError, match=r"rows \[1, 2\] select no demonstration"):
        small.exact_scores(masks)
    with pytest.raises(ValueError, match="select no demonstration"):
        small.estimated_scores(masks)


def test_prompts_longer_than_the_context(small):
    # max_length = 14 tokens: 4 demonstrations of 3 tokens and a query of 2.
    assert small.max_demos == 4
    masks = np.zeros((1, 7), np.float32)
    masks[0, :5] = 1
    with pytest.raises(ValueError, match="17 tokens, longer than the model's context "
                                         "max_length=14"):
        small.exact_scores(masks)
    with pytest.raises(ValueError, match="at most 4 demonstrations fit"):
        small.sample_prompts(jax.random.key(0), 2, shots=5)
    scorer, _ = transformer_scorer()
    demos, queries, labels = random_problem(demo_len=13)
    with pytest.raises(ValueError, match="one-demonstration prompt is 15 tokens"):
        ICLWorkload(scorer, demos, queries, labels, max_length=14)


def test_user_scorer_with_the_wrong_shape():
    good = tanh_scorer()
    demos, queries, labels = random_problem()
    per_position = good._replace(
        label_logits=lambda p, e: jnp.tanh(e) @ p["out"])  # [length, labels]
    with pytest.raises(ValueError, match=r"scorer.label_logits must return "
                                         r"\[num_labels\] logits.*\(5, 3\)"):
        ICLWorkload(per_position, demos, queries, labels, max_length=14)
    flat = good._replace(embed=lambda p, tokens: p["table"][tokens].sum(0))
    with pytest.raises(ValueError, match=r"scorer.embed must map tokens \[5\]"):
        ICLWorkload(flat, demos, queries, labels, max_length=14)
    with pytest.raises(TypeError, match="scorer must be a PromptScorer"):
        ICLWorkload(lambda t: t, demos, queries, labels, max_length=14)


def test_user_scorer_with_non_finite_values():
    good = tanh_scorer()
    demos, queries, labels = random_problem()
    nan_scorer = good._replace(
        label_logits=lambda p, e: jnp.where(e[0, 0] > 0, jnp.nan, 1.0)
        * good.label_logits(p, e))
    workload = ICLWorkload(nan_scorer, demos, queries, labels, max_length=14)
    masks = mixed_masks(7)
    with pytest.raises(ValueError, match="non-finite losses"):
        workload.exact_scores(masks)


def test_other_bad_arguments(small):
    scorer, _ = transformer_scorer()
    demos, queries, labels = random_problem(vocab=CONFIG.vocab_size)
    with pytest.raises(ValueError, match=r"query_labels must lie in \[0, 2\)"):
        ICLWorkload(scorer, demos, queries, labels + 5, max_length=CONFIG.max_length)
    with pytest.raises(ValueError, match="query_labels has 4 labels"):
        ICLWorkload(scorer, demos, queries, labels[:4], max_length=CONFIG.max_length)
    with pytest.raises(TypeError, match="demonstrations must hold integer token ids"):
        ICLWorkload(scorer, demos * 1.0, queries, labels, max_length=CONFIG.max_length)
    with pytest.raises(ValueError, match="task_names has 2 names"):
        ICLWorkload(scorer, demos, queries, labels, max_length=CONFIG.max_length,
                    task_names=["a", "b"])
    with pytest.raises(ValueError, match="masks has 6 task columns"):
        small.exact_scores(np.ones((1, 6)))
    with pytest.raises(ValueError, match="anchor must be 'mean' or 2 pool indices"):
        small.anchor_embeddings(2, np.array([0, 9]))
    with pytest.raises(ValueError, match="anchor must be 'mean'"):
        small.estimated_scores(np.eye(7)[:2], anchor="median")
    with pytest.raises(ValueError, match="no held-out queries"):
        small.prompt_performance(np.eye(7)[:2])
    with pytest.raises(ValueError, match="split must be"):
        small.prompt_performance(np.eye(7)[:2], split="test")


def test_bad_config():
    with pytest.raises(ValueError, match="preset must be one of"):
        icl_workload("huge")
    with pytest.raises(TypeError, match="unknown ICLConfig fields"):
        icl_workload("tiny", num_layers=3)
    with pytest.raises(ValueError, match="width must be divisible by heads"):
        icl_workload("tiny", width=30, heads=4)
    with pytest.raises(ValueError, match="pool_label_noise must be in"):
        icl_workload("tiny", pool_label_noise=1.5)
    with pytest.raises(ValueError, match="num_labels must be >= 2"):
        icl_workload("tiny", num_labels=1)
