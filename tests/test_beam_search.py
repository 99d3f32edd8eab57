"""Beam search (T5X semantics) against greedy, exhaustive search and teacher-forced scores."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softprompt_jax as sp
from softprompt_jax import decoding
from softprompt_jax.decoding import EOS_ID, NEG_INF, beam_search, decode
from softprompt_jax.inference import predict_tokens, prompted_encode
from softprompt_jax.model.scan import stack_layers
from softprompt_jax.prompt_bank import PromptBank

# A small vocabulary makes EOS (id 1) come up naturally in random models.
CFG = sp.get_config("t5_1_1_tiny").replace(vocab_size=8)
MAX_LENGTH = 10
# Exhaustive search: 3 non-EOS tokens, so 40 sequences end with EOS within 4 tokens. With 54
# beams the top 2 * 54 candidates hold every extension at every step, so the search is exact.
SMALL_CFG = sp.get_config("t5_1_1_tiny").replace(vocab_size=4)
SMALL_LENGTH = 4
EXACT_BEAMS = 54


def boosted_eos_params(cfg, seed: int) -> dict:
    """Random params whose EOS logit is raised, so some rows stop early and some run on."""
    params = sp.init_params(cfg, seed)
    kernel = params["decoder"]["logits_dense"]["kernel"]
    params["decoder"]["logits_dense"]["kernel"] = kernel.at[:, EOS_ID].multiply(2.5)
    return params


def encoder_tokens(cfg, batch: int, seed: int) -> jax.Array:
    """Random encoder ids, every third row padded after 4 tokens."""
    rng = np.random.RandomState(seed)
    tokens = rng.randint(2, cfg.vocab_size, (batch, 7))
    tokens[::3, 4:] = 0
    return jnp.asarray(tokens)


@functools.partial(jax.jit, static_argnums=0)
def encode(cfg, params, tokens: jax.Array) -> jax.Array:
    """The encoder's output for `tokens` (mask = tokens > 0), no prompt."""
    return sp.T5(cfg).apply({"params": params}, tokens, enable_dropout=False, method=sp.T5.encode)


@functools.partial(jax.jit, static_argnums=0)
def teacher_forced_logits(cfg, params, tokens: jax.Array, inputs: jax.Array) -> jax.Array:
    return sp.T5(cfg).apply({"params": params}, tokens, inputs, enable_dropout=False)


@pytest.fixture(scope="module")
def setup():
    params = boosted_eos_params(CFG, 1)
    tokens = encoder_tokens(CFG, 16, 0)
    return params, tokens, encode(CFG, params, tokens)


@pytest.fixture(scope="module")
def small_setup():
    params = boosted_eos_params(SMALL_CFG, 2)
    tokens = encoder_tokens(SMALL_CFG, 6, 1)
    return params, tokens, encode(SMALL_CFG, params, tokens)


def token_log_probs(cfg, params, tokens: jax.Array, targets: np.ndarray) -> np.ndarray:
    """Teacher-forced log-softmax `[batch, length, vocab]` of the decoder on `targets`."""
    inputs = np.pad(targets, ((0, 0), (1, 0)))[:, :-1]
    logits = teacher_forced_logits(cfg, params, tokens, jnp.asarray(inputs))
    return np.asarray(jax.nn.log_softmax(logits), np.float64)


def sequence_scores(cfg, params, tokens, targets: np.ndarray, alpha: float) -> np.ndarray:
    """Beam-search scores of `targets` by teacher forcing: summed log-probs up to and
    including EOS over ((5 + length) / 6) ** alpha; a row without EOS sums all, unpenalised."""
    log_probs = token_log_probs(cfg, params, tokens, targets)
    picked = np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    has_eos = (targets == EOS_ID).any(axis=1)
    lengths = np.where(has_eos, np.argmax(targets == EOS_ID, axis=1) + 1, targets.shape[1])
    summed = np.where(np.arange(targets.shape[1]) < lengths[:, None], picked, 0.0).sum(axis=1)
    return np.where(has_eos, summed / ((5.0 + lengths) / 6.0) ** alpha, summed)


