"""The default T5 vocabulary: where its path comes from, lazy loading, the real model's ids."""

from __future__ import annotations

import pytest
import tensorflow as tf
from conftest import TEST_DATA
from softprompt_jax.tasks import vocab


def test_path_from_argument_then_environment_then_t5s_bucket(monkeypatch) -> None:
    monkeypatch.delenv(vocab.VOCAB_ENV_VAR, raising=False)
    assert (
        vocab.vocabulary_path() == "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model"
    )
    monkeypatch.setenv(vocab.VOCAB_ENV_VAR, "/local/spiece.model")
    assert vocab.vocabulary_path() == "/local/spiece.model"
    assert vocab.vocabulary_path("/other.model") == "/other.model"


def test_vocabulary_is_read_on_first_use_only(tmp_path) -> None:
    missing = vocab.get_vocabulary(str(tmp_path / "absent.model"))  # registering reads nothing
    with pytest.raises(tf.errors.NotFoundError):
        missing.encode("x")


def test_real_t5_vocabulary_ids() -> None:
    t5 = vocab.get_vocabulary(str(TEST_DATA / "t5_vocab" / "spiece.model"))
    assert t5.vocab_size == 32_100  # 32,000 pieces + 100 sentinels
    assert t5.encode("True") == [10998]
    assert t5.encode("<extra_id_0>") == [32099]
    assert (t5.pad_id, t5.eos_id, t5.unk_id) == (0, 1, 2)
    features = vocab.output_features(t5)
    assert features["inputs"].add_eos and features["targets"].add_eos
