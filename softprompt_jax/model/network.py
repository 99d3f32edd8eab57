"""The T5 encoder-decoder with T5X's parameter tree.

`T5(cfg)` covers T5 1.1 (gated GELU, `decoder/logits_dense`) and the original
T5 (ReLU, logits through the tied embedding). The encoder accepts either token
ids or ready-made input embeddings plus a mask; that second door is where a
soft prompt enters, and it is all the model knows about prompts.

Packed rows (several examples per row, as seqio packs them) carry T5X's
`encoder_segment_ids` / `decoder_segment_ids` (0 = padding): attention stays
within a segment. T5's relative position bias depends only on index differences,
which inside a contiguous segment equal the per-segment position differences, so
the segment masks are all packing needs (T5X accepts `*_positions` and ignores them).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from softprompt_jax.model.config import T5Config
from softprompt_jax.model.layers import (
    Dense,
    Embed,
    MlpBlock,
    MultiHeadAttention,
    RelativePositionBiases,
    RMSNorm,
    attention_block_kwargs,
    constrain,
    mask_to_bias,
    segment_bias,
)
from softprompt_jax.model.scan import run_layers


class EncoderLayer(nn.Module):
    config: T5Config
    deterministic: bool = True
    scanned: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array, prefix=None):
        """`prefix`: this layer's `(keys, values)` in front of its self-attention's."""
        cfg = self.config
        dropout = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
        h = RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, name="pre_attention_layer_norm")(x)
        h = MultiHeadAttention(**attention_block_kwargs(cfg), name="attention")(
            h, h, bias, deterministic=self.deterministic, prefix=prefix
        )
        x = x + dropout(h, deterministic=self.deterministic)
        h = RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, name="pre_mlp_layer_norm")(x)
        h = MlpBlock(
            cfg.mlp_dim, cfg.mlp_activations, cfg.compute_dtype, cfg.dropout_rate, name="mlp"
        )(h, deterministic=self.deterministic)
        x = x + dropout(h, deterministic=self.deterministic)
        x = constrain(x, ("batch", "length", "embed"))
        return (x, None) if self.scanned else x


class DecoderLayer(nn.Module):
    """Self-attention, cross-attention, MLP; `decode` steps one token with the cache."""

    config: T5Config
    deterministic: bool = True
    decode: bool = False
    init_cache: bool = False
    scanned: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        self_bias: jax.Array | None,
        encoded: jax.Array | None,
        cross_bias: jax.Array | None,
        prefix=None,
    ):
        """`prefix`: this layer's `(keys, values)` in front of its self-attention's."""
        cfg = self.config
        norm = lambda name: RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, name=name)
        dropout = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
        attention = lambda name: MultiHeadAttention(**attention_block_kwargs(cfg), name=name)
        self_cache, cross_cache = ("self", "cross") if self.decode else (None, None)
        if self.init_cache:
            for name, cache, kv in (
                ("self_attention", "self", None),
                ("encoder_decoder_attention", "cross", encoded),
            ):
                attention(name)(x, kv, None, deterministic=True, cache=cache, init_cache=True)
            return (x, None) if self.scanned else x
        h = norm("pre_self_attention_layer_norm")(x)
        h = attention("self_attention")(
            h, h, self_bias, deterministic=self.deterministic, cache=self_cache, prefix=prefix
        )
        x = x + dropout(h, deterministic=self.deterministic)
        h = norm("pre_cross_attention_layer_norm")(x)
        h = attention("encoder_decoder_attention")(
            h, encoded, cross_bias, deterministic=self.deterministic, cache=cross_cache
        )
        x = x + dropout(h, deterministic=self.deterministic)
        h = norm("pre_mlp_layer_norm")(x)
        h = MlpBlock(
            cfg.mlp_dim, cfg.mlp_activations, cfg.compute_dtype, cfg.dropout_rate, name="mlp"
        )(h, deterministic=self.deterministic)
        x = x + dropout(h, deterministic=self.deterministic)
        x = constrain(x, ("batch", "length", "embed"))
        return (x, None) if self.scanned else x


def _prefix_bias(relpos: nn.Module, length: int, prefix, bidirectional: bool) -> jax.Array:
    """Relative position bias `[1, heads, length, P + length]` with P prefix keys in front.

    The prefix's keys take positions 0..P-1 and the tokens P.., as Hugging Face T5 places a
    cache of P entries; without a prefix, the plain `[1, heads, length, length]` table.
    """
    virtual = 0 if prefix is None else prefix[0].shape[1]
    bias = relpos(virtual + length, virtual + length, bidirectional=bidirectional)
    return bias[:, :, virtual:]


def _visible_prefix(bias: jax.Array, prefix) -> jax.Array:
    """`bias` `[..., q, k]` with zeros for the P always-visible prefix keys put in front."""
    if prefix is None:
        return bias
    zeros = jnp.zeros(bias.shape[:-1] + (prefix[0].shape[1],), bias.dtype)
    return jnp.concatenate([zeros, bias], axis=-1)


class Encoder(nn.Module):
    """Input embeddings `[b, l, d]` + mask `[b, l]` -> encoded `[b, l, d]`."""

    config: T5Config

    @nn.compact
    def __call__(
        self,
        embeddings: jax.Array,
        mask: jax.Array,
        *,
        enable_dropout: bool,
        undropped_prefix: int = 0,
        segment_ids: jax.Array | None = None,
        prefix: tuple[jax.Array, jax.Array] | None = None,
    ):
        """`undropped_prefix` leading positions (a prompt) skip the input dropout;
        `segment_ids` `[b, l]` keep attention within each packed segment; `prefix`
        `(keys, values)` `[layers, P, heads, head_dim]` go in front of every layer's own."""
        cfg = self.config
        deterministic = not enable_dropout
        length = embeddings.shape[1]
        relpos = RelativePositionBiases(
            cfg.relative_attention_num_buckets,
            cfg.relative_attention_max_distance,
            cfg.num_heads,
            cfg.compute_dtype,
            name="relpos_bias",
        )
        bias = _prefix_bias(relpos, length, prefix, bidirectional=True)
        bias = bias + _visible_prefix(mask_to_bias(mask, cfg.compute_dtype), prefix)
        if segment_ids is not None:
            if prefix is not None:
                raise ValueError("key/value prefixes are not supported with packed rows")
            bias = bias + segment_bias(segment_ids, segment_ids, cfg.compute_dtype)
        dropped = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(
            embeddings, deterministic=deterministic
        )
        if undropped_prefix:
            dropped = jnp.concatenate(
                [embeddings[:, :undropped_prefix], dropped[:, undropped_prefix:]], axis=1
            )
        x = dropped.astype(cfg.compute_dtype)
        x = constrain(x, ("batch", "length", "embed"))
        x = run_layers(
            EncoderLayer,
            cfg.num_encoder_layers,
            x,
            bias,
            per_layer=prefix,
            config=cfg,
            deterministic=deterministic,
        )
        x = RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, name="encoder_norm")(x)
        output_broadcast = (-2,) if cfg.broadcast_encoder_output_dropout else ()
        return nn.Dropout(cfg.dropout_rate, broadcast_dims=output_broadcast)(
            x, deterministic=deterministic
        )


