"""Prompt initialisers and how prompts (single or a per-example bank) enter the encoder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TEST_DATA

import softprompt_jax as sp
from softprompt_jax.model import get_config, init_params
from softprompt_jax.prompts import init_prompt, prepend_prompt, prompted_logits

EMB_DIM = 8


@pytest.fixture(scope="module")
def table_params():
    """Only the embedding table, with distinct rows so each row identifies its id."""
    table = np.random.default_rng(0).normal(size=(32128, EMB_DIM)).astype(np.float32)
    return {"token_embedder": {"embedding": jnp.asarray(table)}}


@pytest.fixture(scope="module")
def t5_vocab():
    spm = pytest.importorskip("sentencepiece")
    return spm.SentencePieceProcessor(model_file=str(TEST_DATA / "t5_vocab" / "spiece.model"))


@pytest.fixture(scope="module")
def tiny():
    # The real 32128-row vocabulary, float32 compute; one layer per stack compiles fast.
    cfg = get_config("t5_1_1_tiny").replace(num_encoder_layers=1, num_decoder_layers=1)
    return cfg, init_params(cfg, 0)


def row_ids(prompt, params) -> list[int]:
    """The embedding ids whose rows the prompt's rows are (exactly); -1 where none is."""
    table = np.asarray(params["token_embedder"]["embedding"])
    matches = (np.asarray(prompt)[:, None, :] == table[None]).all(-1)
    return [int(np.flatnonzero(m)[0]) if m.any() else -1 for m in matches]


def test_random_uniform_is_seeded_and_symmetric(table_params):
    prompt = init_prompt("random_uniform", 100, params=table_params, seed=3)
    assert prompt.shape == (100, EMB_DIM) and prompt.dtype == jnp.float32
    np.testing.assert_array_equal(prompt, init_prompt("random_uniform", 100, emb_dim=8, seed=3))
    assert not np.array_equal(prompt, init_prompt("random_uniform", 100, emb_dim=8, seed=4))
    # The paper's U[-0.5, 0.5], not the official code's U[0, 0.5).
    assert -0.5 <= float(prompt.min()) < -0.45 and 0.45 < float(prompt.max()) <= 0.5


def test_sampled_vocab_uses_frequent_regular_tokens(table_params):
    prompt = init_prompt("sampled_vocab", 50, params=table_params, seed=1)
    ids = row_ids(prompt, table_params)
    assert all(3 <= i < 5000 for i in ids) and len(set(ids)) == len(ids)
    np.testing.assert_array_equal(
        prompt, init_prompt("sampled_vocab", 50, params=table_params, seed=1)
    )
    assert (
        row_ids(init_prompt("sampled_vocab", 50, params=table_params, seed=2), table_params) != ids
    )


def test_sampled_vocab_skips_sentinels_of_a_small_vocab(table_params):
    class SmallVocab:  # seqio-like: 40 ids, the last 10 of them sentinels
        vocab_size, extra_ids = 40, 10

    prompt = init_prompt("sampled_vocab", 60, params=table_params, vocab=SmallVocab())
    ids = set(row_ids(prompt, table_params))
    assert ids <= set(range(3, 30)) and len(ids) > 20  # 60 > 27 ids: drawn with replacement


