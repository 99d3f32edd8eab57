"""The T5 vocabulary the SuperGLUE tasks tokenize with, and their output features."""

from __future__ import annotations

import os

import seqio

# T5's SentencePiece model (32,000 pieces); T5 and the official prompt-tuning code use this path.
DEFAULT_VOCAB_PATH = "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model"
# Set this to a local copy of the model to work offline.
VOCAB_ENV_VAR = "SOFTPROMPT_JAX_VOCAB"
# T5 appends 100 sentinel ids (<extra_id_0> .. <extra_id_99>) to the 32,000 pieces.
EXTRA_IDS = 100


def vocabulary_path(path: str | None = None) -> str:
    """The model path to use: `path`, else $SOFTPROMPT_JAX_VOCAB, else T5's GCS path."""
    return path or os.environ.get(VOCAB_ENV_VAR) or DEFAULT_VOCAB_PATH


def get_vocabulary(path: str | None = None) -> seqio.Vocabulary:
    """T5's vocabulary (local or gs:// path); seqio reads the file on first use, not here.

    A Hugging Face `tokenizer.json` (GPT-2, Llama 3, Qwen2) gives a `TokenizerVocabulary`
    (which needs the `tokenizers` package, imported only then).
    """
    path = vocabulary_path(path)
    if path.endswith("tokenizer.json"):
        from softprompt_jax.tasks.hf_tokenizer import TokenizerVocabulary

        return TokenizerVocabulary(path)
    return seqio.SentencePieceVocabulary(path, extra_ids=EXTRA_IDS)


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    """T5's text-to-text features: EOS appended to inputs and targets."""
    return {
        "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=False),
        "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
    }
