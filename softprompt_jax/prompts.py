"""Soft prompts: how they are initialised and how they enter the frozen encoder.

A prompt is a float32 array `[length, emb_dim]`; a bank of prompts is
`[num_prompts, length, emb_dim]`, with one prompt id per example choosing which
row of the bank that example sees. The prompt is prepended to the encoder's
input embeddings and the encoder mask gets ones in front; the decoder is
untouched (as in T5X's prompt-tuning code and Hugging Face PEFT).

Packed rows (several examples per row, seqio's packing, T5X's `encoder_segment_ids` and
`encoder_positions`) hold each example's prompt at the start of its segment instead: the data
pipeline reserves the prompt's positions in front of every example's inputs before packing
(slot tokens `prompt_slot_token(prompt id)`), and `fill_prompt_slots` writes the prompt over
them. Inside a segment the rows are then exactly those of the unpacked example.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from softprompt_jax.checkpoints.prompt_files import load_prompt
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.model import T5, T5Config
from softprompt_jax.prompt_bank import PaddedBank, PromptBank

# Logical axes for the partitioner; both map to "replicated" (the prompt is tiny).
PROMPT_AXES = ("prompt_length", "embed")
BANK_AXES = ("prompts", "prompt_length", "embed")

INIT_METHODS = ("random_uniform", "sampled_vocab", "class_labels", "text", "file")

# Ids 0, 1, 2 are T5's pad, EOS and unk; regular SentencePiece pieces follow,
# ordered by frequency, and sentinels (`<extra_id_N>`) come after them.
FIRST_REGULAR_ID = 3
SAMPLED_VOCAB_POPULATION = 5000


class Vocabulary(Protocol):
    """Anything that turns text into token ids (seqio, sentencepiece, ...)."""

    def encode(self, text: str) -> Sequence[int]: ...


def init_prompt(
    method: str,
    length: int,
    *,
    params: Mapping[str, Any] | None = None,
    vocab: Vocabulary | None = None,
    labels: Sequence[str] | None = None,
    text: str | None = None,
    path: str | Path | None = None,
    emb_dim: int | None = None,
    seed: int = 0,
    scale: float = 0.5,
    population_size: int = SAMPLED_VOCAB_POPULATION,
) -> jax.Array:
    """A new float32 prompt `[length, emb_dim]`, initialised as in Lester et al. (2021).

    - `random_uniform`: U[-scale, scale] (paper: scale 0.5).
    - `sampled_vocab`: embeddings of distinct regular tokens drawn from the
      `population_size` most frequent ids (paper: 5,000; special ids skipped).
    - `class_labels`: row i is the mean embedding of `labels[i]`'s pieces; the
      remaining rows come from `sampled_vocab`.
    - `text`: the embeddings of `text`'s tokens (no EOS), truncated to `length`;
      remaining rows come from `sampled_vocab`.
    - `file`: a prompt file (see `load_prompt`), checked against `[length, emb_dim]`.

    The same arguments and `seed` always give the same prompt.
    """
    if method not in INIT_METHODS:
        raise SoftpromptError(
            f"unknown prompt init method {method!r}; expected one of {INIT_METHODS}"
        )
    if length <= 0:
        raise SoftpromptError(f"prompt length must be positive, got {length}")
    if method == "random_uniform":
        dim = emb_dim if emb_dim is not None else _embedding_table(params).shape[1]
        rng = np.random.default_rng(seed)
        return jnp.asarray(rng.uniform(-scale, scale, (length, dim)), jnp.float32)
    table = _embedding_table(params)
    if method == "file":
        if path is None:
            raise SoftpromptError("init_prompt('file') needs path=")
        return load_prompt(path, expected_shape=(length, table.shape[1]))
    prompt = _sampled_vocab(table, length, vocab, seed, population_size)
    if method == "class_labels":
        if vocab is None or not labels:
            raise SoftpromptError(
                "init_prompt('class_labels') needs vocab= and a non-empty labels="
            )
        if len(labels) > length:
            raise SoftpromptError(
                f"{len(labels)} class labels do not fit in a prompt of length {length}"
            )
        rows = [_embed(table, _encode(vocab, label)).mean(axis=0) for label in labels]
        prompt = prompt.at[: len(rows)].set(jnp.stack(rows))
    elif method == "text":
        if vocab is None or not text:
            raise SoftpromptError("init_prompt('text') needs vocab= and a non-empty text=")
        rows = _embed(table, _encode(vocab, text)[:length])
        prompt = prompt.at[: rows.shape[0]].set(rows)
    return prompt


def _embedding_table(params: Mapping[str, Any] | None) -> jax.Array:
    """The frozen model's input embedding table `[vocab, emb_dim]`."""
    try:
        return params["token_embedder"]["embedding"]
    except (KeyError, TypeError):
        raise SoftpromptError(
            "this prompt initialiser needs params= with params['token_embedder']['embedding'] "
            "(random_uniform takes emb_dim= instead)"
        ) from None


