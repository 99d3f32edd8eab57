"""Building blocks shared by the decoder-only networks (GPT-2, Llama family) in Flax linen.

Causal self-attention with grouped-query heads, optional RoPE, per-layer key/value
prefixes (prefix tuning, P-tuning v2) and a decode cache written at an explicit index;
the attention mask over `[prefix; keys]`. The layer stack is `scan.run_layers`, as T5's.
Every parameter and large activation has logical axis names.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from softprompt_jax.model.layers import MASK_BIAS, constrain

_init = nn.initializers.normal(0.02)


class Linear(nn.Module):
    """`x @ kernel (+ bias)` with a `[in, out]` kernel; the output in the compute dtype."""

    features: int
    kernel_axes: tuple[str, str]
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(_init, self.kernel_axes),
            (x.shape[-1], self.features),
            jnp.float32,
        )
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[1:]),
                (self.features,),
                jnp.float32,
            )
            y = y + bias.astype(self.dtype)
        return y


class LayerNorm(nn.Module):
    """GPT-2's LayerNorm (mean and variance in float32, `scale` and `bias`)."""

    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (x.shape[-1],)
        axes = nn.with_logical_partitioning
        scale = self.param("scale", axes(nn.initializers.ones, ("embed",)), features, jnp.float32)
        bias = self.param("bias", axes(nn.initializers.zeros, ("embed",)), features, jnp.float32)
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(self.dtype)


def rope_frequencies(
    head_dim: int,
    theta: float,
    factor: float | None = None,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_positions: int = 8192,
) -> tuple[float, ...]:
    """RoPE's `head_dim / 2` inverse frequencies (float32), Llama 3's scaling when `factor` is set.

    Llama 3.1's `rope_type='llama3'` (transformers' `_compute_llama3_parameters`): wavelengths
    longer than `original / low_freq_factor` are slowed by `factor`, those shorter than
    `original / high_freq_factor` kept, the ones between interpolated smoothly.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    if factor is not None:
        wavelen = np.float32(2 * math.pi) / inv_freq
        low_freq_wavelen = original_max_positions / low_freq_factor
        high_freq_wavelen = original_max_positions / high_freq_factor
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(factor), inv_freq)
        smooth = (original_max_positions / wavelen - low_freq_factor) / (
            high_freq_factor - low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return tuple(float(f) for f in inv_freq)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: tuple[float, ...]) -> jax.Array:
    """Rotary embedding as Hugging Face's Llama: halves rotated, angles in float32.

    `x` `[batch, length, heads, head_dim]`, `positions` `[batch, length]`, `inv_freq` from
    `rope_frequencies`.
    """
    head_dim = x.shape[-1]
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = head_dim // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attention_bias(
    key_mask: jax.Array,
    query_length: int,
    *,
    prefix_length: int = 0,
    query_start: jax.Array | int = 0,
    sliding_window: int | None = None,
) -> jax.Array:
    """Additive float32 bias `[batch, 1, query, prefix + keys]` over `[prefix; keys]`.

    Keys are numbered from 0 (prefix first); query `i` is key number
    `prefix_length + query_start + i`, and sees the keys up to itself (causal), within
    `sliding_window`, that `key_mask` `[batch, keys]` marks valid. Prefix keys are valid.
    """
    batch = key_mask.shape[0]
    valid = jnp.concatenate([jnp.ones((batch, prefix_length), bool), key_mask > 0], axis=1)
    key_index = jnp.arange(valid.shape[1])
    query_index = prefix_length + query_start + jnp.arange(query_length)
    seen = key_index[None, :] <= query_index[:, None]
    if sliding_window is not None:
        seen &= query_index[:, None] - key_index[None, :] < sliding_window
    visible = seen[None, None] & valid[:, None, None, :]
    return jnp.where(visible, 0.0, MASK_BIAS).astype(jnp.float32)


class CausalSelfAttention(nn.Module):
    """Grouped-query causal self-attention, scaled by `1/sqrt(head_dim)`, softmax in float32.

    `prefix` is this layer's `(key, value)`, each `[batch or 1, P, kv_heads, head_dim]`, put in
    front of the keys and values (after RoPE, which they do not get: as PEFT's cache). With
    `decode`, this call's keys and values are written into the cache at `cache_index` and
    attention runs over the whole cache (the first call, from `init_cache`, makes it).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    out_bias: bool = False
    rope_inv_freq: tuple[float, ...] | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        bias: jax.Array,
        positions: jax.Array,
        prefix: tuple[jax.Array, jax.Array] | None = None,
        *,
        decode: bool = False,
        cache_index: jax.Array | int = 0,
    ) -> jax.Array:
        batch, length, _ = x.shape

        def project(name: str, heads: int) -> jax.Array:
            dense = Linear(
                heads * self.head_dim, ("embed", "joined_kv"), self.qkv_bias, self.dtype, name=name
            )
            y = dense(x).reshape(batch, length, heads, self.head_dim)
            return constrain(y, ("batch", "length", "heads", "kv"))

        query = project("query", self.num_heads)
        key = project("key", self.num_kv_heads)
        value = project("value", self.num_kv_heads)
        if self.rope_inv_freq is not None:
            query = apply_rope(query, positions, self.rope_inv_freq)
            key = apply_rope(key, positions, self.rope_inv_freq)
        if decode:
            key, value = self._update_cache(key, value, cache_index)
        if prefix is not None:
            join = lambda p, k: jnp.concatenate(
                [jnp.broadcast_to(p, (batch, *p.shape[1:])).astype(k.dtype), k], axis=1
            )
            key, value = join(prefix[0], key), join(prefix[1], value)
        groups = self.num_heads // self.num_kv_heads
        query = query.reshape(batch, length, self.num_kv_heads, groups, self.head_dim)
        logits = jnp.einsum("bqkgd,bskd->bkgqs", query, key).astype(jnp.float32)
        logits = logits / jnp.sqrt(self.head_dim).astype(jnp.float32) + bias[:, :, None]
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgqs,bskd->bqkgd", weights, value)
        out = out.reshape(batch, length, self.num_heads * self.head_dim)
        return Linear(x.shape[-1], ("joined_kv", "embed"), self.out_bias, self.dtype, name="out")(
            out
        )

    def _update_cache(self, key: jax.Array, value: jax.Array, index: jax.Array | int):
        """The whole cache with this call's keys and values written at `index`."""
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
        start = (0, index, 0, 0)
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, start)
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value, start)
        return cached_key.value, cached_value.value
