"""Evaluate prompts on tasks' splits with the tasks' own metrics.

Generation tasks are decoded with the key/value cache (greedy, or beam search) and scored by
the task's postprocessor and metrics; `*_rank` tasks score every candidate label instead
(rank classification), which never yields an illegal label. A prompt bank evaluates several
tasks at once, each with its own prompt, in batches that mix the tasks; an ensemble runs the
K prompts of one task in one batch and combines their answers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import seqio

from softprompt_jax import batching, inference
from softprompt_jax.ensembles import ensemble_predict, ensemble_scores, majority
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.losses import packed_scores
from softprompt_jax.model.config import T5Config
from softprompt_jax.model.decoder_config import is_decoder_only
from softprompt_jax.prompt_bank import PromptBank
from softprompt_jax.prompts import prompt_slot_token
from softprompt_jax.tasks import evaluation as task_evaluation
from softprompt_jax.tasks import packing as task_packing
from softprompt_jax.tasks.postprocessors import as_text
from softprompt_jax.tasks.rank_classification import ScoreFn, rank_classification_predictions

Example = Mapping[str, Any]
Batches = Iterable[tuple[dict[str, np.ndarray], int]]
Row = tuple[str, int]  # (task, index of the example among that task's examples)


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
    num_beams: int = 1,
    alpha: float = 0.6,
    length_buckets: int = 1,
    pack: bool = False,
) -> dict[str, float]:
    """The task's metrics on `split` (at most `max_examples` examples).

    `feature_lengths=None` scores whole inputs and targets, as T5X evaluates; given lengths
    truncate like training. Generation tasks also report `loss_per_token`, the mean target
    cross-entropy, and decode `decode_length` tokens (default: the targets length), greedily
    or, with `num_beams > 1`, by beam search with length penalty `alpha`. `length_buckets > 1`
    pads batches to a few input lengths (`batching.bucket_lengths`); the metrics are the same.
    `pack=True` scores several examples per row (seqio's packing, each example with its
    prompt; `packed_example_scores`): the same scores in fewer rows. Decoding stays unpacked.
    """
    return evaluate_tasks(
        cfg,
        params,
        prompt,
        {task: None},
        split=split,
        feature_lengths=feature_lengths,
        batch_size=batch_size,
        max_examples=max_examples,
        decode_length=decode_length,
        num_beams=num_beams,
        alpha=alpha,
        length_buckets=length_buckets,
        pack=pack,
    )[task]


def evaluate_tasks(
    cfg: T5Config,
    params: Mapping[str, Any],
    prompt: jax.Array | PromptBank,
    prompt_ids: Mapping[str, int | None],
    *,
    split: str,
    feature_lengths: Mapping[str, int] | None,
    batch_size: int,
    max_examples: int | None = None,
    decode_length: int | None = None,
    num_beams: int = 1,
    alpha: float = 0.6,
    length_buckets: int = 1,
    pack: bool = False,
) -> dict[str, dict[str, float]]:
    """Each task's metrics, as `evaluate_prompt` gives them, with its own prompt.

    `prompt_ids[task]` is the task's row of the bank `prompt` (None for a single prompt).
    The tasks' examples are interleaved, so every batch mixes the tasks; with
    `feature_lengths=None` batches are as long as the longest task needs, and each task
    still decodes its own targets length, so its metrics equal its prompt's alone.
    """
    examples = {task: _examples(task, split, feature_lengths, max_examples) for task in prompt_ids}
    lengths = {task: dict(feature_lengths or full_lengths(ex)) for task, ex in examples.items()}
    padded = {name: max(each[name] for each in lengths.values()) for name in ("inputs", "targets")}
    rows = _interleaved({task: len(ex) for task, ex in examples.items()})

    def in_batches(chosen: Sequence[Row], run: Callable[[Batches], Sequence[Any]]) -> list[Any]:
        ids = [prompt_ids[task] for task, _ in chosen]
        return bucketed(
            [examples[task][i] for task, i in chosen],
            None if None in ids else ids,
            padded,
            batch_size,
            length_buckets,
            run,
        )

    if pack:
        ids = [prompt_ids[task] for task, _ in rows]
        chosen = [examples[task][i] for task, i in rows]
        packed = packed_example_scores(
            cfg, params, prompt, chosen, None if None in ids else ids, padded, batch_size
        )
        scores = _by_task(list(packed), rows)
    else:
        score_fn = inference.make_score_fn(cfg, params, prompt)
        scores = _by_task(in_batches(rows, lambda b: score_batches(score_fn, b)), rows)
    predictions: dict[str, list[str]] = {}
    for tasks, vocabulary, max_length in _decode_groups(lengths, decode_length):
        chosen = [row for row in rows if row[0] in tasks]
        decode = functools.partial(
            inference.predict_texts,
            cfg,
            params,
            prompt,
            vocabulary,
            max_length=max_length,
            num_beams=num_beams,
            alpha=alpha,
        )
        texts = in_batches(chosen, decode)
        predictions |= _by_task(texts, chosen)
    return {
        task: _rank_metrics(task, ex, scores[task])
        if is_rank_task(task)
        else _generation_metrics(task, ex, predictions[task], scores[task], lengths[task])
        for task, ex in examples.items()
    }


def evaluate_ensemble(
    cfg: T5Config,
    params: Mapping[str, Any],
    bank: PromptBank,
    *,
    task: str,
    split: str,
    feature_lengths: Mapping[str, int] | None,
    batch_size: int,
    max_examples: int | None = None,
    decode_length: int | None = None,
    length_buckets: int = 1,
) -> dict[str, float]:
    """Every member's metrics (`member/<name>/<metric>`) and the ensemble's, in one batch.

    The ensemble's answer is the majority vote of the members' answers, ties to the earliest
    member (`ensemble_vote/<metric>`); a rank task also ranks the candidates by the members'
    mean log-likelihood (`ensemble_mean_score/<metric>`). Decoding is greedy;
    `length_buckets` as in `evaluate_prompt`.
    """
    examples = _examples(task, split, feature_lengths, max_examples)
    lengths = dict(feature_lengths or full_lengths(examples))

    def in_batches(run: Callable[[Batches], Sequence[Any]]) -> list[Any]:
        return bucketed(examples, None, lengths, batch_size, length_buckets, run)

    def scores_per_row(batches: Batches) -> list[np.ndarray]:
        return [
            column
            for batch, size in batches
            for column in ensemble_scores(cfg, params, bank, batch)[0][:, :size].T
        ]

    member_scores = np.stack(in_batches(scores_per_row), axis=1)
    if is_rank_task(task):
        members = [_rank_metrics(task, examples, scores) for scores in member_scores]
        results = {
            "ensemble_vote": _rank_metrics(task, examples, _vote_scores(examples, member_scores)),
            "ensemble_mean_score": _rank_metrics(task, examples, member_scores.mean(axis=0)),
        }
    else:
        max_length = decode_length or lengths["targets"]
        answers = in_batches(
            lambda batches: _ensemble_texts(cfg, params, bank, task, batches, max_length)
        )
        member_texts = [[each[0][k] for each in answers] for k in range(len(bank.names))]
        vote = [each[1] for each in answers]
        members = [
            _generation_metrics(task, examples, texts, scores, lengths)
            for texts, scores in zip(member_texts, member_scores, strict=True)
        ]
        results = {"ensemble_vote": task_evaluation.evaluate_predictions(task, examples, vote)}
    results |= {f"member/{name}": each for name, each in zip(bank.names, members, strict=True)}
    return {
        f"{group}/{key}": value for group, each in results.items() for key, value in each.items()
    }


def prompted_batches(
    examples: Sequence[Example],
    prompt_ids: Sequence[int] | None,
    lengths: Mapping[str, int],
    batch_size: int,
) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """`t5x_batches` of the examples, each row with its prompt's `prompt_ids` (padding rows: 0).

    `prompt_ids=None` (a single prompt) adds none.
    """
    batches = task_evaluation.t5x_batches(examples, lengths, batch_size)
    if prompt_ids is None:
        yield from batches
        return
    ids = np.asarray(prompt_ids, np.int32)
    start = 0
    for batch, size in batches:
        rows = batching.padded_rows(ids[start : start + size], batch_size)
        yield {**batch, "prompt_ids": rows}, size
        start += size


def bucketed(
    examples: Sequence[Example],
    prompt_ids: Sequence[int] | None,
    lengths: Mapping[str, int],
    batch_size: int,
    length_buckets: int,
    run: Callable[[Batches], Sequence[Any]],
) -> list[Any]:
    """`run`'s per-row outputs on `prompted_batches` of the examples, in the examples' order.

    With `length_buckets > 1` the examples run shortest first, each batch padded to its
    bucket's input length (`batching.by_length`; rows sharing an input and prompt together),
    and the outputs are put back in order.
    """
    keys = [
        (np.asarray(ex["inputs"]).tobytes(), -1 if prompt_ids is None else prompt_ids[i])
        for i, ex in enumerate(examples)
    ]
    groups = batching.by_length(
        [len(ex["inputs"]) for ex in examples], lengths["inputs"], length_buckets, keys
    )

    def batches() -> Iterator[tuple[dict[str, np.ndarray], int]]:
        for length, indices in groups:
            yield from prompted_batches(
                [examples[i] for i in indices],
                None if prompt_ids is None else [prompt_ids[i] for i in indices],
                {**lengths, "inputs": length},
                batch_size,
            )

    outputs = list(run(batches()))
    return batching.restore_order(outputs, np.concatenate([i for _, i in groups] or [[]]))


def packed_example_scores(
    cfg: T5Config,
    params: Mapping[str, Any],
    prompt: jax.Array | np.ndarray | PromptBank,
    examples: Sequence[Example],
    prompt_ids: Sequence[int] | None,
    lengths: Mapping[str, int],
    batch_size: int,
) -> np.ndarray:
    """Each example's summed target log-likelihood (float64, in order), several per row.

    The examples are packed in order by seqio (`tasks/packing.packed_batches`), each with its
    prompt's positions reserved (`prompt_ids[i]`'s length for a bank), and every segment's
    score (`losses.packed_scores`) is mapped back to its example: `score_batches` of the same
    examples unpacked, in fewer rows.
    """
    if is_decoder_only(cfg):
        raise SoftpromptError(
            "PACK=True packs soft prompts on T5 (encoder-decoder) rows; "
            "score this model with PACK=False"
        )
    if isinstance(prompt, np.ndarray):
        prompt = jnp.asarray(prompt)
    if not isinstance(prompt, (PromptBank, jax.Array)):
        raise SoftpromptError(
            "PACK=True packs soft prompts ([P, d], an [N, P, d] bank or a PromptBank); "
            f"score this {type(prompt).__name__} with PACK=False"
        )
    if isinstance(prompt, PromptBank):
        lengths_by_id = prompt.lengths
    else:
        lengths_by_id = (prompt.shape[-2],) * (1 if prompt.ndim == 2 else prompt.shape[0])
    ids = [0] * len(examples) if prompt_ids is None else [int(i) for i in prompt_ids]
    slots = [(lengths_by_id[i], prompt_slot_token(i)) for i in ids]
    # A segment holds at least one target token and its prompt's slots.
    row_length = lengths["inputs"] + max(lengths_by_id)
    max_segments = max(1, min(lengths["targets"], row_length // min(lengths_by_id)))
    scores = []
    for batch, segments in task_packing.packed_batches(examples, lengths, batch_size, slots):
        features = {name: jnp.asarray(array) for name, array in batch.items()}
        per_segment = np.asarray(packed_scores(cfg, params, prompt, features, max_segments))
        scores += [row[:count] for row, count in zip(per_segment, segments, strict=True)]
    return np.concatenate(scores).astype(np.float64) if scores else np.zeros([0])


def score_batches(score_fn: ScoreFn, batches: Batches) -> np.ndarray:
    """`score_fn` on every real row of `(batch, size)` pairs, in order (float64)."""
    scores = [np.asarray(score_fn(batch), np.float64)[:size] for batch, size in batches]
    return np.concatenate(scores) if scores else np.zeros([0])


def _examples(
    task: str, split: str, feature_lengths: Mapping[str, int] | None, max_examples: int | None
) -> list[dict[str, Any]]:
    """The task's examples; a split without any is a user mistake."""
    examples = task_evaluation.load_examples(task, split, feature_lengths, max_examples)
    if not examples:
        raise SoftpromptError(f"task {task!r} has no examples in split {split!r}")
    return examples


