"""GPT-2 in Flax linen, numerically matching Hugging Face's `GPT2LMHeadModel`.

Params: `token_embedder/embedding` (also the output projection), `position_embedder/embedding`,
`decoder/layers_N/{pre_attention_layer_norm, attention/{query,key,value,out}, pre_mlp_layer_norm,
mlp/{wi,wo}}` (kernels `[in, out]` with biases) and `decoder/decoder_norm`. The network takes
input embeddings (a prompt goes in front of the token embeddings), a key mask, positions and
optional per-layer key/value prefixes; positions are added as learned embeddings.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from softprompt_jax.model.decoder_blocks import (
    CausalSelfAttention,
    LayerNorm,
    Linear,
    attention_bias,
)
from softprompt_jax.model.decoder_config import GPT2Config
from softprompt_jax.model.layers import Embed, constrain
from softprompt_jax.model.scan import run_layers

_ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


class GPT2Mlp(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = Linear(cfg.mlp_dim, ("embed", "mlp"), True, cfg.compute_dtype, name="wi")(x)
        h = constrain(_ACTIVATIONS[cfg.activation](h), ("batch", "length", "mlp"))
        return Linear(cfg.emb_dim, ("mlp", "embed"), True, cfg.compute_dtype, name="wo")(h)


class GPT2Layer(nn.Module):
    config: GPT2Config
    decode: bool = False
    scanned: bool = False

    @nn.compact
    def __call__(self, x, bias, positions, cache_index, prefix=None):
        cfg = self.config
        norm = lambda name: LayerNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, name=name)
        h = CausalSelfAttention(
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            qkv_bias=True,
            out_bias=True,
            dtype=cfg.compute_dtype,
            name="attention",
        )(
            norm("pre_attention_layer_norm")(x),
            bias,
            positions,
            prefix,
            decode=self.decode,
            cache_index=cache_index,
        )
        x = x + h
        x = x + GPT2Mlp(cfg, name="mlp")(norm("pre_mlp_layer_norm")(x))
        x = constrain(x, ("batch", "length", "embed"))
        return (x, None) if self.scanned else x


class GPT2Decoder(nn.Module):
    """The layer stack and the final LayerNorm."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x, bias, positions, prefix, cache_index, decode: bool) -> jax.Array:
        cfg = self.config
        x = run_layers(
            GPT2Layer,
            cfg.num_layers,
            x,
            bias,
            positions,
            cache_index,
            per_layer=prefix,
            config=cfg,
            decode=decode,
        )
        return LayerNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, name="decoder_norm")(x)


class PositionEmbed(nn.Module):
    """Learned absolute position embeddings `[max_positions, embed]`."""

    num_positions: int
    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, positions: jax.Array) -> jax.Array:
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.01), ("abspos_buckets", "embed")),
            (self.num_positions, self.features),
            jnp.float32,
        )
        return jnp.take(table.astype(self.dtype), positions, axis=0)


class GPT2(nn.Module):
    """GPT-2 language model: `embed(ids)`, then `__call__` gives float32 logits."""

    config: GPT2Config

    def setup(self) -> None:
        cfg = self.config
        self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, cfg.compute_dtype)
        self.position_embedder = PositionEmbed(
            cfg.max_position_embeddings, cfg.emb_dim, cfg.compute_dtype
        )
        self.decoder = GPT2Decoder(cfg)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Token ids `[b, l]` -> token embeddings `[b, l, d]` (no positions yet)."""
        return self.token_embedder(tokens)

    def __call__(
        self,
        embeddings: jax.Array,
        key_mask: jax.Array,
        positions: jax.Array,
        prefix: tuple[jax.Array, jax.Array] | None = None,
        *,
        decode: bool = False,
        cache_index: jax.Array | int = 0,
    ) -> jax.Array:
        """Logits `[b, l, vocab]` (float32) for `embeddings` `[b, l, d]` at `positions` `[b, l]`.

        `key_mask` `[b, keys]` marks valid keys: the inputs' own, or with `decode` the whole
        cache's (this call's inputs are written at `cache_index`).
        """
        prefix_length = 0 if prefix is None else prefix[0].shape[2]
        bias = attention_bias(
            key_mask, embeddings.shape[1], prefix_length=prefix_length, query_start=cache_index
        )
        x = embeddings.astype(self.config.compute_dtype) + self.position_embedder(positions)
        x = constrain(x, ("batch", "length", "embed"))
        x = self.decoder(x, bias, positions, prefix, cache_index, decode)
        return constrain(self.token_embedder.attend(x), ("batch", "length", "vocab"))
