"""The Llama family (Llama, Mistral, Qwen2) in Flax linen, matching Hugging Face's models.

Params: `token_embedder/embedding`, `decoder/layers_N/{pre_attention_layer_norm/scale,
attention/{query,key,value,out}, pre_mlp_layer_norm/scale, mlp/{wi_0 (gate), wi_1 (up), wo}}`,
`decoder/decoder_norm/scale` and `decoder/logits_dense/kernel` (absent when the embeddings
are tied). Kernels are `[in, out]`; key/value kernels have `num_kv_heads * head_dim` columns.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from softprompt_jax.model.decoder_blocks import (
    CausalSelfAttention,
    Linear,
    attention_bias,
    rope_frequencies,
)
from softprompt_jax.model.decoder_config import LlamaConfig
from softprompt_jax.model.layers import Embed, RMSNorm, constrain
from softprompt_jax.model.scan import run_layers


class SwiGLU(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dense = lambda n, axes, name: Linear(n, axes, cfg.mlp_bias, cfg.compute_dtype, name=name)
        gate = dense(cfg.mlp_dim, ("embed", "mlp"), "wi_0")(x)
        up = dense(cfg.mlp_dim, ("embed", "mlp"), "wi_1")(x)
        h = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return dense(cfg.emb_dim, ("mlp", "embed"), "wo")(h)


class LlamaLayer(nn.Module):
    config: LlamaConfig
    decode: bool = False
    scanned: bool = False

    @nn.compact
    def __call__(self, x, bias, positions, cache_index, prefix=None):
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, name=name)
        h = CausalSelfAttention(
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            qkv_bias=cfg.qkv_bias,
            out_bias=cfg.out_bias,
            rope_inv_freq=rope_frequencies(
                cfg.head_dim,
                cfg.rope_theta,
                cfg.rope_scaling_factor,
                cfg.rope_low_freq_factor,
                cfg.rope_high_freq_factor,
                cfg.rope_original_max_positions,
            ),
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
        x = x + SwiGLU(cfg, name="mlp")(norm("pre_mlp_layer_norm")(x))
        x = constrain(x, ("batch", "length", "embed"))
        return (x, None) if self.scanned else x


class LlamaDecoder(nn.Module):
    """The layer stack, the final RMSNorm and (untied) the output projection."""

    config: LlamaConfig
    shared_embedding: Embed

    @nn.compact
    def __call__(self, x, bias, positions, prefix, cache_index, decode: bool) -> jax.Array:
        cfg = self.config
        x = run_layers(
            LlamaLayer,
            cfg.num_layers,
            x,
            bias,
            positions,
            cache_index,
            per_layer=prefix,
            config=cfg,
            decode=decode,
        )
        x = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, name="decoder_norm")(x)
        if cfg.tie_word_embeddings:
            return self.shared_embedding.attend(x)
        return Linear(cfg.vocab_size, ("embed", "vocab"), dtype=jnp.float32, name="logits_dense")(x)


class Llama(nn.Module):
    """Llama-family language model: `embed(ids)`, then `__call__` gives float32 logits."""

    config: LlamaConfig

    def setup(self) -> None:
        cfg = self.config
        self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, cfg.compute_dtype)
        self.decoder = LlamaDecoder(cfg, shared_embedding=self.token_embedder)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Token ids `[b, l]` -> token embeddings `[b, l, d]`."""
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
        """Logits `[b, l, vocab]` (float32); arguments as `GPT2.__call__` (RoPE at `positions`)."""
        cfg = self.config
        prefix_length = 0 if prefix is None else prefix[0].shape[2]
        bias = attention_bias(
            key_mask,
            embeddings.shape[1],
            prefix_length=prefix_length,
            query_start=cache_index,
            sliding_window=cfg.sliding_window,
        )
        x = constrain(embeddings.astype(cfg.compute_dtype), ("batch", "length", "embed"))
        logits = self.decoder(x, bias, positions, prefix, cache_index, decode)
        return constrain(logits, ("batch", "length", "vocab"))
