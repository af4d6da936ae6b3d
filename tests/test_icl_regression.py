"""The in-context linear-regression workload and the vector-prompt, regression
side of ICLWorkload: the data generator, exact scores, the embedding
linearization (loss and output, one or several anchors), the trained tiny
model, and bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tasksurrogate_jax.core.metrics import mean_spearman
from tasksurrogate_jax.workloads.icl import (
    ICLWorkload,
    NearestAnchors,
    PromptScorer,
)
from tasksurrogate_jax.workloads.icl_regression import (
    PRESETS,
    ICLRegressionConfig,
    RegressionTransformer,
    bayes_predictions,
    encode_pairs,
    encode_queries,
    icl_regression_workload,
    probe_inputs,
    regression_world,
    sample_sequences,
)

TINY = PRESETS["tiny"]


def untrained(config=TINY, seed=0):
    """An untrained RegressionTransformer, its PromptScorer and the world."""
    model = RegressionTransformer(config, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)

    def embed(p, inputs):
        return nnx.merge(graphdef, p).embed_inputs(inputs)

    def prediction(p, embeddings):
        return nnx.merge(graphdef, p).predictions_from_embeddings(embeddings)[-1]

    return model, PromptScorer(params, embed, prediction=prediction)


@pytest.fixture(scope="module")
def small():
    """A regression ICLWorkload of an untrained model on the tiny world."""
    model, scorer = untrained()
    world = regression_world(TINY)
    workload = ICLWorkload(scorer, world["pool"], world["queries"],
                           world["query_labels"], max_length=TINY.max_length,
                           heldout_queries=world["heldout"][:16],
                           heldout_labels=world["heldout_labels"][:16])
    return workload, model, world


def masks_of(rows, num_tasks):
    masks = np.zeros((len(rows), num_tasks), np.float32)
    for i, row in enumerate(rows):
        masks[i, list(row)] = 1
    return masks


def random_masks(num, shots, num_tasks=TINY.pool_size, seed=0):
    rng = np.random.default_rng(seed)
    return masks_of([rng.choice(num_tasks, shots, replace=False)
                     for _ in range(num)], num_tasks)


# -- the data generator --------------------------------------------------------


@pytest.mark.parametrize("design", ["probe", "random"])
def test_world_plants_the_weaknesses_where_they_should_be(design):
    c = dataclasses.replace(TINY, design=design, pool_size=30, num_noisy=4,
                            num_outliers=3, num_duplicates=4)
    world = regression_world(c)
    w, x, y = world["w_star"], world["pool_x"], world["pool_y"]
    d, length = c.input_dim, c.demo_length
    assert x.shape == (30, length, d) and y.shape == (30, length)
    np.testing.assert_allclose(np.linalg.norm(w), 1.0, rtol=1e-6)
    noisy, outlier, dup = (world["pool_noisy"], world["pool_outlier"],
                           world["pool_duplicate_of"])
    assert (noisy.sum(), outlier.sum(), (dup >= 0).sum()) == (4, 3, 4)
    assert not (noisy & outlier).any() and not ((dup >= 0) & (noisy | outlier)).any()
    residual = y - np.einsum("kld,d->kl", x, w)
    clean = ~noisy
    # Clean labels carry only the pool noise (0.3): within 5 sigma.
    assert np.abs(residual[clean]).max() < 5 * c.pool_noise
    if design == "probe":
        # Every demonstration probes sqrt(D) e_j; an outlier scaled by 3.
        scale = np.where(outlier, c.outlier_scale, 1.0)[:, None, None]
        np.testing.assert_allclose(x, scale * probe_inputs(d)[None], rtol=1e-6)
        # A noisy demonstration shows a task off by noisy_shift.
        shown = y[noisy] / np.sqrt(d)
        off = np.linalg.norm(shown - w, axis=1)
        assert np.all(np.abs(off - c.noisy_shift) < 4 * c.pool_noise)
    else:
        assert np.all(np.abs(np.abs(residual[noisy]) - c.noisy_shift)
                      < 5 * c.pool_noise)
        norms = np.linalg.norm(x[:, 0], axis=1)
        assert norms[outlier].mean() > 2 * norms[~outlier].mean()
    # Near-duplicates copy a clean demonstration, jittered by 0.02.
    for j in np.nonzero(dup >= 0)[0]:
        i = dup[j]
        assert dup[i] < 0 and not noisy[i] and not outlier[i]
        assert np.abs(x[j] - x[i]).max() < 6 * c.duplicate_jitter
        assert np.abs(y[j] - y[i]).max() < 6 * c.duplicate_jitter * (
            1 if design == "probe" else np.abs(w).sum())
        assert world["names"][j].endswith(f"dup-of-d{i:02d}")
    assert sum(n.endswith("noisy") for n in world["names"]) == 4
    # The encoded pool: [x, y, 1] per pair; queries [x, 0, 0].
    np.testing.assert_array_equal(world["pool"][..., :d], x)
    np.testing.assert_array_equal(world["pool"][..., d], y)
    np.testing.assert_array_equal(world["pool"][..., d + 1], 1.0)
    assert world["queries"].shape == (c.num_targets, 1, d + 2)
    np.testing.assert_array_equal(world["queries"][:, 0, d:], 0.0)
    q_residual = world["query_labels"] - world["query_x"] @ w
    assert np.abs(q_residual).max() < 5 * c.pool_noise
    # Deterministic by world_seed.
    again = regression_world(c)
    np.testing.assert_array_equal(again["pool"], world["pool"])
    other = regression_world(dataclasses.replace(c, world_seed=2))
    assert not np.allclose(other["w_star"], w)


def test_training_sequences_and_the_bayes_predictor():
    c = dataclasses.replace(TINY, design="random", max_demos=5)
    sample = jax.jit(sample_sequences, static_argnums=(1, 2))
    batch = sample(jax.random.key(0), c, 3)
    assert batch["demonstrations"].shape == (3, 5, c.input_dim + 2)
    assert batch["queries"].shape == (3, 6, c.input_dim + 2)
    np.testing.assert_array_equal(batch["demonstrations"],
                                  encode_pairs(batch["pair_x"], batch["pair_y"]))
    np.testing.assert_array_equal(batch["queries"], encode_queries(batch["query_x"]))
    # The Bayes predictor is ridge with lambda = sigma^2 D.
    xs, ys, xq = (np.asarray(batch[k][0], np.float64)
                  for k in ("pair_x", "pair_y", "query_x"))
    lam = c.train_noise**2 * c.input_dim
    w = np.linalg.solve(xs.T @ xs + lam * np.eye(c.input_dim), xs.T @ ys)
    np.testing.assert_allclose(
        bayes_predictions(batch["pair_x"][0], batch["pair_y"][0],
                          batch["query_x"][0, 5], noise=c.train_noise),
        xq[5] @ w, rtol=1e-4)
    probe = sample(jax.random.key(0), TINY, 2)
    # float32 probe inputs against NumPy's float64 ones (sqrt(2): 1 ulp of
    # float32, 1.7e-8 relative).
    np.testing.assert_allclose(
        probe["pair_x"][0], np.tile(probe_inputs(TINY.input_dim), (TINY.max_demos, 1)),
        rtol=1e-7)


def test_query_mask_equals_forward_passes_of_each_prompt():
    # Query r of a training sequence sees the first r demonstrations: the
    # causal forward pass of the prompt [those pairs, query r].
    model, _ = untrained()
    batch = sample_sequences(jax.random.key(1), TINY, 2)
    length = TINY.demo_length
    at_once = np.asarray(jax.jit(lambda d, q: model.query_predictions(d, q, length))(
        batch["demonstrations"], batch["queries"]))
    forward = jax.jit(lambda inputs: model(inputs)[:, -1])
    for r in (0, 2, TINY.max_demos):
        prompt = jnp.concatenate([batch["demonstrations"][:, : r * length],
                                  batch["queries"][:, r:r + 1]], 1)
        np.testing.assert_allclose(at_once[:, r], np.asarray(forward(prompt)),
                                   rtol=1e-5, atol=1e-6)


# -- exact scores and the linearization ----------------------------------------


def test_exact_scores_equal_a_loop_of_single_forward_passes(small):
    workload, model, world = small
    masks = np.concatenate([random_masks(5, 2, seed=1), random_masks(4, 3, seed=2)])
    scores = np.asarray(workload.exact_scores(masks))
    forward = jax.jit(lambda inputs: model(inputs)[-1])
    for i, row in enumerate(masks):
        demos = world["pool"][np.nonzero(row)[0]].reshape(-1, TINY.vector_dim)
        for t in range(workload.num_targets):
            inputs = np.concatenate([demos, world["queries"][t]])
            expected = (forward(inputs) - world["query_labels"][t]) ** 2
            np.testing.assert_allclose(scores[i, t], expected, rtol=1e-5, atol=1e-7)
    performance = workload.prompt_performance(masks[:3])
    assert performance.accuracy is None  # a regression head has no accuracy
    assert performance.loss.shape == (3,)


def _first_order_reference(workload, linearize):
    """``(embeddings [T, L, W], anchors [T, L, W]) -> [T]``: the first-order
    estimate of every query by jax.jvp at the given anchors (jitted)."""
    s = workload.scorer
    labels = jnp.asarray(workload.query_labels)

    def one(e, e0, label):
        if linearize == "loss":
            value, slope = jax.jvp(
                lambda x: (s.prediction(s.params, x) - label) ** 2, (e0,), (e - e0,))
            return value + slope
        value, slope = jax.jvp(lambda x: s.prediction(s.params, x), (e0,), (e - e0,))
        return (value + slope - label) ** 2

    return jax.jit(lambda e, e0: jax.vmap(one)(e, e0, labels))


@pytest.mark.parametrize("anchor", ["mean", "one", "several"])
def test_linearization_equals_jvp_at_the_anchor(small, anchor):
    workload, _, _ = small
    s = workload.scorer
    shots = 3
    masks = random_masks(5, shots, seed=3)
    a = {"mean": "mean", "one": np.array([4, 0, 9]),
         "several": NearestAnchors(5, seed=1)}[anchor]
    e0 = np.asarray(workload.anchor_embeddings(shots, a), np.float64)
    assert e0.ndim == (4 if anchor == "several" else 3)
    e0 = e0 if e0.ndim == 4 else e0[:, None]  # [T, A, L, W]
    embed = jax.jit(jax.vmap(lambda idx, q: s.embed(
        s.params, workload._prompt(jnp.asarray(workload.demonstrations), idx, q)),
        in_axes=(None, 0)))
    for linearize in ("loss", "output"):
        estimated = np.asarray(workload.estimated_scores(masks, anchor=a,
                                                         linearize=linearize))
        reference = _first_order_reference(workload, linearize)
        for i, row in enumerate(masks):
            e = embed(jnp.asarray(np.nonzero(row)[0]), jnp.asarray(workload.queries))
            # The nearest anchor of each query, by float64 distances.
            nearest = ((np.asarray(e, np.float64)[:, None] - e0) ** 2).sum(
                (2, 3)).argmin(1)
            chosen = e0[np.arange(len(nearest)), nearest].astype(np.float32)
            np.testing.assert_allclose(estimated[i], reference(e, chosen),
                                       rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("linearize", ["loss", "output"])
def test_estimate_is_exact_at_the_anchor_prompts(small, linearize):
    workload, _, _ = small
    anchors = np.array([[1, 5, 7], [0, 2, 19], [3, 4, 11]])
    masks = masks_of(anchors, workload.num_tasks)
    exact = np.asarray(workload.exact_scores(masks))
    # Several anchors: each anchor prompt is its own nearest anchor.
    np.testing.assert_allclose(
        workload.estimated_scores(masks, anchor=anchors, linearize=linearize),
        exact, rtol=1e-5, atol=1e-7)
    one = workload.estimation_error(masks[:1], anchor=anchors[0],
                                    linearize=linearize)
    assert one.relative_error < 1e-5
    # The linearization's values at the anchor are the forward pass's.
    _, values, slopes = workload.linearization(3, anchors[0], linearize=linearize)
    e0 = workload.anchor_embeddings(3, anchors[0])
    assert slopes.shape == e0.shape
    if linearize == "loss":
        np.testing.assert_allclose(values, exact[0], rtol=1e-5, atol=1e-7)
    else:
        np.testing.assert_allclose((values - workload.query_labels) ** 2, exact[0],
                                   rtol=1e-5, atol=1e-7)


def test_nearest_anchors_are_drawn_once_per_seed(small):
    workload, _, _ = small
    groups, single = workload.anchor_prompts(3, NearestAnchors(6, seed=2))
    assert not single and groups.shape == (6, 1, 3)
    assert len({tuple(g) for g in groups[:, 0]}) == 6  # distinct
    assert (np.diff(groups[:, 0], axis=1) > 0).all()  # pool order
    again, _ = workload.anchor_prompts(3, NearestAnchors(6, seed=2))
    np.testing.assert_array_equal(groups, again)
    mean, single = workload.anchor_prompts(3, "mean")
    assert single and mean.shape == (1, TINY.pool_size, 3)


# -- the trained tiny workload (slow tier) --------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return icl_regression_workload("tiny")  # about 6 s of training


@pytest.mark.slow
def test_trained_tiny_model_learns_in_context(tiny):
    c = tiny.config
    loss = tiny.in_context_loss(jax.random.key(0), num_sequences=1000)
    assert loss["model"].shape == (c.max_demos + 1,)
    # Measured: 1.07 with no demonstration, 0.016 after 4 (Bayes: 1.07,
    # 0.0115), on fresh tasks.
    assert loss["model"][4] < 0.05 * loss["model"][0]
    assert loss["model"][4] < 2.5 * loss["bayes"][4]
    assert tiny.training_losses[-50:].mean() < 0.5 * tiny.training_losses[:50].mean()
    # On the fixed task's held-out queries: 0 shots (the query alone) against
    # random 4-shot prompts (measured 0.88 against 0.17).
    queries, labels = tiny.heldout
    zero_shot = np.mean((np.asarray(tiny.model()(jnp.asarray(queries)))[:, -1]
                         - labels) ** 2)
    masks = tiny.sample_prompts(jax.random.key(1), 40, shots=4)
    four_shot = tiny.prompt_performance(masks).loss
    assert four_shot.mean() < 0.4 * zero_shot


@pytest.mark.slow
def test_tiny_linearization_error_is_small(tiny):
    masks = np.asarray(tiny.sample_prompts(jax.random.key(2), 120, shots=4))
    exact = np.asarray(tiny.exact_scores(masks))
    # The default estimate: the output linearized at the nearest of 32 anchors.
    assert tiny.anchor == NearestAnchors(32, seed=tiny.config.world_seed)
    assert tiny.linearize == "output"
    estimated = np.asarray(tiny.estimated_scores(masks))
    relative = np.abs(estimated - exact) / exact
    # Measured (float64 tests): median 0.12, 0.06 on the mean over targets,
    # Spearman 0.95; the pool's mean embedding as anchor: 0.44, 0.38, 0.67;
    # the loss linearized: 0.32, 0.25, 0.74.
    assert np.median(relative) < 0.2
    mean_target = np.abs(estimated.mean(1) - exact.mean(1)) / exact.mean(1)
    assert mean_target.mean() < 0.12
    assert float(mean_spearman(exact, estimated)) > 0.9
    mean_anchor = np.asarray(tiny.estimated_scores(masks, anchor="mean"))
    assert np.median(np.abs(mean_anchor - exact) / exact) > np.median(relative)


@pytest.mark.slow
def test_tiny_planted_weaknesses_hurt(tiny):
    # A noisy or outlying demonstration in place of a clean one, in the same
    # clean contexts (paired), raises the target loss. Measured: noisy 0.068
    # against 0.041, outlier 0.096 against 0.038 (held-out queries: 0.147
    # against 0.132, 0.183 against 0.128).
    rng = np.random.default_rng(0)
    clean = np.nonzero(~tiny.pool_noisy & ~tiny.pool_outlier
                       & (tiny.pool_duplicate_of < 0))[0]
    for kind in (tiny.pool_noisy, tiny.pool_outlier):
        weak, fine = [], []
        for i in np.nonzero(kind)[0]:
            for _ in range(10):
                pick = rng.choice(clean, 4, replace=False)
                weak.append([i, *pick[:3]])
                fine.append(pick)
        weak = masks_of(weak, tiny.num_tasks)
        fine = masks_of(fine, tiny.num_tasks)
        assert (np.asarray(tiny.exact_scores(weak)).mean()
                > 1.3 * np.asarray(tiny.exact_scores(fine)).mean())
        assert tiny.prompt_performance(weak).loss.mean() > \
            tiny.prompt_performance(fine).loss.mean()


# -- bad input -----------------------------------------------------------------


def test_scorer_heads_and_prompt_kinds(small):
    workload, _, world = small
    s = workload.scorer
    args = (world["pool"], world["queries"], world["query_labels"])
    with pytest.raises(ValueError, match="exactly one head.*got neither"):
        ICLWorkload(s._replace(prediction=None), *args, max_length=13)
    with pytest.raises(ValueError, match="exactly one head.*got both"):
        ICLWorkload(s._replace(label_logits=lambda p, e: e[-1, :2]), *args,
                    max_length=13)
    with pytest.raises(ValueError, match=r"scorer.prediction must return one real"):
        ICLWorkload(s._replace(prediction=lambda p, e: e[-1]), *args, max_length=13)
    with pytest.raises(ValueError, match=r"scorer.embed must map input vectors "
                                         r"\[3, 4\]"):
        ICLWorkload(s._replace(embed=lambda p, v: v.sum(0)), *args, max_length=13)
    with pytest.raises(ValueError, match="queries must be of the demonstrations' "
                                         "kind"):
        ICLWorkload(s, world["pool"], world["queries"][..., :3],
                    world["query_labels"], max_length=13)
    with pytest.raises(ValueError, match="queries must be of the demonstrations' "
                                         "kind"):
        ICLWorkload(s, world["pool"], np.zeros((8, 1), np.int32),
                    world["query_labels"], max_length=13)
    with pytest.raises(TypeError, match="demonstrations must hold integer token ids "
                                        r"\[num, length\] or real input vectors"):
        ICLWorkload(s, world["pool"][..., 0], *args[1:], max_length=13)
    bad = world["pool"].copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="demonstrations must be finite"):
        ICLWorkload(s, bad, *args[1:], max_length=13)
    with pytest.raises(ValueError, match="query_labels must be finite"):
        ICLWorkload(s, *args[:2], np.full(8, np.inf), max_length=13)
    with pytest.raises(ValueError, match="one-demonstration prompt is 3 input "
                                         "vectors, longer than the model's context"):
        ICLWorkload(s, *args, max_length=2)
    # 6 demonstrations of 2 pairs and the query: 13 input vectors.
    assert workload.max_demos == 6
    with pytest.raises(ValueError, match="7 demonstrations is 15 input vectors"):
        workload.exact_scores(random_masks(1, 7))


def test_bad_anchors_and_linearize(small):
    workload, _, _ = small
    masks = random_masks(2, 3)
    with pytest.raises(ValueError, match="linearize must be 'loss' or 'output'"):
        workload.estimated_scores(masks, linearize="logits")
    with pytest.raises(ValueError, match=r"anchor must be 'mean' or 3 pool indices"):
        workload.estimated_scores(masks, anchor=np.array([[0, 1], [2, 3]]))
    with pytest.raises(ValueError, match="anchor must be 'mean' or 3 pool indices"):
        workload.estimated_scores(masks, anchor=np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="NearestAnchors.num_anchors must be >= 1"):
        workload.estimated_scores(masks, anchor=NearestAnchors(0))
    with pytest.raises(ValueError, match="the default anchor must be 'mean' or a "
                                         "NearestAnchors"):
        ICLWorkload(workload.scorer, workload.demonstrations, workload.queries,
                    workload.query_labels, max_length=13, anchor=np.arange(3))
    with pytest.raises(ValueError, match="linearize must be"):
        ICLWorkload(workload.scorer, workload.demonstrations, workload.queries,
                    workload.query_labels, max_length=13, linearize="both")


def test_bad_config():
    with pytest.raises(ValueError, match="preset must be one of"):
        icl_regression_workload("huge")
    with pytest.raises(TypeError, match="unknown ICLRegressionConfig fields"):
        icl_regression_workload("tiny", num_layers=3)
    with pytest.raises(ValueError, match="design must be one of"):
        icl_regression_workload("tiny", design="grid")
    with pytest.raises(ValueError, match="width must be divisible by heads"):
        icl_regression_workload("tiny", width=30, heads=4)
    with pytest.raises(ValueError, match="must be <= pool_size - num_duplicates"):
        icl_regression_workload("tiny", num_noisy=13)
    with pytest.raises(ValueError, match="pool_noise must be finite and >= 0"):
        icl_regression_workload("tiny", pool_noise=-1.0)
    with pytest.raises(ValueError, match="outlier_scale must be > 0"):
        icl_regression_workload("tiny", outlier_scale=0.0)
    with pytest.raises(ValueError, match="linearize must be 'loss' or 'output'"):
        icl_regression_workload("tiny", linearize="jvp")
    with pytest.raises(TypeError, match="config must be an ICLRegressionConfig"):
        from tasksurrogate_jax.workloads.icl_regression import ICLRegressionWorkload
        ICLRegressionWorkload({"input_dim": 2})
    assert ICLRegressionConfig().max_length == 8 * 4 + 1
