"""Per-config dispatch for what loaders and partitioners need: T5 or a decoder-only network."""

from __future__ import annotations

import jax.numpy as jnp

from softprompt_jax.model import config as t5_config
from softprompt_jax.model import decoder_only, network
from softprompt_jax.model.config import T5Config
from softprompt_jax.model.decoder_config import DecoderOnlyConfig, is_decoder_only

ModelConfig = T5Config | DecoderOnlyConfig


def param_shapes(cfg: ModelConfig) -> dict:
    """The params tree of `cfg` as `jax.ShapeDtypeStruct`s."""
    if is_decoder_only(cfg):
        return decoder_only.param_shapes(cfg)
    return network.param_shapes(cfg)


def logical_axes(cfg: ModelConfig) -> dict:
    """The params tree of `cfg` with logical axis names (PartitionSpecs) as leaves."""
    if is_decoder_only(cfg):
        return decoder_only.logical_axes(cfg)
    return network.logical_axes(cfg)


def param_dtype(cfg: ModelConfig, key: str, dtype: str | jnp.dtype) -> jnp.dtype:
    """Stored dtype of param `key`: `dtype`, but float32 for the output projection."""
    if is_decoder_only(cfg):
        return jnp.dtype(jnp.float32 if key == decoder_only.output_param(cfg) else dtype)
    return t5_config.param_dtype(cfg, key, dtype)
