"""The subset axis on devices: one mesh axis, ``"subsets"``.

Every chunk of subsets (masks, with their per-row keys or parameters) is split
over the devices of a :class:`jax.sharding.Mesh` along its leading axis
(``NamedSharding(mesh, P("subsets"))``); what every subset shares (the model's
parameters, the data, the target) is replicated on every device
(``NamedSharding(mesh, P())``), and the arrays carry these shardings into
``jax.jit``. Programs whose rows never interact run per device
(:func:`per_shard`, ``jax.shard_map``: retraining, the full-space solve), with
no communication; the others are split by XLA's SPMD
partitioner (GSPMD: the projected convex solve, whose vmapped ``while_loop``
shares its "any row still running" flag, and the subset searches, whose
objective is any traceable function and whose exhaustive minimum is reduced
over the devices). Either way a device computes what one device would for
its rows.

Devices and hosts:

- :func:`subset_mesh` with no argument spans ``jax.devices()``: every local
  device of a single process, or, after ``jax.distributed.initialize()``, every
  device of every process. Pass ``subset_mesh(jax.local_devices())`` to keep a
  call on one process.
- With several processes every process runs the same program on the same
  arguments (SPMD): arrays are built from each process's full copy
  (:func:`shard_subsets`, :func:`replicate`: no data crosses processes on the
  way in), each process's devices compute their rows, and :func:`to_host`
  gathers the results so that every process holds all of them.
- A mesh may have other axes as well: the arrays are replicated over them.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

SUBSET_AXIS = "subsets"


def subset_mesh(devices=None) -> Mesh:
    """A one-axis mesh ``("subsets",)`` over ``devices``.

    Args:
      devices: a sequence of devices; ``None`` is ``jax.devices()`` (all the
        devices of all processes: with ``jax.distributed`` a multi-host mesh).

    Returns:
      ``jax.sharding.Mesh`` with the single axis ``"subsets"``.
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("devices must hold at least one device, got none.")
    return Mesh(np.asarray(devices, dtype=object), (SUBSET_AXIS,))


def check_mesh(mesh) -> Mesh:
    """``mesh`` validated (``None``: :func:`subset_mesh` of all devices).

    Raises:
      TypeError: ``mesh`` is not a ``jax.sharding.Mesh``.
      ValueError: ``mesh`` has no ``"subsets"`` axis.
    """
    if mesh is None:
        return subset_mesh()
    if not isinstance(mesh, Mesh):
        raise TypeError(
            "mesh must be a jax.sharding.Mesh with a 'subsets' axis (e.g. "
            f"tasksurrogate_jax.truth.sharding.subset_mesh()) or None, got "
            f"{type(mesh).__name__}.")
    if SUBSET_AXIS not in mesh.axis_names:
        raise ValueError(
            f"mesh must have an axis named {SUBSET_AXIS!r} (the axis the subsets "
            f"are split over), got axes {tuple(mesh.axis_names)}.")
    return mesh


def num_shards(mesh: Mesh) -> int:
    """The number of devices the subset axis is split over."""
    return int(mesh.shape[SUBSET_AXIS])


def round_up(size: int, mesh: Mesh) -> int:
    """``size`` rounded up to a multiple of the subset axis's length."""
    shards = num_shards(mesh)
    return -(-int(size) // shards) * shards


def num_local_devices(mesh: Mesh) -> int:
    """The devices of ``mesh`` that belong to this process."""
    index = jax.process_index()
    return sum(d.process_index == index for d in mesh.devices.flat)


def is_multiprocess(mesh: Mesh) -> bool:
    """Whether ``mesh`` spans devices of other processes."""
    return num_local_devices(mesh) != mesh.size


def subset_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over ``"subsets"``, the rest whole."""
    return NamedSharding(mesh, P(SUBSET_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of ``mesh``."""
    return NamedSharding(mesh, P())


def shard_subsets(tree, mesh: Mesh):
    """The arrays of ``tree`` with their leading (subset) axis split over
    ``mesh``; the leading axis must be a multiple of :func:`num_shards`."""
    return jax.tree.map(lambda x: _put(x, subset_sharding(mesh)), tree)


def replicate(tree, mesh: Mesh):
    """The arrays of ``tree`` copied to every device of ``mesh`` (Python
    scalars and other non-array leaves are left as they are)."""
    return jax.tree.map(lambda x: _put(x, replicated_sharding(mesh)), tree)


def per_shard(fn, mesh: Mesh, batched=(True,)):
    """``fn`` run by each device on its own rows (``jax.shard_map``).

    For programs whose rows never interact (a ``vmap`` or ``lax.map`` of one
    subset's program): each device runs ``fn`` on its share of the rows, with
    no communication. GSPMD can do worse on such programs: it runs a
    ``lax.map`` whole on every device, and gathers the rows before an
    operation it does not split (XLA's ``TopK``, the mini-batch draw).

    Args:
      fn: ``fn(*args)`` returning a pytree of arrays with a leading row axis.
      mesh: the mesh.
      batched: per positional argument, whether it has a leading row axis
        (split over ``"subsets"``) or is shared (replicated).

    Returns:
      A function of the same arguments (to call under ``jax.jit``).
    """
    in_specs = tuple(P(SUBSET_AXIS) if b else P() for b in batched)
    # check_vma=False: third-party loops (optax's L-BFGS line search) mix
    # per-device and replicated values in lax.cond branches, which the
    # varying-axis check refuses; rows never meet here.
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=P(SUBSET_AXIS),
                         check_vma=False)


def to_host(tree):
    """The arrays of ``tree`` as NumPy arrays holding every row (``None``
    leaves stay ``None``).

    A sharded array that spans other processes is gathered from them
    (``multihost_utils.process_allgather``): every process must call this.
    """
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def _put(x, sharding: NamedSharding):
    """``x`` placed with ``sharding``; non-array leaves are returned as they are."""
    if not isinstance(x, (jax.Array, np.ndarray, np.generic)):
        return x
    if sharding.is_fully_addressable or (
            isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    # Several processes: each one fills its own devices' shards from its full
    # copy (the same on every process: SPMD), without a cross-process check.
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype,
                                                         jax.dtypes.prng_key):
        data = _put(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding,
                                        lambda index: host[index])


__all__ = [
    "SUBSET_AXIS",
    "check_mesh",
    "is_multiprocess",
    "num_local_devices",
    "num_shards",
    "per_shard",
    "replicate",
    "replicated_sharding",
    "round_up",
    "shard_subsets",
    "subset_mesh",
    "subset_sharding",
    "to_host",
]
