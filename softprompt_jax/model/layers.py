"""Building blocks of T5 in Flax linen, numerically matching T5X's `layers.py`.

Every parameter carries T5X's logical axis names so a partitioner can map it
onto a device mesh; the large activations carry logical constraints too.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from softprompt_jax.model.config import T5Config

# Additive attention bias for masked-out keys (T5X's value).
MASK_BIAS = -1e10

_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
_attention_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")


def _query_init(head_dim: int):
    """T5X folds the 1/sqrt(head_dim) attention scale into the query init."""

    def init(key, shape, dtype=jnp.float32):
        return _attention_init(key, shape, dtype) / jnp.sqrt(head_dim).astype(dtype)

    return init


def constrain(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """Logical sharding constraint; a no-op when no mesh and rules are active."""
    return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
    """T5's layer norm: no mean subtraction, no bias, statistics in float32."""

    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            (x.shape[-1],),
            jnp.float32,
        )
        x = x.astype(jnp.float32)
        y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
        return y.astype(self.dtype) * scale.astype(self.dtype)


class Dense(nn.Module):
    """A bias-free dense layer with a 2-D kernel `[in, out]`, as T5X stores it."""

    features: int
    kernel_axes: tuple[str, str]
    dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = _kernel_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
            (x.shape[-1], self.features),
            jnp.float32,
        )
        return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))


class Embed(nn.Module):
    """Token embedding table `[vocab, embed]`; `attend` gives tied output logits."""

    num_embeddings: int
    features: int
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
            (self.num_embeddings, self.features),
            jnp.float32,
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        # A gather of the cast table: bit-identical to T5X's one-hot matmul.
        return jnp.take(self.embedding.astype(self.dtype), ids, axis=0)

    def attend(self, query: jax.Array) -> jax.Array:
        return jnp.dot(query.astype(jnp.float32), self.embedding.astype(jnp.float32).T)


def relative_position_buckets(
    query_length: int,
    key_length: int,
    *,
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
) -> np.ndarray:
    """T5's bucketing of `key_pos - query_pos` into `[query_length, key_length]` ids.

    Computed with numpy at trace time, exactly as T5X does (float32 log plus eps).
    """
    context = np.arange(query_length, dtype=np.int32)[:, None]
    memory = np.arange(key_length, dtype=np.int32)[None, :]
    n = -(memory - context)
    bucket = np.zeros_like(n)
    if bidirectional:
        num_buckets //= 2
        bucket += (n < 0).astype(np.int32) * num_buckets
        n = np.abs(n)
    else:
        n = np.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    scaled = np.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps)
    scaled = scaled / np.log(max_distance / max_exact) * (num_buckets - max_exact)
    large = np.minimum(max_exact + scaled.astype(np.int32), num_buckets - 1)
    return bucket + np.where(is_small, n, large)