class Decoder(nn.Module):
    """Decoder stack and output logits (f32); `decode=True` steps one token with a cache.

    `init_cache=True` (with `decode`) only creates that cache for `decoder_input_tokens`'s
    shape `[rows, max_length]`: zeroed self-attention keys/values and the cross-attention
    keys/values of `encoded`, projected once per batch; it returns None.
    """

    config: T5Config
    shared_embedding: Embed

    @nn.compact
    def __call__(
        self,
        encoded: jax.Array | None,
        encoder_mask: jax.Array | None,
        decoder_input_tokens: jax.Array,
        decoder_target_tokens: jax.Array | None,
        *,
        enable_dropout: bool,
        decode: bool,
        max_decode_length: int | None,
        encoder_segment_ids: jax.Array | None = None,
        decoder_segment_ids: jax.Array | None = None,
        init_cache: bool = False,
        prefix: tuple[jax.Array, jax.Array] | None = None,
    ) -> jax.Array | None:
        """`prefix` `(keys, values)` `[layers, P, heads, head_dim]` go in front of every
        self-attention's own (teacher-forced or with `decode`; not with packed rows)."""
        cfg = self.config
        if init_cache:
            x = jnp.zeros(decoder_input_tokens.shape + (cfg.emb_dim,), cfg.compute_dtype)
            encoded = encoded.astype(cfg.compute_dtype)
            layer_args = dict(config=cfg, decode=True, init_cache=True)
            run_layers(DecoderLayer, cfg.num_decoder_layers, x, None, encoded, None, **layer_args)
            return None
        if (encoder_segment_ids is None) != (decoder_segment_ids is None):
            raise ValueError("pass both encoder_segment_ids and decoder_segment_ids, or neither")
        if decode and decoder_segment_ids is not None:
            raise ValueError("packed rows (segment ids) cannot be decoded step by step")
        if prefix is not None and decoder_segment_ids is not None:
            raise ValueError("key/value prefixes are not supported with packed rows")
        deterministic = not enable_dropout
        length = decoder_input_tokens.shape[1]
        bias_length = max_decode_length if decode and max_decode_length else length
        relpos = RelativePositionBiases(
            cfg.relative_attention_num_buckets,
            cfg.relative_attention_max_distance,
            cfg.num_heads,
            cfg.compute_dtype,
            name="relpos_bias",
        )
        self_bias = _prefix_bias(relpos, bias_length, prefix, bidirectional=False)
        if not decode:
            causal = jnp.tril(jnp.ones((length, length), bool))
            mask = jnp.where(causal, 0.0, -1e10).astype(cfg.compute_dtype)
            if decoder_target_tokens is not None:
                mask = mask + mask_to_bias(decoder_target_tokens > 0, cfg.compute_dtype)
            self_bias = self_bias + _visible_prefix(mask, prefix)
        cross_bias = mask_to_bias(encoder_mask, cfg.compute_dtype)
        if decoder_segment_ids is not None:
            dtype = cfg.compute_dtype
            self_bias = self_bias + segment_bias(decoder_segment_ids, decoder_segment_ids, dtype)
            cross_bias = cross_bias + segment_bias(decoder_segment_ids, encoder_segment_ids, dtype)

        dropout = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
        x = self.shared_embedding(decoder_input_tokens)
        x = dropout(x, deterministic=deterministic).astype(cfg.compute_dtype)
        x = run_layers(
            DecoderLayer,
            cfg.num_decoder_layers,
            x,
            self_bias,
            None if encoded is None else encoded.astype(cfg.compute_dtype),
            cross_bias,
            per_layer=prefix,
            config=cfg,
            deterministic=deterministic,
            decode=decode,
        )
        x = RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, name="decoder_norm")(x)
        x = dropout(x, deterministic=deterministic)
        if cfg.logits_via_embedding:
            # Tied output embedding, rescaled as T5 and Hugging Face do.
            logits = self.shared_embedding.attend(x) / jnp.sqrt(x.shape[-1])
        else:
            logits = Dense(cfg.vocab_size, ("embed", "vocab"), jnp.float32, name="logits_dense")(x)
        return constrain(logits, ("batch", "length", "vocab"))


