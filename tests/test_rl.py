"""The multi-objective RL workload: rollouts, training, linearization, bad input.

Everything that trains or rolls out a policy (θ* of the tiny preset alone
compiles for about 10 s) is in the slow tier (``pytest -m slow``).
"""

import gymnax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tasksurrogate_jax.estimate.features import linearized_examples
from tasksurrogate_jax.estimate.projection import (
    make_projection,
    num_parameters,
    unproject,
)
from tasksurrogate_jax.workloads.rl import (
    ACROBOT_VARIANTS,
    make_variant_params,
    policy_gradients,
    rl_workload,
)


@pytest.fixture(scope="module")
def tiny():
    return rl_workload("tiny")


def replay_episode(workload, params, env_params, key, *, shaping=(0.0, 0.0)):
    """One episode re-simulated step by step in gymnax, independently of the
    workload's scan: the same key protocol (reset and step keys, one action
    key and one environment key per step), the policy sampled at every step,
    CartPole's position shaping ``1 - w |x - x*| / x_threshold`` applied to the
    reward. Returns numpy ``(obs, actions, rewards, alive)``."""
    env = workload.env
    weight, target_x = shaping
    sample = jax.jit(lambda obs, k: jax.random.categorical(
        k, workload.apply_fn(params, obs.astype(jnp.float32))))
    step = jax.jit(env.step_env)
    reset_key, steps_key = jax.random.split(key)
    obs, state = env.reset_env(reset_key, env_params)
    alive, rows = 1.0, []
    for step_key in jax.random.split(steps_key, workload.config.horizon):
        k_act, k_env = jax.random.split(step_key)
        action = int(sample(obs, k_act))
        next_obs, next_state, reward, done, _ = step(k_env, state, action, env_params)
        reward = float(reward)
        if weight:
            reward *= 1.0 - weight * abs(float(state.x) - target_x) / float(
                env_params.x_threshold)
        rows.append((np.asarray(obs, np.float64), action, alive * reward, alive))
        alive *= 1.0 - float(done)
        obs, state = next_obs, next_state
    obs, actions, rewards, alive = zip(*rows, strict=True)
    return np.stack(obs), np.array(actions), np.array(rewards), np.array(alive)


def assert_episode_equals_replay(traj, replayed):
    obs, actions, rewards, alive = replayed
    np.testing.assert_array_equal(np.asarray(traj.alive), alive)
    live = alive > 0
    assert live.sum() >= 10  # enough of an episode to compare
    np.testing.assert_array_equal(np.asarray(traj.actions)[live], actions[live])
    np.testing.assert_allclose(np.asarray(traj.obs)[live], obs[live], rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(traj.rewards), rewards, rtol=1e-6,
                               atol=1e-6)


@pytest.mark.slow
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
    # Variant 3 (gravity 19.6, reward centred on x* = 0.5) re-simulated in
    # gymnax with its parameters set here: same states, actions and rewards.
    _, default = gymnax.make("CartPole-v1")
    variant = default.replace(gravity=19.6)
    key = jax.random.key(8)
    assert_episode_equals_replay(
        tiny.rollout(params, 3, key),
        replay_episode(tiny, params, variant, key, shaping=(1.0, 0.5)))


def test_variant_parameters_reach_the_environment():
    _, params, shaping = make_variant_params(
        "CartPole-v1", ((("gravity", 4.9),), (("length", 0.25), ("masspole", 0.5))))
    np.testing.assert_allclose(params.gravity, [4.9, 9.8])
    np.testing.assert_allclose(params.total_mass, [1.1, 1.5])
    np.testing.assert_allclose(params.polemass_length, [0.05, 0.125])
    np.testing.assert_array_equal(shaping, [[0.0, 0.0], [0.0, 0.0]])


@pytest.mark.slow
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


@pytest.mark.slow
def test_trained_cpu_policy_beats_a_random_policy():
    cpu = rl_workload("cpu")  # θ* trains in about 10 s
    trained = -np.asarray(cpu.evaluate(cpu.base_params()))
    untrained = -np.asarray(cpu.evaluate(cpu.init_fn(jax.random.key(123))))
    assert (trained > 3.0 * untrained).all(), (trained, untrained)
    assert cpu.base_history[-5:].mean() > 3.0 * cpu.base_history[:5].mean()


@pytest.mark.slow
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


@pytest.mark.slow
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


def _tree_norm(tree):
    return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2)
                             for x in jax.tree.leaves(tree))))


