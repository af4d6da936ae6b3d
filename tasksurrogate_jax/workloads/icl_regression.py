"""In-context linear regression: a smooth in-context family (docs/method.md).

The token family of :mod:`tasksurrogate_jax.workloads.icl` hinges on an exact
symbol match, which no first-order model in the input embeddings follows. Here
a prompt's loss varies smoothly with its demonstrations' values, after Garg et
al. (2022), "What can transformers learn in-context? A case study of simple
function classes":

- a *task* is a weight vector ``w`` in ``R^D``; a labelled pair is ``(x, y)``
  with ``y = w·x + ε``, ``ε ~ N(0, σ²)``; a query is an ``x`` whose ``y`` the
  model predicts;
- every pair is one input vector ``[x, y, 1]`` in ``R^{D+2}`` and a query is
  ``[x, 0, 0]`` (the last entry marks a labelled pair); a prompt is its
  demonstrations' pairs, then the query;
- a small transformer (``workloads/transformer.py``'s
  :class:`TransformerBlock`, a linear read-in, no position embeddings: the
  demonstrations are exchangeable; a linear read-out) predicts the query's
  ``y`` at the last position; it is trained from scratch on fresh tasks
  ``w ~ N(0, I_D / D)``, with queries after 0 to ``max_demos``
  demonstrations in every training sequence (each query attends to the pairs
  of the demonstrations before it and to itself: the prompt it would end).

Two designs of a demonstration (``design``):

- ``"probe"`` (default): a demonstration is a noisy measurement of the task at
  ``D`` fixed probe inputs ``√D e_1, ..., √D e_D``: ``D`` pairs whose labels
  are ``√D w_j + ε``. Every prompt of ``k`` shots puts the same probe inputs at
  the same positions; prompts differ in the labels only, in which the
  Bayes-optimal prediction (ridge) is linear. This is the smooth family: the
  first-order model in the input embeddings holds.
- ``"random"`` (Garg et al.): a demonstration is one pair with ``x ~ N(0,
  I_D)``. The prediction then depends on products of a demonstration's ``x``
  and its label (``(XᵀX)⁻¹ Xᵀ y``), which change together from prompt to
  prompt: the first-order model fails even for the ideal predictor
  (``benchmarks/bench_icl_linearization.py`` measures both).

The attribution problem is one fixed task ``w*`` (``world_seed``, ``|w*| =
1``) and a pool of ``pool_size`` demonstrations with planted weaknesses:

- ``num_noisy`` with corrupted labels (the task seen through the
  demonstration is off by ``noisy_shift`` in a random direction: ``"probe"``;
  its label shifted by ``± noisy_shift``: ``"random"``);
- ``num_outliers`` with outlying inputs (scaled by ``outlier_scale``,
  correctly labelled, but far outside what the model was trained on);
- ``num_duplicates`` near-duplicates of other clean demonstrations (labels,
  or ``x``, jittered by ``duplicate_jitter``): redundant with their source.

Target and held-out queries are fresh ``x ~ N(0, I_D)`` with ``y = w*·x + ε``;
a query's loss is the squared error ``(f(prompt) - y)²``. Demonstrations
interact: a noisy label hurts less beside clean ones and two noisy ones may
cancel; a near-duplicate adds its source's noise again.

The workload is an :class:`~tasksurrogate_jax.workloads.icl.ICLWorkload` with
vector prompts and a regression head: exact scores, the embedding
linearization (anchors; ``"loss"`` or ``"output"``), prompt sampling and
performance are the generic ones. The embeddings are a linear read-in of the
inputs, so the linearization in the embeddings is one in the raw ``(x, y)``.

Presets (:data:`PRESETS`): ``"cpu"`` (trains in about 1.5 minutes on 2 cores),
``"tiny"`` (tests: seconds).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tasksurrogate_jax._checks import check_key, check_positive_int
from tasksurrogate_jax.workloads.base import config_from_preset
from tasksurrogate_jax.workloads.icl import (
    ICLWorkload,
    NearestAnchors,
    PromptScorer,
)
from tasksurrogate_jax.workloads.icl_synthetic import with_preset_defaults
from tasksurrogate_jax.workloads.transformer import (
    TransformerBlock,
    train_on_fresh_batches,
)

DESIGNS = ("probe", "random")


@dataclasses.dataclass(frozen=True)
class ICLRegressionConfig:
    """Configuration of the in-context linear-regression workload.

    Attributes:
      input_dim: D, the dimension of ``x``.
      design: ``"probe"`` or ``"random"`` (see the module docstring), for the
        training sequences and the pool alike.
      max_demos: demonstrations per training sequence (the most a prompt
        holds).
      train_noise: σ of the label noise of training sequences.
      depth, width, heads, mlp_ratio: the transformer.
      learning_rate, warmup_steps, weight_decay, batch_size, num_steps:
        AdamW with linear warm-up and cosine decay (gradients clipped to
        norm 1).
      seed: model initialisation and training sequences.
      pool_size: K, the candidate demonstrations (the tasks), duplicates
        included.
      pool_noise: σ of the label noise of the pool and of the queries.
      num_noisy: demonstrations with corrupted labels.
      noisy_shift: the size of a corruption (``y`` has unit scale).
      num_outliers: demonstrations whose inputs are scaled by
        ``outlier_scale`` (their labels are correct).
      outlier_scale: the scale of an outlying input.
      num_duplicates: near-duplicates of other clean demonstrations.
      duplicate_jitter: σ of a near-duplicate's jitter (labels for
        ``"probe"``, ``x`` for ``"random"``).
      num_targets: T, target queries.
      num_heldout_queries: queries kept out of the targets.
      world_seed: the fixed task, the pool and the queries.
      num_anchors: the default estimate's anchors: the nearest of
        ``num_anchors`` random prompts (:class:`NearestAnchors`, seed
        ``world_seed``); 0: the pool's mean embedding.
      linearize: the default estimate's ``"output"`` or ``"loss"``.
    """

    input_dim: int = 4
    design: str = "probe"
    max_demos: int = 8
    train_noise: float = 0.1
    depth: int = 2
    width: int = 64
    heads: int = 4
    mlp_ratio: int = 4
    learning_rate: float = 2e-3
    warmup_steps: int = 200
    weight_decay: float = 0.0
    batch_size: int = 64
    num_steps: int = 3000
    seed: int = 0
    pool_size: int = 50
    pool_noise: float = 0.3
    num_noisy: int = 6
    noisy_shift: float = 1.0
    num_outliers: int = 4
    outlier_scale: float = 3.0
    num_duplicates: int = 6
    duplicate_jitter: float = 0.02
    num_targets: int = 32
    num_heldout_queries: int = 256
    world_seed: int = 1
    num_anchors: int = 128
    linearize: str = "output"

    @property
    def demo_length(self) -> int:
        """Input vectors per demonstration: ``D`` (``"probe"``) or 1."""
        return self.input_dim if self.design == "probe" else 1

    @property
    def max_length(self) -> int:
        return self.max_demos * self.demo_length + 1

    @property
    def vector_dim(self) -> int:
        """The dimension of an input vector: ``D + 2``."""
        return self.input_dim + 2


PRESETS: dict[str, ICLRegressionConfig] = {
    "cpu": ICLRegressionConfig(),
    # Tests: a 2-D task, a smaller model, seconds of training.
    "tiny": ICLRegressionConfig(
        input_dim=2, max_demos=6, width=32, heads=2, num_steps=400,
        learning_rate=3e-3, warmup_steps=50, pool_size=20, num_noisy=3,
        num_outliers=2, num_duplicates=3, num_targets=8, num_heldout_queries=256,
        num_anchors=32,
    ),
}


class RegressionTransformer(nnx.Module):
    """Transformer over input vectors ``[..., length, D + 2]`` -> predictions
    ``[..., length]`` at every position (causal attention, no positions).

    Split in two for the linearization: :meth:`embed_inputs` (a linear
    read-in) and :meth:`predictions_from_embeddings`.
    """

    def __init__(self, config: ICLRegressionConfig, *, rngs: nnx.Rngs):
        c = config
        self.read_in = nnx.Linear(c.vector_dim, c.width, rngs=rngs)
        self.blocks = nnx.List(
            [TransformerBlock(c.width, c.heads, c.mlp_ratio, rngs=rngs)
             for _ in range(c.depth)])
        self.ln_f = nnx.LayerNorm(c.width, rngs=rngs)
        self.read_out = nnx.Linear(c.width, 1, rngs=rngs)

    def embed_inputs(self, inputs):
        """``[..., length, D + 2]`` -> ``[..., length, width]``."""
        return self.read_in(inputs)

    def predictions_from_embeddings(self, x, mask=None):
        """``[..., length, width]`` -> ``[..., length]``; ``mask`` ``[..., 1,
        length, length]`` (default: causal)."""
        if mask is None:
            mask = nnx.make_causal_mask(x[..., 0])
        for block in self.blocks:
            x = block(x, mask)
        return self.read_out(self.ln_f(x))[..., 0]

    def __call__(self, inputs):
        """Causal predictions: position ``-1`` is the prompt's prediction."""
        return self.predictions_from_embeddings(self.embed_inputs(inputs))

    def query_predictions(self, demonstrations, queries, demo_length: int):
        """Predictions of ``queries`` after 0, 1, ... demonstrations at once.

        Args:
          demonstrations: ``[..., n * demo_length, D + 2]`` the pairs of ``n``
            demonstrations.
          queries: ``[..., n + 1, D + 2]``; query ``r`` attends to the pairs of
            the first ``r`` demonstrations and to itself, which is the causal
            forward pass of the prompt ``[those pairs, query r]``.
          demo_length: pairs per demonstration.

        Returns:
          ``[..., n + 1]``.
        """
        m, q = demonstrations.shape[-2], queries.shape[-2]
        x = self.embed_inputs(jnp.concatenate([demonstrations, queries], -2))
        mask = _query_mask(m, q, demo_length)
        return self.predictions_from_embeddings(x, mask)[..., m:]