class T5(nn.Module):
    """T5 encoder-decoder; params follow T5X's tree (`token_embedder`, `encoder`, `decoder`)."""

    config: T5Config

    def setup(self) -> None:
        cfg = self.config
        self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, cfg.compute_dtype)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg, shared_embedding=self.token_embedder)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Token ids `[b, l]` -> input embeddings `[b, l, d]` in the compute dtype."""
        return self.token_embedder(tokens)

    def encode(
        self,
        encoder_input_tokens: jax.Array | None = None,
        *,
        encoder_input_embeddings: jax.Array | None = None,
        encoder_mask: jax.Array | None = None,
        encoder_segment_ids: jax.Array | None = None,
        enable_dropout: bool = True,
        undropped_prefix: int = 0,
        prefix: tuple[jax.Array, jax.Array] | None = None,
    ) -> jax.Array:
        """Encode token ids (mask = ids > 0), or embeddings with an explicit mask.

        `prefix`: per-layer key/value prefixes `[layers, P, heads, head_dim]` (see `Encoder`).

        Input dropout hits every position (as in T5X, prompt included) except the first
        `undropped_prefix` ones. `encoder_segment_ids` `[b, l]` (packed rows) cover the rows
        passed, prompt slots included; with embeddings they stand in for a missing mask (> 0).
        """
        embeddings, mask = self._encoder_inputs(
            encoder_input_tokens, encoder_input_embeddings, encoder_mask, encoder_segment_ids
        )
        return self.encoder(
            embeddings,
            mask,
            enable_dropout=enable_dropout,
            undropped_prefix=undropped_prefix,
            segment_ids=encoder_segment_ids,
            prefix=prefix,
        )

    def init_decode_cache(
        self, encoded: jax.Array, decoder_rows: int, max_decode_length: int
    ) -> None:
        """Create the decode cache (apply with `mutable=["cache"]`) before the first step.

        Each decoder layer keeps the cross-attention keys/values of `encoded`, projected
        once per batch, and zeroed self-attention keys/values for `decoder_rows` rows (a
        multiple of the batch: beams, beam index fastest) and `max_decode_length` steps.
        """
        tokens = jnp.zeros((decoder_rows, max_decode_length), jnp.int32)
        self.decoder(
            encoded,
            None,
            tokens,
            None,
            enable_dropout=False,
            decode=True,
            max_decode_length=max_decode_length,
            init_cache=True,
        )

    def decode(
        self,
        encoded: jax.Array | None,
        encoder_mask: jax.Array,
        decoder_input_tokens: jax.Array,
        decoder_target_tokens: jax.Array | None = None,
        *,
        encoder_segment_ids: jax.Array | None = None,
        decoder_segment_ids: jax.Array | None = None,
        enable_dropout: bool = True,
        decode: bool = False,
        max_decode_length: int | None = None,
        prefix: tuple[jax.Array, jax.Array] | None = None,
    ) -> jax.Array:
        """Decoder logits `[b, l, vocab]` (float32) given the encoder's output and mask.

        `prefix`: per-layer self-attention key/value prefixes (see `Decoder`).

        With `decode=True` (after `init_decode_cache`) one token steps each row and
        `encoded` is unused: its projected keys/values are in the cache.
        Packed rows pass both segment ids: decoder self-attention stays causal within a
        segment and cross-attention reaches only the encoder rows of the same segment.
        """
        return self.decoder(
            encoded,
            encoder_mask,
            decoder_input_tokens,
            decoder_target_tokens,
            enable_dropout=enable_dropout,
            decode=decode,
            max_decode_length=max_decode_length,
            encoder_segment_ids=encoder_segment_ids,
            decoder_segment_ids=decoder_segment_ids,
            prefix=prefix,
        )

    def __call__(
        self,
        encoder_input_tokens: jax.Array | None,
        decoder_input_tokens: jax.Array,
        decoder_target_tokens: jax.Array | None = None,
        *,
        encoder_input_embeddings: jax.Array | None = None,
        encoder_mask: jax.Array | None = None,
        encoder_segment_ids: jax.Array | None = None,
        decoder_segment_ids: jax.Array | None = None,
        enable_dropout: bool = True,
        undropped_prefix: int = 0,
    ) -> jax.Array:
        """Teacher-forced logits `[b, target_len, vocab]`; token 0 is padding.

        Packed rows pass `encoder_segment_ids` and `decoder_segment_ids` (T5X's features,
        0 = padding); each segment then sees only itself.
        """
        embeddings, mask = self._encoder_inputs(
            encoder_input_tokens, encoder_input_embeddings, encoder_mask, encoder_segment_ids
        )
        encoded = self.encoder(
            embeddings,
            mask,
            enable_dropout=enable_dropout,
            undropped_prefix=undropped_prefix,
            segment_ids=encoder_segment_ids,
        )
        return self.decode(
            encoded,
            mask,
            decoder_input_tokens,
            decoder_target_tokens,
            encoder_segment_ids=encoder_segment_ids,
            decoder_segment_ids=decoder_segment_ids,
            enable_dropout=enable_dropout,
        )

    def _encoder_inputs(self, tokens, embeddings, mask, segment_ids):
        if (tokens is None) == (embeddings is None):
            raise ValueError(
                "pass exactly one of encoder_input_tokens and encoder_input_embeddings"
            )
        if tokens is not None:
            embeddings, mask = self.embed(tokens), (tokens > 0) if mask is None else mask
        elif mask is None and segment_ids is not None:
            mask = segment_ids > 0
        if mask is None:
            raise ValueError(
                "encoder_input_embeddings needs an explicit encoder_mask [batch, length]"
            )
        for name, value in (("encoder_mask", mask), ("encoder_segment_ids", segment_ids)):
            if value is not None and value.shape != embeddings.shape[:2]:
                raise ValueError(
                    f"{name} has shape {value.shape}; embeddings have shape {embeddings.shape}"
                )
        return embeddings, mask


def init_params(config: T5Config, rng: jax.Array | int = 0) -> dict:
    """Randomly initialised float32 params (T5X's initialisers), as a plain nested dict."""
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    tokens = jnp.ones((1, 1), jnp.int32)
    variables = jax.jit(lambda r: T5(config).init(r, tokens, tokens, enable_dropout=False))(rng)
    return nn.meta.unbox(variables["params"])


def param_shapes(config: T5Config) -> dict:
    """The params tree as `jax.ShapeDtypeStruct`s, without allocating anything."""
    return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))


def logical_axes(config: T5Config) -> dict:
    """The params tree with each leaf replaced by its logical axis names (a PartitionSpec)."""
    tokens = jnp.ones((1, 1), jnp.int32)
    abstract = jax.eval_shape(
        lambda: T5(config).init(jax.random.PRNGKey(0), tokens, tokens, enable_dropout=False)
    )
    return nn.get_partition_spec(abstract)["params"]
