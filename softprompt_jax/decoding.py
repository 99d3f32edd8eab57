"""Autoregressive decoding with a key/value cache: greedy, temperature sampling, beam search.

The encoder runs once (callers pass its output, prompt included, and mask). The
decode cache (Flax's `cache` collection) holds each decoder layer's cross-attention
keys and values, projected from the encoder output once per batch (T5X re-projects
them at every step), and the self-attention keys and values, which accumulate
step by step as in T5X. Beams share their row's cross-attention keys and values.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from softprompt_jax.model.config import T5Config
from softprompt_jax.model.network import T5

EOS_ID = 1
KeyValues = tuple[jax.Array, jax.Array]
NEG_INF = -1.0e7  # T5X's finite "minus infinity" for beams and slots that must not win


class _LoopState(NamedTuple):
    step: jax.Array
    sequences: jax.Array  # [batch, max_length] decoded ids, 0 after EOS
    cache: dict
    token: jax.Array  # [batch, 1] the token fed next
    ended: jax.Array  # [batch] bool
    rng: jax.Array


def _decode_step(cfg, params, cache, encoder_mask, token, max_length, prefix=None):
    logits, variables = T5(cfg).apply(
        {"params": params, "cache": cache},
        None,
        encoder_mask,
        token,
        enable_dropout=False,
        decode=True,
        max_decode_length=max_length,
        prefix=prefix,
        method=T5.decode,
        mutable=["cache"],
    )
    return logits[:, 0, :], variables["cache"]


def init_cache(
    cfg: T5Config, params: dict, encoded: jax.Array, max_length: int, num_beams: int = 1
) -> dict:
    """The decode cache for `num_beams` rows per encoder row and `max_length` steps."""
    rows = encoded.shape[0] * num_beams
    return T5(cfg).apply(
        {"params": params},
        encoded,
        rows,
        max_length,
        method=T5.init_decode_cache,
        mutable=["cache"],
    )[1]["cache"]


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
    prefix: KeyValues | None = None,
) -> jax.Array:
    """Decode up to `max_length` tokens per row; returns `[batch, max_length]` int32.

    `temperature=0` is greedy (argmax). Otherwise tokens are sampled from
    softmax(logits / temperature), restricted to the `top_k` best when
    `top_k > 0`. A row stops at EOS (kept); later positions are 0. `prefix`: the decoder's
    per-layer self-attention key/value prefixes `[layers, P, heads, head_dim]` (prefix tuning).
    """
    batch = encoded.shape[0]
    if rng is None:
        rng = jax.random.PRNGKey(0)
    state = _LoopState(
        step=jnp.array(0, jnp.int32),
        sequences=jnp.zeros((batch, max_length), jnp.int32),
        cache=init_cache(cfg, params, encoded, max_length),
        token=jnp.zeros((batch, 1), jnp.int32),  # T5's decoder BOS is the pad id 0
        ended=jnp.zeros((batch,), bool),
        rng=rng,
    )

    def not_done(state: _LoopState) -> jax.Array:
        return (state.step < max_length) & ~jnp.all(state.ended)

    def body(state: _LoopState) -> _LoopState:
        logits, cache = _decode_step(
            cfg, params, state.cache, encoder_mask, state.token, max_length, prefix
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


class _BeamState(NamedTuple):
    step: jax.Array  # tokens decoded so far
    live_seqs: jax.Array  # [batch, beams, 1 + max_length]: BOS 0, then tokens; best beam first
    live_log_probs: jax.Array  # [batch, beams] float32, descending
    finished_seqs: jax.Array  # [batch, beams, 1 + max_length], EOS kept, zeros after
    finished_scores: jax.Array  # [batch, beams] log-prob / brevity penalty, descending
    finished_flags: jax.Array  # [batch, beams] whether the slot holds a finished sequence
    cache: dict  # self-attention rows [batch * beams], beam index fastest


def brevity_penalty(alpha: float, length: jax.Array | int) -> jax.Array:
    """T5X's length normaliser `((5 + length) / 6) ** alpha`; finished log-probs divide by it."""
    return jnp.power((5.0 + length) / 6.0, alpha)


