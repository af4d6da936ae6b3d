"""The multi-objective RL workload: rollouts, training, linearization, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tasksurrogate_jax.estimation import linearized_examples
from tasksurrogate_jax.projection import make_projection, num_parameters, unproject
from tasksurrogate_jax.workloads.rl import (
    CARTPOLE_VARIANTS,
    make_variant_params,
    policy_gradients,
    rl_workload,
)


@pytest.fixture(scope="module")
def tiny():
    return rl_workload("tiny")


def test_rollouts_are_reproducible_from_the_key(tiny):
    params = tiny.init_fn(jax.random.key(0))
    a = tiny.rollout(params, 1, jax.random.key(3))
    b = tiny.rollout(params, 1, jax.random.key(3))
    c = tiny.rollout(params, 1, jax.random.key(4))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.actions, c.actions)
    # Rewards stop with the episode; the alive flag never comes back.
    alive = np.asarray(a.alive)
    assert (np.diff(alive) <= 0).all()
    assert (np.asarray(a.rewards)[alive == 0] == 0).all()
    np.testing.assert_array_equal(tiny.evaluate(params), tiny.evaluate(params))


def test_variant_parameters_reach_the_environment():
    _, params, shaping = make_variant_params(
        "CartPole-v1", ((("gravity", 4.9),), (("length", 0.25), ("masspole", 0.5))))
    np.testing.assert_allclose(params.gravity, [4.9, 9.8])
    np.testing.assert_allclose(params.total_mass, [1.1, 1.5])
    np.testing.assert_allclose(params.polemass_length, [0.05, 0.125])
    np.testing.assert_array_equal(shaping, [[0.0, 0.0], [0.0, 0.0]])


def test_vmapped_subset_training_equals_one_at_a_time(tiny):
    masks = np.array([[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 1, 1]], np.float32)
    together = tiny.train_subsets(masks, chunk_size=None)
    for i, mask in enumerate(masks):
        alone = tiny.train_subsets(mask[None], chunk_size=None)
        jax.tree.map(lambda a, b, i=i: np.testing.assert_allclose(
            a[i], b[0], rtol=2e-4, atol=2e-5), together, alone)
    # Chunks (with padding) change nothing either.
    chunked = tiny.train_subsets(masks, chunk_size=2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
                 together, chunked)


def test_trained_cpu_policy_beats_a_random_policy():
    cpu = rl_workload("cpu")  # θ* trains in about 10 s
    trained = -np.asarray(cpu.evaluate(cpu.base_params()))
    untrained = -np.asarray(cpu.evaluate(cpu.init_fn(jax.random.key(123))))
    assert (trained > 3.0 * untrained).all(), (trained, untrained)
    assert cpu.base_history[-5:].mean() > 3.0 * cpu.base_history[:5].mean()


def test_linearized_logits_match_jvp(tiny):
    params = tiny.base_params()
    traj = tiny.rollout(params, 0, jax.random.key(5))
    obs = traj.obs[:20]
    projection = make_projection(jax.random.key(1), 16,
                                 num_params=num_parameters(params))
    examples = linearized_examples(tiny.apply_fn, params, obs, traj.actions[:20],
                                   projection=projection, output_mode="logits")
    w = 0.1 * jax.random.normal(jax.random.key(2), (16,))
    tangent = unproject(projection, w, params)
    logits, slope = jax.jvp(lambda p: tiny.apply_fn(p, obs), (params,), (tangent,))
    np.testing.assert_allclose(examples.outputs, logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(examples.features @ w, slope, rtol=1e-4, atol=1e-6)
    # The log-probabilities of the actions taken, linearized the same way.
    actions = traj.actions[:20]
    probs = jax.nn.softmax(examples.outputs)
    onehot = jax.nn.one_hot(actions, tiny.num_actions)
    linear_logp = jnp.einsum("nc,nc->n", onehot - probs, examples.features @ w)

    def logp(p):
        out = jax.nn.log_softmax(tiny.apply_fn(p, obs))
        return jnp.take_along_axis(out, actions[:, None], 1)[:, 0]

    _, logp_slope = jax.jvp(logp, (params,), (tangent,))
    np.testing.assert_allclose(linear_logp, logp_slope, rtol=1e-4, atol=1e-6)


def test_policy_gradient_estimate_is_the_gradient_in_the_subspace(tiny):
    examples, task, adv, projection = tiny.linearized_rollouts(proj_dim=8)
    params = tiny.base_params()
    assert examples.features.shape[1:] == (tiny.num_actions, 8)
    assert task.shape == adv.shape == examples.labels.shape
    pick = np.arange(0, examples.labels.shape[0], 97)[:5]
    rows = np.asarray(policy_gradients(examples, adv))[pick]
    # Independent: d/dw of A log π(a | x; θ* + P w) at w = 0, by autodiff
    # through the network; the observation is recovered from the rollout.
    traj = jax.jit(tiny.rollouts, static_argnums=2)(
        params, jax.random.fold_in(jax.random.key(tiny.config.seed), 11),
        tiny.config.episodes)
    alive = np.asarray(traj.alive).reshape(-1) > 0
    obs = np.asarray(traj.obs).reshape(-1, tiny.obs_dim)[alive][pick]
    for row, x, a, advantage in zip(rows, obs, examples.labels[pick], adv[pick],
                                    strict=True):
        def objective(w, x=x, a=a, advantage=advantage):
            moved = jax.tree.map(jnp.add, params, unproject(projection, w, params))
            return advantage * jax.nn.log_softmax(tiny.apply_fn(moved, x))[a]
        expected = jax.grad(objective)(jnp.zeros(8))
        np.testing.assert_allclose(row, expected, rtol=2e-3, atol=1e-5)


def test_scores_have_the_right_shape_and_the_estimate_tracks_them(tiny):
    masks = np.array([[1, 1, 1, 1], [0, 1, 1, 1], [1, 0, 0, 0]], np.float32)
    exact = np.asarray(tiny.exact_scores(masks))
    assert exact.shape == (3, tiny.num_targets) and np.isfinite(exact).all()
    assert (exact <= 0).all()  # minus returns of non-negative rewards
    for method in ("pg", "awr"):
        estimated = np.asarray(tiny.estimated_scores(masks, method=method,
                                                     proj_dim=16))
        assert estimated.shape == exact.shape and np.isfinite(estimated).all()
    scratch = np.asarray(tiny.exact_scores(masks[:1], from_scratch=True))
    assert scratch.shape == (1, tiny.num_targets)


# -- bad input ---------------------------------------------------------------


def test_unknown_environment_and_parameters():
    with pytest.raises(ValueError, match="env must be one of"):
        rl_workload("tiny", env="Pendulum-v1")
    with pytest.raises(ValueError, match="unknown CartPole-v1 parameter 'mass'"):
        rl_workload("tiny", variants=((("mass", 1.0),),))
    with pytest.raises(ValueError, match=r"gravity=-9.8 is outside its valid range"):
        rl_workload("tiny", variants=((("gravity", -9.8),),))
    with pytest.raises(ValueError, match=r"link_mass_1=50.0 is outside"):
        rl_workload("tiny", env="Acrobot-v1", variants=((("link_mass_1", 50.0),),))
    with pytest.raises(TypeError, match=r"variants\[0\] must be a tuple of"):
        rl_workload("tiny", variants=((1, 2, 3),))
    with pytest.raises(ValueError, match="at least one variant"):
        rl_workload("tiny", variants=())
    with pytest.raises(ValueError, match=r"targets must be variant indices in \[0"):
        rl_workload("tiny", targets=(5,))
    with pytest.raises(TypeError, match="unknown RLConfig fields"):
        rl_workload("tiny", gamma=0.9)
    with pytest.raises(ValueError, match="discount must be in"):
        rl_workload("tiny", discount=0.0)


def test_masks_selecting_no_environment(tiny):
    masks = np.array([[1, 0, 0, 0], [0, 0, 0, 0]], np.float32)
    with pytest.raises(ValueError, match=r"rows \[1\] select no environment variant"):
        tiny.exact_scores(masks)
    with pytest.raises(ValueError, match="select no environment variant"):
        tiny.estimated_scores(masks)
    with pytest.raises(ValueError, match="masks has 3 task columns"):
        tiny.exact_scores(np.ones((1, 3)))
    with pytest.raises(ValueError, match="method must be one of"):
        tiny.estimated_scores(masks[:1], method="ppo")


def test_acrobot_family_builds():
    workload = rl_workload("tiny", env="Acrobot-v1", variants=None, horizon=20)
    assert workload.num_tasks == 8 and workload.num_actions == 3
    params = workload.init_fn(jax.random.key(0))
    returns = -np.asarray(workload.evaluate(params))
    assert (returns <= 0).all()  # -1 per step until the goal
    assert workload.task_names[0] == "default"
    assert len(CARTPOLE_VARIANTS) == 10


def test_exact_scores_are_stored_and_resumed(tiny, tmp_path, monkeypatch):
    masks = np.array([[1, 0, 0, 1], [0, 1, 1, 0], [1, 1, 1, 1]], np.float32)
    first = np.asarray(tiny.exact_scores(masks, chunk_size=2, store_dir=tmp_path))
    assert sorted(p.name for p in tmp_path.glob("chunk_*.npz")) == [
        "chunk_00000.npz", "chunk_00001.npz"]
    # Unchunked, without a store: the same scores (padding changes nothing).
    np.testing.assert_allclose(tiny.exact_scores(masks, chunk_size=8), first,
                               rtol=1e-4, atol=1e-3)

    def no_training(*args, **kwargs):
        raise AssertionError("a stored chunk was trained again")

    # A rerun reads every chunk back; an interrupted run resumes from the rest.
    monkeypatch.setattr(tiny, "train_subsets", no_training)
    np.testing.assert_array_equal(
        tiny.exact_scores(masks, chunk_size=2, store_dir=tmp_path), first)
    monkeypatch.undo()
    (tmp_path / "chunk_00001.npz").unlink()
    np.testing.assert_allclose(
        tiny.exact_scores(masks, chunk_size=2, store_dir=tmp_path), first,
        rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="holds results of a different configuration"):
        tiny.exact_scores(masks[:2], chunk_size=2, store_dir=tmp_path)
