"""A Hugging Face tokenizer.json as the tasks' vocabulary, with id 0 a real token (GPT-2's `!`)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from softprompt_jax.tasks import get_vocabulary
from softprompt_jax.tasks.hf_tokenizer import TokenizerVocabulary
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from softprompt_jax import inference, lm_batches

TEXT = "hi! this is a quick test, isn't it?"


@pytest.fixture(scope="module")
def vocabulary(tmp_path_factory) -> TokenizerVocabulary:
    """A tiny byte-level BPE trained here; as in GPT-2, `!` is id 0 and EOS comes last."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([TEXT, "a quick test of this tokenizer"] * 10, trainer)
    tokenizer.add_special_tokens(["<|endoftext|>"])
    path = tmp_path_factory.mktemp("gpt2_like") / "tokenizer.json"
    tokenizer.save(str(path))
    return get_vocabulary(str(path))


def test_encodes_and_decodes_like_the_tokenizer_in_python_and_tf(vocabulary):
    assert isinstance(vocabulary, TokenizerVocabulary)
    ids = vocabulary.encode(TEXT)
    assert 0 in ids and vocabulary.eos_id == vocabulary.vocab_size - 1
    assert vocabulary.decode(ids) == TEXT
    assert vocabulary.decode([*ids, vocabulary.eos_id, 5, 6]) == TEXT  # up to EOS
    tf_ids = vocabulary.encode_tf(tf.constant(TEXT))
    assert tf_ids.numpy().tolist() == ids
    assert vocabulary.decode_tf(tf.constant(ids)).numpy().decode() == TEXT


def test_a_real_token_0_stays_inside_the_causal_lm_batch(vocabulary):
    inputs = [*vocabulary.encode("hi! it"), vocabulary.eos_id]
    targets = [*vocabulary.encode("test"), vocabulary.eos_id]
    encoder = np.zeros((1, len(inputs) + 2), np.int32)
    encoder[0, : len(inputs)] = inputs
    decoder = np.zeros((1, len(targets) + 1), np.int32)
    decoder[0, : len(targets)] = targets
    batch = lm_batches.from_encoder_decoder(
        {"encoder_input_tokens": encoder, "decoder_target_tokens": decoder}
    )
    length = len(inputs) + len(targets)
    assert np.asarray(batch["input_ids"])[0, :length].tolist() == inputs + targets
    assert np.asarray(batch["attention_mask"])[0].tolist() == [1] * length + [0] * 3
    labels = np.asarray(batch["labels"])[0]
    assert labels[len(inputs) : length].tolist() == targets
    assert (labels[: len(inputs)] == -100).all() and (labels[length:] == -100).all()
    aligned, mask = lm_batches.right_aligned(encoder)
    assert np.asarray(aligned)[0].tolist() == [0, 0] + inputs
    assert np.asarray(mask)[0].tolist() == [0, 0] + [1] * len(inputs)


def test_decoded_texts_keep_token_0_and_end_at_the_vocabularys_eos(vocabulary):
    ids = vocabulary.encode(TEXT)
    row = [*ids, vocabulary.eos_id, *vocabulary.encode("junk")]
    assert inference.ids_to_texts(vocabulary, np.asarray([row])) == [TEXT]
