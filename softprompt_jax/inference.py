"""Prompted inference: encode once with the prompt, then decode or score.

A prompt is `[P, d]`, or a bank `[N, P, d]` with `prompt_ids` `[batch]` picking
one row per example, so one batch can mix tasks or ensemble members.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from softprompt_jax import batching, decoding
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.lm_batches import right_aligned
from softprompt_jax.lm_decoding import lm_generate
from softprompt_jax.losses import score_batch
from softprompt_jax.model.config import T5Config
from softprompt_jax.model.decoder_config import is_decoder_only
from softprompt_jax.model.network import T5
from softprompt_jax.prompt_bank import PromptBank
from softprompt_jax.prompts import prepend_prompt
from softprompt_jax.t5_prefixes import is_t5_prefix, t5_prefix_encode

Batch = Mapping[str, np.ndarray]


def _encode_with_prompt(model: T5, prompt, tokens, prompt_ids):
    embeddings, mask = prepend_prompt(prompt, model.embed(tokens), tokens > 0, prompt_ids)
    encoded = model.encode(
        encoder_input_embeddings=embeddings, encoder_mask=mask, enable_dropout=False
    )
    return encoded, mask


def prompted_encode(
    cfg: T5Config,
    params: Mapping[str, Any],
    prompt: jax.Array,
    tokens: jax.Array,
    prompt_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Encoder output `[b, P + l, d]` and its mask for `[prompt; embed(tokens)]`."""
    return T5(cfg).apply({"params": params}, prompt, tokens, prompt_ids, method=_encode_with_prompt)


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "max_length", "temperature", "top_k", "num_beams", "alpha"),
)
def predict_tokens(
    cfg: T5Config,
    params: Mapping[str, Any],
    prompt: jax.Array,
    tokens: jax.Array,
    prompt_ids: jax.Array | None = None,
    *,
    max_length: int,
    temperature: float = 0.0,
    top_k: int = 0,
    rng: jax.Array | None = None,
    num_beams: int = 1,
    alpha: float = 0.6,
) -> jax.Array:
    """Decoded target ids `[batch, max_length]`, EOS kept and zeros after it.

    Greedy unless `temperature > 0` (sampling) or `num_beams > 1` (beam search with
    length penalty `alpha`, returning each row's best sequence).
    """
    if is_decoder_only(cfg):
        if temperature > 0 or num_beams > 1:
            raise SoftpromptError("decoder-only models decode greedily (no sampling or beams yet)")
        inputs, mask = right_aligned(tokens)
        # No EOS id here (the vocabulary's is not known): texts are cut at it when decoded.
        return lm_generate(cfg, params, inputs, mask, max_length, prompt, prompt_ids)
    decoder_prefix = None
    if is_t5_prefix(prompt):
        encoded, mask, decoder_prefix = t5_prefix_encode(cfg, params, prompt, tokens)
    else:
        encoded, mask = prompted_encode(cfg, params, prompt, tokens, prompt_ids)
    if num_beams > 1:
        sequences, _ = decoding.beam_search(
            cfg,
            params,
            encoded,
            mask,
            max_length=max_length,
            num_beams=num_beams,
            alpha=alpha,
            prefix=decoder_prefix,
        )
        return sequences[:, 0]
    return decoding.decode(
        cfg,
        params,
        encoded,
        mask,
        max_length=max_length,
        temperature=temperature,
        top_k=top_k,
        rng=rng,
        prefix=decoder_prefix,
    )


def ids_to_texts(vocabulary, ids: np.ndarray) -> list[str]:
    """Decode each row up to (not including) the vocabulary's EOS with a seqio vocabulary.

    Ids 0 before EOS go to the vocabulary too: padding to T5's and the byte vocabulary (which
    decode it to nothing), a real token to some (GPT-2's `!`).
    """
    texts = []
    for row in np.asarray(ids).tolist():
        if vocabulary.eos_id in row:
            row = row[: row.index(vocabulary.eos_id)]
        texts.append(vocabulary.decode(row))
    return texts


def make_score_fn(
    cfg: T5Config, params: Mapping[str, Any], prompt: jax.Array
) -> Callable[[Batch], np.ndarray]:
    """The rank-classification `ScoreFn`: summed target log-likelihood per example.

    Rows of a batch that share their input (and prompt), as a rank task's candidates do,
    share one encoder pass (`batching.share_encoder_rows`; T5 with a soft prompt). Scores
    through the module-level jitted `score_batch`, so every call (every in-training eval)
    reuses the programs compiled before.
    """
    # T5 with a soft prompt (array or bank); decoder-only models and prefixes score row by row.
    share = isinstance(cfg, T5Config) and isinstance(prompt, jax.Array | np.ndarray | PromptBank)

    def score_fn(batch: Batch) -> np.ndarray:
        shared = batching.share_encoder_rows(batch) if share else batch
        features = {k: jnp.asarray(v) for k, v in shared.items()}
        return np.asarray(score_batch(cfg, params, prompt, features))

    return score_fn


