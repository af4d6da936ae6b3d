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

Results can be stored chunk by chunk (:mod:`tasksurrogate_jax.truth.store`) and are
resumed: finished chunks are read back, not recomputed.

**Devices.** Each chunk is split over the devices of a mesh
(:mod:`tasksurrogate_jax.truth.sharding`; default: every device): the masks and the
per-row keys and parameters along the ``"subsets"`` axis, the data, target and
shared parameters replicated, and every device trains its rows with no
communication (``jax.shard_map`` of the vmapped program). Compiled chunks are
padded to a multiple of the device count. With several processes
(``jax.distributed.initialize()``) every process calls :func:`retrain` with
the same arguments; each computes the rows of its devices and the results are
gathered so that every process returns all of them.
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
from tasksurrogate_jax.data import (
    TargetData,
    TaskData,
    check_nonempty_masks,
    check_target_matches,
    mask_to_weights,
)
from tasksurrogate_jax.losses import argmax_accuracy, softmax_cross_entropy
from tasksurrogate_jax.truth import sharding
from tasksurrogate_jax.truth.chunking import map_chunks, open_store
from tasksurrogate_jax.truth.fingerprint import array_digest, program_digest

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
    """Results for ``m`` subsets (with ``retrain(replicates=R)``, every array
    has a leading replicate axis ``R`` before the subsets').

    Attributes:
      losses: ``[num_subsets, num_targets]`` (or ``[R, num_subsets,
        num_targets]``) per-target loss ``F(s)``.
      accuracy: the same shape, per-target 0/1 correctness, or ``None`` when
        the spec has no ``accuracy_fn``.
      params: trained parameters stacked along the leading axes
        (``[num_subsets, ...]`` or ``[R, num_subsets, ...]``), or ``None``
        unless ``return_params=True``.
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
    return train_stepwise(params, weights, key, data, spec=spec,
                          apply_at_step=lambda p, step, inputs: spec.apply_fn(
                              p, inputs))[0]


def train_stepwise(params, weights, key, data: TaskData, *, spec: TrainSpec,
                   apply_at_step: Callable, record_every: int | None = None):
    """:func:`train_on_weights` with a model that may change with the step.

    ``apply_at_step(params, step, inputs)`` replaces ``spec.apply_fn`` (``step``:
    the step's index, a traced int); everything else (loss, optimizer, the
    batches of ``key``) is ``spec``'s program.

    Returns:
      ``(params, recorded)``: the trained parameters, and (``record_every``
      given) the parameters before steps ``0, record_every, 2 record_every,
      ...`` stacked on a leading axis (else ``None``). Recording holds every
      step's parameters before keeping those (``num_steps`` copies of
      ``params``: meant for the full-space models that are linearized
      along the path).
    """
    n = data.num_examples
    full_batch = spec.batch_size is None or spec.batch_size >= n
    opt_state = spec.optimizer.init(params)

    def batch_loss(p, step, inputs, labels, w):
        per_example = spec.loss_fn(apply_at_step(p, step, inputs), labels)
        w = w.astype(per_example.dtype)
        return jnp.sum(w * per_example) / jnp.maximum(jnp.sum(w), 1e-30)

    def step_fn(carry, step_and_key):
        p, s = carry
        step, step_key = step_and_key
        if full_batch:
            inputs, labels, w = data.inputs, data.labels, weights
        else:
            gumbel = jax.random.gumbel(step_key, (n,), jnp.float32)
            score = jnp.where(weights > 0, gumbel, -jnp.inf)
            _, idx = jax.lax.top_k(score, spec.batch_size)
            inputs, labels, w = data.inputs[idx], data.labels[idx], weights[idx]
        grads = jax.grad(batch_loss)(p, step, inputs, labels, w)
        updates, s = spec.optimizer.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), (
            None if record_every is None else p)

    step_keys = jax.random.split(key, spec.num_steps)
    (params, _), trajectory = jax.lax.scan(
        step_fn, (params, opt_state), (jnp.arange(spec.num_steps), step_keys))
    recorded = None if record_every is None else jax.tree.map(
        lambda leaf: leaf[::record_every], trajectory)
    return params, recorded


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


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), tree)


def train_program_digest(spec: TrainSpec, params, data: TaskData,
                         target: TargetData, *, key=None, init_fn=None) -> dict:
    """What one subset's training and scoring computes, as digests
    (:func:`~tasksurrogate_jax.truth.fingerprint.program_digest`).

    Args:
      spec: the training program.
      params: the parameters it starts from, or their shapes.
      data, target: arrays or shapes (only shapes and dtypes enter).
      key: a PRNG key of the kind the run uses (default ``jax.random.key(0)``).
      init_fn: also digest ``init_fn(key)`` (training from scratch).

    Returns:
      ``{"train": digest}`` of the model, loss, accuracy, optimizer with its
      hyperparameters and schedule, steps and batch size at the data's shapes;
      with ``init_fn``, also ``"init"``.
    """
    key = jax.random.key(0) if key is None else as_typed_key(key)
    mask = jax.ShapeDtypeStruct((data.num_tasks,), jnp.float32)
    out = {"train": program_digest(
        lambda m, p, k, d, t: _retrain_single(m, p, k, d, t, spec), mask,
        _abstract(params), _abstract(key), _abstract(data), _abstract(target))}
    if init_fn is not None:
        out["init"] = program_digest(init_fn, _abstract(key))
    return out


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
    jax.jit, static_argnames=("spec", "params_batched", "keys_batched", "mesh")
)
def retrain_chunk(
    masks, params, keys, data: TaskData, target: TargetData, *, spec,
    params_batched: bool = False, keys_batched: bool = False, mesh=None,
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
      mesh: ``None``, or a ``jax.sharding.Mesh`` (static) whose ``"subsets"``
        axis the chunk is split over: each device trains its rows
        (``jax.shard_map``; the chunk a multiple of the axis length).

    Returns:
      ``(losses [chunk, T], accuracy [chunk, T] or None, params [chunk, ...])``.
    """
    in_axes = (0, 0 if params_batched else None, 0 if keys_batched else None,
               None, None)
    fn = jax.vmap(functools.partial(_retrain_single, spec=spec), in_axes=in_axes)
    if mesh is not None:
        batched = tuple(axis == 0 for axis in in_axes)
        fn = sharding.per_shard(fn, mesh, batched)
    return fn(masks, params, keys, data, target)


