"""Multi-objective reinforcement learning: environment variants as tasks.

The paper's third setting (docs/method.md). One policy is trained
on K variants of a gymnax environment at once (physical parameters and, for
CartPole, the reward objective vary); which of them help a target variant, and
which subset to train on?

- Tasks: the K variants (:data:`CARTPOLE_VARIANTS` by default).
- ``θ*``: an MLP policy (Flax NNX) trained with REINFORCE and a per-step batch
  baseline on all variants, each variant's loss weighted by the mask.
- ``F(s)`` for target variant t: minus the mean return of the policy after
  fine-tuning ``θ*`` on the variants in s (``from_scratch=True`` trains from a
  fresh initialisation instead), over a fixed set of evaluation episodes drawn
  from a key (the same episodes for every subset). Lower is better, like a
  loss.
- ``exact_scores``: the fine-tuning of every subset, vmapped over subsets,
  variants and episodes in one compiled program per chunk of subsets;
  ``replicate_scores`` repeats it with other training keys (paired replicates
  from the same ``θ*``, ``[R, m, T]``: the ground truth's noise, for its
  ceiling).
- ``estimated_scores``: a first-order estimate from ``θ*``'s linearized
  policy, with no training: :class:`RLWorkload` inherits it from
  :mod:`tasksurrogate_jax.workloads.rl_estimation`.

The environment variants, the policy and its trajectories are in
:mod:`tasksurrogate_jax.workloads.rl_env`. gymnax is an optional dependency of
this workload: ``pip install "tasksurrogate-jax[rl]"``.

Presets (:data:`PRESETS`): ``"cpu"`` (a few minutes on 2 cores), ``"paper"``
(longer horizons and training, for GPU/TPU), ``"tiny"`` (tests).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tasksurrogate_jax._checks import as_typed_key, check_positive_int
from tasksurrogate_jax.truth.chunking import map_chunks, map_padded_chunks, open_store
from tasksurrogate_jax.truth.fingerprint import array_digest, program_digest
from tasksurrogate_jax.truth.retraining import replicate_key
from tasksurrogate_jax.workloads.base import LeaveOneOutWorkload, config_from_preset
from tasksurrogate_jax.workloads.rl_env import (
    ACROBOT_VARIANTS,
    CARTPOLE_VARIANTS,
    ENVIRONMENTS,
    PARAMETER_RANGES,
    Policy,
    Trajectories,
    _key_bytes,
    _params_digest,
    make_variant_params,
    variant_name,
)
from tasksurrogate_jax.workloads.rl_estimation import (
    ESTIMATORS as ESTIMATORS,  # re-exported
)
from tasksurrogate_jax.workloads.rl_estimation import (
    LinearizedPolicyEstimate,
    RLEstimation,
)
from tasksurrogate_jax.workloads.rl_estimation import (
    policy_gradients as policy_gradients,  # re-exported
)
from tasksurrogate_jax.workloads.supervised import check_regime


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Configuration of the multi-objective RL workload.

    Attributes:
      env: gymnax environment, one of :data:`ENVIRONMENTS`.
      variants: one tuple of ``(parameter, value)`` pairs per task (the
        environment's defaults for the rest); ``None`` = the environment's
        default set (:data:`CARTPOLE_VARIANTS`, :data:`ACROBOT_VARIANTS`).
      targets: indices of the target variants (``None`` = all).
      horizon: steps per episode (episodes end earlier on termination).
      hidden: policy MLP width (two hidden layers, tanh).
      episodes: episodes per variant per training iteration.
      discount: discount of the returns-to-go in the policy gradient.
      learning_rate, iterations: Adam for ``θ*``.
      finetune_learning_rate, finetune_iterations: Adam for fine-tuning.
      eval_episodes: evaluation episodes per target variant.
      seed: policy initialisation, training episodes and evaluation episodes.
    """

    env: str = "CartPole-v1"
    variants: tuple | None = None
    targets: tuple | None = None
    horizon: int = 200
    hidden: int = 32
    episodes: int = 8
    discount: float = 0.99
    learning_rate: float = 1e-2
    iterations: int = 150
    finetune_learning_rate: float = 3e-3
    finetune_iterations: int = 30
    eval_episodes: int = 32
    seed: int = 0


