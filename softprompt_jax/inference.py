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
    share one encoder pass (`batching.share_encoder_rows`; T5 with a soft prompt).
    """
    scorer = jax.jit(functools.partial(score_batch, cfg))
    # T5 with a soft prompt (array or bank); decoder-only models and prefixes score row by row.
    share = isinstance(cfg, T5Config) and isinstance(prompt, jax.Array | np.ndarray | PromptBank)

    def score_fn(batch: Batch) -> np.ndarray:
        shared = batching.share_encoder_rows(batch) if share else batch
        features = {k: jnp.asarray(v) for k, v in shared.items()}
        return np.asarray(scorer(params, prompt, features))

    return score_fn


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
    """Per input, each of its candidates' summed log-likelihood (float64), in order.

    The public entry for rank classification on token ids (infer, the server, benchmarks):
    `inputs[i]` are input ids (EOS included), `candidates[i]` its candidate target ids (any
    number, EOS included), `prompt_ids[i]` its prompt of a bank. Inputs longer than
    `inputs_length` (default: the longest) are cut. Each batch holds `batch_size`
    (input, candidate) rows and encodes each distinct input once; `length_buckets > 1` pads
    batches to a few input lengths (`batching.bucket_lengths`) instead of the longest.
    """
    pairs = [(i, c) for i, each in enumerate(candidates) for c in each]
    if not pairs:
        return [np.zeros([0]) for _ in inputs]
    inputs_length = inputs_length or max(len(tokens) for tokens in inputs)
    targets_length = max(len(c) for _, c in pairs)
    rows = [min(len(inputs[i]), inputs_length) for i, _ in pairs]
    keys = [(inputs[i][:inputs_length].tobytes(), _id(prompt_ids, i)) for i, _ in pairs]
    score_fn = make_score_fn(cfg, params, prompt)
    scores: list[float] = []
    order: list[int] = []
    for length, indices in batching.by_length(rows, inputs_length, length_buckets, keys):
        for start in range(0, len(indices), batch_size):
            chosen = [pairs[k] for k in indices[start : start + batch_size]]
            batch = _candidate_batch(chosen, inputs, prompt_ids, length, targets_length, batch_size)
            scores += list(score_fn(batch)[: len(chosen)])
        order += list(indices)
    scores = np.asarray(batching.restore_order(scores, order), np.float64)
    return np.split(scores, np.cumsum([len(each) for each in candidates])[:-1])


def _id(prompt_ids: Sequence[int] | None, row: int) -> int:
    return -1 if prompt_ids is None else int(prompt_ids[row])


def _candidate_batch(
    pairs: Sequence[tuple[int, np.ndarray]],
    inputs: Sequence[np.ndarray],
    prompt_ids: Sequence[int] | None,
    inputs_length: int,
    targets_length: int,
    batch_size: int,
) -> dict[str, np.ndarray]:
    """T5X features of (input index, candidate ids) pairs, zero-padded to `batch_size` rows."""
    encoder = np.zeros((batch_size, inputs_length), np.int32)
    targets = np.zeros((batch_size, targets_length), np.int32)
    for row, (i, candidate) in enumerate(pairs):
        tokens = inputs[i][:inputs_length]
        encoder[row, : len(tokens)] = tokens
        targets[row, : len(candidate)] = candidate
    batch = {
        "encoder_input_tokens": encoder,
        "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
        "decoder_target_tokens": targets,
        "decoder_loss_weights": (targets > 0).astype(np.int32),
    }
    if prompt_ids is not None:
        ids = [prompt_ids[i] for i, _ in pairs]
        batch["prompt_ids"] = np.pad(np.asarray(ids, np.int32), (0, batch_size - len(pairs)))
    return batch


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
