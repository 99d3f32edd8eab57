"""The network against Hugging Face `transformers` T5: same random weights, same logits."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import softprompt_jax as sp  # noqa: E402
from softprompt_jax.checkpoints.huggingface import (  # noqa: E402
    config_from_hf,
    params_from_hf_state_dict,
)
from softprompt_jax.model.layers import relative_position_buckets  # noqa: E402

# (feed_forward_proj, tie_word_embeddings, d_model, d_kv, heads, d_ff, enc layers, dec layers,
#  buckets, max distance): T5 1.1 and original T5 shapes, including an I != d model like
#  t5_1_1_small and an asymmetric encoder/decoder.
CONFIGS = {
    "t5_1_1": ("gated-gelu", False, 16, 4, 3, 24, 2, 2, 32, 128),
    "t5_1_1_small_like": ("gated-gelu", False, 20, 6, 2, 28, 1, 3, 16, 24),
    "t5_original": ("relu", True, 16, 4, 4, 32, 2, 2, 32, 128),
    "t5_original_short_buckets": ("relu", True, 12, 3, 2, 20, 3, 1, 8, 20),
}


def make_hf_model(name: str, vocab_size: int = 300):
    ff, tie, d, dkv, heads, dff, enc, dec, buckets, distance = CONFIGS[name]
    hf_config = transformers.T5Config(
        vocab_size=vocab_size,
        d_model=d,
        d_kv=dkv,
        d_ff=dff,
        num_layers=enc,
        num_decoder_layers=dec,
        num_heads=heads,
        feed_forward_proj=ff,
        tie_word_embeddings=tie,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=distance,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(hf_config).eval()
    if not tie:  # transformers 5 always shares lm_head with the embedding; untie it.
        model.lm_head.weight = torch.nn.Parameter(torch.empty(vocab_size, d))
    with torch.no_grad():  # HF's init leaves some tensors tiny; use O(1) weights everywhere.
        for param in model.parameters():
            param.normal_(0.0, 0.5)
    return hf_config, model


def random_batch(vocab_size: int, seed: int = 0):
    rng = np.random.RandomState(seed)
    encoder = rng.randint(2, vocab_size, (3, 150))
    encoder[1, 97:] = 0  # encoder padding, and lengths past the relpos max distance
    encoder[2, 9:] = 0
    decoder = rng.randint(2, vocab_size, (3, 21))
    decoder[:, 0] = 0
    return encoder, decoder


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name):
    hf_config, hf_model = make_hf_model(name)
    cfg = config_from_hf(hf_config.to_dict(), dtype="float32")
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    params = params_from_hf_state_dict(state, cfg)
    if not cfg.logits_via_embedding:  # the separate output layer is really compared
        assert not np.array_equal(state["lm_head.weight"], state["shared.weight"])
    encoder, decoder = random_batch(hf_config.vocab_size)

    with torch.no_grad():
        expected = hf_model(
            input_ids=torch.tensor(encoder),
            attention_mask=torch.tensor(encoder > 0),
            decoder_input_ids=torch.tensor(decoder),
        ).logits.numpy()
    logits = sp.T5(cfg).apply(
        {"params": params}, jnp.asarray(encoder), jnp.asarray(decoder), enable_dropout=False
    )

    assert logits.shape == expected.shape and logits.dtype == jnp.float32
    scale = np.abs(expected).max()
    np.testing.assert_array_less(np.abs(np.asarray(logits) - expected).max(), 1e-4 * scale)


def test_original_and_1_1_are_distinguished():
    """The variant flags come from the HF config, not from a guess."""
    v11 = config_from_hf(make_hf_model("t5_1_1")[0].to_dict())
    v10 = config_from_hf(make_hf_model("t5_original")[0].to_dict())
    assert v11.mlp_activations == ("gelu", "linear") and not v11.logits_via_embedding
    assert v10.mlp_activations == ("relu",) and v10.logits_via_embedding


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("buckets,distance", [(32, 128), (8, 20)])
def test_relative_position_buckets_match_transformers(bidirectional, buckets, distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    length = 600
    ours = relative_position_buckets(
        length, length, bidirectional=bidirectional, num_buckets=buckets, max_distance=distance
    )
    relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    theirs = T5Attention._relative_position_bucket(
        relative, bidirectional=bidirectional, num_buckets=buckets, max_distance=distance
    ).numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_unsupported_feed_forward_is_named():
    with pytest.raises(ValueError, match="gated-silu"):
        config_from_hf({"feed_forward_proj": "gated-silu", "num_layers": 1})