PRESETS: dict[str, RLConfig] = {
    "cpu": RLConfig(),
    "paper": RLConfig(horizon=500, hidden=64, episodes=32, iterations=500,
                      finetune_iterations=100, eval_episodes=128),
    "tiny": RLConfig(variants=CARTPOLE_VARIANTS[:4], horizon=100, hidden=16,
                     episodes=8, iterations=60, finetune_iterations=10,
                     eval_episodes=16),
}
# The pipeline's defaults of a preset where they differ from the class's: the
# 4 variants of "tiny" have only 10 subsets that are neither empty, full nor
# leave-one-out.
PRESET_PIPELINE_DEFAULTS = {"tiny": {"num_subsets": 7, "num_heldout": 3}}


class RLWorkload(LinearizedPolicyEstimate, LeaveOneOutWorkload):
    """Environment variants as tasks (see the module docstring).

    Args:
      config: an :class:`RLConfig` (see :data:`PRESETS`).
      estimation: the :class:`RLEstimation` of :meth:`estimated_scores`.
    """

    name: ClassVar[str] = "rl"
    presets: ClassVar[dict[str, RLConfig]] = PRESETS
    # Subsets uniform over those neither empty, full nor leave-one-out.
    pipeline_defaults: dict[str, Any] = {
        "regime": "finetune", "num_subsets": 60, "num_heldout": 20,
        "design": "uniform"}
    estimation: RLEstimation = RLEstimation()

    def __init__(self, config: RLConfig, *,
                 estimation: RLEstimation = RLEstimation()):  # noqa: B008 (frozen)
        if not isinstance(config, RLConfig):
            raise TypeError(f"config must be an RLConfig, got {type(config).__name__}.")
        if not isinstance(estimation, RLEstimation):
            raise TypeError("estimation must be an RLEstimation, got "
                            f"{type(estimation).__name__}.")
        self.estimation = estimation
        c = config
        for field in ("horizon", "hidden", "episodes", "iterations",
                      "finetune_iterations", "eval_episodes"):
            check_positive_int(getattr(c, field), field)
        if not 0.0 < c.discount <= 1.0:
            raise ValueError(f"discount must be in (0, 1], got {c.discount}.")
        if c.env not in PARAMETER_RANGES:
            raise ValueError(f"env must be one of {ENVIRONMENTS}, got {c.env!r}.")
        variants = c.variants
        if variants is None:
            variants = CARTPOLE_VARIANTS if c.env == "CartPole-v1" else ACROBOT_VARIANTS
        self.variants = tuple(tuple(v) for v in variants)
        self.env, self.env_params, self.shaping = make_variant_params(
            c.env, self.variants)
        k = len(self.variants)
        targets = tuple(range(k)) if c.targets is None else tuple(c.targets)
        bad = [t for t in targets if not (isinstance(t, (int, np.integer))
                                          and 0 <= t < k)]
        if bad or not targets:
            raise ValueError(
                f"targets must be variant indices in [0, {k}), got {c.targets!r}.")
        self.config, self.targets = c, targets
        self.obs_dim = int(np.prod(self.env.observation_space(
            jax.tree.map(lambda x: x[0], self.env_params)).shape))
        self.num_actions = int(self.env.num_actions)
        abstract = nnx.eval_shape(lambda: Policy(self.obs_dim, self.num_actions,
                                                 c.hidden, rngs=nnx.Rngs(0)))
        self._graphdef = nnx.graphdef(abstract)
        # Per-key caches: θ*, its linearized rollouts, the full-set fine-tuning
        # distance; compiled trainers per setting.
        self._base_params, self._linearized, self._moved = {}, {}, {}
        self._trainers = {}
        self._evaluate_many = jax.jit(jax.vmap(self.evaluate))

    # -- the interface ------------------------------------------------------

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(variant_name(v) for v in self.variants)

    @property
    def num_targets(self) -> int:
        return len(self.targets)

    @property
    def target_description(self) -> str:
        names = [self.task_names[t] for t in self.targets]
        return f"minus the mean return on {self.config.env} variants {names}"

    def fingerprint(self) -> dict:
        """What determines this workload's scores (JSON): its configuration
        (environment, variants, policy, training program, evaluation
        episodes) and the digest of the policy's program (the jaxpr of its
        logits at one observation)."""
        params = jax.eval_shape(self.init_fn, jax.random.key(0))
        obs = jax.ShapeDtypeStruct((self.obs_dim,), jnp.float32)
        return {"workload": self.name, "config": dataclasses.asdict(self.config),
                "target_description": self.target_description,
                "policy": program_digest(self.apply_fn, params, obs)}

    def store_config(self) -> dict:
        """JSON description of the workload, for a results store."""
        return {"workload": self.name, **dataclasses.asdict(self.config)}

    def apply_fn(self, params, obs):
        """Action logits ``[..., A]`` of the policy ``params``."""
        return nnx.merge(self._graphdef, params)(obs)

    def init_fn(self, key):
        """Fresh policy parameters (an ``nnx.State`` of ``nnx.Param``)."""
        model = Policy(self.obs_dim, self.num_actions, self.config.hidden,
                       rngs=nnx.Rngs(params=key))
        return nnx.split(model, nnx.Param)[1]

    def check_masks(self, masks, name: str = "masks") -> jax.Array:
        masks = super().check_masks(masks, name)
        empty = np.nonzero(np.asarray(masks).sum(1) == 0)[0]
        if empty.size:
            raise ValueError(
                f"{name} rows {empty[:10].tolist()} select no environment variant; "
                "training needs at least one."
            )
        return masks

    # -- rollouts and training ---------------------------------------------

    def rollout(self, params, variant: int | jax.Array, key) -> Trajectories:
        """One episode of the (stochastic) policy on one variant.

        Returns:
          :class:`Trajectories` with ``[horizon]`` leading axes.
        """
        env_params = jax.tree.map(lambda x: x[variant], self.env_params)
        weight, target_x = self.shaping[variant]
        reset_key, steps_key = jax.random.split(key)
        obs, state = self.env.reset_env(reset_key, env_params)

        def step(carry, step_key):
            obs, state, alive = carry
            k_act, k_env = jax.random.split(step_key)
            logits = self.apply_fn(params, obs.astype(jnp.float32))
            action = jax.random.categorical(k_act, logits)
            next_obs, next_state, reward, done, _ = self.env.step_env(
                k_env, state, action, env_params)
            if self.config.env == "CartPole-v1":
                reward = reward * (1.0 - weight * jnp.abs(state.x - target_x)
                                   / env_params.x_threshold)
            # gymnax keeps float64 states under jax_enable_x64; the policy is
            # float32.
            out = (obs.astype(jnp.float32), action.astype(jnp.int32),
                   (alive * reward).astype(jnp.float32), alive)
            return (next_obs, next_state, alive * (1.0 - done)), out

        _, (obs_seq, actions, rewards, alive) = jax.lax.scan(
            step, (obs, state, jnp.float32(1.0)),
            jax.random.split(steps_key, self.config.horizon))
        return Trajectories(obs_seq, actions, rewards, alive)

    def rollouts(self, params, key, num_episodes: int) -> Trajectories:
        """``num_episodes`` episodes on every variant: ``[K, E, horizon, ...]``."""
        keys = jax.random.split(key, (self.num_tasks, num_episodes))
        variants = jnp.arange(self.num_tasks)
        per_variant = jax.vmap(self.rollout, in_axes=(None, None, 0))
        return jax.vmap(per_variant, in_axes=(None, 0, 0))(params, variants, keys)

    def advantages(self, traj: Trajectories) -> jax.Array:
        """Returns-to-go minus their per-step mean over each variant's episodes.

        Args:
          traj: ``[K, E, horizon]`` trajectories.

        Returns:
          ``[K, E, horizon]`` advantages (0 after an episode ends).
        """
        gamma = self.config.discount

        def to_go(rewards):
            def back(carry, r):
                carry = r + gamma * carry
                return carry, carry
            return jax.lax.scan(back, 0.0, rewards, reverse=True)[1]

        returns = jax.vmap(jax.vmap(to_go))(traj.rewards)
        baseline = jnp.sum(returns * traj.alive, 1, keepdims=True) / jnp.maximum(
            jnp.sum(traj.alive, 1, keepdims=True), 1.0)
        return (returns - baseline) * traj.alive

    def _policy_loss(self, params, traj, advantages, task_weights):
        logp = jax.nn.log_softmax(self.apply_fn(params, traj.obs))
        logp = jnp.take_along_axis(logp, traj.actions[..., None], -1)[..., 0]
        per_variant = -jnp.mean(jnp.sum(logp * advantages, -1), 1) / (
            self.config.horizon)
        return jnp.sum(task_weights * per_variant) / jnp.sum(task_weights)

    def train(self, params, task_weights, key, *, iterations: int,
              learning_rate: float):
        """REINFORCE on the variants weighted by ``task_weights`` ``[K]``.

        Returns:
          ``(params, mean_returns [iterations])``: the trained policy and, per
          iteration, the weighted mean return of its training episodes.
        """
        optimizer = optax.adam(learning_rate)

        def step(carry, step_key):
            p, state = carry
            traj = self.rollouts(p, step_key, self.config.episodes)
            adv = jax.lax.stop_gradient(self.advantages(traj))
            grads = jax.grad(self._policy_loss)(p, traj, adv, task_weights)
            updates, state = optimizer.update(grads, state, p)
            ret = jnp.sum(task_weights * traj.rewards.sum(-1).mean(-1)) / jnp.sum(
                task_weights)
            return (optax.apply_updates(p, updates), state), ret

        (params, _), history = jax.lax.scan(
            step, (params, optimizer.init(params)),
            jax.random.split(key, iterations))
        return params, history

    def evaluate(self, params, key=None) -> jax.Array:
        """Minus the mean return on each target variant ``[T]`` over the fixed
        evaluation episodes (``key``: default from the config's seed)."""
        key = self._eval_key() if key is None else key
        keys = jax.random.split(key, (len(self.targets), self.config.eval_episodes))
        per_target = jax.vmap(self.rollout, in_axes=(None, None, 0))
        traj = jax.vmap(per_target, in_axes=(None, 0, 0))(
            params, jnp.asarray(self.targets), keys)
        return -traj.rewards.sum(-1).mean(-1)

    def _key(self, key):
        """``key`` as a typed key; ``None``: the config's seed."""
        return jax.random.key(self.config.seed) if key is None else as_typed_key(key)

    def _eval_key(self):
        return jax.random.fold_in(jax.random.key(self.config.seed), 7)

    def base_params(self, *, key=None):
        """``θ*``: the policy trained on all variants (cached per key; default
        from the config's seed)."""
        key = self._key(key)
        cache = _key_bytes(key)
        if cache not in self._base_params:
            c = self.config
            k_init, k_train = jax.random.split(key)
            train = jax.jit(lambda p, k: self.train(
                p, jnp.ones(self.num_tasks), k, iterations=c.iterations,
                learning_rate=c.learning_rate))
            params, history = train(self.init_fn(k_init), k_train)
            self._base_params[cache] = params
            self.base_history = np.asarray(history)
        return self._base_params[cache]

    def train_subsets(self, masks, *, key=None, replicate: int = 0,
                      from_scratch: bool = False, base_params=None,
                      chunk_size: int | None = 16):
        """Fine-tunes ``θ*`` (or trains from scratch) on every subset.

        All subsets share the training keys (common random numbers), so their
        differences come from the masks. Vmapped over subsets in chunks.

        Keys: the training streams of replicate 0 derive from ``key`` itself,
        those of replicate ``r >= 1`` from ``fold_in(key, r)``: fine-tuning
        episodes from ``fold_in(., 5)``, the fresh initialisation of
        ``from_scratch`` from ``fold_in(., 3)``. ``θ*`` is the same for every
        replicate: :meth:`base_params` of ``key``, unless ``base_params``.

        Args:
          masks: ``[num_subsets, num_tasks]``, no row empty.
          key: default from the config's seed.
          replicate: which replicate's training streams.
          from_scratch: train from a fresh initialisation instead of ``θ*``.
          base_params: ``θ*`` to fine-tune from, if at hand (unused with
            ``from_scratch``).
          chunk_size: subsets per compiled call (``None``: all at once).

        Returns:
          The trained policies, a pytree with a leading ``[num_subsets]`` axis.
        """
        masks = self.check_masks(masks)
        train = self._replicate_trainer(self._key(key), replicate, from_scratch,
                                        base_params)
        return map_padded_chunks(train, masks, chunk_size)

    def _replicate_trainer(self, key, replicate: int, from_scratch: bool,
                           base_params):
        """``train(masks [c, K]) -> policies [c, ...]`` of replicate
        ``replicate`` (see :meth:`train_subsets`), compiled once per setting."""
        replicate = check_positive_int(replicate, "replicate", minimum=0)
        stream = key if replicate == 0 else replicate_key(key, replicate)
        c = self.config
        if from_scratch:
            init = self.init_fn(jax.random.fold_in(stream, 3))
            iterations, lr = c.iterations, c.learning_rate
        else:
            init = self.base_params(key=key) if base_params is None else base_params
            iterations, lr = c.finetune_iterations, c.finetune_learning_rate
        train_key = jax.random.fold_in(stream, 5)
        trainer = self._chunk_trainer(iterations, lr)
        return lambda chunk: trainer(init, train_key, chunk)

    def _chunk_trainer(self, iterations: int, learning_rate: float):
        """``(init, key, masks [n, K]) -> policies [n, ...]``, compiled once per
        setting and chunk shape."""
        cache = (iterations, learning_rate)
        if cache not in self._trainers:
            def one_chunk(init, key, chunk):
                return jax.vmap(lambda mask: self.train(
                    init, mask, key, iterations=iterations,
                    learning_rate=learning_rate)[0])(chunk)
            self._trainers[cache] = jax.jit(one_chunk)
        return self._trainers[cache]

    def replicate_scores(self, masks, *, key=None, regime: str = "finetune",
                         replicates: int = 1, base_params=None, chunk_size: int = 16,
                         store_dir=None, progress: bool = False) -> jax.Array:
        """Minus the target returns after training on each subset, per replicate.

        Replicates are paired: within one, every subset shares ``θ*`` and the
        training episodes' keys, so the mask is the only difference; replicates
        differ in those keys (see :meth:`train_subsets`). Evaluation episodes
        are the same fixed ones everywhere: they are part of ``F``.

        Args:
          masks: ``[num_subsets, num_tasks]``, no row empty.
          key: default from the config's seed.
          regime: ``"finetune"`` (from ``θ*``) or ``"scratch"`` (from a fresh
            initialisation per replicate).
          replicates: ``R >= 1``; replicate 0 is :meth:`exact_scores` of ``key``.
          base_params: ``θ*`` to fine-tune from, if at hand (e.g. read back from
            a store); ``None``: :meth:`base_params` of ``key``.
          chunk_size: subsets per compiled call (memory); the last chunk is
            padded, so every chunk runs the same program.
          store_dir: folder to save each finished (replicate, chunk) of scores
            to and resume from (:class:`~tasksurrogate_jax.truth.store.ChunkStore`,
            keyed on this workload's configuration, the masks, the key, ``θ*``
            when given and the settings).
          progress: a progress bar over chunks.

        Returns:
          ``[replicates, num_subsets, num_targets]``.
        """
        masks = np.asarray(self.check_masks(masks))
        key = self._key(key)
        from_scratch = check_regime(regime) == "scratch"
        replicates = check_positive_int(replicates, "replicates")
        size = min(check_positive_int(chunk_size, "chunk_size"), masks.shape[0])
        store = None
        if store_dir is not None:
            settings = {"workload": self.fingerprint(), "masks": array_digest(masks),
                        "key": np.asarray(jax.random.key_data(key)).tolist(),
                        "from_scratch": from_scratch, "chunk_size": size,
                        "replicates": replicates}
            if base_params is not None:
                settings["base_params"] = _params_digest(base_params)
            store = open_store(store_dir, settings)
        device_masks = jnp.asarray(masks)
        scores = []
        for r in range(replicates):
            train = self._replicate_trainer(key, r, from_scratch, base_params)
            scores.append(map_chunks(
                lambda rows, train=train: {
                    "scores": self._evaluate_many(train(device_masks[rows]))},
                masks.shape[0], chunk_size=size, store=store,
                first_chunk=r * -(-masks.shape[0] // size),
                progress=f"fine-tuning, replicate {r} ({size}/chunk)"
                if progress else None)["scores"])
        return jnp.asarray(np.stack(scores))

    def exact_scores(self, masks, *, key=None, from_scratch: bool = False,
                     base_params=None, chunk_size: int = 16,
                     store_dir=None) -> jax.Array:
        """Minus the target returns after training on each subset: replicate 0
        of :meth:`replicate_scores` (``from_scratch``: the ``"scratch"``
        regime), ``[num_subsets, num_targets]``.

        Args:
          masks: ``[num_subsets, num_tasks]``, no row empty.
          key: training key (``θ*``, fine-tuning); default from the seed.
          from_scratch: train from a fresh initialisation instead of ``θ*``.
          base_params, chunk_size, store_dir: as for :meth:`replicate_scores`.
        """
        return self.replicate_scores(
            masks, key=key, regime="scratch" if from_scratch else "finetune",
            base_params=base_params, chunk_size=chunk_size, store_dir=store_dir)[0]


def rl_workload(preset: str = "cpu", *,
                estimation: RLEstimation = RLEstimation(),  # noqa: B008 (frozen)
                **overrides) -> RLWorkload:
    """Builds the RL workload from a preset (``θ*`` is trained on first use).

    Args:
      preset: one of :data:`PRESETS` (``"cpu"``, ``"paper"``, ``"tiny"``).
      estimation: :class:`RLEstimation`.
      **overrides: :class:`RLConfig` fields to change.
    """
    workload = RLWorkload(config_from_preset(PRESETS, preset, overrides),
                          estimation=estimation)
    workload.pipeline_defaults = {**RLWorkload.pipeline_defaults,
                                  **PRESET_PIPELINE_DEFAULTS.get(preset, {})}
    return workload