def _query_mask(num_pairs: int, num_queries: int, demo_length: int):
    """``[1, N, N]`` attention mask of :meth:`query_predictions`."""
    n = num_pairs + num_queries
    mask = np.zeros((n, n), bool)
    mask[:num_pairs, :num_pairs] = np.tril(np.ones((num_pairs, num_pairs), bool))
    for r in range(num_queries):
        mask[num_pairs + r, : r * demo_length] = True
        mask[num_pairs + r, num_pairs + r] = True
    return jnp.asarray(mask[None])


def encode_pairs(xs, ys):
    """Labelled pairs ``[..., D]``, ``[...]`` -> input vectors ``[..., D + 2]``
    (``[x, y, 1]``)."""
    xs = jnp.asarray(xs)
    ys = jnp.asarray(ys, xs.dtype)[..., None]
    return jnp.concatenate([xs, ys, jnp.ones_like(ys)], -1)


def encode_queries(xs):
    """Queries ``[..., D]`` -> input vectors ``[..., D + 2]`` (``[x, 0, 0]``)."""
    xs = jnp.asarray(xs)
    return jnp.concatenate([xs, jnp.zeros(xs.shape[:-1] + (2,), xs.dtype)], -1)


def probe_inputs(input_dim: int) -> np.ndarray:
    """``[D, D]`` the probe inputs ``√D e_j`` of the ``"probe"`` design."""
    return np.sqrt(input_dim) * np.eye(input_dim, dtype=np.float32)