class RelativePositionBiases(nn.Module):
    """One `[heads, buckets]` table per stack, shared by all its layers."""

    num_buckets: int
    max_distance: int
    num_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, query_length: int, key_length: int, bidirectional: bool) -> jax.Array:
        table = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(
                nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
                ("heads", "relpos_buckets"),
            ),
            (self.num_heads, self.num_buckets),
            jnp.float32,
        )
        buckets = relative_position_buckets(
            query_length,
            key_length,
            bidirectional=bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        bias = jnp.take(table.astype(self.dtype), jnp.asarray(buckets), axis=1)
        return bias[None]  # [1, heads, q, k]


def mask_to_bias(key_mask: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """`[batch, k]` validity mask -> additive `[batch, 1, 1, k]` bias (0 or -1e10)."""
    return jnp.where(key_mask[:, None, None, :] > 0, 0.0, MASK_BIAS).astype(dtype)


def segment_bias(query_segments: jax.Array, key_segments: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """`[b, q]`, `[b, k]` packed segment ids -> additive `[b, 1, q, k]` bias, 0 within a segment."""
    same = query_segments[:, None, :, None] == key_segments[:, None, None, :]
    return jnp.where(same, 0.0, MASK_BIAS).astype(dtype)


class MultiHeadAttention(nn.Module):
    """T5 attention: no 1/sqrt(d) scaling, additive bias, optional decode cache.

    `attention_impl` picks the kernel: "einsum" (T5X's two einsums), "fused"
    (`jax.nn.dot_product_attention`; jax picks the implementation, which in jax 0.10 is
    always XLA) or "cudnn" (cuDNN flash attention: GPU only, bfloat16/float16 (float32
    raises), head_dim a multiple of 8 and at most 256 on Hopper; with a bias, training
    needs even query and key lengths; jax raises otherwise). Both fused paths compute
    logits and softmax in float32 whatever `float32_logits` says. T5's relative-position
    bias and masks go in as one additive bias, broadcast to full `[.., q, k]` (cuDNN takes
    no shorter axes) and cuDNN's backward pass always computes its gradient too.
    """

    num_heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32
    dropout_rate: float = 0.0
    float32_logits: bool = False
    attention_impl: str = "einsum"

    @nn.compact
    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array | None,
        bias: jax.Array | None,
        *,
        deterministic: bool,
        cache: str | None = None,
        init_cache: bool = False,
        prefix: tuple[jax.Array, jax.Array] | None = None,
    ) -> jax.Array | None:
        """Attend from `inputs_q` to `inputs_kv`; `cache` says how a decode step uses the cache.

        `prefix` `(keys, values)` `[P, heads, head_dim]` go in front of the keys and values
        (prefix tuning); `bias` then covers `P` more key positions, in front. With
        `cache="self"` they stay beside the cache, always visible to every step.

        `cache="self"` appends this step's key/value to the keys so far; `cache="cross"`
        reads the keys/values of the encoder output, projected once (`inputs_kv` unused),
        and serves `k` decoder rows per encoder row (beams, beam index fastest).
        `init_cache=True` only creates the cache: zeros for `inputs_q.shape[:2]` (rows, max
        decode length) for "self", the projected `inputs_kv` for "cross"; it returns None.
        """
        joined = self.num_heads * self.head_dim
        dense = functools.partial(Dense, joined, ("embed", "joined_kv"), self.dtype)
        split = lambda x: x.reshape(x.shape[:2] + (self.num_heads, self.head_dim))
        qkv_axes = ("batch", "length", "heads", "kv")
        project_kv = lambda: tuple(
            constrain(split(dense(kernel_init=_attention_init, name=name)(inputs_kv)), qkv_axes)
            for name in ("key", "value")
        )
        if init_cache:
            self._init_cache(cache, inputs_q, project_kv)
            return None
        query = constrain(
            split(dense(kernel_init=_query_init(self.head_dim), name="query")(inputs_q)), qkv_axes
        )
        if cache == "cross":
            key, value = self._cached("cached_key"), self._cached("cached_value")
            # Rows that share an encoder row (beams) become extra queries of that row.
            query = query.reshape((key.shape[0], -1) + query.shape[2:])
        else:
            key, value = project_kv()
        if cache == "self":
            virtual = 0 if prefix is None else prefix[0].shape[0]
            key, value, bias = self._update_cache(key, value, bias, virtual)
        if prefix is not None:
            if cache == "cross":
                raise ValueError("key/value prefixes go in self-attention, not cross-attention")
            rows = lambda p, x: jnp.broadcast_to(p, (x.shape[0],) + p.shape).astype(x.dtype)
            key, value = (
                jnp.concatenate([rows(p, x), x], axis=1)
                for p, x in zip(prefix, (key, value), strict=True)
            )
        out = self._attend(query, key, value, bias, deterministic)
        out = out.reshape(inputs_q.shape[:2] + (joined,))
        return Dense(
            inputs_q.shape[-1],
            ("joined_kv", "embed"),
            self.dtype,
            kernel_init=_attention_init,
            name="out",
        )(out)

    def _attend(self, query, key, value, bias, deterministic: bool) -> jax.Array:
        """softmax(q k^T + bias) v with T5X's dropout of the weights, shared over queries."""
        dropout = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))
        if self.attention_impl == "einsum":
            if self.float32_logits:
                query, key = query.astype(jnp.float32), key.astype(jnp.float32)
            logits = jnp.einsum("bqhd,bkhd->bhqk", query, key)
            if bias is not None:
                logits = logits + bias.astype(logits.dtype)
            weights = jax.nn.softmax(logits).astype(self.dtype)
            weights = dropout(weights, deterministic=deterministic)
            return jnp.einsum("bhqk,bkhd->bqhd", weights, value)
        if not deterministic and self.dropout_rate > 0:
            # The weights' dropout mask is shared over queries, so it can scale the values:
            # the same draw as the einsum path's (same module, same [b, h, 1, k] shape).
            ones = jnp.ones((key.shape[0], self.num_heads, 1, key.shape[1]), self.dtype)
            scale = dropout(ones, deterministic=False)
            value = value * jnp.transpose(scale, (0, 3, 1, 2)).astype(value.dtype)
        if bias is not None:
            # cuDNN wants the bias's query and key axes in full.
            bias = jnp.broadcast_to(bias, bias.shape[:2] + (query.shape[1], key.shape[1])).astype(
                query.dtype
            )
        return jax.nn.dot_product_attention(
            query,
            key,
            value,
            bias=bias,
            scale=1.0,
            implementation="cudnn" if self.attention_impl == "cudnn" else None,
        )

    def _cached(self, name: str) -> jax.Array:
        if not self.has_variable("cache", name):
            raise ValueError("no decode cache: create it first with T5.init_decode_cache")
        return self.get_variable("cache", name)

    def _init_cache(self, cache: str | None, inputs_q: jax.Array, project_kv) -> None:
        if cache == "cross":
            key, value = project_kv()
        elif cache == "self":
            shape = inputs_q.shape[:2] + (self.num_heads, self.head_dim)
            key = value = jnp.zeros(shape, self.dtype)
            self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        else:
            raise ValueError(f"init_cache needs cache='self' or 'cross', got {cache!r}")
        self.variable("cache", "cached_key", lambda: key)
        self.variable("cache", "cached_value", lambda: value)

    def _update_cache(
        self, key: jax.Array, value: jax.Array, bias: jax.Array | None, virtual: int = 0
    ):
        """Write this step's key/value into the cache and mask keys not yet decoded.

        The step's bias covers `virtual` always-visible prefix keys in front of the cache.
        """
        cached_key, cached_value = self._cached("cached_key"), self._cached("cached_value")
        batch, step_len, heads, head_dim = key.shape
        max_length = cached_key.shape[1]
        if step_len != 1:
            raise ValueError(f"cached decoding takes one token per step, got length {step_len}")
        index = self.get_variable("cache", "cache_index")
        key = jax.lax.dynamic_update_slice(cached_key, key, (0, index, 0, 0))
        value = jax.lax.dynamic_update_slice(cached_value, value, (0, index, 0, 0))
        self.put_variable("cache", "cached_key", key)
        self.put_variable("cache", "cached_value", value)
        self.put_variable("cache", "cache_index", index + 1)
        positions = jnp.arange(virtual + max_length) - virtual
        visible = (positions <= index)[None, None, None, :]
        step_bias = jnp.where(visible, 0.0, MASK_BIAS).astype(self.dtype)
        if bias is not None:
            # `bias` is the full `[1, heads, max_len, virtual + max_len]` relpos table: row `index`.
            row = jax.lax.dynamic_slice_in_dim(bias, index, 1, axis=2)
            step_bias = step_bias + row.astype(self.dtype)
        return key, value, step_bias


