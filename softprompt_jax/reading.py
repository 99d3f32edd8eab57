"""Reading a prompt back as words (Lester et al. 2021, Section 7).

Each prompt position is compared with every row of the frozen model's input embedding
table by cosine similarity; its nearest vocabulary pieces hint at what it learned (the
paper finds class labels among them). Prompts of a bank are compared with each other by
the mean, over one prompt's positions, of the best-matching position of the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from softprompt_jax.prompt_bank import PromptBank


def nearest_tokens(
    prompt: jax.Array, params: Mapping[str, Any], vocab: Any, k: int = 5
) -> list[list[tuple[str, float]]]:
    """Per prompt position, the `k` most cosine-similar vocabulary pieces, best first.

    Only ids the vocabulary knows are candidates (the embedding table is padded past them);
    `vocab` is a seqio vocabulary or a SentencePiece processor.
    """
    table = jnp.asarray(params["token_embedder"]["embedding"], jnp.float32)
    table = table[: min(table.shape[0], _vocab_size(vocab))]
    similarity = _cosine(jnp.asarray(prompt, jnp.float32), table)
    values, ids = jax.lax.top_k(similarity, k)
    return [
        [(_piece(vocab, int(i)), float(v)) for i, v in zip(row_ids, row_values, strict=True)]
        for row_ids, row_values in zip(np.asarray(ids), np.asarray(values), strict=True)
    ]


def prompt_similarity(bank: PromptBank) -> np.ndarray:
    """`[N, N]`: entry (i, j) is the mean over prompt i's positions of their best cosine
    with any position of prompt j (1 on the diagonal; not symmetric in general)."""
    size = len(bank.names)
    matrix = np.zeros((size, size), np.float32)
    for i, a in enumerate(bank.prompts):
        for j, b in enumerate(bank.prompts):
            matrix[i, j] = float(_cosine(a, b).max(axis=1).mean())
    return matrix


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
    """Cosine similarity of every row of `a` with every row of `b`."""
    unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return unit(a) @ unit(b).T


def _vocab_size(vocab: Any) -> int:
    for name in ("vocab_size", "get_piece_size"):
        size = getattr(vocab, name, None)
        if size is not None:
            return size() if callable(size) else size
    raise ValueError(f"cannot tell the size of vocabulary {vocab!r}")


def _piece(vocab: Any, token_id: int) -> str:
    """The SentencePiece piece of an id (e.g. '▁yes'), else its decoded text."""
    processor = getattr(vocab, "tokenizer", vocab)
    if hasattr(processor, "id_to_piece") and token_id < processor.get_piece_size():
        return processor.id_to_piece(token_id)
    return vocab.decode([token_id])
