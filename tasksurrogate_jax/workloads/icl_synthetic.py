"""In-context learning: the synthetic token workload (docs/method.md).

:func:`icl_workload` builds a :class:`SyntheticICLWorkload`, an
:class:`~tasksurrogate_jax.workloads.icl.ICLWorkload` that trains its own
small decoder-only transformer (no weights can be downloaded here) to learn
in context, and draws the pool and queries from one fixed task.

The synthetic token family (a random token-to-label map with a distractor
feature, where in-context learning is induction-head copying):

- a *task* is a random map ``f`` from ``num_symbols`` symbols to
  ``num_labels`` labels;
- a demonstration is ``[distractor, symbol, label]`` with ``label = f(symbol)``
  (flipped to another label with probability ``train_label_noise``) and a
  distractor token that carries no information; a query is
  ``[distractor, symbol]``, and the model predicts its label at the symbol;
- training sequences hold ``max_demos`` demonstrations of a fresh task and a
  query, with the loss at every label position (0 to ``max_demos`` shots);
- the attribution pool is ``pool_size`` demonstrations of one fixed task
  (``world_seed``), a fraction ``pool_label_noise`` of them with a wrong label,
  so some demonstrations help a query, some hurt it and most do nothing; a
  demonstration helps only queries with its symbol, and two with the same
  symbol are redundant, so demonstrations interact.

Token ids: symbols ``[0, S)``, distractors ``[S, S + D)``, labels
``[S + D, S + D + C)``. The model outputs ``C`` label logits per position.

Presets (:data:`PRESETS`): ``"cpu"`` (trains in about a minute on 2 cores),
``"paper"`` (larger model and pool, for GPU/TPU), ``"tiny"`` (tests,
notebook in CI).
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
from tasksurrogate_jax.losses import softmax_cross_entropy
from tasksurrogate_jax.workloads.base import config_from_preset
from tasksurrogate_jax.workloads.icl import ICLWorkload, PromptScorer
from tasksurrogate_jax.workloads.transformer import (
    TransformerBlock,
    train_on_fresh_batches,
)


@dataclasses.dataclass(frozen=True)
class ICLConfig:
    """Configuration of the synthetic in-context-learning workload.

    Attributes:
      num_symbols: S, the symbols a task maps to labels.
      num_distractors: D, distractor tokens (no information about the label).
      num_labels: C, the labels.
      max_demos: demonstrations per training sequence (the context holds
        ``3 * max_demos + 2`` tokens).
      train_label_noise: probability that a training demonstration's label is
        flipped to another one.
      depth, width, heads, mlp_ratio: the transformer.
      learning_rate, warmup_steps, weight_decay, batch_size, num_steps:
        AdamW with linear warm-up and cosine decay.
      seed: model initialisation and training sequences.
      pool_size: K, the candidate demonstrations (the tasks).
      pool_label_noise: fraction of the pool with a wrong label (rounded).
      num_targets: T, target queries.
      num_heldout_queries: queries kept out of the targets.
      world_seed: the fixed task, the pool and the queries.
    """

    num_symbols: int = 8
    num_distractors: int = 8
    num_labels: int = 2
    max_demos: int = 8
    train_label_noise: float = 0.1
    depth: int = 2
    width: int = 64
    heads: int = 4
    mlp_ratio: int = 4
    learning_rate: float = 3e-3
    warmup_steps: int = 200
    weight_decay: float = 0.01
    batch_size: int = 64
    num_steps: int = 2500
    seed: int = 0
    pool_size: int = 50
    pool_label_noise: float = 0.2
    num_targets: int = 32
    num_heldout_queries: int = 256
    world_seed: int = 1

    @property
    def vocab_size(self) -> int:
        return self.num_symbols + self.num_distractors + self.num_labels

    @property
    def max_length(self) -> int:
        return 3 * self.max_demos + 2


PRESETS: dict[str, ICLConfig] = {
    # 58-80 s of training on 2 cores; 4-shot query accuracy near the
    # best a learner can reach with 10% label noise (benchmarks/README.md).
    "cpu": ICLConfig(),
    # Larger model, vocabulary and pool, for GPU/TPU.
    "paper": ICLConfig(
        num_symbols=16, num_distractors=16, max_demos=16, depth=4, width=128,
        heads=4, batch_size=128, num_steps=20_000, learning_rate=1e-3,
        pool_size=100, num_targets=128, num_heldout_queries=1024,
    ),
    # Tests and the notebook in CI: about 15 seconds of training.
    "tiny": ICLConfig(
        width=32, num_steps=1000, learning_rate=5e-3, pool_size=20,
        num_targets=16, num_heldout_queries=128,
    ),
}


class ICLTransformer(nnx.Module):
    """Decoder-only transformer: tokens ``[..., length]`` -> label logits
    ``[..., length, num_labels]`` at every position.

    Split in two for the linearization: :meth:`embed_tokens` (token plus
    learned position embeddings) and :meth:`logits_from_embeddings`.
    """

    def __init__(self, config: ICLConfig, *, rngs: nnx.Rngs):
        c = config
        self.embed = nnx.Embed(c.vocab_size, c.width, rngs=rngs)
        self.pos = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (c.max_length, c.width),
                                     jnp.float32))
        self.blocks = nnx.List(
            [TransformerBlock(c.width, c.heads, c.mlp_ratio, rngs=rngs)
             for _ in range(c.depth)])
        self.ln_f = nnx.LayerNorm(c.width, rngs=rngs)
        self.unembed = nnx.Linear(c.width, c.num_labels, rngs=rngs)

    def embed_tokens(self, tokens):
        """``[..., length]`` int -> ``[..., length, width]``."""
        return self.embed(tokens) + self.pos[: tokens.shape[-1]]

    def logits_from_embeddings(self, x):
        """``[..., length, width]`` -> ``[..., length, num_labels]`` (causal)."""
        mask = nnx.make_causal_mask(x[..., 0])
        for block in self.blocks:
            x = block(x, mask)
        return self.unembed(self.ln_f(x))

    def __call__(self, tokens):
        return self.logits_from_embeddings(self.embed_tokens(tokens))


def sample_sequences(key, config: ICLConfig, batch_size: int, *, num_demos=None):
    """Training sequences of fresh random tasks.

    Returns:
      ``(tokens [batch, 3 n + 2], shown [batch, n + 1], clean [batch, n + 1])``
      with ``n = num_demos`` (default ``max_demos``): the token ids, the label
      shown for each demonstration (noisy) and the task's true labels; position
      ``3 j + 1`` predicts label ``j`` (``j = n`` is the query).
    """
    c = config
    n = c.max_demos if num_demos is None else num_demos
    k_map, k_sym, k_dis, k_flip, k_shift = jax.random.split(key, 5)
    task = jax.random.randint(k_map, (batch_size, c.num_symbols), 0, c.num_labels)
    symbols = jax.random.randint(k_sym, (batch_size, n + 1), 0, c.num_symbols)
    distractors = jax.random.randint(k_dis, (batch_size, n + 1), 0, c.num_distractors)
    clean = jnp.take_along_axis(task, symbols, axis=1)
    flip = jax.random.bernoulli(k_flip, c.train_label_noise, (batch_size, n + 1))
    shift = jax.random.randint(k_shift, (batch_size, n + 1), 1, c.num_labels)
    shown = jnp.where(flip, (clean + shift) % c.num_labels, clean)
    tokens = jnp.stack(
        [c.num_symbols + distractors, symbols,
         c.num_symbols + c.num_distractors + shown], axis=-1,
    ).reshape(batch_size, -1)[:, :-1]
    return tokens.astype(jnp.int32), shown, clean


def train_icl_transformer(config: ICLConfig):
    """Trains the transformer on fresh random tasks (one compiled scan).

    Returns:
      ``(params, losses [num_steps])``: an ``nnx.State`` of the parameters and
      the training loss of every step.
    """
    c = config
    key = jax.random.key(c.seed)
    model = ICLTransformer(c, rngs=nnx.Rngs(params=jax.random.fold_in(key, 0)))
    graphdef, params = nnx.split(model, nnx.Param)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, c.learning_rate, min(c.warmup_steps, c.num_steps), c.num_steps)
    optimizer = optax.adamw(schedule, weight_decay=c.weight_decay)

    def batch_loss(p, step_key):
        tokens, shown, _ = sample_sequences(step_key, c, c.batch_size)
        logits = nnx.merge(graphdef, p)(tokens)[:, 1::3]
        return softmax_cross_entropy(logits, shown).mean()

    return train_on_fresh_batches(params, batch_loss, optimizer,
                                  num_steps=c.num_steps, key=jax.random.fold_in(key, 1))


class SyntheticICLWorkload(ICLWorkload):
    """The synthetic workload of :func:`icl_workload` (see the module docstring).

    Attributes:
      config: the :class:`ICLConfig`.
      model_params: the trained transformer's parameters (``nnx.State``).
      training_losses: ``[num_steps]`` training loss per step.
      world_task: ``[num_symbols]`` the fixed task's label of each symbol.
      pool_flipped: ``[pool_size]`` bool, demonstrations shown with a wrong label.
    """

    presets: ClassVar[dict[str, ICLConfig]] = PRESETS

    def __init__(self, config: ICLConfig):
        if not isinstance(config, ICLConfig):
            raise TypeError(
                f"config must be an ICLConfig, got {type(config).__name__}.")
        _check_config(config)
        c = self.config = config
        params, losses = train_icl_transformer(c)
        self.model_params, self.training_losses = params, np.asarray(losses)
        graphdef = nnx.graphdef(
            nnx.eval_shape(lambda: ICLTransformer(c, rngs=nnx.Rngs(0))))
        self._graphdef = graphdef

        def embed(p, tokens):
            return nnx.merge(graphdef, p).embed_tokens(tokens)

        def label_logits(p, embeddings):
            return nnx.merge(graphdef, p).logits_from_embeddings(embeddings)[-1]

        world = _world(c)
        self.world_task, self.pool_flipped = world["task"], world["flipped"]
        super().__init__(
            PromptScorer(params, embed, label_logits),
            world["pool"], world["queries"], world["query_labels"],
            max_length=c.max_length, heldout_queries=world["heldout"],
            heldout_labels=world["heldout_labels"], task_names=world["names"],
            description=(
                f"label cross-entropy of {c.num_targets} queries of one random "
                f"{c.num_symbols}-symbol task"),
        )

    def store_config(self) -> dict:
        """JSON description of the workload, for a results store."""
        return {"workload": self.name, **dataclasses.asdict(self.config)}

    def in_context_accuracy(self, key, *, num_sequences: int = 2000) -> np.ndarray:
        """Query accuracy against the true label after 0 to ``max_demos`` shots,
        on fresh tasks from the training distribution.

        Returns:
          ``[max_demos + 1]`` accuracy by number of demonstrations shown.
        """
        key = check_key(key)
        num_sequences = check_positive_int(num_sequences, "num_sequences")
        tokens, _, clean = sample_sequences(key, self.config, num_sequences)
        logits = nnx.merge(self._graphdef, self.model_params)(tokens)[:, 1::3]
        return np.asarray(jnp.mean(jnp.argmax(logits, -1) == clean, axis=0))


def _check_config(c: ICLConfig):
    for name in ("num_symbols", "num_distractors", "max_demos", "depth", "width",
                 "heads", "mlp_ratio", "batch_size", "num_steps", "pool_size",
                 "num_targets", "num_heldout_queries"):
        check_positive_int(getattr(c, name), name)
    check_positive_int(c.num_labels, "num_labels", minimum=2)
    check_positive_int(c.warmup_steps, "warmup_steps", minimum=0)
    if c.width % c.heads:
        raise ValueError(
            f"width must be divisible by heads, got width={c.width}, heads={c.heads}.")
    for name in ("train_label_noise", "pool_label_noise"):
        if not 0.0 <= getattr(c, name) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(c, name)}.")


def _world(c: ICLConfig) -> dict:
    """The fixed task, its demonstration pool and its queries (``world_seed``)."""
    rng = np.random.default_rng(c.world_seed)
    task = rng.integers(0, c.num_labels, c.num_symbols)
    # Every label appears, so the task is not constant.
    task[rng.choice(c.num_symbols, c.num_labels, replace=False)] = np.arange(
        c.num_labels)
    s, d = c.num_symbols, c.num_distractors

    def draw(n):
        symbols = rng.integers(0, s, n)
        distractors = rng.integers(0, d, n)
        return symbols, distractors

    symbols, distractors = draw(c.pool_size)
    flipped = np.zeros(c.pool_size, bool)
    flipped[rng.choice(c.pool_size, int(round(c.pool_label_noise * c.pool_size)),
                       replace=False)] = True
    labels = np.where(flipped, (task[symbols] + rng.integers(1, c.num_labels,
                                                             c.pool_size))
                      % c.num_labels, task[symbols])
    pool = np.stack([s + distractors, symbols, s + d + labels], 1)
    names = tuple(
        f"d{i:02d} s{sym}->{lab}{' (wrong)' if flip else ''}"
        for i, (sym, lab, flip) in enumerate(zip(symbols, labels, flipped,
                                                 strict=True)))

    def queries(n):
        sym, dis = draw(n)
        return np.stack([s + dis, sym], 1), task[sym]

    q, ql = queries(c.num_targets)
    h, hl = queries(c.num_heldout_queries)
    return {"task": task, "flipped": flipped, "pool": pool.astype(np.int32),
            "names": names, "queries": q.astype(np.int32), "query_labels": ql,
            "heldout": h.astype(np.int32), "heldout_labels": hl}


def icl_workload(preset: str = "cpu", **overrides) -> SyntheticICLWorkload:
    """Builds (and trains) the synthetic in-context-learning workload.

    Args:
      preset: one of :data:`PRESETS` (``"cpu"``, ``"paper"``, ``"tiny"``).
      **overrides: :class:`ICLConfig` fields to change.

    Returns:
      The :class:`SyntheticICLWorkload`, its transformer trained.
    """
    return with_preset_defaults(
        SyntheticICLWorkload(config_from_preset(PRESETS, preset, overrides)), preset)


# The pipeline's defaults of the "tiny" presets (fewer prompts, for tests).
PRESET_PIPELINE_DEFAULTS = {"tiny": {"num_subsets": 30, "num_heldout": 30}}


def with_preset_defaults(workload: ICLWorkload, preset: str) -> ICLWorkload:
    """``workload`` with the pipeline defaults of ``preset`` over its class's."""
    workload.pipeline_defaults = {**workload.pipeline_defaults,
                                  **PRESET_PIPELINE_DEFAULTS.get(preset, {})}
    return workload