def sample_sequences(key, config: ICLRegressionConfig, batch_size: int):
    """Training sequences of fresh random tasks ``w ~ N(0, I_D / D)``.

    Returns:
      ``(demonstrations [batch, n * L, D + 2], queries [batch, n + 1, D + 2],
      query_labels [batch, n + 1])`` with ``n = max_demos`` and ``L =
      demo_length``: for :meth:`RegressionTransformer.query_predictions`;
      also ``pair_x [batch, n * L, D]`` and ``pair_y [batch, n * L]`` for a
      reference predictor, as a dict.
    """
    c = config
    n, d, length = c.max_demos, c.input_dim, c.demo_length
    k_w, k_x, k_e, k_q, k_qe = jax.random.split(key, 5)
    w = jax.random.normal(k_w, (batch_size, d), jnp.float32) / np.sqrt(d)
    if c.design == "probe":
        pair_x = jnp.broadcast_to(jnp.tile(probe_inputs(d), (n, 1)),
                                  (batch_size, n * length, d))
    else:
        pair_x = jax.random.normal(k_x, (batch_size, n, d), jnp.float32)
    pair_y = jnp.einsum("bnd,bd->bn", pair_x, w) + c.train_noise * jax.random.normal(
        k_e, (batch_size, n * length), jnp.float32)
    query_x = jax.random.normal(k_q, (batch_size, n + 1, d), jnp.float32)
    query_y = jnp.einsum("bnd,bd->bn", query_x, w) + c.train_noise * \
        jax.random.normal(k_qe, (batch_size, n + 1), jnp.float32)
    return {"demonstrations": encode_pairs(pair_x, pair_y),
            "queries": encode_queries(query_x), "query_labels": query_y,
            "pair_x": pair_x, "pair_y": pair_y, "query_x": query_x}


