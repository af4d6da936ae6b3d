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
- ``estimated_scores``: the policy's action logits linearized around ``θ*``
  with projected gradient features (``features.linearized_examples``), on
  rollouts of ``θ*``; per subset, a policy-improvement problem in the
  projected space over the steps of its variants: the linearized policy
  gradient with a ridge (closed form, default) or advantage-weighted logistic
  regression on the actions taken (``convex.solve_subsets``); the target
  score is then measured by rolling out the policy ``θ* + P ŵ_s``.

gymnax is an optional dependency of this workload: ``pip install
"tasksurrogate-jax[rl]"``.

Presets (:data:`PRESETS`): ``"cpu"`` (a few minutes on 2 cores), ``"paper"``
(longer horizons and training, for GPU/TPU), ``"tiny"`` (tests).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tasksurrogate_jax._checks import as_typed_key, check_positive_int
from tasksurrogate_jax.estimate.convex import SolverSettings, solve_subsets
from tasksurrogate_jax.estimate.features import Linearized, linearized_examples
from tasksurrogate_jax.estimate.projection import (
    make_projection,
    num_parameters,
    unproject,
)
from tasksurrogate_jax.truth.chunking import map_chunks, map_padded_chunks, open_store
from tasksurrogate_jax.truth.fingerprint import array_digest, program_digest
from tasksurrogate_jax.truth.retraining import replicate_key
from tasksurrogate_jax.workloads.base import LeaveOneOutWorkload, config_from_preset
from tasksurrogate_jax.workloads.supervised import check_regime

# Parameters a variant may set, with their valid ranges (inclusive). Derived
# CartPole quantities (total_mass, polemass_length) are recomputed.
# ``position_weight`` (w) and ``target_x`` are ours: CartPole's reward becomes
# ``1 - w |x - target_x| / x_threshold``, so variants can pull the cart to
# different places (conflicting objectives: the policy does not see which
# variant it is in).
PARAMETER_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "CartPole-v1": {
        "gravity": (0.1, 50.0), "masscart": (0.05, 20.0), "masspole": (0.01, 5.0),
        "length": (0.05, 5.0), "force_mag": (0.5, 100.0), "tau": (0.001, 0.05),
        "position_weight": (0.0, 1.0), "target_x": (-2.0, 2.0),
    },
    "Acrobot-v1": {
        "link_length_1": (0.2, 5.0), "link_length_2": (0.2, 5.0),
        "link_mass_1": (0.1, 10.0), "link_mass_2": (0.1, 10.0),
        "link_com_pos_1": (0.05, 5.0), "link_com_pos_2": (0.05, 5.0),
        "link_moi": (0.1, 10.0), "torque_noise_max": (0.0, 1.0), "dt": (0.02, 0.5),
    },
}
ENVIRONMENTS = tuple(PARAMETER_RANGES)
ESTIMATORS = ("pg", "awr")

# Ten CartPole variants: physics (gravity, pole, cart, force) and where the
# reward wants the cart (target_x; position_weight 1).
CARTPOLE_VARIANTS: tuple[tuple[tuple[str, float], ...], ...] = (
    (("position_weight", 1.0), ("target_x", 0.0)),
    (("position_weight", 1.0), ("target_x", 1.0)),
    (("position_weight", 1.0), ("target_x", -1.0)),
    (("position_weight", 1.0), ("target_x", 0.5), ("gravity", 19.6)),
    (("position_weight", 1.0), ("target_x", -0.5), ("length", 0.25)),
    (("position_weight", 1.0), ("target_x", 1.0), ("gravity", 4.9)),
    (("position_weight", 1.0), ("target_x", 0.0), ("masspole", 0.5)),
    (("position_weight", 1.0), ("target_x", -1.0), ("force_mag", 5.0)),
    (("position_weight", 1.0), ("target_x", 0.5), ("force_mag", 20.0)),
    (("position_weight", 1.0), ("target_x", -1.5), ("masscart", 3.0)),
)
ACROBOT_VARIANTS: tuple[tuple[tuple[str, float], ...], ...] = (
    (),
    (("link_length_1", 0.7),),
    (("link_length_2", 1.5),),
    (("link_mass_1", 2.0),),
    (("link_mass_2", 0.5),),
    (("link_moi", 2.0),),
    (("torque_noise_max", 0.2),),
    (("dt", 0.1),),
)


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


