"""The 2-D device mesh `('data', 'model')` that every sharding in a run refers to."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh

from softprompt_jax.errors import SoftpromptError
from softprompt_jax.partitioning.rules import DATA, MODEL


def make_mesh(data: int = -1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `(data, model)` mesh over all devices (every process's), or over `devices` if given.

    `data=-1` takes whatever `model` leaves. Unlike T5X's CPU mesh (which makes every local CPU
    device a model shard), the requested sizes are honoured on every backend. Devices are laid
    out by `jax.make_mesh`, which follows the TPU topology, so the model axis stays on fast links.
    """
    pool = list(jax.devices() if devices is None else devices)
    count = len(pool)
    if model < 1 or data == 0 or data < -1:
        raise SoftpromptError(
            f"mesh sizes must be positive (data may be -1): data={data}, model={model}"
        )
    if data == -1:
        if count % model:
            raise SoftpromptError(
                f"model={model} does not divide the {count} available devices, so data=-1 "
                "cannot fill the mesh"
            )
        data = count // model
    if data * model > count:
        raise SoftpromptError(
            f"mesh data={data} x model={model} needs {data * model} devices; "
            f"only {count} are available"
        )
    if data * model < count and devices is None:
        raise SoftpromptError(
            f"mesh data={data} x model={model} uses {data * model} of the {count} devices; "
            "use them all (data=-1 fills the data axis) or pass devices= to pick a subset"
        )
    return jax.make_mesh(
        (data, model),
        (DATA, MODEL),
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=pool[: data * model],
    )
