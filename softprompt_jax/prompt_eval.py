"""Evaluate a prompt on a task's split with the task's own metrics.

Generation tasks are decoded greedily with the key/value cache and scored by the
task's postprocessor and metrics; `*_rank` tasks score every candidate label
instead (rank classification), which never yields an illegal label.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import seqio

from softprompt_jax import inference
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.model.config import T5Config
from softprompt_jax.tasks import evaluation as task_evaluation
from softprompt_jax.tasks.postprocessors import as_text


def is_rank_task(task: str) -> bool:
    return task.endswith("_rank")


def full_lengths(examples: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """The longest inputs and targets of the examples: T5X's `task_feature_lengths=None`."""
    return {name: max([len(ex[name]) for ex in examples] + [1]) for name in ("inputs", "targets")}


def evaluate_prompt(
    cfg: T5Config,
    params: Mapping[str, Any],
    prompt: jax.Array,
    *,
    task: str,
    split: str,
    feature_lengths: Mapping[str, int] | None,
    batch_size: int,
    max_examples: int | None = None,
    decode_length: int | None = None,
) -> dict[str, float]:
    """The task's metrics on `split` (at most `max_examples` examples).

    `feature_lengths=None` scores whole inputs and targets, as T5X evaluates; given lengths
    truncate like training. Generation tasks also report `loss_per_token`, the mean target
    cross-entropy, and decode `decode_length` tokens (default: the targets length).
    """
    examples = task_evaluation.load_examples(task, split, feature_lengths, max_examples)
    if not examples:
        raise SoftpromptError(f"task {task!r} has no examples in split {split!r}")
    lengths = dict(feature_lengths or full_lengths(examples))
    score_fn = inference.make_score_fn(cfg, params, prompt)
    if is_rank_task(task):
        return task_evaluation.rank_classification_metrics(
            task, examples, score_fn, lengths, batch_size
        )
    vocabulary = seqio.get_mixture_or_task(task).output_features["targets"].vocabulary
    predictions = inference.predict_texts(
        cfg,
        params,
        prompt,
        vocabulary,
        task_evaluation.t5x_batches(examples, lengths, batch_size),
        max_length=decode_length or lengths["targets"],
    )
    metrics = task_evaluation.evaluate_predictions(task, examples, predictions)
    scores = task_evaluation.score_examples(examples, score_fn, lengths, batch_size)
    num_tokens = sum(min(len(ex["targets"]), lengths["targets"]) for ex in examples)
    return {**metrics, "loss_per_token": float(-scores.sum() / max(num_tokens, 1))}


def metric_names(task: str, split: str) -> set[str]:
    """The names `evaluate_prompt` reports for `task`, without a model.

    The task's own metric functions score one example of `split` as if predicted perfectly
    (a rank task: with every candidate scored alike), so whatever keys they return are
    found, and a missing split fails here rather than at the first evaluation.
    """
    examples = task_evaluation.load_examples(task, split, None, max_examples=1)
    if not examples:
        raise SoftpromptError(f"eval task {task!r} has no examples in split {split!r}")
    if is_rank_task(task):
        return set(
            task_evaluation.rank_classification_metrics(
                task,
                examples,
                lambda batch: np.zeros(len(batch["encoder_input_tokens"])),
                full_lengths(examples),
                batch_size=len(examples),
            )
        )
    targets = [as_text(ex["targets_pretokenized"]) for ex in examples]
    return {*task_evaluation.evaluate_predictions(task, examples, targets), "loss_per_token"}
