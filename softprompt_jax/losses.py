"""The prompt's loss, gradient and target scores on the frozen model, and the cross-entropy.

As T5X keeps `loss_fn` and `score_batch` with its model (`models.py`), apart from the trainer,
these sit right above the prompted network: training, evaluation and inference all use them.

T5X's token cross-entropy (`t5x/losses.py`) has label smoothing, z-loss and loss weights.

Per target token: `CE = logZ - sum(soft_targets * logits) - smoothing_constant` plus
`z_loss * logZ**2`, multiplied by `decoder_loss_weights` (0 on padding). The sum
over tokens is then normalised one of two ways:

- `"sum"`: T5X's default for T5 1.1 (`loss_normalizing_factor=None`), used by the
  official prompt-tuning runs;
- `"mean_tokens"`: divided by the number of weighted target tokens, which is
  Hugging Face's (and PEFT's) mean over non-padding labels (T5X's
  `NUM_REAL_TARGET_TOKENS`);
- `"mean_sequences"`: T5X's `AVERAGE_PER_SEQUENCE`: each sequence's mean over its weighted
  tokens, averaged over the sequences (a packed row's segments count one by one; a row or
  segment without target tokens counts for nothing).

All three give the same loss on packed rows as on the same examples unpacked.

Autodiff of this loss gives exactly T5X's custom VJP,
`(1 + 2 * z_loss * logZ) * softmax - soft_targets`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from softprompt_jax.causal_lm import lm_loss_inputs
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.lm_batches import causal_lm_batch
from softprompt_jax.model import T5, T5Config
from softprompt_jax.model.decoder_config import is_decoder_only
from softprompt_jax.prompts import packing_features, prepend_prompt, prompted_logits
from softprompt_jax.t5_prefixes import is_t5_prefix, t5_prefix_logits

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]

NORMALIZATIONS = ("mean_tokens", "sum", "mean_sequences")


def token_cross_entropy(
    logits: jax.Array, targets: jax.Array, *, z_loss: float = 0.0, label_smoothing: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """Per-token `(loss, z_loss_term)` `[batch, length]`; `loss` includes the z-loss term."""
    logits = logits.astype(jnp.float32)
    vocab_size = logits.shape[-1]
    confidence = 1.0 - label_smoothing
    low_confidence = label_smoothing / (vocab_size - 1)
    # Entropy of the smoothed target distribution, so a perfect model scores 0.
    normalizing_constant = -(
        confidence * jnp.log(confidence)
        + (vocab_size - 1) * low_confidence * jnp.log(low_confidence + 1e-20)
    )
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    # sum(soft_targets * logits) without materialising a one-hot [batch, length, vocab].
    expected_logit = (confidence - low_confidence) * target_logit
    if label_smoothing:
        expected_logit += low_confidence * jnp.sum(logits, axis=-1)
    z_term = z_loss * jnp.square(log_z)
    return log_z - expected_logit - normalizing_constant + z_term, z_term


def loss_weights(batch: Mapping[str, jax.Array]) -> jax.Array:
    """`decoder_loss_weights` if the batch has them, else 1 on non-padding targets."""
    if "decoder_loss_weights" in batch:
        return batch["decoder_loss_weights"].astype(jnp.float32)
    return (batch["decoder_target_tokens"] > 0).astype(jnp.float32)


def sequence_weights(weights: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """Each sequence's loss weights divided by their sum: its tokens' share of its mean.

    `segment_ids` `[batch, length]` (packed rows) make each segment a sequence; otherwise
    each row is one. A sequence without weighted tokens keeps weights 0.
    """
    if segment_ids is None:
        totals = jnp.sum(weights, axis=-1, keepdims=True)
    else:
        same = segment_ids[:, :, None] == segment_ids[:, None, :]
        totals = jnp.einsum("bij,bj->bi", same.astype(weights.dtype), weights)
    return jnp.where(totals > 0, weights / jnp.where(totals > 0, totals, 1.0), 0.0)


def weighted_cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    *,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    normalization: str = "sum",
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scalar loss and T5X-style metrics (`loss`, `z_loss`, `cross_ent_loss`, ...).

    `segment_ids` (packed rows' `decoder_segment_ids`) delimit the sequences for
    `"mean_sequences"`; the other normalisations need no segments.
    """
    if normalization not in NORMALIZATIONS:
        raise SoftpromptError(
            f"loss normalization {normalization!r}; expected one of {NORMALIZATIONS}"
        )
    per_token, z_term = token_cross_entropy(
        logits, targets, z_loss=z_loss, label_smoothing=label_smoothing
    )
    num_tokens = jnp.sum(weights)
    normalized = weights
    divisor = 1.0
    if normalization == "mean_tokens":
        divisor = jnp.maximum(num_tokens, 1.0)
    elif normalization == "mean_sequences":
        normalized = sequence_weights(weights, segment_ids)
        divisor = jnp.maximum(jnp.sum(normalized), 1.0)
    loss = jnp.sum(per_token * normalized) / divisor
    total_z_loss = jnp.sum(z_term * normalized) / divisor
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    metrics = {
        "loss": loss,
        "z_loss": total_z_loss,
        "cross_ent_loss": loss - total_z_loss,
        "num_target_tokens": num_tokens,
        "accuracy": jnp.sum(correct * weights) / jnp.maximum(num_tokens, 1.0),
    }
    return loss, metrics


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """How the training loss is computed; the defaults are T5X's (official prompt tuning).

    `prompt_loss_and_grad` defaults instead to the Hugging Face definition
    (z_loss 0, mean over target tokens, no dropout) so it compares with PEFT.
    Dropout (`cfg.dropout_rate`) hits the prompt too when `prompt_dropout` is on: the
    encoder applies input dropout to the prompt and the token embeddings together, as
    T5X does; off, only the token embeddings (and the network inside) are dropped.
    """

    z_loss: float = 1e-4
    label_smoothing: float = 0.0
    normalization: str = "sum"
    enable_dropout: bool = True
    prompt_dropout: bool = True