@dataclasses.dataclass(frozen=True)
class RLEstimation:
    """The settings of :meth:`RLWorkload.estimated_scores` (validated when
    built; see there).

    Attributes:
      method: one of :data:`ESTIMATORS`.
      proj_dim: d of the projected policy (an int).
      ridge: the L2 penalty (``None``: calibrated, see ``estimated_scores``).
      temperature: β of the ``"awr"`` weights.
    """

    method: str = "pg"
    proj_dim: int = 128
    ridge: float | None = None
    temperature: float = 1.0

    def __post_init__(self):
        if self.method not in ESTIMATORS:
            raise ValueError(f"method must be one of {ESTIMATORS}, got "
                             f"{self.method!r}.")
        if isinstance(self.proj_dim, str):
            raise ValueError("proj_dim must be an int for the RL workload (its "
                             f"policy-gradient estimate projects), got "
                             f"{self.proj_dim!r}.")
        check_positive_int(self.proj_dim, "proj_dim")
        number = (isinstance(self.ridge, (int, float))
                  and not isinstance(self.ridge, bool))
        if self.ridge is not None and not (
                number and self.ridge > 0 and np.isfinite(self.ridge)):
            raise ValueError(f"ridge must be None or a finite number > 0, got "
                             f"{self.ridge!r}.")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}.")


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


def _gymnax():
    try:
        import gymnax
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(
            "the RL workload needs gymnax: pip install \"tasksurrogate-jax[rl]\" "
            "(or pip install gymnax six)."
        ) from err
    return gymnax


def make_variant_params(env: str, variants) -> tuple[Any, Any, jax.Array]:
    """The environment and its parameters for every variant.

    Returns:
      ``(environment, params, shaping)``: ``params`` is the gymnax parameter
      dataclass with a leading ``[K]`` axis on every field; ``shaping``
      ``[K, 2]`` holds each variant's ``(position_weight, target_x)``.
    """
    if env not in PARAMETER_RANGES:
        raise ValueError(f"env must be one of {ENVIRONMENTS}, got {env!r}.")
    environment, default = _gymnax().make(env)
    ranges = PARAMETER_RANGES[env]
    if len(variants) == 0:
        raise ValueError("variants must hold at least one variant.")
    per_variant, centers = [], []
    for k, variant in enumerate(variants):
        try:
            settings = dict(variant)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"variants[{k}] must be a tuple of (parameter, value) pairs, got "
                f"{variant!r}."
            ) from err
        for name, value in settings.items():
            if name not in ranges:
                raise ValueError(
                    f"variants[{k}]: unknown {env} parameter {name!r}; valid: "
                    f"{sorted(ranges)}."
                )
            lo, hi = ranges[name]
            if not (isinstance(value, (int, float, np.floating, np.integer))
                    and lo <= float(value) <= hi):
                raise ValueError(
                    f"variants[{k}]: {name}={value!r} is outside its valid range "
                    f"[{lo}, {hi}] for {env}."
                )
        centers.append((float(settings.pop("position_weight", 0.0)),
                        float(settings.pop("target_x", 0.0))))
        params = default.replace(**{n: float(v) for n, v in settings.items()})
        if env == "CartPole-v1":
            params = params.replace(
                total_mass=params.masscart + params.masspole,
                polemass_length=params.masspole * params.length)
        per_variant.append(params)
    stacked = jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]),
                           *per_variant)
    return environment, stacked, jnp.asarray(centers, jnp.float32).reshape(-1, 2)


def variant_name(variant) -> str:
    """Short name: ``"default"``, ``"x*=+1 gravity=4.9"`` (``x*``: the reward's
    target cart position, shown with its weight when that is not 1)."""
    settings = dict(variant)
    parts = []
    if "position_weight" in settings or "target_x" in settings:
        weight = settings.pop("position_weight", 0.0)
        target = settings.pop("target_x", 0.0)
        parts.append(f"x*={target:+g}" + ("" if weight == 1 else f"(w={weight:g})"))
    parts += [f"{n}={v:g}" for n, v in settings.items()]
    return " ".join(parts) or "default"


