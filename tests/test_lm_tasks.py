"""Decoder-only models on seqio tasks: prefix-LM features and T5X batches against Hugging Face."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import torch
import transformers
from softprompt_jax.tasks import evaluation

import softprompt_jax as sp
from softprompt_jax import batching, inference, lm_batches, losses, methods
from softprompt_jax.causal_lm import lm_loss
from softprompt_jax.model.decoder_config import GPT2Config

EXAMPLES = [
    {"inputs": [5, 6, 7, 1], "targets": [8, 9, 1]},
    {"inputs": [10, 11, 1], "targets": [12, 1]},
]
LENGTHS = {"inputs": 6, "targets": 4}
HF_KEYS = ("input_ids", "attention_mask", "labels")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A tiny random GPT-2, as Hugging Face runs it and as loaded here."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=4, n_positions=32)
    model = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(path)
    cfg, params = sp.load_pretrained(path, dtype="float32")
    return model, cfg, params


def prefix_lm_batch() -> dict[str, np.ndarray]:
    dataset = tf.data.Dataset.from_generator(
        lambda: iter(EXAMPLES),
        output_signature={n: tf.TensorSpec([None], tf.int32) for n in ("inputs", "targets")},
    )
    features = methods.feature_converter(GPT2Config())(dataset, LENGTHS)
    return next(features.batch(len(EXAMPLES)).as_numpy_iterator())


def hf_sequences() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """inputs ++ targets right-padded, their mask, and labels on the targets only."""
    width = sum(LENGTHS.values())
    ids, mask, labels = (torch.zeros(len(EXAMPLES), width, dtype=torch.long) for _ in range(3))
    labels -= 100
    for row, ex in enumerate(EXAMPLES):
        sequence = ex["inputs"] + ex["targets"]
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
        labels[row, len(ex["inputs"]) : len(sequence)] = torch.tensor(ex["targets"])
    return ids, mask, labels


def test_prefix_lm_features_train_as_hf_loss_on_targets(gpt2):
    model, cfg, params = gpt2
    batch = prefix_lm_batch()
    assert {"decoder_target_tokens", "decoder_causal_attention"} <= set(batch)
    config = losses.LossConfig(z_loss=0.0, normalization="mean_tokens", enable_dropout=False)
    ids, mask, labels = hf_sequences()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    loss, _ = losses.prompt_loss(None, cfg, params, batch, config)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    # With a prompt, the loss is causal_lm's (= PEFT's) on the Hugging Face batch.
    prompt = jnp.asarray(np.random.default_rng(0).normal(size=(3, cfg.emb_dim)), jnp.float32)
    hf_batch = {k: v.numpy().astype(np.int32) for k, v in zip(HF_KEYS, (ids, mask, labels))}
    loss, _ = losses.prompt_loss(prompt, cfg, params, batch, config)
    expected = float(lm_loss(prompt, cfg, params, hf_batch))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_rank_scores_of_t5x_batches_are_hf_target_log_likelihoods(gpt2):
    model, cfg, params = gpt2
    ids, mask, labels = hf_sequences()
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits, -1)
    picked = torch.gather(log_probs[:, :-1], 2, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    expected = (picked * (labels[:, 1:] != -100)).sum(-1).numpy()
    # Two candidates of one input share its row (encoder_index), as a rank task's do.
    examples = [{k: np.asarray(v, np.int32) for k, v in ex.items()} for ex in EXAMPLES]
    examples.insert(1, {**examples[0], "targets": np.asarray([9, 1], np.int32)})
    batch, _ = next(evaluation.t5x_batches(examples, LENGTHS, batch_size=4))
    shared = {k: jnp.asarray(v) for k, v in batching.share_encoder_rows(batch).items()}
    assert "encoder_index" in shared
    scores = np.asarray(losses.score_batch(cfg, params, None, shared))
    np.testing.assert_allclose(inference.make_score_fn(cfg, params, None)(batch), scores, rtol=1e-5)
    np.testing.assert_allclose(scores[[0, 2]], expected, rtol=1e-5, atol=1e-5)
    alone = losses.score_batch(cfg, params, None, {k: v[1:2] for k, v in batch.items()})
    np.testing.assert_allclose(scores[1], alone[0], rtol=1e-5)
    # The public scorer dispatches too: input 0's two candidates, input 1's one and a padding one.
    inputs = batching.pad_tokens([ex["inputs"] for ex in EXAMPLES], LENGTHS["inputs"])
    candidates = [[examples[0]["targets"], [9, 1]], [examples[2]["targets"], []]]
    candidates = np.stack([batching.pad_tokens(each, LENGTHS["targets"]) for each in candidates])
    by_input = np.asarray(sp.score_candidates(cfg, params, None, inputs, candidates))
    np.testing.assert_allclose(by_input.ravel()[:3], scores[:3], rtol=1e-5, atol=1e-5)
    assert by_input[1, 1] == 0


def test_predictions_continue_right_aligned_inputs(gpt2):
    model, cfg, params = gpt2
    tokens = np.zeros((2, 6), np.int32)
    for row, ex in enumerate(EXAMPLES):
        tokens[row, : len(ex["inputs"])] = ex["inputs"]
    ids = inference.predict_tokens(cfg, params, None, jnp.asarray(tokens), max_length=3)
    aligned, mask = lm_batches.right_aligned(tokens)
    assert aligned[1].tolist() == [0, 0, 0, 10, 11, 1] and mask[1].tolist() == [0, 0, 0, 1, 1, 1]
    for row, ex in enumerate(EXAMPLES):
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ex["inputs"]]), max_new_tokens=3, do_sample=False, pad_token_id=0
            )
        generated = out[0, len(ex["inputs"]) :].tolist()
        stop = generated.index(1) + 1 if 1 in generated else 3
        assert np.asarray(ids)[row, :stop].tolist() == generated[:stop]