def _interleaved(counts: Mapping[str, int]) -> list[Row]:
    """Every example of every task, one of each task in turn, so that batches mix tasks."""
    return [(task, i) for i in range(max(counts.values())) for task, n in counts.items() if i < n]


def _by_task(values: Sequence[Any], rows: Sequence[Row]) -> dict[str, list[Any]]:
    """Per-row values regrouped by task, each task's in its examples' order."""
    grouped: dict[str, list[Any]] = {}
    for value, (task, _) in zip(values, rows, strict=True):
        grouped.setdefault(task, []).append(value)
    return grouped


def _decode_groups(
    lengths: Mapping[str, Mapping[str, int]], decode_length: int | None
) -> list[tuple[set[str], seqio.Vocabulary, int]]:
    """The generation tasks that decode together: those sharing vocabulary and decode length."""
    groups: list[tuple[set[str], seqio.Vocabulary, int]] = []
    for task, each in lengths.items():
        if is_rank_task(task):
            continue
        key = (_targets_vocabulary(task), decode_length or each["targets"])
        group = next((g for g in groups if (g[1], g[2]) == key), None)
        if group is None:
            groups.append(({task}, *key))
        else:
            group[0].add(task)
    return groups


def _targets_vocabulary(task: str) -> seqio.Vocabulary:
    """The vocabulary that decodes the task's targets."""
    return seqio.get_mixture_or_task(task).output_features["targets"].vocabulary


