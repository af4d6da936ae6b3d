"""Ground truth by retraining: mask-weighted training, vmapped over subsets.

``F(s)`` for a subset ``s`` of tasks is the per-target loss of a model trained on
the tasks in ``s``. Every subset runs *the same training program*; only the
per-example weights ``w = mask_to_weights(s, task_ids)`` differ:

- **Loss.** Full batch: ``L(θ; w) = Σ_n w_n ℓ_n(θ) / Σ_n w_n``. Mini-batch:
  the same sum over the batch, normalised by the batch's kept weight.
- **Mini-batches** are drawn from the kept examples only: at each step a
  Gumbel score ``g_n`` is drawn for every example (from the step's key), the
  examples of dropped tasks get ``-inf``, and the ``batch_size`` best scores
  form the batch (``lax.top_k``): a uniform sample *without replacement* of the
  kept examples, fresh at every step (independent across steps, so there are
  no epochs). When a subset keeps fewer than ``batch_size`` examples the batch
  takes all of them, and the remaining slots have weight 0. With shared keys
  (the default) every subset sees the *same* Gumbel scores, so two subsets
  differing in one task draw nearly the same batches (common random numbers:
  the mask is the only difference). ``batch_size=None`` (or ``>=`` the number
  of examples) trains full batch.
- **Steps** are one ``lax.scan``; a chunk of masks is ``vmap``ped and the whole
  chunk is one ``jit``-compiled call (:func:`retrain_chunk`). The driver
  :func:`retrain` pads the last chunk to the same size, so the program
  compiles once.
- **Initialisation.** From scratch with ``init_fn(key)``: by default the same
  initialisation key and the same batch keys for every mask
  (``seeds="shared"``); ``seeds="independent"`` folds the subset's row index
  into the key (so results do not depend on the chunking). Or fine-tuning
  from given parameters ``init_params`` (e.g. ``θ*``), with a fresh optimizer
  state.

The model is any ``apply_fn(params, inputs[batch, ...]) -> outputs[batch, ...]``
with any per-example loss ``loss_fn(outputs, labels) -> [batch]`` and any optax
optimizer. Flax NNX models enter through ``nnx.split``/``nnx.merge`` (see
``workloads/modular.py``); this module does not import flax.

Results can be stored chunk by chunk (:mod:`tasksurrogate_jax.store`) and are
resumed: finished chunks are read back, not recomputed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tasksurrogate_jax._checks import as_typed_key, check_positive_int
from tasksurrogate_jax.chunking import pad_rows
from tasksurrogate_jax.data import (
    TargetData,
    TaskData,
    check_nonempty_masks,
    check_target_matches,
    mask_to_weights,
)
from tasksurrogate_jax.losses import argmax_accuracy, softmax_cross_entropy
from tasksurrogate_jax.store import ChunkStore, array_digest

SEED_MODES = ("shared", "independent")


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """The training program shared by every subset (hashable; a static argument).

    Attributes:
      apply_fn: ``apply_fn(params, inputs[batch, ...]) -> outputs[batch, ...]``.
      optimizer: an ``optax.GradientTransformation``.
      num_steps: optimizer steps per subset.
      batch_size: mini-batch size, or ``None`` for full batch.
      loss_fn: per-example loss ``(outputs, labels) -> [batch]``; also the
        target score.
      accuracy_fn: per-example correctness ``(outputs, labels) -> [batch]``, or
        ``None`` (no accuracy reported).
    """

    apply_fn: Callable
    optimizer: optax.GradientTransformation
    num_steps: int
    batch_size: int | None = None
    loss_fn: Callable = softmax_cross_entropy
    accuracy_fn: Callable | None = argmax_accuracy


def make_train_spec(
    *,
    apply_fn: Callable,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    batch_size: int | None = None,
    loss_fn: Callable = softmax_cross_entropy,
    accuracy_fn: Callable | None = argmax_accuracy,
) -> TrainSpec:
    """Validates and builds a :class:`TrainSpec` (see its attributes)."""
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}.")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")
    if accuracy_fn is not None and not callable(accuracy_fn):
        raise TypeError(
            f"accuracy_fn must be callable or None, got {type(accuracy_fn).__name__}."
        )
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(
            "optimizer must be an optax.GradientTransformation (with init and "
            f"update), got {type(optimizer).__name__}."
        )
    num_steps = check_positive_int(num_steps, "num_steps")
    if batch_size is not None:
        batch_size = check_positive_int(batch_size, "batch_size")
    return TrainSpec(apply_fn, optimizer, num_steps, batch_size, loss_fn, accuracy_fn)


class RetrainResult(NamedTuple):
    """Results for ``m`` subsets.

    Attributes:
      losses: ``[num_subsets, num_targets]`` per-target loss ``F(s)``.
      accuracy: ``[num_subsets, num_targets]`` per-target 0/1 correctness, or
        ``None`` when the spec has no ``accuracy_fn``.
      params: trained parameters stacked along a leading ``num_subsets`` axis,
        or ``None`` unless ``return_params=True``.
    """

    losses: jax.Array
    accuracy: jax.Array | None
    params: Any = None


# ---------------------------------------------------------------------------
# The single-subset program (pure, jittable, vmappable).


def train_on_weights(params, weights, key, data: TaskData, *, spec: TrainSpec):
    """Trains from ``params`` with per-example ``weights`` ``[num_examples]``.

    One ``lax.scan`` over ``spec.num_steps`` steps (see the module docstring for
    the loss normalisation and the batch sampling).

    Returns:
      The trained parameters.
    """
    n = data.num_examples
    full_batch = spec.batch_size is None or spec.batch_size >= n
    opt_state = spec.optimizer.init(params)

    def batch_loss(p, inputs, labels, w):
        per_example = spec.loss_fn(spec.apply_fn(p, inputs), labels)
        w = w.astype(per_example.dtype)
        return jnp.sum(w * per_example) / jnp.maximum(jnp.sum(w), 1e-30)

    def step(carry, step_key):
        p, s = carry
        if full_batch:
            inputs, labels, w = data.inputs, data.labels, weights
        else:
            gumbel = jax.random.gumbel(step_key, (n,), jnp.float32)
            score = jnp.where(weights > 0, gumbel, -jnp.inf)
            _, idx = jax.lax.top_k(score, spec.batch_size)
            inputs, labels, w = data.inputs[idx], data.labels[idx], weights[idx]
        grads = jax.grad(batch_loss)(p, inputs, labels, w)
        updates, s = spec.optimizer.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), None

    step_keys = jax.random.split(key, spec.num_steps)
    (params, _), _ = jax.lax.scan(step, (params, opt_state), step_keys)
    return params


def evaluate_targets(params, target: TargetData, *, spec: TrainSpec):
    """Per-target losses ``[T]`` and correctness ``[T]`` (or ``None``)."""
    outputs = spec.apply_fn(params, target.inputs)
    losses = spec.loss_fn(outputs, target.labels)
    acc = None if spec.accuracy_fn is None else spec.accuracy_fn(outputs, target.labels)
    return losses, acc


def _retrain_single(mask, params, key, data, target, spec):
    weights = mask_to_weights(mask, data.task_ids)
    trained = train_on_weights(params, weights, key, data, spec=spec)
    losses, acc = evaluate_targets(trained, target, spec=spec)
    return losses, acc, trained


@functools.partial(jax.jit, static_argnames=("spec",))
def retrain_one(mask, params, key, data: TaskData, target: TargetData, *, spec):
    """One subset, one compiled call (the loop baseline of the benchmark).

    Args:
      mask: ``[num_tasks]`` 0/1.
      params: initial parameters.
      key: batch-sampling key.
      data: training data.
      target: target data.
      spec: the :class:`TrainSpec` (static).

    Returns:
      ``(losses [T], accuracy [T] or None, trained params)``.
    """
    return _retrain_single(mask, params, key, data, target, spec)


@functools.partial(
    jax.jit, static_argnames=("spec", "params_batched", "keys_batched")
)
def retrain_chunk(
    masks, params, keys, data: TaskData, target: TargetData, *, spec,
    params_batched: bool = False, keys_batched: bool = False,
):
    """A chunk of subsets trained in one compiled, vmapped call.

    Args:
      masks: ``[chunk, num_tasks]`` 0/1.
      params: initial parameters, shared (``params_batched=False``) or with a
        leading ``chunk`` axis.
      keys: one batch-sampling key, or ``[chunk]`` keys (``keys_batched=True``).
      data: training data (shared).
      target: target data (shared).
      spec: the :class:`TrainSpec` (static).
      params_batched: whether ``params`` has a leading chunk axis (static).
      keys_batched: whether ``keys`` has a leading chunk axis (static).

    Returns:
      ``(losses [chunk, T], accuracy [chunk, T] or None, params [chunk, ...])``.
    """
    in_axes = (0, 0 if params_batched else None, 0 if keys_batched else None,
               None, None)
    fn = functools.partial(_retrain_single, spec=spec)
    return jax.vmap(fn, in_axes=in_axes)(masks, params, keys, data, target)


# ---------------------------------------------------------------------------
# Driver: chunks, memory, progress, store, resume.


def default_memory_budget() -> int:
    """Bytes a chunk may use: half the accelerator's limit, a quarter of host RAM."""
    device = jax.devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - backends without memory stats
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"] * 0.5)
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        ram = 8 * 2**30
    return int(ram * 0.25)