def _embed(table: jax.Array, ids: Sequence[int]) -> jax.Array:
    """Rows of the embedding table as float32 (exact for bf16 and f32 tables)."""
    return jnp.take(table, jnp.asarray(ids, jnp.int32), axis=0).astype(jnp.float32)


def _encode(vocab: Vocabulary, text: str) -> list[int]:
    """Token ids of `text` without EOS; an empty encoding is an error."""
    ids = list(vocab.encode(text))
    if not ids:
        raise SoftpromptError(f"the vocabulary encodes {text!r} to no tokens")
    return ids


def _sampled_vocab(
    table: jax.Array, length: int, vocab: Vocabulary | None, seed: int, population_size: int
) -> jax.Array:
    """Embeddings of `length` regular ids drawn from the `population_size` most frequent."""
    end = min(population_size, table.shape[0], _num_regular_ids(vocab))
    population = np.arange(FIRST_REGULAR_ID, end)
    if population.size == 0:
        raise SoftpromptError(
            f"no regular token ids to sample: population_size={population_size}, "
            f"embedding rows={table.shape[0]}"
        )
    # Distinct tokens when the population allows it (as the official code does).
    replace = length > population.size
    ids = np.random.default_rng(seed).choice(population, size=length, replace=replace)
    return _embed(table, ids)


def _num_regular_ids(vocab: Vocabulary | None) -> int:
    """Ids below this are regular pieces: a seqio vocabulary's size without its sentinels."""
    size, extra = getattr(vocab, "vocab_size", None), getattr(vocab, "extra_ids", 0)
    if isinstance(size, int) and isinstance(extra, int):
        return size - extra
    return np.iinfo(np.int32).max