class Policy(nnx.Module):
    """MLP policy: observations ``[..., obs_dim]`` -> action logits ``[..., A]``."""

    def __init__(self, obs_dim: int, num_actions: int, hidden: int, *,
                 rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(obs_dim, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, num_actions, rngs=rngs,
                              kernel_init=nnx.initializers.normal(0.01))

    def __call__(self, obs):
        return self.out(jnp.tanh(self.fc2(jnp.tanh(self.fc1(obs)))))


class Trajectories(NamedTuple):
    """Episodes of one or more variants.

    Attributes:
      obs: ``[..., horizon, obs_dim]`` observations.
      actions: ``[..., horizon]`` int actions.
      rewards: ``[..., horizon]`` rewards (0 after the episode ended).
      alive: ``[..., horizon]`` 1 while the episode runs.
    """

    obs: jax.Array
    actions: jax.Array
    rewards: jax.Array
    alive: jax.Array


class RLWorkload(LeaveOneOutWorkload):
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
                 estimation: RLEstimation = RLEstimation()):
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

    # -- the first-order estimate -------------------------------------------

    def linearized_rollouts(self, *, key=None, base_params=None, proj_dim: int = 64,
                            num_episodes: int | None = None,
                            batch_size: int | None = 4096):
        """Rollouts of ``θ*`` and the projected Jacobians of its action logits.

        Args:
          key: the rollouts use ``fold_in(key, 11)``, the projection
            ``fold_in(key, 13)``; default from the config's seed.
          base_params: ``θ*``; ``None``: :meth:`base_params` of ``key``.
          proj_dim: d.
          num_episodes: per variant (default ``episodes``).
          batch_size: steps per Jacobian batch.

        Returns:
          ``(examples, task_of_example, advantages, projection)``:
          :class:`~tasksurrogate_jax.estimate.features.Linearized` over the ``n``
          alive steps (``outputs`` ``[n, A]`` logits at ``θ*``, ``features``
          ``[n, A, d]`` = ``J(s) P``, ``labels`` the actions), ``[n]`` variant
          of each step, ``[n]`` advantages, and the projection.
        """
        key = self._key(key)
        params = self.base_params(key=key) if base_params is None else base_params
        num_episodes = self.config.episodes if num_episodes is None else num_episodes
        cache = (_key_bytes(key), _params_digest(params), proj_dim, num_episodes)
        if cache not in self._linearized:
            self._linearized[cache] = self._linearize(key, params, proj_dim,
                                                      num_episodes, batch_size)
        return self._linearized[cache]

    def _linearize(self, key, params, proj_dim, num_episodes, batch_size):
        traj = jax.jit(self.rollouts, static_argnums=2)(
            params, jax.random.fold_in(key, 11), num_episodes)
        adv = self.advantages(traj)
        alive = np.asarray(traj.alive).reshape(-1) > 0
        task = np.broadcast_to(np.arange(self.num_tasks)[:, None, None],
                               traj.alive.shape).reshape(-1)[alive]
        obs = np.asarray(traj.obs).reshape(-1, self.obs_dim)[alive]
        actions = np.asarray(traj.actions).reshape(-1)[alive]
        projection = make_projection(jax.random.fold_in(key, 13), proj_dim,
                                     num_params=num_parameters(params))
        examples = linearized_examples(
            self.apply_fn, params, jnp.asarray(obs), jnp.asarray(actions),
            projection=projection, output_mode="logits", batch_size=batch_size)
        return examples, task, np.asarray(adv).reshape(-1)[alive], projection

    def estimated_scores(self, masks, *, key=None, base_params=None,
                         method: str | None = None, proj_dim: int | None = None,
                         ridge: float | None = None,
                         temperature: float | None = None,
                         num_episodes: int | None = None,
                         settings: SolverSettings | None = None) -> jax.Array:
        """First-order estimates ``[num_subsets, num_targets]`` (no training).

        The policy's logits are linearized around ``θ*`` in a random
        ``proj_dim``-dimensional subspace, ``z(x; θ* + P w) ≈ z_n + Φ_n w``, on
        ``θ*``'s rollouts; each subset's update ``ŵ_s`` solves a policy-
        improvement problem over the steps of its variants, and the score is
        minus the mean target return of the real policy ``θ* + P ŵ_s``.

        - ``method="pg"``: the linearized policy-gradient objective
          ``Σ_n A_n log π_w(a_n | x_n)`` to first order in w, minus
          ``ridge/2 ||w||²``: ``ŵ_s = mean_n A_n Φ_nᵀ(e_{a_n} − p_n) / ridge``,
          one closed-form step per subset.
        - ``method="awr"``: advantage-weighted logistic regression on the
          actions taken, weights ``exp(clip(A_n / (temperature · std A), ±5))``,
          plus ``ridge/2 ||w||²`` (convex; Newton, ``settings``).

        Args:
          masks: ``[num_subsets, num_tasks]``, no row empty.
          key: the rollouts and projection (:meth:`linearized_rollouts`) and
            the calibrating fine-tuning (replicate 0 of :meth:`train_subsets`);
            ``θ*`` is :meth:`base_params` of ``key`` unless ``base_params``.
          base_params: ``θ*`` to linearize around.
          method, proj_dim, ridge, temperature: override the workload's
            :attr:`estimation` (:class:`RLEstimation`) for this call:
            ``"pg"`` or ``"awr"``; d; the L2 penalty, which sets how far each
            update moves (``None`` in the settings: for ``"pg"``, calibrated
            by one real fine-tuning on all variants so that the full set's
            update has the same norm, :meth:`calibrated_ridge`; for
            ``"awr"``, 1e-2); β of the ``"awr"`` weights.
          num_episodes: rollouts of ``θ*`` per variant (default ``episodes``).
          settings: the ``"awr"`` solver.
        """
        chosen = {"method": method, "proj_dim": proj_dim, "ridge": ridge,
                  "temperature": temperature}
        estimation = dataclasses.replace(self.estimation, **{
            name: value for name, value in chosen.items() if value is not None})
        method, proj_dim = estimation.method, estimation.proj_dim
        ridge, temperature = estimation.ridge, estimation.temperature
        masks = np.asarray(self.check_masks(masks))
        key = self._key(key)
        params = self.base_params(key=key) if base_params is None else base_params
        examples, task, adv, projection = self.linearized_rollouts(
            key=key, base_params=params, proj_dim=proj_dim, num_episodes=num_episodes)
        weights = masks[:, task]  # [m, n]
        if method == "pg":
            if ridge is None:
                ridge = self.calibrated_ridge(key=key, base_params=params,
                                              proj_dim=proj_dim,
                                              num_episodes=num_episodes)
            w = jnp.asarray(weights, jnp.float32) @ policy_gradients(examples, adv)
            w = w / jnp.asarray(weights.sum(1, keepdims=True), jnp.float32) / ridge
        else:
            scaled = adv / (temperature * max(float(np.std(adv)), 1e-8))
            awr = np.exp(np.clip(scaled, -5.0, 5.0))
            w = solve_subsets(examples, jnp.asarray(weights * awr, jnp.float32),
                              ridge=jnp.asarray(1e-2 if ridge is None else ridge,
                                                examples.features.dtype),
                              output_mode="logits",
                              settings=settings or SolverSettings()).w
        deltas = unproject(projection, w, params)
        policies = jax.tree.map(lambda p, d: p[None] + d, params, deltas)
        return self._evaluate_many(policies)

    def calibrated_ridge(self, *, key=None, base_params=None, proj_dim: int = 128,
                         num_episodes: int | None = None) -> float:
        """The ``"pg"`` ridge whose full-set update ``P ŵ`` has the norm of one
        real fine-tuning of ``θ*`` on all variants (replicate 0 of
        :meth:`train_subsets`; one training run per key and ``θ*``)."""
        key = self._key(key)
        params = self.base_params(key=key) if base_params is None else base_params
        examples, task, adv, projection = self.linearized_rollouts(
            key=key, base_params=params, proj_dim=proj_dim, num_episodes=num_episodes)
        g = policy_gradients(examples, adv).mean(0)
        step = _tree_norm(unproject(projection, g, params))
        cache = (_key_bytes(key), _params_digest(params))
        if cache not in self._moved:
            tuned = self.train_subsets(np.ones((1, self.num_tasks)), key=key,
                                       base_params=params)
            self._moved[cache] = float(_tree_norm(
                jax.tree.map(lambda a, b: a[0] - b, tuned, params)))
        return float(step) / self._moved[cache]


def policy_gradients(examples: Linearized, advantages) -> jax.Array:
    """``[n, d]``: ``A_n Φ_nᵀ(e_{a_n} − softmax(z_n))``, each step's projected
    policy gradient."""
    probs = jax.nn.softmax(examples.outputs, axis=-1)
    onehot = jax.nn.one_hot(examples.labels, probs.shape[-1], dtype=probs.dtype)
    scores = jnp.einsum("nc,ncd->nd", onehot - probs, examples.features)
    return scores * jnp.asarray(advantages, scores.dtype)[:, None]


def _key_bytes(key) -> bytes:
    """A typed key's data, as a cache key."""
    return np.asarray(jax.random.key_data(key)).tobytes()


def _params_digest(params) -> str:
    """A digest of a policy's parameters, as a cache and store key."""
    return array_digest(*jax.tree.leaves(params))


def _tree_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree)))


def rl_workload(preset: str = "cpu", *, estimation: RLEstimation = RLEstimation(),
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
