"""Load frozen T5 weights straight into device shards, so no host ever holds the whole model.

For a T5X legacy checkpoint each device's slice is read on its own from the zarr chunks it
touches (a process reads only what its devices hold, once per distinct slice); `layers_N`
leaves are stacked slice by slice for a scanned model. Our own (orbax) format restores each
shard through orbax. Hugging Face safetensors are read whole on each host, then placed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import NamedSharding, PartitionSpec

from softprompt_jax.checkpoints import native, t5x_legacy
from softprompt_jax.checkpoints.pretrained import HUGGINGFACE, NATIVE, T5X, detect_format
from softprompt_jax.model import T5Config, infer_config_from_shapes, param_shapes
from softprompt_jax.model.scan import stack_layers, unstack_layers
from softprompt_jax.partitioning.shardings import place

Index = tuple[slice, ...]
_STACKS = ("encoder", "decoder")


def read_config(path: str | os.PathLike, dtype: str = "bfloat16") -> T5Config:
    """The model config of a checkpoint, from metadata only (no array data is read)."""
    kind, location = detect_format(path)
    if kind == T5X:
        shapes = t5x_legacy.open_checkpoint(location).shapes()
        return infer_config_from_shapes(shapes, dtype=jnp.dtype(dtype).name)
    if kind == NATIVE:
        config = json.loads((Path(location) / native.CONFIG_FILE).read_text())
        return T5Config.from_dict(config).replace(dtype=jnp.dtype(dtype).name)
    from softprompt_jax.checkpoints.huggingface import config_from_hf

    config = json.loads((Path(location) / "config.json").read_text())
    return config_from_hf(config, dtype=jnp.dtype(dtype).name)


def load_sharded(
    path: str | os.PathLike, cfg: T5Config, shardings: Any, dtype: str | None = None
) -> dict:
    """Frozen params as global arrays laid out by `shardings` (from `param_shardings`).

    `dtype` defaults to the compute dtype `cfg.dtype`: weights are stored once, as used.
    """
    dtype = jnp.dtype(dtype or cfg.dtype)
    kind, location = detect_format(path)
    if kind == T5X:
        return _load_t5x(t5x_legacy.open_checkpoint(location), cfg, shardings, dtype)
    if kind == NATIVE:
        return _load_native(Path(location).absolute(), cfg, shardings, dtype)
    assert kind == HUGGINGFACE
    from softprompt_jax.checkpoints.pretrained import load_pretrained

    with jax.default_device(jax.devices("cpu")[0]):  # host memory, not one accelerator's
        _, params = load_pretrained(location, dtype.name, config=cfg)
    return place(params, shardings)


def _load_t5x(
    checkpoint: t5x_legacy.T5XCheckpoint, cfg: T5Config, shardings: Any, dtype: jnp.dtype
) -> dict:
    """Each device's slice, read from its zarr chunks; shapes checked before any data read."""
    stored = checkpoint.shapes()
    expected = flatten_dict(param_shapes(cfg), sep="/")
    flat_shardings = flatten_dict(shardings, sep="/")
    readers = {key: _reader(checkpoint, stored, key, tuple(s.shape)) for key, s in expected.items()}
    out = {}
    for key, read in readers.items():
        out[tuple(key.split("/"))] = jax.make_array_from_callback(
            tuple(expected[key].shape),
            flat_shardings[key],
            _once_per_slice(lambda index, read=read: read(index, dtype)),
        )
    return unflatten_dict(out)


