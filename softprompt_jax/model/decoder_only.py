"""Decoder-only networks by config: the module, random params, shapes, logical axes, cache."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from softprompt_jax.model.decoder_config import DecoderOnlyConfig, GPT2Config
from softprompt_jax.model.gpt2 import GPT2
from softprompt_jax.model.llama import Llama


def network(cfg: DecoderOnlyConfig) -> GPT2 | Llama:
    """The Flax module for `cfg`: `GPT2` or `Llama`."""
    return GPT2(cfg) if isinstance(cfg, GPT2Config) else Llama(cfg)


def _run_on_ids(model: nn.Module, ids: jax.Array, decode: bool = False) -> jax.Array:
    """Embed `ids` and run the model on them (every param is used once)."""
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    return model(model.embed(ids), jnp.ones_like(ids), positions, decode=decode)


def _variables(cfg: DecoderOnlyConfig, rng: jax.Array, batch: int = 1, length: int = 1, **kw):
    ids = jnp.zeros((batch, length), jnp.int32)
    return network(cfg).init(rng, ids, method=_run_on_ids, **kw)


def init_params(cfg: DecoderOnlyConfig, rng: jax.Array | int = 0) -> dict:
    """Randomly initialised float32 params as a plain nested dict (for tests and tools)."""
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    variables = jax.jit(lambda r: _variables(cfg, r))(rng)
    return nn.meta.unbox(variables["params"])


def param_shapes(cfg: DecoderOnlyConfig) -> dict:
    """The params tree as `jax.ShapeDtypeStruct`s, without allocating anything."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))


def logical_axes(cfg: DecoderOnlyConfig) -> dict:
    """The params tree with each leaf replaced by its logical axis names (a PartitionSpec)."""
    abstract = jax.eval_shape(lambda: _variables(cfg, jax.random.PRNGKey(0)))
    return nn.get_partition_spec(abstract)["params"]


def init_cache(cfg: DecoderOnlyConfig, batch: int, max_length: int) -> dict:
    """An all-zero decode cache for `batch` sequences of up to `max_length` positions."""
    abstract = jax.eval_shape(
        lambda: _variables(cfg, jax.random.PRNGKey(0), batch, max_length, decode=True)
    )
    return jax.tree_util.tree_map(
        lambda x: jnp.zeros(x.shape, x.dtype), nn.meta.unbox(abstract["cache"])
    )


def output_param(cfg: DecoderOnlyConfig) -> str:
    """The '/'-path of the output projection (kept in float32, as T5's)."""
    if cfg.tie_word_embeddings:
        return "token_embedder/embedding"
    return "decoder/logits_dense/kernel"
