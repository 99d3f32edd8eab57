"""Decoder-only language models with a soft prompt or a key/value prefix: logits and loss.

Semantics are Hugging Face's and PEFT's (`TaskType.CAUSAL_LM`): a prompt `[P, d]` (or a bank
row per example) goes in front of the token embeddings with mask ones and positions 0..P-1;
a prefix (`prefixes.py`) goes in front of every layer's keys and values. Either way the input
tokens' positions start at P, and the logits returned are those of the input positions only.
The loss is HF's causal-LM loss: `labels` shifted by one, -100 ignored, mean over the rest
(with a prompt, PEFT's -100 labels in front of the prompt rows).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from softprompt_jax.errors import SoftpromptError
from softprompt_jax.model.decoder_config import (
    DecoderOnlyConfig,
    check_positions,
    is_decoder_only,
)
from softprompt_jax.model.decoder_only import network
from softprompt_jax.prefixes import is_prefix, prefix_key_values, prefix_length
from softprompt_jax.prompts import prepend_prompt

IGNORE_INDEX = -100
Batch = Mapping[str, jax.Array]
Prompt = Any  # a prompt [P, d], a bank [N, P, d] / PromptBank, a prefix pytree, or None


def model_inputs(
    cfg: DecoderOnlyConfig,
    embeddings: jax.Array,
    attention_mask: jax.Array,
    prompt: Prompt,
    prompt_ids: jax.Array | None = None,
    position_ids: jax.Array | None = None,
    new_tokens: int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array, tuple | None, int]:
    """`(embeddings, key mask, positions, prefix keys/values, prompt rows)` for the network.

    The network's first `prompt rows` outputs are the prompt's (0 for a prefix). A sequence
    (with `new_tokens` to generate) past GPT-2's positions raises SoftpromptError.

    `position_ids` `[batch, length]` are the input tokens' positions counted without the
    prompt or prefix (default `0..length-1`); the virtual length P is added to them.
    """
    batch, length = attention_mask.shape
    if position_ids is None:
        position_ids = jnp.broadcast_to(jnp.arange(length), (batch, length))
    if prompt is None:
        check_positions(cfg, 0, length, new_tokens)
        return embeddings, attention_mask, position_ids, None, 0
    if is_prefix(prompt):
        if prompt_ids is not None:
            raise SoftpromptError("prompt_ids pick bank rows; a prefix is shared by the batch")
        virtual = prefix_length(prompt)
        check_positions(cfg, virtual, length, new_tokens)
        kv = prefix_key_values(cfg, prompt)
        return embeddings, attention_mask, virtual + position_ids, kv, 0
    embeddings, mask = prepend_prompt(prompt, embeddings, attention_mask, prompt_ids)
    virtual = mask.shape[1] - length
    check_positions(cfg, virtual, length, new_tokens)
    prompt_mask = mask[:, :virtual].astype(jnp.int32)
    prompt_length = jnp.sum(prompt_mask, axis=1, keepdims=True)
    positions = jnp.concatenate(
        [prompt_positions(prompt_mask), prompt_length + position_ids], axis=1
    )
    return embeddings, mask, positions, None, virtual


def prompt_positions(prompt_mask: jax.Array) -> jax.Array:
    """Positions `[batch, P]` of a (left-padded) prompt's rows: its own length counted from 0.

    A bank row shorter than the longest prompt is padded on the left (`PromptBank.padded`),
    so its rows take positions 0..len-1, as that prompt alone; padding rows take 0.
    """
    return jnp.maximum(jnp.cumsum(prompt_mask.astype(jnp.int32), axis=-1) - 1, 0)


def _all_logits(
    cfg: DecoderOnlyConfig,
    params: Mapping[str, Any],
    input_ids: jax.Array,
    attention_mask: jax.Array,
    prompt: Prompt,
    prompt_ids: jax.Array | None,
    position_ids: jax.Array | None,
) -> tuple[jax.Array, int]:
    """Logits of every row the network runs on, and how many prompt rows lead them."""
    _check_decoder_only(cfg)
    model = network(cfg)
    embeddings = model.apply({"params": params}, input_ids, method=model.embed)
    embeddings, mask, positions, kv, prompt_rows = model_inputs(
        cfg, embeddings, attention_mask, prompt, prompt_ids, position_ids
    )
    return model.apply({"params": params}, embeddings, mask, positions, kv), prompt_rows


@functools.partial(jax.jit, static_argnames="cfg")
def lm_logits(
    cfg: DecoderOnlyConfig,
    params: Mapping[str, Any],
    input_ids: jax.Array,
    attention_mask: jax.Array,
    prompt: Prompt = None,
    prompt_ids: jax.Array | None = None,
    position_ids: jax.Array | None = None,
) -> jax.Array:
    """Float32 logits `[batch, length, vocab]` of the input positions (prompt/prefix left out)."""
    logits, prompt_rows = _all_logits(
        cfg, params, input_ids, attention_mask, prompt, prompt_ids, position_ids
    )
    return logits[:, prompt_rows:]


def lm_loss_inputs(
    cfg: DecoderOnlyConfig, params: Mapping[str, Any], prompt: Prompt, batch: Batch
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(logits, targets, weights)` of a batch `{input_ids, attention_mask, labels}`.

    Row t of `logits` predicts `targets[:, t]`; `weights` are 0 where the label is -100.
    Without a prompt, position t predicts `labels[t + 1]` (HF's shift). With a prompt, PEFT
    gives the prompt rows -100 labels, so the last prompt row predicts `labels[0]` too. For
    any token loss (e.g. `losses.weighted_cross_entropy`); `prompt_ids` and `position_ids`
    in the batch are used when present.
    """
    _check_batch(batch)
    logits, prompt_rows = _all_logits(
        cfg,
        params,
        batch["input_ids"],
        batch["attention_mask"],
        prompt,
        batch.get("prompt_ids"),
        batch.get("position_ids"),
    )
    labels = batch["labels"]
    if prompt_rows:
        logits, targets = logits[:, prompt_rows - 1 : -1], labels
    else:
        logits, targets = logits[:, :-1], labels[:, 1:]
    weights = (targets != IGNORE_INDEX).astype(jnp.float32)
    return logits, jnp.where(targets == IGNORE_INDEX, 0, targets), weights


def lm_loss(
    prompt: Prompt, cfg: DecoderOnlyConfig, params: Mapping[str, Any], batch: Batch
) -> jax.Array:
    """HF's causal-LM loss (PEFT's `model(**batch).loss`): mean CE over labels not -100."""
    logits, targets, weights = lm_loss_inputs(cfg, params, prompt, batch)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_loss = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(token_loss * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _check_batch(batch: Batch) -> None:
    missing = sorted({"input_ids", "attention_mask", "labels"} - set(batch))
    if missing:
        raise SoftpromptError(
            f"a decoder-only batch needs input_ids, attention_mask and labels; missing {missing}"
        )


def _check_decoder_only(cfg) -> None:
    if not is_decoder_only(cfg):
        raise SoftpromptError(
            f"lm_logits takes a decoder-only config (GPT2Config, LlamaConfig); got "
            f"{type(cfg).__name__}"
        )
