"""Packed rows (T5X's segment ids): each segment's logits equal its example run alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softprompt_jax as sp

TINY = sp.get_config("t5_1_1_tiny")
PROMPT_LENGTH = 2


def example(rng: np.random.RandomState, inputs: int, targets: int) -> dict:
    """One example: encoder ids (a prompt goes in front), decoder inputs (BOS 0) and targets."""
    target = rng.randint(2, TINY.vocab_size, targets)
    return {
        "inputs": rng.randint(2, TINY.vocab_size, inputs),
        "decoder_input": np.concatenate([[0], target[:-1]]),
        "target": target,
    }


@pytest.fixture(scope="module")
def setup():
    params = sp.init_params(TINY, 3)
    rng = np.random.RandomState(0)
    prompt = jnp.asarray(rng.normal(size=(PROMPT_LENGTH, TINY.emb_dim)), jnp.float32)
    return params, prompt, [example(rng, 3, 3), example(rng, 2, 4)]


def embed(params, prompt: jax.Array, ids: np.ndarray) -> jax.Array:
    """The prompt followed by the ids' embeddings, as prompts.py builds the encoder input."""
    tokens = sp.T5(TINY).apply({"params": params}, jnp.asarray(ids), method=sp.T5.embed)
    return jnp.concatenate([prompt, tokens], axis=0)


@jax.jit
def logits(params, embeddings, decoder_input, target, encoder_segments, decoder_segments):
    packed = {}
    if encoder_segments is not None:
        packed = dict(encoder_segment_ids=encoder_segments, decoder_segment_ids=decoder_segments)
    return sp.T5(TINY).apply(
        {"params": params},
        None,
        decoder_input,
        target,
        encoder_input_embeddings=embeddings,
        encoder_mask=None if packed else jnp.ones(embeddings.shape[:2], bool),
        enable_dropout=False,
        **packed,
    )


def test_each_packed_segment_equals_its_example_alone(setup):
    params, prompt, examples = setup
    pad_encoder, pad_decoder = 2, 1
    embeddings = jnp.concatenate(
        [embed(params, prompt, ex["inputs"]) for ex in examples]
        + [jnp.zeros((pad_encoder, TINY.emb_dim))]
    )
    segment = lambda key, extra, pad: np.concatenate(
        [np.full(len(ex[key]) + extra, i + 1) for i, ex in enumerate(examples)] + [np.zeros(pad)]
    ).astype(np.int32)
    join = lambda key: np.concatenate([ex[key] for ex in examples] + [np.zeros(pad_decoder)])
    packed = logits(
        params,
        embeddings[None],
        jnp.asarray(join("decoder_input"), jnp.int32)[None],
        jnp.asarray(join("target"), jnp.int32)[None],
        jnp.asarray(segment("inputs", PROMPT_LENGTH, pad_encoder))[None],
        jnp.asarray(segment("target", 0, pad_decoder))[None],
    )[0]
    start = 0
    for ex in examples:
        alone = logits(
            params,
            embed(params, prompt, ex["inputs"])[None],
            jnp.asarray(ex["decoder_input"], jnp.int32)[None],
            jnp.asarray(ex["target"], jnp.int32)[None],
            None,
            None,
        )[0]
        stop = start + len(ex["target"])
        np.testing.assert_allclose(packed[start:stop], alone, rtol=0, atol=1e-5)
        start = stop


def test_packed_rows_are_not_decoded_step_by_step(setup):
    params, _, _ = setup
    ids = jnp.ones((1, 3), jnp.int32)
    with pytest.raises(ValueError, match="segment ids"):
        sp.T5(TINY).apply(
            {"params": params},
            jnp.zeros((1, 3, TINY.emb_dim)),
            ids > 0,
            ids,
            encoder_segment_ids=ids,
            decoder_segment_ids=ids,
            enable_dropout=False,
            decode=True,
            max_decode_length=3,
            method=sp.T5.decode,
            mutable=["cache"],
        )
    with pytest.raises(ValueError, match="both"):
        sp.T5(TINY).apply(
            {"params": params}, ids, ids, encoder_segment_ids=ids, enable_dropout=False
        )
