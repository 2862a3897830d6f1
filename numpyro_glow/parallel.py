"""Data-parallel training on several devices with JAX's own sharding.

A one-axis :class:`jax.sharding.Mesh` over the batch: every training batch is split
along axis 0 across the devices (``PartitionSpec("batch")``), the parameters and the
optimiser state are replicated on all of them (``PartitionSpec()``), and ``jax.jit``
inserts the all-reduce of the gradients. The numbers are those of a single device up
to the order of float32 sums: the random bits are drawn with JAX's partitionable
Threefry (the default), so a sharded draw equals the unsharded one.

Across hosts, call :func:`jax.distributed.initialize` first (``numpyro-glow train
--distributed``): then :func:`jax.devices` lists the devices of every process, and
each process, which computes the same global batch, places only its own slices.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "BATCH_AXIS",
    "batch_sharding",
    "check_batch_size",
    "make_mesh",
    "replicate",
    "replicated_sharding",
    "resolve_devices",
    "shard_batch",
    "shard_local_batch",
]

BATCH_AXIS = "batch"


def resolve_devices(devices: int | str | None) -> list[jax.Device]:
    """The first ``devices`` of :func:`jax.devices` (``None``: one; ``"all"``: all).

    ``ValueError`` if more are asked for than exist, saying how to get more host
    (CPU) devices.
    """
    available = jax.devices()
    if devices is None:
        return available[:1]
    if devices == "all":
        return list(available)
    if isinstance(devices, str):
        if not devices.isdigit():
            raise ValueError(f"expected devices to be a positive integer or 'all', got {devices!r}")
        devices = int(devices)
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"expected devices to be a positive integer or 'all', got {devices!r}")
    if devices > len(available):
        raise ValueError(
            f"{devices} devices requested but only {len(available)} "
            f"{available[0].platform.upper()} device(s) exist. For N devices on a CPU, set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N in the environment before "
            "JAX is imported (for several hosts, see jax.distributed.initialize / --distributed)"
        )
    return available[:devices]


def make_mesh(devices: int | str | None = "all") -> Mesh:
    """A one-axis mesh named :data:`BATCH_AXIS` over the devices :func:`resolve_devices`
    picks (an int ``N`` for the first N of :func:`jax.devices`, or ``"all"``)."""
    return Mesh(np.array(resolve_devices(devices)), (BATCH_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Axis 0 split over the mesh, the other axes whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """``ValueError`` unless ``batch_size`` divides evenly over the mesh's devices."""
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(
            f"batch size {batch_size} is not divisible by the number of devices {n}; "
            f"use a batch size that is a multiple of {n}"
        )


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    """``jax.device_put``; with devices of other processes in the mesh, each process
    places its own slices of ``x`` (the same global value in every process)."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def shard_batch(x: Any, mesh: Mesh) -> Any:
    """Every array leaf of ``x`` split along axis 0 over the mesh (``None`` stays
    ``None``). Axis 0 must divide evenly over the devices (:func:`check_batch_size`)."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda a: _put(a, sharding), x)


def shard_local_batch(x: Any, mesh: Mesh) -> Any:
    """A global batch from each process's own rows: every array leaf of ``x`` (this
    process's consecutive rows, processes in order) becomes the process's part
    of axis 0 of the global array (``None`` stays ``None``)."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), x
    )


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every array leaf of ``tree`` (parameters, optimiser state, a PRNG key) copied
    to every device of the mesh."""
    sharding = replicated_sharding(mesh)
    return jax.tree.map(lambda a: _put(a, sharding), tree)
