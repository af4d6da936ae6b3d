"""Multi-objective reinforcement learning: the environment variants and the
policy (the tasks of :class:`~tasksurrogate_jax.workloads.rl.RLWorkload`).

The tasks are K variants of a gymnax environment (:data:`ENVIRONMENTS`):
physical parameters and, for CartPole, the reward objective vary
(:data:`CARTPOLE_VARIANTS` by default, :data:`ACROBOT_VARIANTS`; the valid
ranges in :data:`PARAMETER_RANGES`). :func:`make_variant_params` stacks their
gymnax parameters, :func:`variant_name` names them; :class:`Policy` is the MLP
policy (Flax NNX) and :class:`Trajectories` holds its episodes.

gymnax is an optional dependency of this workload: ``pip install
"tasksurrogate-jax[rl]"``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tasksurrogate_jax.truth.fingerprint import array_digest

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


def _key_bytes(key) -> bytes:
    """A typed key's data, as a cache key."""
    return np.asarray(jax.random.key_data(key)).tobytes()


def _params_digest(params) -> str:
    """A digest of a policy's parameters, as a cache and store key."""
    return array_digest(*jax.tree.leaves(params))
