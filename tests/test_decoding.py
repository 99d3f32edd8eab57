"""Cached decoding against uncached recomputation of the full decoder."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softprompt_jax as sp
from softprompt_jax.decoding import EOS_ID, _decode_step, decode, init_cache
from softprompt_jax.model.scan import stack_layers

# A small vocabulary makes EOS (id 1) come up naturally in random models.
CFG = sp.get_config("t5_1_1_tiny").replace(vocab_size=8)
MAX_LENGTH = 10


@pytest.fixture(scope="module")
def setup():
    params = sp.init_params(CFG, 1)
    # Raise the EOS logit's weights so that some rows stop early and some run on.
    kernel = params["decoder"]["logits_dense"]["kernel"]
    params["decoder"]["logits_dense"]["kernel"] = kernel.at[:, EOS_ID].multiply(2.5)
    rng = np.random.RandomState(0)
    encoder = rng.randint(2, CFG.vocab_size, (16, 7))
    encoder[::3, 4:] = 0
    encoder = jnp.asarray(encoder)
    encoded = sp.T5(CFG).apply(
        {"params": params}, encoder, enable_dropout=False, method=sp.T5.encode
    )
    return params, encoder, encoded


def uncached_greedy(params, encoder) -> np.ndarray:
    """Reference: rerun the whole decoder on the prefix at every step."""
    batch = encoder.shape[0]
    inputs = np.zeros((batch, MAX_LENGTH), np.int32)
    out = np.zeros((batch, MAX_LENGTH), np.int32)
    ended = np.zeros(batch, bool)
    for i in range(MAX_LENGTH):
        logits = sp.T5(CFG).apply(
            {"params": params}, encoder, jnp.asarray(inputs), enable_dropout=False
        )
        token = np.where(ended, 0, np.asarray(jnp.argmax(logits[:, i], -1)))
        out[:, i] = token
        ended |= token == EOS_ID
        if i + 1 < MAX_LENGTH:
            inputs[:, i + 1] = token
    return out


def test_cached_greedy_equals_uncached(setup):
    params, encoder, encoded = setup
    cached = np.asarray(decode(CFG, params, encoded, encoder > 0, max_length=MAX_LENGTH))
    expected = uncached_greedy(params, encoder)
    np.testing.assert_array_equal(cached, expected)
    # The check covers rows that stop early: EOS kept, zeros after it.
    stopped = [row for row in cached if EOS_ID in row[:-1]]
    assert stopped, "no row reached EOS early; pick another seed"
    for row in stopped:
        eos = list(row).index(EOS_ID)
        assert not row[eos + 1 :].any()


def test_sampling_is_seeded_and_respects_top_k(setup):
    params, encoder, encoded = setup
    mask = encoder > 0
    sample = lambda seed, **kw: np.asarray(
        decode(
            CFG,
            params,
            encoded,
            mask,
            max_length=MAX_LENGTH,
            temperature=1.0,
            rng=jax.random.PRNGKey(seed),
            **kw,
        )
    )
    np.testing.assert_array_equal(sample(1), sample(1))
    assert (sample(1) != sample(2)).any()
    greedy = np.asarray(decode(CFG, params, encoded, mask, max_length=MAX_LENGTH))
    np.testing.assert_array_equal(sample(3, top_k=1), greedy)


@pytest.mark.parametrize("scan_layers, beams", [(False, 1), (True, 3)])
def test_cached_steps_equal_teacher_forced_logits(setup, scan_layers, beams):
    """Step by step through the cache (cross-attention keys/values projected once, `beams`
    decoder rows per encoder row) gives the full decoder's teacher-forced logits."""
    params, encoder, encoded = setup
    encoder, encoded = encoder[:4], encoded[:4]
    cfg = CFG.replace(scan_layers=scan_layers)
    step_params = stack_layers(params) if scan_layers else params
    rows = encoder.shape[0] * beams
    inputs = np.random.RandomState(1).randint(2, CFG.vocab_size, (rows, MAX_LENGTH))
    inputs[:, 0] = 0
    cache = jax.jit(init_cache, static_argnums=(0, 3, 4))(
        cfg, step_params, encoded, MAX_LENGTH, beams
    )
    step = jax.jit(_decode_step, static_argnums=(0, 5))
    steps = []
    for i in range(MAX_LENGTH):
        logits, cache = step(
            cfg, step_params, cache, encoder > 0, jnp.asarray(inputs[:, i : i + 1]), MAX_LENGTH
        )
        steps.append(logits)
    repeated = jnp.repeat(encoder, beams, axis=0)
    expected = jax.jit(functools.partial(sp.T5(CFG).apply, enable_dropout=False))(
        {"params": params}, repeated, jnp.asarray(inputs)
    )
    np.testing.assert_allclose(jnp.stack(steps, axis=1), expected, rtol=0, atol=1e-5)