def _generation_metrics(
    task: str,
    examples: Sequence[Example],
    predictions: Sequence[str],
    scores: Sequence[float],
    lengths: Mapping[str, int],
) -> dict[str, float]:
    """The task's metrics on decoded texts, and the mean target cross-entropy per token."""
    metrics = task_evaluation.evaluate_predictions(task, examples, predictions)
    num_tokens = sum(min(len(ex["targets"]), lengths["targets"]) for ex in examples)
    return {**metrics, "loss_per_token": float(-np.sum(scores) / max(num_tokens, 1))}


_REPLAY_BATCH = 256  # rows per batch when handing back computed scores (only order matters)


def _rank_metrics(
    task: str, examples: Sequence[Example], scores: Sequence[float]
) -> dict[str, float]:
    """A rank task's metrics for candidate scores computed already.

    `rank_classification_metrics` asks a `ScoreFn` batch after batch, in order; this one
    hands back the given scores in turn.
    """
    splits = range(_REPLAY_BATCH, len(examples), _REPLAY_BATCH)
    chunks = iter(np.array_split(np.asarray(scores), splits))
    return task_evaluation.rank_classification_metrics(
        task, examples, lambda batch: next(chunks), full_lengths(examples), _REPLAY_BATCH
    )


def _vote_scores(examples: Sequence[Example], member_scores: np.ndarray) -> np.ndarray:
    """1 for the candidate most members rank first (ties: the earliest member's), else 0."""
    rows = [
        {"example_index": int(ex["example_index"]), "candidate_index": int(ex["candidate_index"])}
        for ex in examples
    ]
    choices = np.array(
        [
            [chosen["candidate_index"] for chosen in rank_classification_predictions(rows, scores)]
            for scores in member_scores
        ]
    )
    indices = sorted({row["example_index"] for row in rows})
    won = {index: int(majority(choices[:, i])) for i, index in enumerate(indices)}
    return np.array([float(row["candidate_index"] == won[row["example_index"]]) for row in rows])


def _ensemble_texts(
    cfg: T5Config,
    params: Mapping[str, Any],
    bank: PromptBank,
    task: str,
    batches: Batches,
    max_length: int,
) -> list[tuple[list[str], str]]:
    """Per example, every member's greedy answer `[K]` and their majority vote."""
    vocabulary = _targets_vocabulary(task)
    answers: list[tuple[list[str], str]] = []
    for batch, size in batches:
        tokens = jnp.asarray(batch["encoder_input_tokens"])
        per_member, voted = ensemble_predict(cfg, params, bank, tokens, max_length=max_length)
        texts = [inference.ids_to_texts(vocabulary, ids[:size]) for ids in per_member]
        votes = inference.ids_to_texts(vocabulary, voted[:size])
        answers += [([each[i] for each in texts], votes[i]) for i in range(size)]
    return answers


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
