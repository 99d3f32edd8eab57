"""T5X feature batches as Hugging Face causal-LM batches, for decoder-only models.

Training reads seqio's decoder-only features (`seqio.PrefixLMFeatureConverter`, T5X's
decoder-only names): `decoder_target_tokens` is `inputs ++ targets` with no gap,
`decoder_loss_weights` is 1 on the targets only (prefix-LM: loss on the targets), and
`decoder_causal_attention` marks the inputs plus one. The model reads the sequence itself as
`input_ids` (Hugging Face's and PEFT's semantics, no BOS shift: position t predicts t + 1)
with causal attention throughout, as GPT-2 and Llama were trained; `decoder_causal_attention`
only tells where the example ends. Labels are the targets, -100 elsewhere.

Evaluation and inference build T5X encoder-decoder batches (`tasks/evaluation.t5x_batches`);
`from_encoder_decoder` concatenates each row's inputs and targets the same way, so a rank
task's candidates score `log p(targets | inputs)` as the prefix-LM trains it. Rows are
padded with 0 at the end (seqio's convention); a row's length runs to its last non-zero id,
so a real token 0 inside it (GPT-2's `!`) stays.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from softprompt_jax.causal_lm import IGNORE_INDEX

Batch = Mapping[str, jax.Array]


def causal_lm_batch(batch: Batch) -> dict[str, jax.Array]:
    """`{input_ids, attention_mask, labels, loss_weights[, prompt_ids]}` of either T5X batch.

    A batch that is already Hugging Face's (`input_ids`, `attention_mask`, `labels`) is kept.
    """
    if "input_ids" in batch:
        return dict(batch)
    if "encoder_input_tokens" in batch:
        return from_encoder_decoder(batch)
    return from_prefix_lm(batch)


def from_prefix_lm(batch: Batch) -> dict[str, jax.Array]:
    """The causal-LM batch of seqio's prefix-LM features (unpacked)."""
    tokens = jnp.asarray(batch["decoder_target_tokens"])
    weights = jnp.asarray(batch["decoder_loss_weights"]).astype(jnp.float32)
    used = (weights > 0) | (jnp.asarray(batch["decoder_causal_attention"]) > 0)
    # A position is real when a used position follows it (inputs, then targets, then padding).
    mask = jnp.flip(jnp.cumsum(jnp.flip(used, -1), -1), -1) > 0
    return _with_prompt_ids(batch, tokens, mask, weights)


def from_encoder_decoder(batch: Batch) -> dict[str, jax.Array]:
    """Each row's inputs (up to their padding) followed by its targets, right-padded.

    With `encoder_index` (`batching.share_encoder_rows`), row i's inputs (and prompt id) are
    encoder row `encoder_index[i]`.
    """
    inputs = jnp.asarray(batch["encoder_input_tokens"])
    prompt_ids = batch.get("prompt_ids")
    if "encoder_index" in batch:
        index = jnp.asarray(batch["encoder_index"])
        inputs = jnp.take(inputs, index, axis=0)
        prompt_ids = None if prompt_ids is None else jnp.take(prompt_ids, index, axis=0)
    targets = jnp.asarray(batch["decoder_target_tokens"])
    target_weights = jnp.asarray(batch.get("decoder_loss_weights", targets > 0), jnp.float32)
    num_inputs, num_targets = _length(inputs), _length(targets)
    position = jnp.arange(inputs.shape[1] + targets.shape[1])[None]
    in_targets = position - num_inputs
    target_at = jnp.clip(in_targets, 0, targets.shape[1] - 1)
    is_input = position < num_inputs
    tokens = jnp.where(
        is_input,
        jnp.take_along_axis(inputs, jnp.clip(position, 0, inputs.shape[1] - 1), axis=1),
        jnp.take_along_axis(targets, target_at, axis=1),
    )
    mask = position < num_inputs + num_targets
    weights = jnp.where(
        is_input | ~mask, 0.0, jnp.take_along_axis(target_weights, target_at, axis=1)
    )
    return _with_prompt_ids({"prompt_ids": prompt_ids}, tokens, mask, weights)


def right_aligned(tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Right-padded input rows moved to the right (left padding), and their mask, to generate."""
    tokens = jnp.asarray(tokens)
    length = tokens.shape[1]
    shift = length - _length(tokens)
    source = jnp.arange(length)[None] - shift
    aligned = jnp.where(source >= 0, jnp.take_along_axis(tokens, jnp.maximum(source, 0), 1), 0)
    return aligned, (source >= 0).astype(jnp.int32)


def _length(tokens: jax.Array) -> jax.Array:
    """`[batch, 1]`: each right-padded row's length, up to its last non-zero id (id 0 may be a
    real token inside a row, as GPT-2's `!`)."""
    nonzero = tokens > 0
    last = tokens.shape[1] - jnp.argmax(jnp.flip(nonzero, -1), axis=-1)
    return jnp.where(jnp.any(nonzero, -1), last, 0)[:, None]


def _with_prompt_ids(
    batch: Batch, tokens: jax.Array, mask: jax.Array, weights: jax.Array
) -> dict[str, jax.Array]:
    labels = jnp.where(weights > 0, tokens, IGNORE_INDEX)
    out = {
        "input_ids": tokens,
        "attention_mask": mask.astype(jnp.int32),
        "labels": labels,
        "loss_weights": weights,
    }
    if batch.get("prompt_ids") is not None:
        out["prompt_ids"] = jnp.asarray(batch["prompt_ids"])
    return out