def train_regression_transformer(config: ICLRegressionConfig):
    """Trains the transformer on fresh random tasks (one compiled scan).

    Returns:
      ``(params, losses [num_steps])``: an ``nnx.State`` of the parameters and
      the training loss (mean squared error over queries after 0 to
      ``max_demos`` demonstrations) of every step.
    """
    c = config
    key = jax.random.key(c.seed)
    model = RegressionTransformer(c, rngs=nnx.Rngs(params=jax.random.fold_in(key, 0)))
    graphdef, params = nnx.split(model, nnx.Param)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, c.learning_rate, min(c.warmup_steps, c.num_steps), c.num_steps)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, weight_decay=c.weight_decay))

    def batch_loss(p, step_key):
        batch = sample_sequences(step_key, c, c.batch_size)
        predictions = nnx.merge(graphdef, p).query_predictions(
            batch["demonstrations"], batch["queries"], c.demo_length)
        return jnp.mean(jnp.square(predictions - batch["query_labels"]))

    return train_on_fresh_batches(params, batch_loss, optimizer,
                                  num_steps=c.num_steps, key=jax.random.fold_in(key, 1))


def bayes_predictions(pair_x, pair_y, query_x, *, noise: float):
    """The Bayes-optimal prediction under the training distribution: ridge
    with ``λ = σ² D``, the posterior mean of ``w ~ N(0, I_D / D)``.

    Args:
      pair_x: ``[..., m, D]``; pair_y: ``[..., m]``; query_x: ``[..., D]``.
      noise: σ of the label noise.

    Returns:
      ``[...]``.
    """
    d = pair_x.shape[-1]
    gram = (jnp.einsum("...kd,...ke->...de", pair_x, pair_x)
            + noise**2 * d * jnp.eye(d))
    moment = jnp.einsum("...kd,...k->...d", pair_x, pair_y)
    w = jnp.linalg.solve(gram, moment[..., None])[..., 0]
    return jnp.einsum("...d,...d->...", w, query_x)


class ICLRegressionWorkload(ICLWorkload):
    """The in-context linear-regression workload (see the module docstring).

    Attributes:
      config: the :class:`ICLRegressionConfig`.
      model_params: the trained transformer's parameters (``nnx.State``).
      training_losses: ``[num_steps]`` training loss per step.
      w_star: ``[D]`` the fixed task.
      pool_x, pool_y: ``[K, L, D]``, ``[K, L]`` the demonstrations' pairs
        (``L = demo_length``).
      pool_noisy: ``[K]`` bool, demonstrations with corrupted labels.
      pool_outlier: ``[K]`` bool, demonstrations with outlying inputs.
      pool_duplicate_of: ``[K]`` int, the pool index of the demonstration a
        near-duplicate copies (-1 for the others).
      query_x: ``[T, D]`` the target queries' ``x`` (``query_labels``: their
        ``y``); heldout_x: ``[H, D]``, their labels in ``heldout[1]``.
    """

    name: ClassVar[str] = "icl_regression"
    presets: ClassVar[dict[str, ICLRegressionConfig]] = PRESETS

    def __init__(self, config: ICLRegressionConfig):
        if not isinstance(config, ICLRegressionConfig):
            raise TypeError(f"config must be an ICLRegressionConfig, got "
                            f"{type(config).__name__}.")
        c = self.config = config
        world = regression_world(c)  # checks the config before training
        params, losses = train_regression_transformer(c)
        self.model_params, self.training_losses = params, np.asarray(losses)
        graphdef = nnx.graphdef(
            nnx.eval_shape(lambda: RegressionTransformer(c, rngs=nnx.Rngs(0))))
        self._graphdef = graphdef

        def embed(p, inputs):
            return nnx.merge(graphdef, p).embed_inputs(inputs)

        def prediction(p, embeddings):
            return nnx.merge(graphdef, p).predictions_from_embeddings(embeddings)[-1]

        for name in ("w_star", "pool_x", "pool_y", "pool_noisy", "pool_outlier",
                     "pool_duplicate_of", "query_x", "heldout_x"):
            setattr(self, name, world[name])
        anchor = ("mean" if c.num_anchors == 0
                  else NearestAnchors(c.num_anchors, seed=c.world_seed))
        super().__init__(
            PromptScorer(params, embed, prediction=prediction),
            world["pool"], world["queries"], world["query_labels"],
            max_length=c.max_length, heldout_queries=world["heldout"],
            heldout_labels=world["heldout_labels"], task_names=world["names"],
            description=(f"squared error of {c.num_targets} queries of one "
                         f"{c.input_dim}-D linear task ({c.design} design)"),
            anchor=anchor, linearize=c.linearize,
        )

    def store_config(self) -> dict:
        """JSON description of the workload, for a results store."""
        return {"workload": self.name, **dataclasses.asdict(self.config)}

    def model(self) -> RegressionTransformer:
        """The trained transformer as an ``nnx`` module."""
        return nnx.merge(self._graphdef, self.model_params)

    def in_context_loss(self, key, *, num_sequences: int = 2000) -> dict:
        """Squared error of a query after 0 to ``max_demos`` demonstrations,
        on fresh tasks from the training distribution, beside the
        Bayes-optimal predictor's (:func:`bayes_predictions`).

        Returns:
          ``{"model": [max_demos + 1], "bayes": [max_demos + 1]}``: mean
          squared error against the noisy label by number of demonstrations.
        """
        key = check_key(key)
        num_sequences = check_positive_int(num_sequences, "num_sequences")
        c = self.config
        batch = sample_sequences(key, c, num_sequences)
        predictions = self.model().query_predictions(
            batch["demonstrations"], batch["queries"], c.demo_length)
        length = c.demo_length
        bayes = jnp.stack([
            bayes_predictions(batch["pair_x"][:, : n * length],
                              batch["pair_y"][:, : n * length],
                              batch["query_x"][:, n], noise=c.train_noise)
            for n in range(c.max_demos + 1)], 1)
        labels = batch["query_labels"]
        return {"model": np.asarray(jnp.mean(jnp.square(predictions - labels), 0)),
                "bayes": np.asarray(jnp.mean(jnp.square(bayes - labels), 0))}


