"""Prompt ensembles (Lester et al. 2021, Table 3): K prompts for one task, run in one batch.

Every input is repeated once per member, each copy with its member's prompt, so the frozen
model runs once for the whole ensemble. Generated answers are combined by majority vote (a
tie goes to the earliest member's answer); rank-classification scores by their mean.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from softprompt_jax.inference import predict_tokens
from softprompt_jax.losses import score_batch
from softprompt_jax.model import T5Config
from softprompt_jax.prompt_bank import PromptBank


def num_members(bank: PromptBank | jax.Array) -> int:
    return len(bank.names) if isinstance(bank, PromptBank) else bank.shape[0]


def _per_member(array: jax.Array, members: int) -> jax.Array:
    """`[members * batch, ...]`: the batch repeated once per member (member-major)."""
    return jnp.tile(jnp.asarray(array), (members,) + (1,) * (jnp.ndim(array) - 1))


def _member_ids(members: int, batch: int) -> jax.Array:
    """The prompt id of each row of `_per_member`."""
    return jnp.repeat(jnp.arange(members, dtype=jnp.int32), batch)


def ensemble_predict(
    cfg: T5Config,
    params: Mapping[str, Any],
    bank: PromptBank | jax.Array,
    tokens: jax.Array,
    *,
    max_length: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy decodes of every member `[K, batch, max_length]` and their vote `[batch, max_length]`.

    The vote is the sequence most members decoded; among tied sequences, the one the
    earliest member decoded.
    """
    members, batch = num_members(bank), tokens.shape[0]
    decoded = predict_tokens(
        cfg,
        params,
        bank,
        _per_member(tokens, members),
        _member_ids(members, batch),
        max_length=max_length,
    )
    per_member = np.asarray(decoded).reshape(members, batch, max_length)
    return per_member, np.stack([majority(per_member[:, i]) for i in range(batch)])


def majority(answers: np.ndarray) -> np.ndarray:
    """The most frequent row of `answers` `[K, ...]`; ties go to the earliest member's."""
    rows = [tuple(row.ravel().tolist()) for row in answers]
    counts = Counter(rows)
    best = max(counts.values())
    return answers[next(k for k, row in enumerate(rows) if counts[row] == best)]


def ensemble_scores(
    cfg: T5Config, params: Mapping[str, Any], bank: PromptBank | jax.Array, batch: Mapping
) -> tuple[np.ndarray, np.ndarray]:
    """Every member's target log-likelihoods `[K, batch]` and their mean `[batch]`.

    For rank classification: score each candidate (one row of `batch` per candidate) with
    every member; the ensemble ranks candidates by the members' mean log-likelihood.
    """
    members, rows = num_members(bank), len(batch["encoder_input_tokens"])
    copies = {name: _per_member(value, members) for name, value in batch.items()}
    scores = score_batch(cfg, params, bank, copies, _member_ids(members, rows))
    scores = np.asarray(scores).reshape(members, rows)
    return scores, scores.mean(axis=0)