def _tree_bytes(tree) -> int:
    return sum(
        math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
    )


def estimate_subset_bytes(
    masks, params, key, data: TaskData, target: TargetData, *, spec: TrainSpec
) -> int:
    """Memory of one subset's training program, from XLA's memory analysis.

    Compiles the program for a chunk of one subset (ahead of time, not run) and
    adds its temporary, argument and output sizes, less the shared data. Falls
    back to ``24 x`` the parameter bytes when the backend gives no analysis.
    """
    try:
        lowered = retrain_chunk.lower(
            masks[:1], params, key, data, target, spec=spec
        )
        stats = lowered.compile().memory_analysis()
        total = (
            stats.temp_size_in_bytes
            + stats.output_size_in_bytes
            + _tree_bytes(params) * 2
        )
        return max(int(total), 1)
    except Exception:  # noqa: BLE001 - analysis unavailable on some backends
        return 24 * _tree_bytes(params) + 1


def choose_chunk_size(
    num_subsets: int, subset_bytes: int, *, memory_budget: int,
    max_chunk_size: int = 256,
) -> int:
    """Largest chunk within the memory budget, balanced to limit padding.

    Returns:
      ``c`` with ``c * subset_bytes <= memory_budget`` (at least 1), at most
      ``max_chunk_size`` and ``num_subsets``, and the chunks as even as possible.
    """
    fit = max(1, memory_budget // max(subset_bytes, 1))
    chunk = int(min(fit, max_chunk_size, num_subsets))
    num_chunks = -(-num_subsets // chunk)
    return -(-num_subsets // num_chunks)


def replicate_key(key, replicate: int):
    """The key of replicate ``replicate`` of a run with ``key``: ``fold_in``."""
    return jax.random.fold_in(as_typed_key(key), replicate)


def retrain(
    masks,
    *,
    data: TaskData,
    target: TargetData,
    spec: TrainSpec,
    key,
    init_fn: Callable | None = None,
    init_params=None,
    seeds: str = "shared",
    replicates: int | None = None,
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    store_dir=None,
    store_config: Mapping | None = None,
    return_params: bool = False,
    progress: bool = True,
) -> RetrainResult:
    """Trains one model per mask (and replicate) and scores the targets: ``F(s)``.

    Args:
      masks: ``[num_subsets, num_tasks]`` 0/1; every row must keep at least one
        training example.
      data: the training data (``num_tasks`` columns in ``masks``).
      target: the target data; each example is one score column.
      spec: the training program (:func:`make_train_spec`).
      key: PRNG key: ``init_key, batch_key = jax.random.split(key)`` with shared
        seeds; row ``j`` uses ``jax.random.split(jax.random.fold_in(key, j))``
        with independent seeds.
      init_fn: ``init_fn(key) -> params``, to train from scratch.
      init_params: parameters to fine-tune from (e.g. ``θ*``); exclusive with
        ``init_fn``.
      seeds: ``"shared"`` (default: every subset uses the same initialisation and
        batch keys, so the mask is the only difference) or ``"independent"``
        (row ``j`` uses ``fold_in(key, j)``).
      replicates: ``None`` for one run with ``key``; ``R >= 1`` for ``R`` paired
        replicates in the same compiled program: replicate ``r`` is exactly the
        run with :func:`replicate_key` ``(key, r)`` (its own initialisation, or
        the same ``init_params``, and its own batch order), shared by its masks.
      chunk_size: (mask, replicate) rows per compiled call; ``None`` picks the
        largest that fits ``memory_budget`` (from XLA's memory analysis; with an
        existing store, the stored chunk size).
      memory_budget: bytes a chunk may use (default: :func:`default_memory_budget`).
      store_dir: folder to save each finished chunk to (and resume from).
      store_config: JSON-serialisable description of what the arguments cannot
        show (model, optimizer, their hyperparameters); required with
        ``store_dir``. The store also records digests of the masks, data,
        target, key, initial parameters and the training settings, and refuses
        a folder holding a different configuration.
      return_params: also return the trained parameters (stacked).
      progress: show a tqdm progress bar over chunks.

    Returns:
      A :class:`RetrainResult` with ``losses`` ``[num_subsets, num_targets]``, or
      ``[replicates, num_subsets, num_targets]`` (and so the accuracy and the
      parameters' leading axes) when ``replicates`` is given.

    Raises:
      TypeError / ValueError: bad arguments (wrong mask width, masks that keep no
        examples, a target that does not match the data, a store folder of a
        different configuration, ...), each naming the argument.
    """
    masks = _check_retrain_args(masks, data, target, spec, init_fn, init_params,
                                seeds, store_dir, store_config)
    key = as_typed_key(key)
    if replicates is not None:
        replicates = check_positive_int(replicates, "replicates")
    if chunk_size is not None:
        chunk_size = check_positive_int(chunk_size, "chunk_size")
    num_masks = masks.shape[0]
    num_rows = num_masks * (replicates or 1)
    # One run with shared seeds trains every row from the same parameters and
    # batch key (nothing batched); otherwise each row gets its own keys.
    per_row = replicates is not None or seeds == "independent"
    scratch = init_params is None

    init_key, batch_key = jax.random.split(key)
    if not scratch:
        params0 = init_params
    elif per_row:
        params0 = jax.eval_shape(init_fn, init_key)  # shapes only; real per row
    else:
        params0 = jax.jit(init_fn)(init_key)

    if chunk_size is None:
        chunk_size = _auto_chunk_size(
            masks, params0, init_fn if scratch and per_row else None, init_key,
            batch_key, data, target, spec, num_rows=num_rows, store_dir=store_dir,
            memory_budget=memory_budget)
    store = None
    if store_dir is not None:
        store = ChunkStore(store_dir, {
            "kind": "retraining",
            "user": dict(store_config),
            "num_subsets": int(num_masks),
            "replicates": replicates,
            "num_tasks": int(data.num_tasks),
            "num_targets": int(target.num_targets),
            "masks": array_digest(np.asarray(masks)),
            "data": array_digest(data.inputs, data.labels, data.task_ids),
            "target": array_digest(target.inputs, target.labels),
            "key": np.asarray(jax.random.key_data(key)).ravel().tolist(),
            "seeds": seeds,
            "init": "init_fn" if scratch else array_digest(*jax.tree.leaves(params0)),
            "num_steps": spec.num_steps,
            "batch_size": spec.batch_size,
            "chunk_size": int(chunk_size),
            "return_params": bool(return_params),
            "accuracy": spec.accuracy_fn is not None,
        })

    chunks = range(-(-num_rows // chunk_size))
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=f"retraining ({chunk_size}/chunk)", unit="chunk")
    outputs = []
    for c in chunks:
        if store is not None and store.has_chunk(c):
            outputs.append(store.load_chunk(c))
            continue
        rows = np.arange(c * chunk_size, min((c + 1) * chunk_size, num_rows))
        padded = pad_rows(rows, chunk_size)
        params, keys = params0, batch_key
        if per_row:
            init_keys, keys = _row_keys(
                key, jnp.asarray(padded, jnp.uint32), num_masks=num_masks,
                replicated=replicates is not None,
                independent=seeds == "independent")
            if scratch:
                params = _init_rows(init_keys, init_fn=init_fn)
        trained = retrain_chunk(
            masks[padded % num_masks], params, keys, data, target, spec=spec,
            params_batched=per_row and scratch, keys_batched=per_row,
        )
        out = _chunk_arrays(rows, *trained, return_params=return_params)
        if store is not None:
            store.save_chunk(c, out)
        outputs.append(out)

    lead = (num_masks,) if replicates is None else (replicates, num_masks)
    return _assemble(outputs, lead, like=params0, accuracy=spec.accuracy_fn is not None,
                     return_params=return_params)


def _auto_chunk_size(masks, params0, init_fn, init_key, batch_key, data, target,
                     spec, *, num_rows, store_dir, memory_budget) -> int:
    """A stored run's chunk size, else the largest that fits the memory budget
    (``init_fn`` given: rows start from their own initialisation)."""
    stored = None if store_dir is None else _stored_chunk_size(store_dir)
    if stored is not None:
        return stored
    example = params0 if init_fn is None else jax.jit(init_fn)(init_key)
    subset_bytes = estimate_subset_bytes(masks, example, batch_key, data, target,
                                         spec=spec)
    budget = default_memory_budget() if memory_budget is None else memory_budget
    return choose_chunk_size(num_rows, subset_bytes, memory_budget=int(budget))


def _chunk_arrays(rows, losses, accuracy, trained, *, return_params) -> dict:
    """A finished chunk as named numpy arrays, padding rows dropped."""
    n = rows.size
    out = {"rows": rows, "losses": np.asarray(losses)[:n]}
    if accuracy is not None:
        out["accuracy"] = np.asarray(accuracy)[:n]
    if return_params:
        for i, leaf in enumerate(jax.tree.leaves(trained)):
            out[f"param_{i:05d}"] = np.asarray(leaf)[:n]
    return out


def _assemble(outputs, lead, *, like, accuracy: bool,
              return_params: bool) -> RetrainResult:
    """The chunks' arrays stacked with leading axes ``lead``."""

    def gather(name):
        stacked = np.concatenate([o[name] for o in outputs])
        return jnp.asarray(stacked.reshape(lead + stacked.shape[1:]))

    params_out = None
    if return_params:
        leaves = [gather(f"param_{i:05d}") for i in range(len(jax.tree.leaves(like)))]
        params_out = jax.tree.unflatten(jax.tree.structure(like), leaves)
    return RetrainResult(gather("losses"), gather("accuracy") if accuracy else None,
                         params_out)


def _check_retrain_args(masks, data, target, spec, init_fn, init_params, seeds,
                        store_dir, store_config):
    """Validates :func:`retrain`'s arguments; returns the checked masks."""
    if not isinstance(data, TaskData):
        raise TypeError(f"data must be a TaskData, got {type(data).__name__}.")
    if not isinstance(spec, TrainSpec):
        raise TypeError(
            f"spec must be a TrainSpec (make_train_spec), got {type(spec).__name__}."
        )
    check_target_matches(data, target)
    masks = check_nonempty_masks(masks, data)
    if (init_fn is None) == (init_params is None):
        raise ValueError(
            "give exactly one of init_fn (train from scratch) and init_params "
            "(fine-tune from given parameters)."
        )
    if init_fn is not None and not callable(init_fn):
        raise TypeError(f"init_fn must be callable, got {type(init_fn).__name__}.")
    if seeds not in SEED_MODES:
        raise ValueError(f"seeds must be one of {SEED_MODES}, got {seeds!r}.")
    if store_dir is not None and store_config is None:
        raise ValueError(
            "store_config is required with store_dir: describe the model and the "
            "optimizer (e.g. a workload's preset) so that a folder is never reused "
            "for a different configuration."
        )
    return masks


@functools.partial(jax.jit, static_argnames=("num_masks", "replicated",
                                             "independent"))
def _row_keys(key, rows, *, num_masks, replicated, independent):
    """(init keys, batch keys) of rows ``i = r * num_masks + j`` (replicate ``r``,
    mask ``j``): ``split`` of the run key (``fold_in(key, r)`` when replicated,
    else ``key``), folded with ``j`` first for independent seeds."""

    def one(i):
        run = jax.random.fold_in(key, i // num_masks) if replicated else key
        if independent:
            run = jax.random.fold_in(run, i % num_masks)
        return jax.random.split(run)

    pairs = jax.vmap(one)(rows)
    return pairs[:, 0], pairs[:, 1]


@functools.partial(jax.jit, static_argnames=("init_fn",))
def _init_rows(keys, *, init_fn):
    return jax.vmap(init_fn)(keys)


def _stored_chunk_size(store_dir) -> int | None:
    import json
    from pathlib import Path

    manifest = Path(store_dir) / "manifest.json"
    if not manifest.exists():
        return None
    try:
        return int(json.loads(manifest.read_text())["config"]["chunk_size"])
    except (ValueError, KeyError, TypeError):
        return None