def finished_candidates(vocab: int, max_length: int) -> np.ndarray:
    """Every sequence whose first EOS falls within `max_length`, zeros after: `[n, max_length]`."""
    others = [t for t in range(vocab) if t != EOS_ID]
    rows = [
        [*prefix, EOS_ID] + [0] * (max_length - n - 1)
        for n in range(max_length)
        for prefix in itertools.product(others, repeat=n)
    ]
    return np.asarray(rows, np.int32)


def exhaustive_scores(params, tokens, candidates: np.ndarray, alpha: float) -> np.ndarray:
    """`[batch, n]` scores of every candidate for every example."""
    batch, n = tokens.shape[0], len(candidates)
    repeated = jnp.repeat(tokens, n, axis=0)
    tiled = np.tile(candidates, (batch, 1))
    return sequence_scores(SMALL_CFG, params, repeated, tiled, alpha).reshape(batch, n)


def one_beam_reference(greedy: np.ndarray, log_probs: np.ndarray) -> np.ndarray:
    """T5X's one-beam search with alpha=0: the live beam walks greedy's path, and every EOS
    ranked in the top two there (2k candidates, k=1) ends a finished sequence; the best
    finished one wins, greedy's unfinished row only when none finished."""
    out = greedy.copy()
    for row, (seq, lp) in enumerate(zip(greedy, log_probs)):
        best, prefix = -np.inf, 0.0
        for t, token in enumerate(seq):
            if EOS_ID in np.argsort(lp[t])[-2:] and prefix + lp[t, EOS_ID] > best:
                best = prefix + lp[t, EOS_ID]
                out[row] = np.concatenate([seq[:t], [EOS_ID], np.zeros(len(seq) - t - 1)])
            if token == EOS_ID:
                break
            prefix += lp[t, token]
    return out


def test_one_beam_is_greedy_plus_runner_up_endings(setup):
    """One beam is not plain greedy in T5X: an EOS ranked second also ends a finished
    sequence, and the best finished one is returned. Rows without such an EOS get greedy's."""
    params, tokens, encoded = setup
    mask = tokens > 0
    greedy = np.asarray(decode(CFG, params, encoded, mask, max_length=MAX_LENGTH))
    beams, scores = beam_search(
        CFG, params, encoded, mask, max_length=MAX_LENGTH, num_beams=1, alpha=0.0
    )
    beams = np.asarray(beams)[:, 0]
    expected = one_beam_reference(greedy, token_log_probs(CFG, params, tokens, greedy))
    np.testing.assert_array_equal(beams, expected)
    expected_scores = sequence_scores(CFG, params, tokens, expected, 0.0)
    np.testing.assert_allclose(scores[:, 0], expected_scores, atol=1e-5)
    same = (beams == greedy).all(axis=1)
    assert same.any() and not same.all(), "the fixture should cover both cases"