def test_class_labels_average_sentencepiece_pieces(table_params, t5_vocab):
    assert t5_vocab.encode("False") == [10747, 7, 15] and t5_vocab.encode("True") == [10998]
    table = np.asarray(table_params["token_embedder"]["embedding"])
    prompt = init_prompt(
        "class_labels", 6, params=table_params, vocab=t5_vocab, labels=["False", "True"], seed=0
    )
    np.testing.assert_allclose(prompt[0], table[[10747, 7, 15]].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(prompt[1], table[10998])
    # The other slots are the sampled-vocab prompt of the same seed.
    sampled = init_prompt("sampled_vocab", 6, params=table_params, vocab=t5_vocab, seed=0)
    np.testing.assert_array_equal(prompt[2:], sampled[2:])


def test_text_init_truncates_and_fills(table_params, t5_vocab):
    text = "Classify the sentiment of this movie review"
    ids = t5_vocab.encode(text)
    short = init_prompt("text", 3, params=table_params, vocab=t5_vocab, text=text)
    assert row_ids(short, table_params) == ids[:3]
    long = init_prompt("text", len(ids) + 4, params=table_params, vocab=t5_vocab, text=text)
    found = row_ids(long, table_params)
    assert found[: len(ids)] == ids  # no EOS (id 1) after the text
    assert all(3 <= i < 5000 for i in found[len(ids) :])


def test_file_init_checks_the_shape(table_params, tmp_path):
    path = tmp_path / "p.npy"
    np.save(path, np.ones((4, EMB_DIM), np.float64))
    prompt = init_prompt("file", 4, params=table_params, path=path)
    assert prompt.dtype == jnp.float32 and prompt.shape == (4, EMB_DIM)
    with pytest.raises(ValueError, match=r"p\.npy has shape \(4, 8\); model expects \(5, 8\)"):
        init_prompt("file", 5, params=table_params, path=path)


def test_init_errors(table_params, t5_vocab):
    with pytest.raises(ValueError, match="unknown prompt init method 'uniform'"):
        init_prompt("uniform", 4, params=table_params)
    with pytest.raises(ValueError, match="3 class labels do not fit in a prompt of length 2"):
        init_prompt("class_labels", 2, params=table_params, vocab=t5_vocab, labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="token_embedder"):
        init_prompt("sampled_vocab", 2, params={})


def test_hard_prompt_equals_soft_prompt_at_step_0(tiny, t5_vocab):
    """A `text` prompt gives the logits of the same tokens typed in front of the input."""
    cfg, params = tiny
    text_ids = t5_vocab.encode("Is this review positive or negative?")
    prompt = init_prompt(
        "text",
        len(text_ids),
        params=params,
        vocab=t5_vocab,
        text="Is this review positive or negative?",
    )
    texts = ["A great film.", "Dull and far too long, sadly"]
    inputs = np.zeros((2, 12), np.int32)  # EOS-terminated, padded: the first example has 7 pads
    for row, ids in zip(inputs, [t5_vocab.encode(t) + [1] for t in texts]):
        row[: len(ids)] = ids
    decoder = jnp.array([[0, 4273, 1], [0, 150, 1]])
    typed = jnp.asarray(np.concatenate([np.tile(text_ids, (2, 1)), inputs], axis=1))
    model = sp.T5(cfg)
    embed = lambda tokens: model.apply({"params": params}, tokens, method=sp.T5.embed)
    # The encoder sees bit-identical input embeddings and mask ...
    embeddings, mask = prepend_prompt(prompt, embed(jnp.asarray(inputs)), jnp.asarray(inputs) > 0)
    np.testing.assert_array_equal(embeddings, embed(typed))
    np.testing.assert_array_equal(mask, typed > 0)
    # ... so the logits agree up to float32 roundoff (XLA fuses the two graphs differently).
    soft = prompted_logits(cfg, params, prompt, jnp.asarray(inputs), decoder)
    hard = jax.jit(lambda x, y: model.apply({"params": params}, x, y, enable_dropout=False))(
        typed, decoder
    )
    np.testing.assert_allclose(soft, hard, rtol=1e-5, atol=1e-5 * float(jnp.abs(hard).max()))


def test_bank_matches_each_example_with_its_own_prompt(tiny):
    cfg, params = tiny
    bank = jnp.stack([init_prompt("random_uniform", 5, params=params, seed=s) for s in range(3)])
    rng = np.random.default_rng(0)
    inputs = jnp.asarray(rng.integers(3, 1000, (4, 7)) * (np.arange(7) < [[7], [5], [7], [2]]))
    decoder = jnp.asarray(rng.integers(3, 1000, (4, 3)))
    prompt_ids = jnp.array([2, 0, 1, 2])
    mixed = prompted_logits(cfg, params, bank, inputs, decoder, prompt_ids)
    for i, pid in enumerate(prompt_ids):
        alone = prompted_logits(cfg, params, bank[pid], inputs, decoder)
        np.testing.assert_allclose(mixed[i], alone[i], rtol=1e-6, atol=1e-6)
    assert not np.allclose(mixed[1], prompted_logits(cfg, params, bank[2], inputs, decoder)[1])


def test_prepend_prompt_layout_and_errors():
    prompt = jnp.full((2, 3), 7.0)
    embeddings, mask = jnp.ones((2, 4, 3), jnp.bfloat16), jnp.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    combined, combined_mask = prepend_prompt(prompt, embeddings, mask)
    assert combined.shape == (2, 6, 3) and combined.dtype == jnp.bfloat16
    np.testing.assert_array_equal(combined[:, :2], 7.0)
    np.testing.assert_array_equal(combined_mask, [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match=r"needs prompt_ids of shape \(2,\)"):
        prepend_prompt(jnp.zeros((4, 2, 3)), embeddings, mask)
    with pytest.raises(ValueError, match="emb_dim 5; the model's is 3"):
        prepend_prompt(jnp.zeros((2, 5)), embeddings, mask)


def test_bank_gather_traces_without_python_loops(tiny):
    """One jitted call serves any prompt_ids: the bank row is a gather, not a Python branch."""
    cfg, params = tiny
    bank = jnp.zeros((3, 2, cfg.emb_dim))
    tokens = jnp.ones((2, 3), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda ids: prepend_prompt(bank, jnp.zeros((2, 3, 8)), tokens, ids))
    assert "gather" in str(jaxpr(jnp.array([0, 2])))


@pytest.mark.parametrize("prompt_dropout", [True, False])
def test_prompt_dropout_setting(tiny, prompt_dropout):
    """T5X's input dropout (one mask per feature, shared over positions) hits the prompt
    only when `prompt_dropout` is on: dropped features then get exactly zero gradient."""
    cfg, params = tiny
    cfg = cfg.replace(dropout_rate=0.5)
    prompt = init_prompt("random_uniform", 3, params=params, seed=0)
    batch = {
        "encoder_input_tokens": jnp.array([[37, 6, 1]]),
        "decoder_input_tokens": jnp.array([[0, 5, 7]]),
        "decoder_target_tokens": jnp.array([[5, 7, 1]]),
    }
    _, grad = sp.prompt_loss_and_grad(
        cfg,
        params,
        prompt,
        batch,
        enable_dropout=True,
        dropout_rng=jax.random.PRNGKey(1),
        prompt_dropout=prompt_dropout,
    )
    zero_features = (np.asarray(grad) == 0).all(axis=0)
    assert zero_features.any() == prompt_dropout
