"""Greedy generation for decoder-only models with a key/value cache, prompt or prefix included.

The inputs are right-aligned (left padding, as Hugging Face generates batches); each token's
position counts only the valid tokens before it (HF's `cumsum(attention_mask) - 1`), after the
prompt or prefix. One prefill call writes the inputs into the cache, then one token per step.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from softprompt_jax.causal_lm import Prompt, model_inputs
from softprompt_jax.model.decoder_config import DecoderOnlyConfig
from softprompt_jax.model.decoder_only import init_cache, network


def generation_positions(attention_mask: jax.Array) -> jax.Array:
    """HF generate's position ids: valid tokens counted from 0, padding at 1."""
    positions = jnp.cumsum(attention_mask, axis=-1) - 1
    return jnp.where(attention_mask > 0, positions, 1)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "eos_id"))
def lm_generate(
    cfg: DecoderOnlyConfig,
    params: Mapping[str, Any],
    input_ids: jax.Array,
    attention_mask: jax.Array,
    max_new_tokens: int,
    prompt: Prompt = None,
    prompt_ids: jax.Array | None = None,
    eos_id: int | None = None,
) -> jax.Array:
    """The `max_new_tokens` greedy continuations `[batch, max_new_tokens]` of each row.

    After a row emits `eos_id` it repeats it.
    """
    model = network(cfg)
    batch, length = input_ids.shape
    positions = generation_positions(attention_mask)
    embeddings = model.apply({"params": params}, input_ids, method=model.embed)
    embeddings, mask, positions, kv, _ = model_inputs(
        cfg, embeddings, attention_mask, prompt, prompt_ids, positions, max_new_tokens
    )
    filled = embeddings.shape[1]
    key_mask = jnp.concatenate([mask, jnp.ones((batch, max_new_tokens), mask.dtype)], axis=1)
    cache = init_cache(cfg, batch, filled + max_new_tokens)

    def run(cache, embeddings, positions, index):
        logits, state = model.apply(
            {"params": params, "cache": cache},
            embeddings,
            key_mask,
            positions,
            kv,
            decode=True,
            cache_index=index,
            mutable=["cache"],
        )
        return jnp.argmax(logits[:, -1], axis=-1).astype(input_ids.dtype), state["cache"]

    token, cache = run(cache, embeddings, positions, 0)
    done = jnp.zeros((batch,), bool) if eos_id is None else token == eos_id

    def step(carry, i):
        cache, token, position, done = carry
        embedded = model.apply({"params": params}, token[:, None], method=model.embed)
        next_token, cache = run(cache, embedded, position[:, None], filled + i)
        if eos_id is not None:
            next_token = jnp.where(done, eos_id, next_token)
            done = done | (next_token == eos_id)
        return (cache, next_token, position + 1, done), token

    last_position = positions[:, -1] + 1
    (_, token, _, _), tokens = jax.lax.scan(
        step, (cache, token, last_position, done), jnp.arange(max_new_tokens - 1)
    )
    return jnp.concatenate([tokens.T, token[:, None]], axis=1)
