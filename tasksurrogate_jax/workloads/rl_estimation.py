"""Multi-objective reinforcement learning: the first-order estimate.

:class:`~tasksurrogate_jax.workloads.rl.RLWorkload` inherits its
``estimated_scores`` from :class:`LinearizedPolicyEstimate`, defined here
(docs/method.md), with the settings of :class:`RLEstimation`.

The policy's action logits are linearized around ``θ*`` with projected
gradient features (``features.linearized_examples``), on rollouts of ``θ*``;
per subset, a policy-improvement problem in the projected space over the
steps of its variants: the linearized policy gradient with a ridge (closed
form, default; :func:`policy_gradients`) or advantage-weighted logistic
regression on the actions taken (``convex.solve_subsets``); the target score
is then measured by rolling out the policy ``θ* + P ŵ_s``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tasksurrogate_jax._checks import check_positive_int
from tasksurrogate_jax.estimate.convex import SolverSettings, solve_subsets
from tasksurrogate_jax.estimate.features import Linearized, linearized_examples
from tasksurrogate_jax.estimate.projection import (
    make_projection,
    num_parameters,
    unproject,
)
from tasksurrogate_jax.workloads.rl_env import _key_bytes, _params_digest

ESTIMATORS = ("pg", "awr")


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


class LinearizedPolicyEstimate:
    """The first-order estimate of an RL workload (see the module docstring).

    A mixin: it relies on the workload's ``θ*`` (``base_params``, ``_key``),
    rollouts and advantages, policy (``apply_fn``, ``obs_dim``), evaluation
    (``_evaluate_many``), subset training (``train_subsets``), masks check,
    :attr:`estimation` settings and its ``_linearized`` and ``_moved`` caches.
    """

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


def _tree_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree)))

