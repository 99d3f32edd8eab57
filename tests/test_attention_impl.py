"""The fused attention path (`jax.nn.dot_product_attention`) against T5X's einsum path."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softprompt_jax as sp
from softprompt_jax.decoding import beam_search, decode
from softprompt_jax.errors import SoftpromptError

EINSUM = sp.get_config("t5_1_1_tiny").replace(vocab_size=64, dropout_rate=0.3)
FUSED = EINSUM.replace(attention_impl="fused")
MAX_LENGTH = 6


@pytest.fixture(scope="module")
def setup():
    params = sp.init_params(EINSUM, 4)
    rng = np.random.RandomState(0)
    prompt = jnp.asarray(rng.normal(size=(3, EINSUM.emb_dim)), jnp.float32)
    encoder = rng.randint(2, EINSUM.vocab_size, (4, 7))
    encoder[::2, 4:] = 0
    targets = rng.randint(2, EINSUM.vocab_size, (4, 5))
    targets[1, 3:] = 0
    batch = {
        "encoder_input_tokens": jnp.asarray(encoder),
        "decoder_input_tokens": jnp.asarray(np.pad(targets, ((0, 0), (1, 0)))[:, :-1]),
        "decoder_target_tokens": jnp.asarray(targets),
    }
    return params, prompt, batch


@functools.partial(jax.jit, static_argnums=(0, 4))
def logits(cfg, params, prompt, batch, dropout: bool) -> jax.Array:
    return sp.prompted_logits(
        cfg,
        params,
        prompt,
        batch["encoder_input_tokens"],
        batch["decoder_input_tokens"],
        decoder_target_tokens=batch["decoder_target_tokens"],
        enable_dropout=dropout,
        dropout_rng=jax.random.PRNGKey(7),
    )


def test_fused_logits_and_prompt_gradient_equal_einsum(setup):
    params, prompt, batch = setup
    np.testing.assert_allclose(
        logits(FUSED, params, prompt, batch, False),
        logits(EINSUM, params, prompt, batch, False),
        rtol=0,
        atol=1e-5,
    )
    einsum_loss, einsum_grad = sp.prompt_loss_and_grad(EINSUM, params, prompt, batch)
    fused_loss, fused_grad = sp.prompt_loss_and_grad(FUSED, params, prompt, batch)
    np.testing.assert_allclose(fused_loss, einsum_loss, rtol=1e-6)
    tolerance = 1e-5 * float(jnp.abs(einsum_grad).max())
    np.testing.assert_allclose(fused_grad, einsum_grad, rtol=0, atol=tolerance)


def test_fused_attention_dropout_draws_the_einsum_masks(setup):
    """T5X's attention dropout is shared over queries, so the fused path drops through the
    values: with the same rng it gives the einsum path's logits."""
    params, prompt, batch = setup
    fused = logits(FUSED, params, prompt, batch, True)
    np.testing.assert_allclose(fused, logits(EINSUM, params, prompt, batch, True), atol=1e-5)
    undropped = logits(FUSED, params, prompt, batch, False)
    assert np.abs(fused - undropped).max() > 1e-2, "dropout should act"


def test_fused_decoding_equals_einsum(setup):
    params, _, batch = setup
    tokens = batch["encoder_input_tokens"]
    encoded = sp.T5(EINSUM).apply(
        {"params": params}, tokens, enable_dropout=False, method=sp.T5.encode
    )
    for search in (
        lambda cfg: decode(cfg, params, encoded, tokens > 0, max_length=MAX_LENGTH),
        lambda cfg: beam_search(
            cfg, params, encoded, tokens > 0, max_length=MAX_LENGTH, num_beams=3
        ),
    ):
        expected, fused = search(EINSUM), search(FUSED)
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), fused, expected
        )


def test_attention_impl_is_a_run_time_setting():
    assert "attention_impl" not in FUSED.architecture()
    assert FUSED.architecture() == EINSUM.architecture()
    with pytest.raises(SoftpromptError, match="attention_impl='flash'"):
        EINSUM.replace(attention_impl="flash")