def _check_config(c: ICLRegressionConfig):
    for name in ("input_dim", "max_demos", "depth", "width", "heads", "mlp_ratio",
                 "batch_size", "num_steps", "pool_size", "num_targets",
                 "num_heldout_queries"):
        check_positive_int(getattr(c, name), name)
    for name in ("warmup_steps", "num_noisy", "num_outliers", "num_duplicates",
                 "num_anchors", "seed", "world_seed"):
        check_positive_int(getattr(c, name), name, minimum=0)
    if c.design not in DESIGNS:
        raise ValueError(f"design must be one of {DESIGNS}, got {c.design!r}.")
    if c.width % c.heads:
        raise ValueError(
            f"width must be divisible by heads, got width={c.width}, heads={c.heads}.")
    for name in ("train_noise", "pool_noise", "noisy_shift", "duplicate_jitter",
                 "learning_rate", "weight_decay"):
        value = getattr(c, name)
        if not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {value!r}.")
    if not (isinstance(c.outlier_scale, (int, float)) and np.isfinite(c.outlier_scale)
            and c.outlier_scale > 0):
        raise ValueError(f"outlier_scale must be > 0, got {c.outlier_scale!r}.")
    base = c.pool_size - c.num_duplicates
    if c.num_noisy + c.num_outliers + c.num_duplicates > base:
        raise ValueError(
            f"num_noisy + num_outliers + num_duplicates = "
            f"{c.num_noisy + c.num_outliers + c.num_duplicates} must be <= "
            f"pool_size - num_duplicates = {base}: the weaknesses are planted on "
            "distinct demonstrations and each near-duplicate copies a clean one.")
    if c.linearize not in ("loss", "output"):
        raise ValueError(f"linearize must be 'loss' or 'output', got "
                         f"{c.linearize!r}.")