def prepend_prompt(
    prompt: jax.Array | PromptBank,
    embeddings: jax.Array,
    mask: jax.Array,
    prompt_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`[prompt; embeddings]` and `[prompt mask; mask]`: one prompt for all, or one per example.

    `prompt` is `[P, d]` (shared), or a bank with `prompt_ids` `[batch]` picking a prompt per
    example (a gather, so it runs under jit with no Python loop): an array `[N, P, d]`, or a
    `PromptBank` of prompts of any lengths, padded on the left with masked rows (or a
    `PaddedBank`, padded so already). The prompt is cast to the embeddings' (compute) dtype.
    """
    batch = embeddings.shape[0]
    if isinstance(prompt, (PromptBank, PaddedBank)):
        padded, padded_mask = prompt.padded()
        per_example = jnp.take(padded, _bank_ids(padded.shape, prompt_ids, batch), axis=0)
        prompt_mask = jnp.take(padded_mask, prompt_ids, axis=0).astype(mask.dtype)
    elif prompt.ndim == 2:
        if prompt_ids is not None:
            raise SoftpromptError(
                f"prompt_ids given but prompt has shape {prompt.shape}, not a bank"
            )
        per_example = jnp.broadcast_to(prompt, (batch, *prompt.shape))
        prompt_mask = jnp.ones((batch, prompt.shape[0]), mask.dtype)
    elif prompt.ndim == 3:
        per_example = jnp.take(prompt, _bank_ids(prompt.shape, prompt_ids, batch), axis=0)
        prompt_mask = jnp.ones((batch, prompt.shape[1]), mask.dtype)
    else:
        raise SoftpromptError(
            f"prompt must be [length, emb_dim] or a bank, got shape {prompt.shape}"
        )
    if per_example.shape[-1] != embeddings.shape[-1]:
        raise SoftpromptError(
            f"prompt has emb_dim {per_example.shape[-1]}; the model's is {embeddings.shape[-1]}"
        )
    return (
        jnp.concatenate([per_example.astype(embeddings.dtype), embeddings], axis=1),
        jnp.concatenate([prompt_mask, mask], axis=1),
    )


def prompt_slot_token(prompt_id: int) -> int:
    """The token id that reserves a prompt position for prompt `prompt_id` (never 0, padding).

    Slot tokens are never embedded as tokens: `fill_prompt_slots` replaces them. A bank reads
    each segment's prompt id back from its first slot.
    """
    return prompt_id + 1


def fill_prompt_slots(
    prompt: jax.Array | PromptBank | PaddedBank,
    embeddings: jax.Array,
    encoder_input_tokens: jax.Array,
    segment_ids: jax.Array,
    positions: jax.Array,
) -> jax.Array:
    """Packed rows: each segment's first P positions (its reserved slots) become its prompt.

    `segment_ids` / `positions` `[batch, length]` are seqio's packing features (positions
    restart at 0 in every segment). A shared prompt `[P, d]` fills the first P positions of
    every segment; a bank (`[N, P, d]`, a `PromptBank` of any lengths or a `PaddedBank`) fills
    the first `P_id` positions with prompt `id`, read from the segment's first slot token
    (`prompt_slot_token`). A gather and a select: no Python loop under jit.
    """
    if isinstance(prompt, (PromptBank, PaddedBank)):
        table, mask = prompt.padded()
        lengths = jnp.sum(mask, axis=-1, dtype=jnp.int32)
    elif prompt.ndim == 2:
        table, lengths = prompt[None], jnp.asarray([prompt.shape[0]], jnp.int32)
    elif prompt.ndim == 3:
        table = prompt
        lengths = jnp.full((prompt.shape[0],), prompt.shape[1], jnp.int32)
    else:
        raise SoftpromptError(
            f"prompt must be [length, emb_dim] or a bank, got shape {prompt.shape}"
        )
    if table.shape[-1] != embeddings.shape[-1]:
        raise SoftpromptError(
            f"prompt has emb_dim {table.shape[-1]}; the model's is {embeddings.shape[-1]}"
        )
    longest = table.shape[1]
    if table.shape[0] == 1:
        ids = jnp.zeros_like(positions)
    else:  # the segment's first token is its first slot, prompt_slot_token(id)
        starts = jnp.maximum(jnp.arange(positions.shape[1]) - positions, 0)
        first = jnp.take_along_axis(encoder_input_tokens, starts, axis=1)
        ids = jnp.clip(first - prompt_slot_token(0), 0, table.shape[0] - 1)
    length = lengths[ids]
    is_slot = (segment_ids > 0) & (positions < length)
    # A bank's shorter prompts sit at the end of their padded rows (see PromptBank.padded).
    rows = jnp.clip(longest - length + positions, 0, longest - 1)
    vectors = table[ids, rows].astype(embeddings.dtype)
    return jnp.where(is_slot[..., None], vectors, embeddings)


def prompt_length(prompt: jax.Array | PromptBank) -> int:
    """Encoder positions the prompt takes: its length, or a bank's longest."""
    if isinstance(prompt, PaddedBank):
        return prompt.prompts.shape[-2]
    return max(prompt.lengths) if isinstance(prompt, PromptBank) else prompt.shape[-2]


def _bank_ids(bank_shape: tuple[int, ...], prompt_ids: jax.Array | None, batch: int) -> jax.Array:
    if prompt_ids is None or prompt_ids.shape != (batch,):
        got = None if prompt_ids is None else prompt_ids.shape
        raise SoftpromptError(
            f"a prompt bank {tuple(bank_shape)} needs prompt_ids of shape ({batch},), got {got}"
        )
    return prompt_ids


