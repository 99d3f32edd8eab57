"""Autoregressive decoding with a key/value cache: greedy and temperature sampling.

The encoder runs once (callers pass its output, prompt included, and mask);
each step feeds one token through the decoder, whose self-attention keys and
values accumulate in Flax's `cache` collection, as in T5X.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from softprompt_jax.model.config import T5Config
from softprompt_jax.model.network import T5

EOS_ID = 1


class _LoopState(NamedTuple):
    step: jax.Array
    sequences: jax.Array  # [batch, max_length] decoded ids, 0 after EOS
    cache: dict
    token: jax.Array  # [batch, 1] the token fed next
    ended: jax.Array  # [batch] bool
    rng: jax.Array


def _decode_step(cfg, params, cache, encoded, encoder_mask, token, max_length):
    logits, variables = T5(cfg).apply(
        {"params": params, "cache": cache},
        encoded,
        encoder_mask,
        token,
        enable_dropout=False,
        decode=True,
        max_decode_length=max_length,
        method=T5.decode,
        mutable=["cache"],
    )
    return logits[:, 0, :], variables["cache"]


def init_cache(
    cfg: T5Config, params: dict, encoded: jax.Array, encoder_mask: jax.Array, max_length: int
) -> dict:
    """A zeroed decode cache for `encoded.shape[0]` rows and `max_length` steps."""
    dummy = jnp.zeros((encoded.shape[0], max_length), jnp.int32)
    shapes = jax.eval_shape(
        lambda: T5(cfg).apply(
            {"params": params},
            encoded,
            encoder_mask,
            dummy,
            enable_dropout=False,
            decode=True,
            max_decode_length=max_length,
            method=T5.decode,
            mutable=["cache"],
        )[1]["cache"]
    )
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@functools.partial(jax.jit, static_argnames=("cfg", "max_length", "temperature", "top_k"))
def decode(
    cfg: T5Config,
    params: dict,
    encoded: jax.Array,
    encoder_mask: jax.Array,
    *,
    max_length: int,
    temperature: float = 0.0,
    top_k: int = 0,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Decode up to `max_length` tokens per row; returns `[batch, max_length]` int32.

    `temperature=0` is greedy (argmax). Otherwise tokens are sampled from
    softmax(logits / temperature), restricted to the `top_k` best when
    `top_k > 0`. A row stops at EOS (kept); later positions are 0.
    """
    batch = encoded.shape[0]
    if rng is None:
        rng = jax.random.PRNGKey(0)
    state = _LoopState(
        step=jnp.array(0, jnp.int32),
        sequences=jnp.zeros((batch, max_length), jnp.int32),
        cache=init_cache(cfg, params, encoded, encoder_mask, max_length),
        token=jnp.zeros((batch, 1), jnp.int32),  # T5's decoder BOS is the pad id 0
        ended=jnp.zeros((batch,), bool),
        rng=rng,
    )

    def not_done(state: _LoopState) -> jax.Array:
        return (state.step < max_length) & ~jnp.all(state.ended)

    def body(state: _LoopState) -> _LoopState:
        logits, cache = _decode_step(
            cfg, params, state.cache, encoded, encoder_mask, state.token, max_length
        )
        rng, sample_rng = jax.random.split(state.rng)
        token = _choose(logits, temperature, top_k, sample_rng)
        token = jnp.where(state.ended, 0, token)
        sequences = state.sequences.at[:, state.step].set(token)
        ended = state.ended | (token == EOS_ID)
        return _LoopState(state.step + 1, sequences, cache, token[:, None], ended, rng)

    return jax.lax.while_loop(not_done, body, state).sequences


def _choose(logits: jax.Array, temperature: float, top_k: int, rng: jax.Array) -> jax.Array:
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k > 0:
        threshold = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