def prompt_loss(
    prompt: jax.Array,
    cfg: T5Config,
    params: Mapping[str, Any],
    batch: Batch,
    loss_config: LossConfig,
    dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """The scalar loss of a prompt on a T5X feature batch, with metrics (prompt first for grad).

    A packed batch (seqio's `encoder_segment_ids`, `encoder_positions`, `decoder_segment_ids`,
    each example's prompt slots reserved) gives the loss of its examples unpacked.
    """
    if is_decoder_only(cfg):
        return _causal_lm_loss(prompt, cfg, params, batch, loss_config)
    if is_t5_prefix(prompt):
        return _t5_prefix_loss(prompt, cfg, params, batch, loss_config)
    packing = packing_features(batch)
    logits = prompted_logits(
        cfg,
        params,
        prompt,
        batch["encoder_input_tokens"],
        batch["decoder_input_tokens"],
        batch.get("prompt_ids"),
        decoder_target_tokens=batch["decoder_target_tokens"],
        enable_dropout=loss_config.enable_dropout,
        dropout_rng=dropout_rng,
        prompt_dropout=loss_config.prompt_dropout,
        packing=packing,
    )
    return weighted_cross_entropy(
        logits,
        batch["decoder_target_tokens"],
        loss_weights(batch),
        z_loss=loss_config.z_loss,
        label_smoothing=loss_config.label_smoothing,
        normalization=loss_config.normalization,
        segment_ids=None if packing is None else packing["decoder_segment_ids"],
    )


def _causal_lm_loss(
    prompt: Any, cfg: Any, params: Mapping[str, Any], batch: Batch, loss_config: LossConfig
) -> tuple[jax.Array, Metrics]:
    """A decoder-only model's loss (`lm_batches`: prefix-LM features or HF's batch), no dropout."""
    logits, targets, weights = lm_loss_inputs(cfg, params, prompt, causal_lm_batch(batch))
    return weighted_cross_entropy(
        logits,
        targets,
        weights,
        z_loss=loss_config.z_loss,
        label_smoothing=loss_config.label_smoothing,
        normalization=loss_config.normalization,
    )


def _t5_prefix_loss(
    prefix: Any, cfg: T5Config, params: Mapping[str, Any], batch: Batch, loss_config: LossConfig
) -> tuple[jax.Array, Metrics]:
    """T5's loss with key/value prefixes (`t5_prefixes.py`), unpacked rows, no dropout."""
    targets = batch["decoder_target_tokens"]
    logits = t5_prefix_logits(
        cfg, params, prefix, batch["encoder_input_tokens"], batch["decoder_input_tokens"], targets
    )
    return weighted_cross_entropy(
        logits,
        targets,
        loss_weights(batch),
        z_loss=loss_config.z_loss,
        label_smoothing=loss_config.label_smoothing,
        normalization=loss_config.normalization,
    )


def _causal_lm_scores(cfg: Any, params: Mapping[str, Any], prompt: Any, batch: Batch) -> jax.Array:
    """A decoder-only model's summed target log-likelihood per row of a T5X batch."""
    logits, targets, weights = lm_loss_inputs(cfg, params, prompt, causal_lm_batch(batch))
    token_loss, _ = token_cross_entropy(logits, targets)
    return -jnp.sum(token_loss * weights, axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg", "max_segments"))
def packed_scores(
    cfg: T5Config,
    params: Mapping[str, Any],
    prompt: jax.Array,
    batch: Batch,
    max_segments: int,
) -> jax.Array:
    """Per-segment sums of target log-likelihoods `[batch, max_segments]` of packed rows.

    Column j holds segment j + 1 of each row (0 where a row has fewer segments): with the
    segments in order, these are `score_batch`'s per-example scores of the examples unpacked.
    """
    packing = packing_features(batch)
    if packing is None:
        raise SoftpromptError("packed_scores needs a packed batch (encoder_segment_ids, ...)")
    targets = batch["decoder_target_tokens"]
    logits = prompted_logits(
        cfg,
        params,
        prompt,
        batch["encoder_input_tokens"],
        batch["decoder_input_tokens"],
        decoder_target_tokens=targets,
        packing=packing,
    )
    token_loss, _ = token_cross_entropy(logits, targets)
    segments = jnp.arange(1, max_segments + 1)
    in_segment = packing["decoder_segment_ids"][:, None, :] == segments[None, :, None]
    return -jnp.sum(jnp.where(in_segment, (token_loss * loss_weights(batch))[:, None, :], 0), -1)


@functools.partial(
    jax.jit,
    static_argnames=(
        "cfg",
        "z_loss",
        "label_smoothing",
        "loss_normalization",
        "enable_dropout",
        "prompt_dropout",
    ),
)
def prompt_loss_and_grad(
    cfg: T5Config,
    params: Mapping[str, Any],
    prompt: jax.Array,
    batch: Batch,
    *,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    loss_normalization: str = "mean_tokens",
    enable_dropout: bool = False,
    dropout_rng: jax.Array | None = None,
    prompt_dropout: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """`(loss, d loss / d prompt)`; defaults give HF's mean CE over non-padding targets.

    Pass `z_loss=1e-4, loss_normalization="sum"` for T5X's training loss, and
    `enable_dropout=True` with a `dropout_rng` for `cfg.dropout_rate` dropout
    (`prompt_dropout=False` keeps input dropout off the prompt rows).
    """
    loss_config = LossConfig(
        z_loss=z_loss,
        label_smoothing=label_smoothing,
        normalization=loss_normalization,
        enable_dropout=enable_dropout,
        prompt_dropout=prompt_dropout,
    )
    (loss, _), grad = jax.value_and_grad(prompt_loss, has_aux=True)(
        prompt, cfg, params, batch, loss_config, dropout_rng
    )
    return loss, grad


def _shared_encoder_logits(
    model: T5,
    prompt: jax.Array,
    encoder_input_tokens: jax.Array,
    prompt_ids: jax.Array | None,
    encoder_index: jax.Array | None,
    decoder_input_tokens: jax.Array,
    decoder_target_tokens: jax.Array,
) -> jax.Array:
    """Body for `T5.apply`: encode each encoder row once; decoder row i reads `encoder_index[i]`.

    `encoder_index=None` pairs the rows one to one (the plain teacher-forced logits).
    """
    embeddings, mask = prepend_prompt(
        prompt, model.embed(encoder_input_tokens), encoder_input_tokens > 0, prompt_ids
    )
    encoded = model.encode(
        encoder_input_embeddings=embeddings, encoder_mask=mask, enable_dropout=False
    )
    if encoder_index is not None:
        encoded = jnp.take(encoded, encoder_index, axis=0)
        mask = jnp.take(mask, encoder_index, axis=0)
    return model.decode(
        encoded, mask, decoder_input_tokens, decoder_target_tokens, enable_dropout=False
    )


def _target_scores(
    cfg, params, prompt, tokens, prompt_ids, encoder_index, targets, inputs, weights
):
    """Summed target log-likelihood per decoder row, each encoder row encoded once."""
    logits = T5(cfg).apply(
        {"params": params},
        prompt,
        tokens,
        prompt_ids,
        encoder_index,
        inputs,
        targets,
        method=_shared_encoder_logits,
    )
    token_loss, _ = token_cross_entropy(logits, targets)
    return -jnp.sum(token_loss * weights, axis=-1)


@functools.partial(jax.jit, static_argnames="cfg")
def score_batch(
    cfg: T5Config,
    params: Mapping[str, Any],
    prompt: jax.Array,
    batch: Batch,
    prompt_ids: jax.Array | None = None,
) -> jax.Array:
    """Per-example sum of target log-likelihoods `[batch]` (T5X `score_batch`, no z-loss).

    With an `encoder_index` `[batch]` feature (`batching.share_encoder_rows` adds it), the
    encoder rows are the distinct inputs `[n, L]` (and `prompt_ids` `[n]`), each encoded once,
    and example i is scored on encoder row `encoder_index[i]`: rank classification's
    candidates of one input share its encoder pass.
    """
    if prompt_ids is None:
        prompt_ids = batch.get("prompt_ids")
    if is_decoder_only(cfg):
        ids = {} if prompt_ids is None else {"prompt_ids": prompt_ids}
        return _causal_lm_scores(cfg, params, prompt, {**batch, **ids})
    if is_t5_prefix(prompt):
        tokens = batch["encoder_input_tokens"]
        if "encoder_index" in batch:
            tokens = jnp.take(tokens, batch["encoder_index"], axis=0)
        targets = batch["decoder_target_tokens"]
        logits = t5_prefix_logits(
            cfg, params, prompt, tokens, batch["decoder_input_tokens"], targets
        )
        token_loss, _ = token_cross_entropy(logits, targets)
        return -jnp.sum(token_loss * loss_weights(batch), axis=-1)
    return _target_scores(
        cfg,
        params,
        prompt,
        batch["encoder_input_tokens"],
        prompt_ids,
        batch.get("encoder_index"),
        batch["decoder_target_tokens"],
        batch["decoder_input_tokens"],
        loss_weights(batch),
    )