def prompted_apply(
    model: T5,
    prompt: jax.Array,
    encoder_input_tokens: jax.Array,
    decoder_input_tokens: jax.Array,
    decoder_target_tokens: jax.Array | None = None,
    prompt_ids: jax.Array | None = None,
    *,
    enable_dropout: bool = False,
    prompt_dropout: bool = True,
    packing: Mapping[str, jax.Array] | None = None,
) -> jax.Array:
    """Body for `T5.apply(..., method=prompted_apply)`: embed, prepend the prompt, run T5.

    With `prompt_dropout` (T5X's behaviour) the encoder's input dropout hits the prompt
    rows too; without it only the token embeddings are dropped. `packing` (packed rows:
    `encoder_segment_ids`, `encoder_positions`, `decoder_segment_ids`) fills each segment's
    reserved slots with its prompt instead of prepending one (`fill_prompt_slots`).
    """
    if packing is not None:
        return _packed_apply(
            model,
            prompt,
            encoder_input_tokens,
            decoder_input_tokens,
            decoder_target_tokens,
            packing,
            enable_dropout=enable_dropout,
            prompt_dropout=prompt_dropout,
        )
    embeddings, mask = prepend_prompt(
        prompt, model.embed(encoder_input_tokens), encoder_input_tokens > 0, prompt_ids
    )
    return model(
        None,
        decoder_input_tokens,
        decoder_target_tokens,
        encoder_input_embeddings=embeddings,
        encoder_mask=mask,
        enable_dropout=enable_dropout,
        undropped_prefix=0 if prompt_dropout else prompt_length(prompt),
    )


PACKING_FEATURES = ("encoder_segment_ids", "encoder_positions", "decoder_segment_ids")


def packing_features(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array] | None:
    """The batch's packing features (`PACKING_FEATURES`), or None for an unpacked batch."""
    if "encoder_segment_ids" not in batch:
        return None
    missing = [name for name in PACKING_FEATURES if name not in batch]
    if missing:
        raise SoftpromptError(f"a packed batch needs {PACKING_FEATURES}; it lacks {missing}")
    return {name: batch[name] for name in PACKING_FEATURES}


def check_packed_dropout(enable_dropout: bool, prompt_dropout: bool) -> None:
    """Packed rows' prompts sit among the inputs, so dropout cannot spare them: refuse that."""
    if enable_dropout and not prompt_dropout:
        raise SoftpromptError(
            "PACK=True drops the prompt rows with the inputs: set LossConfig.prompt_dropout "
            "= True (T5X's behaviour) or LossConfig.enable_dropout = False"
        )


def _packed_apply(
    model: T5,
    prompt: jax.Array | PromptBank,
    encoder_input_tokens: jax.Array,
    decoder_input_tokens: jax.Array,
    decoder_target_tokens: jax.Array | None,
    packing: Mapping[str, jax.Array],
    *,
    enable_dropout: bool,
    prompt_dropout: bool,
) -> jax.Array:
    """`prompted_apply` on packed rows: prompts in the slots, attention within segments."""
    check_packed_dropout(enable_dropout, prompt_dropout)
    embeddings = fill_prompt_slots(
        prompt,
        model.embed(encoder_input_tokens),
        encoder_input_tokens,
        packing["encoder_segment_ids"],
        packing["encoder_positions"],
    )
    return model(
        None,
        decoder_input_tokens,
        decoder_target_tokens,
        encoder_input_embeddings=embeddings,
        encoder_mask=encoder_input_tokens > 0,
        encoder_segment_ids=packing["encoder_segment_ids"],
        decoder_segment_ids=packing["decoder_segment_ids"],
        enable_dropout=enable_dropout,
    )


@functools.partial(jax.jit, static_argnames=("cfg", "enable_dropout", "prompt_dropout"))
def prompted_logits(
    cfg: T5Config,
    params: Mapping[str, Any],
    prompt: jax.Array,
    encoder_input_tokens: jax.Array,
    decoder_input_tokens: jax.Array,
    prompt_ids: jax.Array | None = None,
    *,
    decoder_target_tokens: jax.Array | None = None,
    enable_dropout: bool = False,
    dropout_rng: jax.Array | None = None,
    prompt_dropout: bool = True,
    packing: Mapping[str, jax.Array] | None = None,
) -> jax.Array:
    """Teacher-forced float32 logits `[batch, target_len, vocab]` of the prompted model.

    `packing`: packed rows' `PACKING_FEATURES` (see `prompted_apply`).
    """
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    return T5(cfg).apply(
        {"params": params},
        prompt,
        encoder_input_tokens,
        decoder_input_tokens,
        decoder_target_tokens,
        prompt_ids,
        enable_dropout=enable_dropout,
        prompt_dropout=prompt_dropout,
        packing=packing,
        method=prompted_apply,
        rngs=rngs,
    )
