"""What `infer` predicts for, and how: rows of input text, each with the prompt that reads it.

Rows come from a task's examples or from a JSON-lines file of the user's own inputs, one
object per line::

    {"prompt": "boolq", "inputs": "..."}
    {"prompt": "cb", "inputs": "...", "candidates": ["entailment", "contradiction", "neutral"]}

`prompt` names a prompt of the bank; `candidates`, when given, are ranked by their
log-likelihood under that prompt (rank classification) instead of decoding an answer.
Every line is checked, and its text tokenized, before any compute: a mistake names the line.
Predictions are made in batches that mix the prompts, and come back in the rows' order.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import seqio

from softprompt_jax import batching, gin_checks, inference
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.model.config import T5Config
from softprompt_jax.prompt_bank import PromptBank

FIELDS = ("prompt", "inputs", "candidates")
REQUIRED = ("prompt", "inputs")


@dataclasses.dataclass(frozen=True)
class InferRow:
    """One input: its text, its tokens and the prompt (a bank name; None: the single prompt)."""

    prompt: str | None
    text: str
    tokens: np.ndarray  # input ids cut to the inputs length, EOS kept
    truncated: bool  # whether the text had more tokens than the inputs length
    candidates: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Prediction:
    text: str
    scores: tuple[float, ...] | None = None  # each candidate's log-likelihood, if ranked


def tokenize(text: str, feature: seqio.Feature, length: int | None) -> tuple[np.ndarray, bool]:
    """Ids of `text` cut to `length` as seqio's `append_eos_after_trim` does (EOS kept, when
    the feature adds one), and whether anything was cut."""
    ids = list(feature.vocabulary.encode(text))
    eos = [feature.vocabulary.eos_id] if feature.add_eos else []
    cut = length is not None and len(ids) + len(eos) > length
    if length is not None:
        ids = ids[: length - len(eos)]
    return np.asarray(ids + eos, np.int32), cut


def read_jsonl(
    path: str | Path,
    prompt_names: Sequence[str],
    feature: seqio.Feature,
    inputs_length: int,
) -> list[InferRow]:
    """The file's rows, in order, tokenized with `feature`; blank lines are skipped.

    A line that is not UTF-8 or JSON, lacks a field, has one of the wrong type or one
    unknown, or names a prompt the bank lacks is a SoftpromptError naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise SoftpromptError(f"input file {path}: no such file")
    rows = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if raw.strip():
            fields = _fields(f"{path} line {number}", raw, prompt_names)
            tokens, truncated = tokenize(fields["inputs"], feature, inputs_length)
            candidates = fields.get("candidates")
            rows.append(
                InferRow(
                    fields["prompt"],
                    fields["inputs"],
                    tokens,
                    truncated,
                    None if candidates is None else tuple(candidates),
                )
            )
    if not rows:
        raise SoftpromptError(f"input file {path} holds no inputs")
    return rows


def _fields(where: str, raw: bytes, prompt_names: Sequence[str]) -> dict[str, Any]:
    """One line's fields, checked: a JSON object with a known prompt and well-typed fields."""
    try:
        fields = json.loads(raw.decode())
    except UnicodeDecodeError as error:
        raise SoftpromptError(f"{where}: not valid UTF-8 ({error.reason})") from error
    except json.JSONDecodeError as error:
        raise SoftpromptError(
            f"{where}: not valid JSON ({error.msg} at column {error.colno})"
        ) from error
    if not isinstance(fields, dict):
        raise SoftpromptError(
            f'{where}: expected an object like {{"prompt": ..., "inputs": ...}}, '
            f"got {type(fields).__name__}"
        )
    for name in fields:
        if name not in FIELDS:
            raise SoftpromptError(
                f"{where}: unknown field {name!r}; the fields are {', '.join(FIELDS)}"
                + gin_checks.did_you_mean(name, FIELDS)
            )
    for name in REQUIRED:
        if not isinstance(fields.get(name), str):
            got = "nothing" if name not in fields else _described(fields[name])
            raise SoftpromptError(f"{where}: field {name!r} must be a string, got {got}")
    if "candidates" in fields and not _strings(fields["candidates"]):
        raise SoftpromptError(
            f"{where}: field 'candidates' must be a non-empty list of strings, "
            f"got {_described(fields['candidates'])}"
        )
    if fields["prompt"] not in prompt_names:
        raise SoftpromptError(
            f"{where}: no prompt named {fields['prompt']!r}; the bank holds "
            + ", ".join(prompt_names)
            + gin_checks.did_you_mean(fields["prompt"], prompt_names)
        )
    return fields


def _strings(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def _described(value: Any) -> str:
    """A JSON value as a message shows it: `5 (int)`."""
    return f"{json.dumps(value)[:40]} ({type(value).__name__})"


def predict(
    cfg: T5Config,
    params: Mapping[str, Any],
    prompt: jax.Array | PromptBank,
    rows: Sequence[InferRow],
    targets: seqio.Feature,
    *,
    inputs_length: int,
    batch_size: int,
    max_length: int,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    num_beams: int = 1,
    alpha: float = 0.6,
    length_buckets: int = 1,
) -> list[Prediction]:
    """Each row's prediction, in order: decoded text, or its best-scoring candidate (the
    earliest among equals) with every candidate's score. `targets` decodes and tokenizes.

    `length_buckets > 1` pads batches to a few input lengths, shortest inputs first
    (`batching.bucket_lengths`); the predictions still come back in the rows' order.
    """
    predictions: list[Prediction | None] = [None] * len(rows)
    decoded = [i for i, row in enumerate(rows) if row.candidates is None]
    if decoded:
        decode = functools.partial(
            inference.predict_texts,
            cfg,
            params,
            prompt,
            targets.vocabulary,
            max_length=max_length,
            temperature=temperature,
            top_k=top_k,
            seed=seed,
            num_beams=num_beams,
            alpha=alpha,
        )
        batches, order = batching.input_batches(
            [rows[i].tokens for i in decoded],
            _prompt_ids(prompt, [rows[i] for i in decoded]),
            max_length=inputs_length,
            batch_size=batch_size,
            length_buckets=length_buckets,
        )
        texts = batching.restore_order(decode(batches), order)
        for i, text in zip(decoded, texts, strict=True):
            predictions[i] = Prediction(text)
    ranked_at = [i for i, row in enumerate(rows) if row.candidates is not None]
    ranked = [rows[i] for i in ranked_at]
    scores = inference.candidate_scores(
        cfg,
        params,
        prompt,
        [row.tokens for row in ranked],
        [[tokenize(c, targets, None)[0] for c in row.candidates] for row in ranked],
        _prompt_ids(prompt, ranked),
        batch_size=batch_size,
        inputs_length=inputs_length,
        length_buckets=length_buckets,
    )
    for i, each in zip(ranked_at, scores, strict=True):
        predictions[i] = Prediction(rows[i].candidates[int(np.argmax(each))], tuple(each.tolist()))
    return predictions


def _prompt_ids(prompt: jax.Array | PromptBank, rows: Sequence[InferRow]) -> list[int] | None:
    """Each row's prompt of the bank; None for a single prompt."""
    return [prompt.index(row.prompt) for row in rows] if isinstance(prompt, PromptBank) else None