# Two programs (vmapped over subsets, and one run alone) that sample actions
# for 60 iterations: float32 rounding flips samples and drifts the returns by
# about 2%, float64 keeps them within 1e-4.
@pytest.mark.float64
@pytest.mark.slow
def test_exact_scores_are_the_returns_of_each_subsets_own_training(tiny):
    masks = np.array([[1, 1, 1, 1], [0, 1, 1, 1], [1, 0, 0, 0]], np.float32)
    exact = np.asarray(tiny.exact_scores(masks))
    scratch = np.asarray(tiny.exact_scores(masks[2:], from_scratch=True))
    assert exact.shape == (3, tiny.num_targets)
    # Independent: each subset trained alone (one REINFORCE run on its variants,
    # the documented keys), then minus its mean return on each target.
    c, key = tiny.config, jax.random.key(tiny.config.seed)
    finetune = jax.jit(lambda p, m: tiny.train(
        p, m, jax.random.fold_in(key, 5), iterations=c.finetune_iterations,
        learning_rate=c.finetune_learning_rate)[0])
    for mask, row in zip(masks, exact, strict=True):
        tuned = finetune(tiny.base_params(), jnp.asarray(mask))
        # float32 returns, summed over episodes
        np.testing.assert_allclose(row, tiny.evaluate(tuned), rtol=1e-4, atol=1e-3)
    fresh = tiny.train(tiny.init_fn(jax.random.fold_in(key, 3)),
                       jnp.asarray(masks[2]), jax.random.fold_in(key, 5),
                       iterations=c.iterations, learning_rate=c.learning_rate)[0]
    np.testing.assert_allclose(scratch[0], tiny.evaluate(fresh), rtol=1e-4,
                               atol=1e-3)
    # Fine-tuning θ* on different variants ends at different policies.
    assert np.abs(exact[0] - exact[2]).max() > 0.5


@pytest.mark.slow
def test_estimated_scores_equal_a_numpy_policy_gradient_step(tiny):
    masks = np.array([[1, 1, 1, 1], [0, 1, 1, 1], [1, 0, 0, 0]], np.float32)
    estimated = np.asarray(tiny.estimated_scores(masks, method="pg", proj_dim=16))
    # Independent, in float64 numpy: each alive step's projected policy
    # gradient A_n Φ_nᵀ(e_{a_n} - softmax(z_n)), averaged over the steps of the
    # subset's variants and divided by the ridge.
    examples, task, adv, projection = tiny.linearized_rollouts(proj_dim=16)
    logits = np.asarray(examples.outputs, np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    onehot = np.eye(tiny.num_actions)[np.asarray(examples.labels)]
    grads = np.einsum("nc,ncd->nd", onehot - probs,
                      np.asarray(examples.features, np.float64))
    grads *= np.asarray(adv, np.float64)[:, None]
    theta = tiny.base_params()
    theta64 = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), theta)
    # The calibrated ridge: the full set's step P ŵ is as long as one real
    # fine-tuning of θ* on all variants.
    c, key = tiny.config, jax.random.key(tiny.config.seed)
    tuned = tiny.train(theta, jnp.ones(tiny.num_tasks), jax.random.fold_in(key, 5),
                       iterations=c.finetune_iterations,
                       learning_rate=c.finetune_learning_rate)[0]
    moved = _tree_norm(jax.tree.map(lambda a, b: np.asarray(a, np.float64) - b,
                                    tuned, theta64))
    ridge = _tree_norm(unproject(projection, grads.mean(0), theta64)) / moved
    np.testing.assert_allclose(tiny.calibrated_ridge(proj_dim=16), ridge, rtol=1e-4)
    steps = []
    for mask, row in zip(masks, estimated, strict=True):
        w = grads[mask[task] > 0].mean(0) / ridge
        step = unproject(projection, w, theta64)
        steps.append(_tree_norm(step))
        policy = jax.tree.map(lambda a, d: (a + np.asarray(d)).astype(np.float32),
                              theta64, step)
        # Minus the mean return of the moved policy on each target.
        np.testing.assert_allclose(row, tiny.evaluate(policy), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(steps[0], moved, rtol=1e-6)
    assert np.abs(estimated[0] - estimated[2]).max() > 0.5  # the masks matter
    awr = np.asarray(tiny.estimated_scores(masks, method="awr", proj_dim=16))
    assert awr.shape == estimated.shape and np.isfinite(awr).all()


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


@pytest.mark.slow
def test_acrobot_variants_reach_the_environment_and_replay_in_gymnax():
    workload = rl_workload("tiny", env="Acrobot-v1", variants=None, horizon=20)
    assert workload.num_tasks == len(ACROBOT_VARIANTS) and workload.num_actions == 3
    _, default = gymnax.make("Acrobot-v1")
    params = workload.init_fn(jax.random.key(0))
    # Variants 1 (a shorter first link), 6 (torque noise: the environment key
    # matters) and 7 (a larger time step), each re-simulated in gymnax with
    # its parameter set here.
    for index, change in ((1, {"link_length_1": 0.7}),
                          (6, {"torque_noise_max": 0.2}), (7, {"dt": 0.1})):
        key = jax.random.key(index)
        traj = workload.rollout(params, index, key)
        replayed = replay_episode(workload, params, default.replace(**change), key)
        assert_episode_equals_replay(traj, replayed)
        # -1 per step until the goal height: out of reach of 20 steps of a
        # random policy, so the return is exactly -20.
        np.testing.assert_array_equal(np.asarray(traj.rewards), -1.0)
    evaluated = np.asarray(workload.evaluate(params))
    np.testing.assert_array_equal(evaluated, 20.0)  # minus the mean return
    assert workload.task_names[0] == "default"


@pytest.mark.slow
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