def regression_world(c: ICLRegressionConfig) -> dict:
    """The fixed task ``w*``, its pool with planted weaknesses and its queries
    (``world_seed``); no model involved.

    Returns:
      A dict with ``w_star [D]``, ``pool_x [K, L, D]``, ``pool_y [K, L]``,
      ``pool_noisy``, ``pool_outlier`` (``[K]`` bool), ``pool_duplicate_of``
      (``[K]`` int, -1 for none), ``pool [K, L, D + 2]`` (the encoded
      demonstrations), ``names``, ``query_x [T, D]``, ``queries [T, 1, D + 2]``,
      ``query_labels [T]``, ``heldout_x``, ``heldout``, ``heldout_labels``.
    """
    _check_config(c)
    rng = np.random.default_rng(c.world_seed)
    d, length = c.input_dim, c.demo_length
    w = rng.standard_normal(d)
    w /= np.linalg.norm(w)
    base = c.pool_size - c.num_duplicates
    kinds = rng.permutation(base)
    noisy = np.zeros(base, bool)
    outlier = np.zeros(base, bool)
    noisy[kinds[: c.num_noisy]] = True
    outlier[kinds[c.num_noisy: c.num_noisy + c.num_outliers]] = True
    sources = np.sort(kinds[c.num_noisy + c.num_outliers:][: c.num_duplicates])
    if c.design == "probe":
        x = np.broadcast_to(probe_inputs(d), (base, d, d)).astype(float)
    else:
        x = rng.standard_normal((base, 1, d))
    x[outlier] *= c.outlier_scale
    y = (np.einsum("kld,d->kl", x, w)
         + c.pool_noise * rng.standard_normal((base, length)))
    if c.design == "probe":
        # The task a noisy demonstration shows is off by noisy_shift.
        direction = rng.standard_normal((c.num_noisy, d))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        y[noisy] += c.noisy_shift * np.sqrt(d) * direction
        dup_x = x[sources]
        dup_y = y[sources] + c.duplicate_jitter * rng.standard_normal((len(sources),
                                                                       length))
    else:
        y[noisy] += c.noisy_shift * rng.choice([-1.0, 1.0], (c.num_noisy, 1))
        dup_x = x[sources] + c.duplicate_jitter * rng.standard_normal((len(sources),
                                                                       1, d))
        # A near-duplicate's label: its source's, noise included, moved with x.
        dup_y = y[sources] + np.einsum("kld,d->kl", dup_x - x[sources], w)
    x, y = np.concatenate([x, dup_x]), np.concatenate([y, dup_y])
    noisy = np.concatenate([noisy, np.zeros(len(sources), bool)])
    outlier = np.concatenate([outlier, np.zeros(len(sources), bool)])
    duplicate_of = np.concatenate([np.full(base, -1), sources])
    # Shuffled: the weaknesses sit anywhere in the pool order.
    order = rng.permutation(c.pool_size)
    position = np.argsort(order)  # old index -> new index
    x, y, noisy, outlier = x[order], y[order], noisy[order], outlier[order]
    duplicate_of = duplicate_of[order]
    duplicate_of = np.where(duplicate_of >= 0, position[duplicate_of], -1)

    def name(i):
        tag = (" noisy" if noisy[i] else " outlier" if outlier[i]
               else f" dup-of-d{duplicate_of[i]:02d}" if duplicate_of[i] >= 0 else "")
        return f"d{i:02d}{tag}"

    def queries(n):
        qx = rng.standard_normal((n, d))
        qy = qx @ w + c.pool_noise * rng.standard_normal(n)
        encoded = np.asarray(encode_queries(qx.astype(np.float32)))[:, None, :]
        return qx.astype(np.float32), encoded, qy.astype(np.float32)

    x, y = x.astype(np.float32), y.astype(np.float32)
    query_x, encoded, query_y = queries(c.num_targets)
    heldout_x, heldout, heldout_y = queries(c.num_heldout_queries)
    return {
        "w_star": w.astype(np.float32), "pool_x": x, "pool_y": y,
        "pool_noisy": noisy, "pool_outlier": outlier,
        "pool_duplicate_of": duplicate_of.astype(np.int64),
        "pool": np.asarray(encode_pairs(x, y)),
        "names": tuple(name(i) for i in range(c.pool_size)),
        "query_x": query_x, "queries": encoded, "query_labels": query_y,
        "heldout_x": heldout_x, "heldout": heldout, "heldout_labels": heldout_y,
    }


def icl_regression_workload(preset: str = "cpu", **overrides) -> ICLRegressionWorkload:
    """Builds (and trains) the in-context linear-regression workload.

    Args:
      preset: one of :data:`PRESETS` (``"cpu"``, ``"tiny"``).
      **overrides: :class:`ICLRegressionConfig` fields to change (validated
        by name, as every workload factory of the pipeline's registry).

    Returns:
      The :class:`ICLRegressionWorkload`, its transformer trained.
    """
    return with_preset_defaults(
        ICLRegressionWorkload(config_from_preset(PRESETS, preset, overrides)), preset)
