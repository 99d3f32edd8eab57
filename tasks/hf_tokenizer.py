"""A Hugging Face `tokenizer.json` (GPT-2, Llama 3, Qwen2: byte-level BPE) as a seqio vocabulary.

So the tasks can tokenize for a decoder-only model whose tokenizer is not SentencePiece:
`SOFTPROMPT_JAX_VOCAB=/models/gpt2/tokenizer.json` registers the SuperGLUE tasks on it. Ids
are the tokenizer's own, no special tokens added; EOS is the `eos_token` of the
`tokenizer_config.json` beside it (else `<|endoftext|>`). seqio pads with 0, so where id 0
is a real token (GPT-2's `!`) a padded position and that token look alike: the model side
counts an example's tokens up to its last non-zero id, not its non-zero ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import seqio
import tensorflow as tf
import tokenizers

DEFAULT_EOS = "<|endoftext|>"


class TokenizerVocabulary(seqio.Vocabulary):
    """seqio's interface over `tokenizers.Tokenizer` (encode/decode in Python and in tf.data)."""

    def __init__(self, path: str) -> None:
        self._path = str(path)
        self._tokenizer = tokenizers.Tokenizer.from_file(self._path)
        config = Path(self._path).with_name("tokenizer_config.json")
        eos = json.loads(config.read_text()).get("eos_token") if config.is_file() else None
        eos = eos.get("content") if isinstance(eos, dict) else eos
        self._eos_id = self._tokenizer.token_to_id(eos or DEFAULT_EOS)
        if self._eos_id is None:
            raise ValueError(f"{self._path}: no EOS token {eos or DEFAULT_EOS!r} in the tokenizer")
        super().__init__(extra_ids=0)

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def unk_id(self) -> int | None:
        return None

    @property
    def _base_vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def _encode(self, s: str) -> list[int]:
        return self._tokenizer.encode(s, add_special_tokens=False).ids

    def _decode(self, ids) -> str:
        ids = [int(i) for i in ids if int(i) != self._eos_id]
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        def encode(text: tf.Tensor) -> np.ndarray:
            return np.asarray(self._encode(text.numpy().decode("utf-8")), np.int32)

        ids = tf.py_function(encode, [s], tf.int32)
        ids.set_shape([None])
        return ids

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        def decode(row: tf.Tensor) -> bytes:
            return self._decode(row.numpy().tolist()).encode("utf-8")

        text = tf.py_function(decode, [ids], tf.string)
        text.set_shape([])
        return text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TokenizerVocabulary) and other._path == self._path

    def __hash__(self) -> int:
        return hash(self._path)