def score_candidates(
    cfg: T5Config,
    params: Mapping[str, Any],
    prompt: jax.Array | PromptBank | Any,
    inputs: jax.Array,
    candidates: jax.Array,
    prompt_ids: jax.Array | None = None,
) -> jax.Array:
    """Each candidate's summed log-likelihood `[B, C]` given its input: rank classification.

    `inputs` `[B, L]` are input ids (0-padded, EOS included); `candidates` `[B, C, T]` are
    target ids (0-padded, EOS included; an all-zero candidate scores 0); `prompt_ids` `[B]`
    pick each input's prompt of a bank. Equals `losses.score_batch` on the B * C
    (input, candidate) rows with T5X's decoder inputs, through its dispatch: T5 with a soft
    prompt encodes each input once; decoder-only models and T5 prefixes score row by row.
    """
    shapes = tuple(jnp.shape(inputs)), tuple(jnp.shape(candidates))
    if len(shapes[0]) != 2 or len(shapes[1]) != 3 or shapes[1][0] != shapes[0][0]:
        raise SoftpromptError(
            "score_candidates takes inputs [B, L] and candidates [B, C, T]; "
            f"got inputs {shapes[0]} and candidates {shapes[1]}"
        )
    if prompt_ids is not None and tuple(jnp.shape(prompt_ids)) != shapes[0][:1]:
        raise SoftpromptError(
            f"score_candidates: prompt_ids {tuple(jnp.shape(prompt_ids))} must be [B] = "
            f"{shapes[0][:1]}, one per input"
        )
    return _score_candidates(cfg, params, prompt, inputs, candidates, prompt_ids)


@functools.partial(jax.jit, static_argnames="cfg")
def _score_candidates(cfg, params, prompt, inputs, candidates, prompt_ids):
    """`score_candidates` once its shapes are checked, compiled once per shape."""
    batch, count, length = candidates.shape
    targets = jnp.asarray(candidates).reshape(batch * count, length)
    features = {
        "encoder_input_tokens": jnp.asarray(inputs),
        "encoder_index": jnp.repeat(jnp.arange(batch, dtype=jnp.int32), count),
        "decoder_input_tokens": batching.shift_right(targets),
        "decoder_target_tokens": targets,
        "decoder_loss_weights": (targets > 0).astype(jnp.int32),
    }
    return score_batch(cfg, params, prompt, features, prompt_ids).reshape(batch, count)


def candidate_scores(
    cfg: T5Config,
    params: Mapping[str, Any],
    prompt: jax.Array | PromptBank,
    inputs: Sequence[np.ndarray],
    candidates: Sequence[Sequence[np.ndarray]],
    prompt_ids: Sequence[int] | None = None,
    *,
    batch_size: int,
    inputs_length: int | None = None,
    length_buckets: int = 1,
) -> list[np.ndarray]:
    """`score_candidates` on token lists: per input, its candidates' scores (float64), in order.

    `inputs[i]` are input ids (EOS included), `candidates[i]` its candidate target ids (any
    number, EOS included), `prompt_ids[i]` its prompt of a bank. Inputs longer than
    `inputs_length` (default: the longest) are cut. Each batch holds as many inputs as fit
    `batch_size` (input, candidate) rows (at least one), every one with all its candidates;
    `length_buckets > 1` pads batches to a few input lengths (`batching.bucket_lengths`)
    instead of the longest.
    """
    count = max([len(each) for each in candidates] + [0])
    if not count:
        return [np.zeros([0]) for _ in inputs]
    inputs_length = inputs_length or max(len(tokens) for tokens in inputs)
    targets_length = max(len(c) for each in candidates for c in each)
    per_batch = max(1, batch_size // count)
    keys = [(x[:inputs_length].tobytes(), _id(prompt_ids, i)) for i, x in enumerate(inputs)]
    lengths = [len(tokens) for tokens in inputs]
    scores: list[np.ndarray] = []
    order: list[int] = []
    for length, indices in batching.by_length(lengths, inputs_length, length_buckets, keys):
        for start in range(0, len(indices), per_batch):
            chosen = indices[start : start + per_batch]
            options = np.zeros((per_batch, count, targets_length), np.int32)
            for row, i in enumerate(chosen):
                options[row, : len(candidates[i])] = batching.pad_tokens(
                    candidates[i], targets_length
                )
            ids = None if prompt_ids is None else [prompt_ids[i] for i in chosen]
            features = batching.t5x_features(
                [inputs[i] for i in chosen], None, ids, inputs_length=length, batch_size=per_batch
            )
            batch_scores = np.asarray(
                score_candidates(
                    cfg,
                    params,
                    prompt,
                    features["encoder_input_tokens"],
                    options,
                    features.get("prompt_ids"),
                ),
                np.float64,
            )
            scores += [batch_scores[row, : len(candidates[i])] for row, i in enumerate(chosen)]
        order += list(indices)
    return batching.restore_order(scores, order)


def _id(prompt_ids: Sequence[int] | None, row: int) -> int:
    return -1 if prompt_ids is None else int(prompt_ids[row])


def predict_texts(
    cfg: T5Config,
    params: Mapping[str, Any],
    prompt: jax.Array,
    vocabulary,
    batches: Sequence[tuple[Batch, int]] | Any,
    *,
    max_length: int,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    num_beams: int = 1,
    alpha: float = 0.6,
) -> list[str]:
    """Predictions as text for `(batch, real_rows)` pairs, in order.

    Greedy by default; with `temperature > 0` sampled (batch `i` uses `fold_in(seed, i)`,
    so the same seed gives the same texts); with `num_beams > 1` beam search (`alpha`: its
    length penalty). A batch's `prompt_ids` pick each row's prompt of a bank.
    """
    texts: list[str] = []
    for i, (batch, size) in enumerate(batches):
        tokens = jnp.asarray(batch["encoder_input_tokens"])
        rng = jax.random.fold_in(jax.random.PRNGKey(seed), i)
        ids = predict_tokens(
            cfg,
            params,
            prompt,
            tokens,
            batch.get("prompt_ids"),
            max_length=max_length,
            temperature=temperature,
            top_k=top_k,
            rng=rng,
            num_beams=num_beams,
            alpha=alpha,
        )
        texts += ids_to_texts(vocabulary, np.asarray(ids)[:size])
    return texts