class MlpBlock(nn.Module):
    """Gated-GELU (T5 1.1: `wi_0`, `wi_1`) or ReLU (T5: `wi`) feed-forward block."""

    mlp_dim: int
    activations: tuple[str, ...]
    dtype: jnp.dtype = jnp.float32
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        activation_fns = {"gelu": nn.gelu, "relu": nn.relu, "linear": lambda h: h}
        names = (
            ["wi"]
            if len(self.activations) == 1
            else [f"wi_{i}" for i in range(len(self.activations))]
        )
        hidden = None
        for name, act in zip(names, self.activations):
            h = activation_fns[act](Dense(self.mlp_dim, ("embed", "mlp"), self.dtype, name=name)(x))
            hidden = h if hidden is None else hidden * h
        hidden = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,))(
            hidden, deterministic=deterministic
        )
        hidden = constrain(hidden, ("batch", "length", "mlp"))
        return Dense(x.shape[-1], ("mlp", "embed"), self.dtype, name="wo")(hidden)


def attention_block_kwargs(cfg: T5Config) -> dict:
    return dict(
        num_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        dtype=cfg.compute_dtype,
        dropout_rate=cfg.dropout_rate,
        float32_logits=cfg.float32_attention_logits,
        attention_impl=cfg.attention_impl,
    )
