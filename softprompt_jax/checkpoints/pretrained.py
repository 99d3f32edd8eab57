"""Whole frozen T5 weights from any pretrained format, cast to `dtype`; and our own save."""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from softprompt_jax.checkpoints import native
from softprompt_jax.checkpoints.reader import check_shapes, model_view, open_pretrained
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.model.config import T5Config
from softprompt_jax.model.families import ModelConfig, param_dtype


def load_pretrained(
    path: str | os.PathLike, dtype: str = "bfloat16", config: ModelConfig | None = None
) -> tuple[ModelConfig, dict]:
    """Load `(config, params)` from a T5X, Hugging Face or native checkpoint, cast to `dtype`.

    Hugging Face GPT-2 and Llama-family dirs give a `GPT2Config` / `LlamaConfig`.

    Without `config` it comes from the checkpoint (inferred from shapes for T5X); either way its
    compute dtype becomes `dtype` and every param is checked against `param_shapes(config)`
    before any array data is read. The output projection stays float32 (`param_dtype`).
    """
    dtype_name = _float_dtype_name(dtype)
    reader = open_pretrained(path)
    cfg = (config or reader.config(dtype_name)).replace(dtype=dtype_name)
    shapes, read = model_view(reader, cfg)
    params = {
        tuple(key.split("/")): jnp.asarray(
            read(key, tuple(slice(None) for _ in shape)).astype(
                param_dtype(cfg, key, dtype_name), copy=False
            )
        )
        for key, shape in shapes.items()
    }
    return cfg, unflatten_dict(params)


def save_pretrained(
    path: str | os.PathLike, cfg: T5Config, params: dict, *, overwrite: bool = False
) -> Path:
    """Check `params` against `cfg`, then save both in our own format (orbax + config.json)."""
    check_params(params, cfg, str(path))
    return native.save_native(path, cfg, params, overwrite=overwrite)


def check_params(params: dict, cfg: ModelConfig, source: str) -> None:
    """Raise SoftpromptError naming `source`, key and shapes if `params` do not fit `cfg`."""
    flat = flatten_dict(params, sep="/")
    for key, value in flat.items():
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise SoftpromptError(
                f"{source}: parameter {key!r} has dtype {value.dtype}; "
                "expected a floating-point array"
            )
    check_shapes({key: value.shape for key, value in flat.items()}, cfg, source)


def _float_dtype_name(dtype: str) -> str:
    try:
        resolved = jnp.dtype(dtype)
    except TypeError as error:  # not a dtype name
        raise SoftpromptError(f"dtype={dtype!r}: {error}") from error
    if not jnp.issubdtype(resolved, jnp.floating):
        raise SoftpromptError(
            f"dtype={dtype!r}: expected a floating-point dtype such as 'bfloat16'"
        )
    return resolved.name