@functools.partial(
    jax.jit, static_argnames=("cfg", "max_length", "num_beams", "alpha", "num_decodes")
)
def beam_search(
    cfg: T5Config,
    params: dict,
    encoded: jax.Array,
    encoder_mask: jax.Array,
    *,
    max_length: int,
    num_beams: int,
    alpha: float = 0.6,
    num_decodes: int = 1,
    prefix: KeyValues | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Beam search as T5X's `beam_search`; returns the best `num_decodes` per row, best first.

    Returns `(sequences [batch, num_decodes, max_length] int32, scores [batch, num_decodes]
    float32)`. A beam that emits EOS is finished: its score is its log-prob divided by
    `brevity_penalty(alpha, length)` (length counts EOS) and it stays in the finished set
    (EOS kept, zeros after). The search stops at `max_length` or once no live beam can beat
    the worst finished one. A row with no finished sequence returns its live beams with raw
    log-probs; slots a row could not fill score `NEG_INF` and hold zeros. Unlike T5X (best
    last), results are sorted best first. `prefix`: as `decode`'s (shared by all beams).
    """
    if not 1 <= num_decodes <= num_beams:
        raise ValueError(f"num_decodes must be in [1, num_beams={num_beams}], got {num_decodes}")
    batch = encoded.shape[0]
    init = _beam_init(
        batch, num_beams, max_length, init_cache(cfg, params, encoded, max_length, num_beams)
    )
    batch_axis = 1 if cfg.scan_layers else 0  # scanned layers stack the cache on axis 0

    def body(state: _BeamState) -> _BeamState:
        tokens = jax.lax.dynamic_index_in_dim(state.live_seqs, state.step, 2, keepdims=False)
        logits, cache = _decode_step(
            cfg, params, state.cache, encoder_mask, tokens.reshape(-1, 1), max_length, prefix
        )
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
        return _beam_step(state, log_probs.reshape(batch, num_beams, -1), cache, alpha, batch_axis)

    def not_done(state: _BeamState) -> jax.Array:
        return (state.step < max_length) & ~_search_settled(state, alpha, max_length)

    return _beam_results(jax.lax.while_loop(not_done, body, init), num_decodes)


def _beam_init(batch: int, beams: int, max_length: int, cache: dict) -> _BeamState:
    """One live beam per row (the others start at NEG_INF) and an empty finished set."""
    seqs = jnp.zeros((batch, beams, 1 + max_length), jnp.int32)
    scores = jnp.full((batch, beams), NEG_INF, jnp.float32)
    return _BeamState(
        step=jnp.array(0, jnp.int32),
        live_seqs=seqs,
        live_log_probs=scores.at[:, 0].set(0.0),
        finished_seqs=seqs,
        finished_scores=scores,
        finished_flags=jnp.zeros((batch, beams), bool),
        cache=cache,
    )


def _beam_step(
    state: _BeamState, log_probs: jax.Array, cache: dict, alpha: float, batch_axis: int
) -> _BeamState:
    """Extend every live beam, keep the 2k best, split them into live and newly finished."""
    batch, beams, vocab = log_probs.shape
    totals = (log_probs + state.live_log_probs[..., None]).reshape(batch, beams * vocab)
    # 2k candidates: even if k of them end with EOS, k remain to stay live.
    cand_log_probs, flat = jax.lax.top_k(totals, 2 * beams)
    parents, tokens = flat // vocab, flat % vocab
    cand_seqs = jnp.take_along_axis(state.live_seqs, parents[..., None], axis=1)
    cand_seqs = cand_seqs.at[:, :, state.step + 1].set(tokens)
    # Extensions of the NEG_INF filler beams never count as finished.
    ended = (tokens == EOS_ID) & (cand_log_probs > NEG_INF)

    keep = jax.lax.top_k(jnp.where(ended, -jnp.inf, cand_log_probs), beams)[1]
    rows = jnp.take_along_axis(parents, keep, axis=1) + beams * jnp.arange(batch)[:, None]
    scores = jnp.where(ended, cand_log_probs / brevity_penalty(alpha, state.step + 1), NEG_INF)
    finished = _merge_finished(state, cand_seqs, scores, ended)
    return _BeamState(
        state.step + 1,
        jnp.take_along_axis(cand_seqs, keep[..., None], axis=1),
        jnp.take_along_axis(cand_log_probs, keep, axis=1),
        *finished,
        _reorder_cache(cache, rows.reshape(-1), batch_axis),
    )


def _merge_finished(
    state: _BeamState, seqs: jax.Array, scores: jax.Array, flags: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The best `beams` of the old finished set and the new candidates, by score."""
    beams = state.finished_scores.shape[1]
    all_scores = jnp.concatenate([state.finished_scores, scores], axis=1)
    top_scores, top = jax.lax.top_k(all_scores, beams)
    all_seqs = jnp.concatenate([state.finished_seqs, seqs], axis=1)
    all_flags = jnp.concatenate([state.finished_flags, flags], axis=1)
    top_seqs = jnp.take_along_axis(all_seqs, top[..., None], axis=1)
    return top_seqs, top_scores, jnp.take_along_axis(all_flags, top, axis=1)


def _reorder_cache(cache: dict, rows: jax.Array, batch_axis: int) -> dict:
    """Give each new beam its parent's self-attention keys and values (rows by flat beam index).

    Cross-attention keys and values stay: a beam's parent is in the same encoder row.
    """

    def gather(path, x: jax.Array) -> jax.Array:
        keys = [getattr(part, "key", None) for part in path]
        if keys[-1] == "cache_index" or "encoder_decoder_attention" in keys:
            return x
        return jnp.take(x, rows, axis=batch_axis)

    return jax.tree_util.tree_map_with_path(gather, cache)


def _search_settled(state: _BeamState, alpha: float, max_length: int) -> jax.Array:
    """True when, in every row, no live beam can beat the worst finished sequence."""
    # The largest penalty a live beam can still get bounds its best possible score.
    penalty = jnp.maximum(
        brevity_penalty(alpha, state.step + 1), brevity_penalty(alpha, max_length)
    )
    best_live = state.live_log_probs[:, :1] / penalty
    worst_finished = jnp.min(state.finished_scores, axis=1, keepdims=True)
    worst_finished = jnp.where(state.finished_flags, worst_finished, NEG_INF)
    return jnp.all(worst_finished > best_live)


def _beam_results(state: _BeamState, num_decodes: int) -> tuple[jax.Array, jax.Array]:
    """Finished sequences (live ones for rows with none finished), first `num_decodes`."""
    any_finished = jnp.any(state.finished_flags, axis=1, keepdims=True)
    seqs = jnp.where(any_finished[..., None], state.finished_seqs, state.live_seqs)
    scores = jnp.where(any_finished, state.finished_scores, state.live_log_probs)
    filled = state.finished_flags | ~any_finished
    seqs = jnp.where(filled[..., None], seqs, 0)
    return seqs[:, :num_decodes, 1:], scores[:, :num_decodes]