# ---------------------------------------------------------------------------
# Driver: chunks, memory, progress, store, resume.


def default_memory_budget(*, mesh=None) -> int:
    """Bytes a chunk may use on each device.

    Half the accelerator's memory limit; on CPU (no limit reported), a quarter
    of the host's RAM, shared evenly by the devices of ``mesh`` that run in this
    process (simulated CPU devices share one memory).

    Args:
      mesh: the ``jax.sharding.Mesh`` the chunks run on (``None``: one device).
    """
    if mesh is None:
        device, sharing = jax.devices()[0], 1
    else:
        index = jax.process_index()
        local = [d for d in mesh.devices.flat if d.process_index == index]
        device, sharing = (local or [jax.devices()[0]])[0], max(len(local), 1)
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
    return int(ram * 0.25) // sharing


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
    max_chunk_size: int = 256, num_devices: int = 1,
) -> int:
    """Largest chunk within the memory budget, balanced to limit padding.

    Args:
      num_subsets: rows to compute.
      subset_bytes: memory of one row's program.
      memory_budget: bytes each device's share of a chunk may use.
      max_chunk_size: most rows per device.
      num_devices: devices a chunk is split over.

    Returns:
      ``num_devices * c``, where each device's share ``c`` has
      ``c * subset_bytes <= memory_budget`` (at least 1), at most
      ``max_chunk_size`` and ``ceil(num_subsets / num_devices)``, and the chunks
      are as even as possible.
    """
    per_device = -(-num_subsets // num_devices)
    fit = max(1, memory_budget // max(subset_bytes, 1))
    chunk = int(min(fit, max_chunk_size, per_device))
    num_chunks = -(-per_device // chunk)
    return -(-per_device // num_chunks) * num_devices


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
    mesh=None,
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
      chunk_size: (mask, replicate) rows per chunk (per stored chunk); ``None``
        picks the largest multiple of the device count that fits
        ``memory_budget`` on each device (from XLA's memory analysis; with an
        existing store, the stored chunk size). A compiled call pads its chunk
        to a multiple of the device count.
      memory_budget: bytes each device's share of a chunk may use (default:
        :func:`default_memory_budget`).
      store_dir: folder to save each finished chunk to (and resume from).
      store_config: optional JSON-serialisable description to record beside
        the store's key (a name, a preset). The key itself is everything that
        determines the numbers: digests of the masks, data, target, key,
        initial parameters (or ``init_fn``'s program), and of the training
        program (model, loss, accuracy, optimizer with its hyperparameters and
        schedule, steps, batch size: :func:`train_program_digest`), the dtype
        and the seeds. A folder holding another key is refused, naming what
        differs.
      return_params: also return the trained parameters (stacked).
      progress: show a tqdm progress bar over chunks (on process 0).
      mesh: a ``jax.sharding.Mesh`` with a ``"subsets"`` axis to split each
        chunk over (:func:`tasksurrogate_jax.truth.sharding.subset_mesh`); ``None``:
        every device (of every process, after ``jax.distributed.initialize()``;
        every process must then make the same call). The store does not depend
        on it: a run stored with one device count resumes with another (its
        rows agree to float rounding). With several processes, process 0
        writes the chunks and every process reads the finished ones back, so
        ``store_dir`` must be on a file system they share.

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
                                seeds, store_config)
    mesh = sharding.check_mesh(mesh)
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
            memory_budget=memory_budget, mesh=mesh)
    store = None if store_dir is None else open_store(store_dir, _store_key(
        masks, data, target, spec, key=key, params0=params0,
        init_fn=init_fn if scratch else None, replicates=replicates, seeds=seeds,
        chunk_size=chunk_size, return_params=return_params, user=store_config),
        mesh=mesh)
    shared = sharding.replicate(
        {"data": data, "target": target, "key": key, "batch_key": batch_key,
         "params": None if scratch and per_row else params0}, mesh)
    train_rows = _row_trainer(
        np.asarray(masks), shared, spec, init_fn=init_fn if scratch else None,
        replicates=replicates, per_row=per_row, independent=seeds == "independent",
        return_params=return_params, mesh=mesh)
    arrays = map_chunks(train_rows, num_rows, chunk_size=chunk_size, store=store,
                        mesh=mesh, progress=f"retraining ({chunk_size}/chunk)"
                        if progress else None)
    lead = (num_masks,) if replicates is None else (replicates, num_masks)
    return _result(arrays, lead, params0 if return_params else None,
                   accuracy=spec.accuracy_fn is not None)


def _store_key(masks, data: TaskData, target: TargetData, spec: TrainSpec, *, key,
               params0, init_fn, replicates, seeds, chunk_size, return_params,
               user) -> dict:
    """What a stored retraining depends on (see :func:`retrain`'s
    ``store_config``): ``init_fn`` is ``None`` when training from ``params0``."""
    return {
        "kind": "retraining",
        "user": dict(user or {}),
        "num_subsets": int(masks.shape[0]),
        "replicates": replicates,
        "num_tasks": int(data.num_tasks),
        "num_targets": int(target.num_targets),
        "masks": array_digest(np.asarray(masks)),
        "data": array_digest(data.inputs, data.labels, data.task_ids),
        "target": array_digest(target.inputs, target.labels),
        "key": np.asarray(jax.random.key_data(key)).ravel().tolist(),
        "seeds": seeds,
        "init": "init_fn" if init_fn is not None
        else array_digest(*jax.tree.leaves(params0)),
        "program": train_program_digest(spec, params0, data, target, key=key,
                                        init_fn=init_fn),
        "num_steps": spec.num_steps,
        "batch_size": spec.batch_size,
        "chunk_size": int(chunk_size),
        "return_params": bool(return_params),
        "accuracy": spec.accuracy_fn is not None,
    }


def _row_trainer(masks_host: np.ndarray, shared: dict, spec: TrainSpec, *,
                 init_fn, replicates, per_row: bool, independent: bool,
                 return_params: bool, mesh):
    """``train_rows(rows) -> {name: array}``: the chunk of (replicate, mask)
    row indices ``rows`` trained, dispatched (for :func:`map_chunks`).
    ``init_fn``: train from scratch (``None``: from ``shared["params"]``)."""
    num_masks = masks_host.shape[0]
    # Every compiled call has one shape: the chunk padded to the device count.
    split = mesh if sharding.num_shards(mesh) > 1 else None  # else: one program

    def train_rows(rows):
        params, keys = shared["params"], shared["batch_key"]
        if per_row:
            init_keys, keys = _row_keys(
                shared["key"], sharding.shard_subsets(rows.astype(np.uint32), mesh),
                num_masks=num_masks, replicated=replicates is not None,
                independent=independent)
            if init_fn is not None:
                params = _init_rows(init_keys, init_fn=init_fn)
        losses, accuracy, trained = retrain_chunk(
            sharding.shard_subsets(masks_host[rows % num_masks], mesh), params,
            keys, shared["data"], shared["target"], spec=spec,
            params_batched=per_row and init_fn is not None, keys_batched=per_row,
            mesh=split)
        out = {"losses": losses}
        if accuracy is not None:
            out["accuracy"] = accuracy
        if return_params:
            out.update({f"param_{i:05d}": leaf
                        for i, leaf in enumerate(jax.tree.leaves(trained))})
        return out

    return train_rows


def _result(arrays: dict, lead: tuple, params_like, *, accuracy: bool
            ) -> RetrainResult:
    """The :class:`RetrainResult` of :func:`map_chunks`' host ``arrays``, rows
    reshaped to ``lead`` and put on the device explicitly; ``params_like``:
    the parameters' structure (``None``: not returned)."""

    def gather(name):
        values = arrays.pop(name)
        return jax.device_put(values.reshape(lead + values.shape[1:]))  # explicit

    params_out = None
    if params_like is not None:
        leaves = [gather(f"param_{i:05d}")
                  for i in range(len(jax.tree.leaves(params_like)))]
        params_out = jax.tree.unflatten(jax.tree.structure(params_like), leaves)
    return RetrainResult(gather("losses"), gather("accuracy") if accuracy else None,
                         params_out)


def _auto_chunk_size(masks, params0, init_fn, init_key, batch_key, data, target,
                     spec, *, num_rows, store_dir, memory_budget, mesh) -> int:
    """A stored run's chunk size, else the largest multiple of the device count
    whose share fits each device's memory budget (``init_fn`` given: rows start
    from their own initialisation). With several processes, process 0's."""
    chunk = None if store_dir is None else _stored_chunk_size(store_dir)
    if chunk is None:
        example = params0 if init_fn is None else jax.jit(init_fn)(init_key)
        subset_bytes = estimate_subset_bytes(masks, example, batch_key, data,
                                             target, spec=spec)
        budget = (default_memory_budget(mesh=mesh) if memory_budget is None
                  else memory_budget)
        chunk = choose_chunk_size(num_rows, subset_bytes, memory_budget=int(budget),
                                  num_devices=sharding.num_shards(mesh))
    if sharding.is_multiprocess(mesh):  # hosts may differ in memory
        from jax.experimental import multihost_utils

        chunk = int(multihost_utils.broadcast_one_to_all(np.int64(chunk)))
    return chunk


def _check_retrain_args(masks, data, target, spec, init_fn, init_params, seeds,
                        store_config):
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
    if store_config is not None and not isinstance(store_config, Mapping):
        raise TypeError("store_config must be a mapping (JSON-serialisable) or None, "
                        f"got {type(store_config).__name__}.")
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