def _reader(
    checkpoint: t5x_legacy.T5XCheckpoint,
    stored: dict[str, tuple[int, ...]],
    key: str,
    shape: tuple[int, ...],
) -> Callable[[Index, jnp.dtype], np.ndarray]:
    """How to read `key` of the model from the checkpoint: directly, stacked or unstacked."""
    source = checkpoint.checkpoint_file
    stack, _, rest = key.partition("/")
    layer, _, leaf = rest.partition("/")
    if key in stored:
        _check(source, key, stored[key], shape)
        return lambda index, dtype: checkpoint.read(key, index, dtype)
    if stack in _STACKS and layer == "layers":  # scanned model, per-layer checkpoint
        names = [f"{stack}/layers_{i}/{leaf}" for i in range(shape[0])]
        for name in names:
            _check(source, name, stored.get(name), shape[1:])

        def read_stacked(index: Index, dtype: jnp.dtype) -> np.ndarray:
            picked = range(*index[0].indices(shape[0]))
            return np.stack([checkpoint.read(names[i], index[1:], dtype) for i in picked])

        return read_stacked
    if stack in _STACKS and layer.startswith("layers_"):  # per-layer model, scanned checkpoint
        name, i = f"{stack}/layers/{leaf}", int(layer.removeprefix("layers_"))
        whole = stored.get(name)
        _check(source, name, None if whole is None else whole[1:], shape)
        if whole[0] <= i:
            raise ValueError(f"{source}: {name} stacks {whole[0]} layers; {key} is missing")
        return lambda index, dtype: checkpoint.read(name, (slice(i, i + 1), *index), dtype)[0]
    raise ValueError(f"{source}: parameter {key!r} (expected shape {shape}) is missing")


def _check(source: str, key: str, found: tuple[int, ...] | None, expected: tuple[int, ...]) -> None:
    if found is None:
        raise ValueError(f"{source}: parameter {key!r} (expected shape {expected}) is missing")
    if tuple(found) != tuple(expected):
        raise ValueError(
            f"{source}: parameter {key!r} has shape {tuple(found)}; the model "
            f"config expects {tuple(expected)}"
        )


def _once_per_slice(read: Callable[[Index], np.ndarray]) -> Callable[[Index], np.ndarray]:
    """Read each distinct slice once, even when several local devices hold a copy of it."""
    cache: dict[tuple, np.ndarray] = {}

    def cached(index: Index) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in cache:
            cache[key] = read(index)
        return cache[key]

    return cached


def _load_native(location: Path, cfg: T5Config, shardings: Any, dtype: jnp.dtype) -> dict:
    """Orbax restores each shard; a scanned/unscanned mismatch is converted on device."""
    saved = T5Config.from_dict(json.loads((location / native.CONFIG_FILE).read_text()))
    convert, shardings_saved = None, shardings
    if saved.scan_layers != cfg.scan_layers:
        convert = stack_layers if cfg.scan_layers else unstack_layers
        shardings_saved = _relayout_shardings(shardings, cfg)
    target = jax.tree_util.tree_map(
        lambda s, sharding: jax.ShapeDtypeStruct(s.shape, dtype, sharding=sharding),
        param_shapes(cfg.replace(scan_layers=saved.scan_layers)),
        shardings_saved,
    )
    try:
        params = ocp.StandardCheckpointer().restore(location / native.PARAMS_DIR, target)
    except (ValueError, FileNotFoundError) as error:
        raise ValueError(
            f"{location / native.PARAMS_DIR}: params do not match the model config: {error}"
        ) from error
    return params if convert is None else jax.jit(convert, out_shardings=shardings)(params)


def _relayout_shardings(shardings: dict, cfg: T5Config) -> dict:
    """Shardings for the other layer layout: add or drop the leading (replicated) layers axis."""

    def respec(sharding: NamedSharding, drop: bool) -> NamedSharding:
        spec = tuple(sharding.spec)
        return NamedSharding(sharding.mesh, PartitionSpec(*(spec[1:] if drop else (None, *spec))))

    counts = {"encoder": cfg.num_encoder_layers, "decoder": cfg.num_decoder_layers}
    out = dict(shardings)
    for name in _STACKS:
        node = dict(shardings[name])
        if cfg.scan_layers:  # ours stacked, saved per layer
            per_layer = jax.tree_util.tree_map(lambda s: respec(s, True), node.pop("layers"))
            node.update({f"layers_{i}": per_layer for i in range(counts[name])})
        else:  # ours per layer, saved stacked
            per_layer = [node.pop(f"layers_{i}") for i in range(counts[name])]
            node["layers"] = jax.tree_util.tree_map(lambda s: respec(s, False), per_layer[0])
        out[name] = node
    return out
