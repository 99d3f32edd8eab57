"""Load frozen T5 weights straight into device shards, so no host ever holds the whole model.

Each device's slice is read on its own, through the format's reader, from only the stored
data it touches (zarr chunks, safetensors byte ranges); a process reads only what its devices
hold, once per distinct slice. `layers_N` are stacked slice by slice for a scanned model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from softprompt_jax.checkpoints.reader import model_view, open_pretrained
from softprompt_jax.model.families import ModelConfig, param_dtype
from softprompt_jax.model.run_time import with_overrides
from softprompt_jax.model.scan import Index


def read_config(
    path: str | os.PathLike, dtype: str = "bfloat16", overrides: Mapping[str, Any] | None = None
) -> ModelConfig:
    """The model config of a checkpoint, from metadata only (no array data is read), with the
    run-time `overrides` (MODEL_OVERRIDES) applied."""
    return with_overrides(open_pretrained(path).config(jnp.dtype(dtype).name), overrides)


def load_sharded(
    path: str | os.PathLike, cfg: ModelConfig, shardings: Any, dtype: str | None = None
) -> dict:
    """Frozen params as global arrays laid out by `shardings` (from `param_shardings`).

    `dtype` defaults to the compute dtype `cfg.dtype`: weights are stored once, as used, but for
    the float32 output projection (`param_dtype`). Shapes are checked before any data is read.
    """
    dtype = jnp.dtype(dtype or cfg.dtype)
    shapes, read = model_view(open_pretrained(path), cfg)
    flat_shardings = flatten_dict(shardings, sep="/")
    return unflatten_dict(
        {
            tuple(key.split("/")): jax.make_array_from_callback(
                shape,
                flat_shardings[key],
                _once_per_slice(
                    lambda index, key=key: read(key, index).astype(
                        param_dtype(cfg, key, dtype), copy=False
                    )
                ),
            )
            for key, shape in shapes.items()
        }
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
