"""Many hosts, one program: start-up, which data each process reads, global batches, host I/O.

Every process runs the same code. Each reads only its shard of the data (seqio `ShardInfo`),
hands its local batch to `global_batch`, and only the main process writes files and logs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from softprompt_jax.errors import SoftpromptError
from softprompt_jax.partitioning.rules import Rules
from softprompt_jax.partitioning.shardings import batch_sharding

COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
    timeout_s: int = 300,
) -> bool:
    """Start `jax.distributed` from flags, `$JAX_COORDINATOR_ADDRESS`, or (`auto`) the TPU pod.

    Call before anything touches a device. Without flags, the variable or `auto`, the run is
    single-process and nothing happens. With a coordinator, unset counts are detected from the
    TPU/Slurm/MPI environment. Returns whether `jax.distributed` is now running.
    """
    if jax.distributed.is_initialized():
        return True
    explicit = (coordinator_address, num_processes, process_id) != (None, None, None)
    if not (explicit or auto or os.environ.get(COORDINATOR_ENV)):
        return False
    jax.distributed.initialize(
        coordinator_address, num_processes, process_id, initialization_timeout=timeout_s
    )
    return True


def is_main_process() -> bool:
    """Whether this process writes checkpoints, metrics and logs (process 0)."""
    return jax.process_index() == 0


def configure_logging(level: int = logging.INFO) -> None:
    """Log at `level` on the main process and only warnings and errors on the others."""
    logging.getLogger().setLevel(level if is_main_process() else logging.WARNING)


def data_shard_info(mesh: Mesh, axis: str = "data") -> tuple[int, int]:
    """`(index, count)` of this process's data shard: processes holding the same rows share one.

    When the model axis spans several hosts, those hosts hold the same batch rows and must read
    the same data, so the count is the number of distinct row sets, not the process count.
    """
    position = mesh.axis_names.index(axis)
    rows: dict[int, set[int]] = {}
    for index, device in np.ndenumerate(mesh.devices):
        rows.setdefault(device.process_index, set()).add(index[position])
    distinct = sorted({tuple(sorted(held)) for held in rows.values()})
    return distinct.index(tuple(sorted(rows[jax.process_index()]))), len(distinct)


def seqio_shard_info(mesh: Mesh) -> Any:
    """`seqio.ShardInfo` for `seqio.get_dataset(..., shard_info=...)` on this process."""
    import seqio  # imported here: it pulls in TensorFlow

    index, count = data_shard_info(mesh)
    return seqio.ShardInfo(index=index, num_shards=count)


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """Examples this process feeds per step; checks the global batch fits the data axis."""
    data = mesh.shape["data"]
    if global_batch_size % data:
        raise SoftpromptError(
            f"batch size {global_batch_size} is not divisible by the data axis size {data}"
        )
    _, shards = data_shard_info(mesh)
    return global_batch_size // shards


def global_batch(
    local_batch: Mapping[str, Any], mesh: Mesh, rules: Rules | None = None
) -> dict[str, jax.Array]:
    """Assemble per-process batches into global arrays split over the data axis."""
    _, shards = data_shard_info(mesh)
    data = mesh.shape["data"]
    sharding = batch_sharding(mesh, rules)
    out = {}
    for name, value in local_batch.items():
        value = np.asarray(value)
        size = value.shape[0] * shards
        if size % data:
            raise SoftpromptError(
                f"feature {name!r}: global batch size {size} ({value.shape[0]} per process x "
                f"{shards} data shards) is not divisible by the data axis size {data}"
            )
        out[name] = jax.make_array_from_process_local_data(
            sharding, value, (size, *value.shape[1:])
        )
    return out


def to_host(tree: Any) -> Any:
    """Numpy copies on every process: replicated arrays locally, sharded ones via all-gather."""

    def fetch(x: Any) -> np.ndarray:
        if not isinstance(x, jax.Array):
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree_util.tree_map(fetch, tree)


def sync(name: str) -> None:
    """Barrier across processes (e.g. around checkpoint writes); a no-op with one process."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
