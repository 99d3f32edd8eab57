"""Shardings for everything a prompt-tuning run holds: frozen params, prompt state and batches.

Frozen params follow the logical-axis rules. A dimension that the mesh axis does not divide
(e.g. T5 small's 6 relpos heads over model=4) is replicated instead, with a warning: JAX does
not allow uneven shards for jit arguments. The prompt, its optimizer slots, rngs and metrics
are tiny and replicated. Batches are split along `batch` (the data axis).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding

from softprompt_jax.model.families import ModelConfig, logical_axes, param_shapes
from softprompt_jax.partitioning.rules import Rules, standard_logical_axis_rules

log = logging.getLogger(__name__)


def resolve_spec(
    logical: Sequence[str | None],
    shape: Sequence[int],
    axis_sizes: Mapping[str, int],
    rules: Rules,
    name: str = "array",
) -> PartitionSpec:
    """Mesh-axis spec for an array with `logical` axis names; non-dividing axes are replicated."""
    if len(logical) != len(shape):
        raise ValueError(f"{name}: logical axes {tuple(logical)} do not fit shape {tuple(shape)}")
    entries = []
    for dim, entry in zip(shape, nn.logical_to_mesh_axes(tuple(logical), rules)):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        ways = math.prod(axis_sizes[axis] for axis in axes)
        if dim % ways:
            log.warning(
                "%s: dimension of size %d (shape %s) is not divisible by mesh axis %s "
                "of size %d; replicating it",
                name,
                dim,
                tuple(shape),
                entry,
                ways,
            )
            entry = None
        entries.append(entry)
    return PartitionSpec(*entries)


def param_specs(
    cfg: ModelConfig, axis_sizes: Mapping[str, int], rules: Rules | None = None
) -> dict:
    """Mesh-axis `PartitionSpec` per frozen param, for a mesh of the given axis sizes."""
    rules = standard_logical_axis_rules() if rules is None else rules
    return jax.tree_util.tree_map_with_path(
        lambda path, names, shape: resolve_spec(
            tuple(names), shape.shape, axis_sizes, rules, name=_path_name(path)
        ),
        logical_axes(cfg),
        param_shapes(cfg),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules: Rules | None = None) -> dict:
    """`NamedSharding` per frozen param: where each device's slice of the model lives."""
    return jax.tree_util.tree_map(
        lambda spec: NamedSharding(mesh, spec),
        param_specs(cfg, dict(mesh.shape), rules),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole value: prompt, optimizer slots, step, rng, metrics."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Rules | None = None) -> NamedSharding:
    """Leading (`batch`) dimension split over the data axis; one sharding for every feature."""
    rules = standard_logical_axis_rules() if rules is None else rules
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch",), rules))


def _path_name(path: tuple) -> str:
    return "/".join(str(getattr(key, "key", key)) for key in path)


def place(tree: Any, shardings: Any) -> Any:
    """Put host or device arrays onto `shardings` (a tree, or a prefix of `tree`, of shardings).

    With several processes each host passes the same full value and keeps only its shards.
    """

    def put(sharding: Sharding, value: Any) -> jax.Array:
        if isinstance(value, jax.Array) and value.sharding == sharding:
            return value
        if jax.process_count() == 1 or (
            isinstance(value, jax.Array) and not value.is_fully_addressable
        ):
            return jax.device_put(value, sharding)
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(
        lambda sharding, subtree: jax.tree_util.tree_map(lambda x: put(sharding, x), subtree),
        shardings,
        tree,
        is_leaf=lambda x: isinstance(x, Sharding),
    )