def exact_beam_search(params, tokens, encoded, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Every beam of the exact-width search on the small vocabulary, best first."""
    seqs, scores = beam_search(
        SMALL_CFG,
        params,
        encoded,
        tokens > 0,
        max_length=SMALL_LENGTH,
        num_beams=EXACT_BEAMS,
        alpha=alpha,
        num_decodes=EXACT_BEAMS,
    )
    return np.asarray(seqs), np.asarray(scores)


def assert_ranked(seqs, scores, candidates: np.ndarray, expected: np.ndarray) -> None:
    """Every candidate, best first, then the slots no sequence could fill: NEG_INF, zeros."""
    top = np.argsort(-expected, axis=1)
    n = len(candidates)
    np.testing.assert_array_equal(seqs[:, :n], candidates[top])
    np.testing.assert_allclose(scores[:, :n], np.take_along_axis(expected, top, axis=1), atol=1e-5)
    assert (scores[:, n:] == NEG_INF).all() and not seqs[:, n:].any()


def test_exact_width_beam_finds_the_exhaustive_top(small_setup):
    params, tokens, encoded = small_setup
    seqs, scores = exact_beam_search(params, tokens, encoded, alpha=0.0)
    candidates = finished_candidates(SMALL_CFG.vocab_size, SMALL_LENGTH)
    assert_ranked(seqs, scores, candidates, exhaustive_scores(params, tokens, candidates, 0.0))


def test_length_penalty_sets_the_ranking(small_setup):
    """By hand on the exhaustive log-probs: dividing by ((5 + length) / 6) ** alpha, length
    counting EOS, reorders the top sequences, and beam search follows that order."""
    params, tokens, encoded = small_setup
    alpha = 0.6
    candidates = finished_candidates(SMALL_CFG.vocab_size, SMALL_LENGTH)
    raw = exhaustive_scores(params, tokens, candidates, 0.0)
    lengths = np.argmax(candidates == EOS_ID, axis=1) + 1
    penalised = raw / ((5.0 + lengths) / 6.0) ** alpha
    top, raw_top = np.argsort(-penalised, axis=1)[:, :5], np.argsort(-raw, axis=1)[:, :5]
    assert (top != raw_top).any(), "pick a seed where the penalty changes some ranking"
    seqs, scores = exact_beam_search(params, tokens, encoded, alpha)
    assert_ranked(seqs, scores, candidates, penalised)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_scores_are_teacher_forced_scores_of_the_returned_sequences(setup, alpha):
    params, tokens, encoded = setup
    seqs, scores = beam_search(
        CFG,
        params,
        encoded,
        tokens > 0,
        max_length=MAX_LENGTH,
        num_beams=4,
        alpha=alpha,
        num_decodes=4,
    )
    seqs, scores = np.asarray(seqs), np.asarray(scores)
    assert seqs.shape == (16, 4, MAX_LENGTH) and seqs.dtype == np.int32
    assert scores.dtype == np.float32
    assert (np.diff(scores, axis=1) <= 0).all(), "best first"
    filled = scores > NEG_INF
    assert not filled.all() and filled[:, 0].all(), "the fixture should leave some slots empty"
    assert not seqs[~filled].any()
    rows = np.repeat(np.arange(16), 4)[filled.reshape(-1)]
    expected = sequence_scores(CFG, params, tokens[rows], seqs[filled], alpha)
    np.testing.assert_allclose(scores[filled], expected, rtol=0, atol=1e-5)
    for seq in seqs[filled]:  # EOS kept, zeros after it
        if EOS_ID in seq:
            assert not seq[list(seq).index(EOS_ID) + 1 :].any()


def test_search_stops_once_no_live_beam_can_win(setup, monkeypatch):
    """Rows whose finished set fills up stop before max_length, with the same result as
    searching to the end (a live beam's bound: its log-prob over the largest penalty)."""
    params, tokens, encoded = setup
    rows = slice(1, 6)
    steps = []
    step = decoding._decode_step
    monkeypatch.setattr(decoding, "_decode_step", lambda *a: (steps.append(1), step(*a))[1])
    search = lambda: decoding.beam_search(
        CFG,
        params,
        encoded[rows],
        tokens[rows] > 0,
        max_length=MAX_LENGTH,
        num_beams=4,
        num_decodes=4,
    )
    with jax.disable_jit():
        early = search()
        stopped_after = len(steps)
        monkeypatch.setattr(decoding, "_search_settled", lambda *a: jnp.array(False))
        full = search()
    assert stopped_after < MAX_LENGTH and len(steps) == stopped_after + MAX_LENGTH
    np.testing.assert_array_equal(early[0], full[0])
    np.testing.assert_array_equal(early[1], full[1])


@pytest.mark.parametrize(
    "alpha, flags, settled",
    [
        (0.0, [True, True], True),  # -2.5 can only fall further below -2.0
        (0.0, [True, False], False),  # an empty finished slot: any live beam still counts
        (0.6, [True, True], False),  # -2.5 / ((5 + 10) / 6) ** 0.6 = -1.44 beats -2.0
    ],
)
def test_settled_bounds_a_live_beam_by_its_best_penalty(alpha, flags, settled):
    zeros = jnp.zeros((1, 2, 1 + MAX_LENGTH), jnp.int32)
    state = decoding._BeamState(
        step=jnp.array(1),
        live_seqs=zeros,
        live_log_probs=jnp.array([[-2.5, -3.0]]),
        finished_seqs=zeros,
        finished_scores=jnp.array([[-1.0, -2.0]]),
        finished_flags=jnp.array([flags]),
        cache={},
    )
    assert bool(decoding._search_settled(state, alpha, MAX_LENGTH)) is settled


def test_scanned_layers_give_the_same_beams(setup):
    params, tokens, encoded = setup
    settings = dict(max_length=MAX_LENGTH, num_beams=4, num_decodes=4)
    expected = beam_search(CFG, params, encoded, tokens > 0, **settings)
    scanned = beam_search(
        CFG.replace(scan_layers=True), stack_layers(params), encoded, tokens > 0, **settings
    )
    np.testing.assert_array_equal(scanned[0], expected[0])
    np.testing.assert_allclose(scanned[1], expected[1], rtol=0, atol=1e-5)


def test_predict_tokens_beam_searches_a_prompt_bank_batch(setup):
    params, tokens, _ = setup
    bank = PromptBank.from_arrays(
        {
            name: sp.init_prompt("sampled_vocab", length, params=params, seed=i)
            for i, (name, length) in enumerate({"short": 2, "long": 5}.items())
        }
    )
    names = ["long", "short", "short", "long", "short", "long"]
    tokens, ids = tokens[: len(names)], bank.ids(names)
    settings = dict(max_length=MAX_LENGTH, num_beams=3, alpha=2.0)
    predicted = np.asarray(predict_tokens(CFG, params, bank, tokens, ids, **settings))
    assert predicted.shape == (len(names), MAX_LENGTH)
    encoded, mask = prompted_encode(CFG, params, bank, tokens, ids)
    best = beam_search(CFG, params, encoded, mask, **settings)[0][:, 0]
    np.testing.assert_array_equal(predicted, best)
    for i, name in enumerate(names):
        alone = predict_tokens(CFG, params, bank[name], tokens[i : i + 1], **settings)
        np.testing.assert_array_equal(predicted[i], alone[0])
    greedy = predict_tokens(CFG, params, bank, tokens, ids, max_length=MAX_LENGTH)
    assert (predicted != np.asarray(greedy)).any(), "beam search should differ from greedy"
    default_alpha = predict_tokens(
        CFG, params, bank, tokens, ids, max_length=MAX_LENGTH, num_beams=3
    )
    assert (predicted != np.asarray(default_alpha)).any(), "alpha should reach the search"


def test_beams_equal_beams_without_a_cache(setup, monkeypatch):
    """Beam search over the cache (cross-attention keys/values projected once per row, shared
    by its beams) returns what it returns when every step reruns the whole decoder on the
    beam's prefix, with no cache at all."""
    params, tokens, encoded = setup
    tokens, encoded = tokens[:6], encoded[:6]
    settings = dict(max_length=MAX_LENGTH, num_beams=3, num_decodes=3)
    cached = beam_search(CFG, params, encoded, tokens > 0, **settings)

    def prefix_cache(cfg, params, encoded, max_length, num_beams=1):
        prefix = jnp.zeros((encoded.shape[0] * num_beams, max_length), jnp.int32)
        return {"prefix": prefix, "cache_index": jnp.array(0, jnp.int32)}

    def full_step(cfg, params, cache, encoder_mask, token, max_length):
        index, prefix = cache["cache_index"], cache["prefix"]
        prefix = jax.lax.dynamic_update_slice(prefix, token, (0, index))
        beams = prefix.shape[0] // encoded.shape[0]
        logits = sp.T5(cfg).apply(
            {"params": params},
            jnp.repeat(encoded, beams, axis=0),
            jnp.repeat(encoder_mask, beams, axis=0),
            prefix,
            enable_dropout=False,
            method=sp.T5.decode,
        )
        step_logits = jax.lax.dynamic_index_in_dim(logits, index, 1, keepdims=False)
        return step_logits, {"prefix": prefix, "cache_index": index + 1}

    monkeypatch.setattr(decoding, "init_cache", prefix_cache)
    monkeypatch.setattr(decoding, "_decode_step", full_step)
    uncached = jax.jit(decoding.beam_search.__wrapped__, static_argnames=tuple(settings) + ("cfg",))
    expected = uncached(CFG, params, encoded, tokens > 0, **settings)
    np.testing.assert_array_equal(cached[0], expected[0])
    np.testing.assert_allclose(cached[1], expected[1], rtol=0, atol=1e-5)
