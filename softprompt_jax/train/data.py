"""Training batches from a seqio task or mixture: deterministic, shuffled, repeated, per-host shard.

The data position is the step: the pipeline is a pure function of the seed, so
a resumed run skips the batches already consumed and sees exactly what an
uninterrupted run would have seen.

For one prompt per task, `per_task_batches` mixes a mixture's tasks itself, as
`seqio.Mixture.get_dataset` does (each task's dataset with the seed, then
`tf.data.Dataset.sample_from_datasets` with the mixture's rates and the seed), because
seqio's mixed stream does not say which task an example came from. Each task's examples
go through the feature converter first and then get their task's index as `prompt_ids`,
which the converter would otherwise drop.

Packing (`pack=True`) puts several examples in each row with seqio's packing
(`EncDecFeatureConverter(pack=True)`, T5X's `encoder_segment_ids`, `encoder_positions`, ...),
after reserving each example's prompt positions in front of its inputs
(`tasks/packing.reserve_prompt_slots`), so the rows' inputs length is the configured one plus
the prompt's. For a mixture with one prompt per task, the tasks' examples are mixed first (as
without packing) and then packed, each example's slots carrying its task's prompt id.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from softprompt_jax.errors import SoftpromptError
from softprompt_jax.prompts import prompt_slot_token
from softprompt_jax.tasks import packing

PROMPT_IDS = "prompt_ids"


def train_batches(
    task: str,
    feature_lengths: Mapping[str, int],
    batch_size: int,
    *,
    seed: int,
    start_step: int = 0,
    split: str = "train",
    shard_info: seqio.ShardInfo | None = None,
    pack_prompt_length: int | None = None,
    converter: seqio.FeatureConverter | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of `batch_size` T5X features (`encoder_input_tokens`, ...) from this data shard.

    `converter` is the model's seqio feature converter (`methods.feature_converter`; default:
    T5's encoder-decoder one).

    With several processes, `batch_size` is this process's share of the global batch and
    `shard_info` (from `partitioning.seqio_shard_info`) names its slice of the data.
    `pack_prompt_length` (the prompt's length) packs the examples, `batch_size` rows a batch.
    """
    if pack_prompt_length is not None:
        _check_packable(converter)
        examples = seqio.get_mixture_or_task(task).get_dataset(
            dict(feature_lengths),
            split=split,
            shuffle=True,
            seed=seed,
            shard_info=shard_info,
            num_epochs=None,
        )
        slotted = packing.reserve_prompt_slots(
            _tokens(examples), pack_prompt_length, prompt_slot_token(0)
        )
        return _packed_batches(slotted, feature_lengths, pack_prompt_length, batch_size, start_step)
    dataset = seqio.get_dataset(
        task,
        task_feature_lengths=dict(feature_lengths),
        dataset_split=split,
        shuffle=True,
        num_epochs=None,
        feature_converter=converter or seqio.EncDecFeatureConverter(pack=False),
        shard_info=shard_info,
        seed=seed,
        batch_size=batch_size,
    )
    return dataset.skip(start_step).as_numpy_iterator()


def mixture_task_names(mixture: str) -> list[str]:
    """The tasks of a seqio mixture (sub-mixtures flattened) in seqio's order, by name."""
    return [task.name for task in seqio.get_mixture_or_task(mixture).tasks]


def per_task_batches(
    mixture: str,
    feature_lengths: Mapping[str, int],
    batch_size: int,
    *,
    seed: int,
    start_step: int = 0,
    split: str = "train",
    shard_info: seqio.ShardInfo | None = None,
    pack_prompt_lengths: Sequence[int] | None = None,
    converter: seqio.FeatureConverter | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """`train_batches` of a mixture plus `prompt_ids`: each example's task, as its index.

    The index is the task's position in `mixture_task_names`, the names of the prompt bank.
    Without `prompt_ids` the batches are those of `train_batches(mixture, ...)`.
    `pack_prompt_lengths` (the bank's prompt lengths, by task index) packs the mixed
    examples instead, each with its task's prompt slots (`prompt_slot_token(index)`); the
    rows then carry no `prompt_ids`.
    """
    if pack_prompt_lengths is not None:
        _check_packable(converter)
    mix = seqio.get_mixture_or_task(mixture)
    lengths = dict(feature_lengths)
    datasets, rates = [], []
    for index, task in enumerate(mix.tasks):
        if split not in task.splits:  # seqio skips such a task too
            continue
        if pack_prompt_lengths is None:
            datasets.append(
                _task_features(task, index, lengths, split, seed, shard_info, converter)
            )
        else:
            examples = task.get_dataset(
                lengths,
                split=split,
                shuffle=True,
                seed=seed,
                shard_info=shard_info,
                num_epochs=None,
            )
            datasets.append(
                packing.reserve_prompt_slots(
                    _tokens(examples), pack_prompt_lengths[index], prompt_slot_token(index)
                )
            )
        rates.append(mix.get_rate(task))
    if not datasets:
        raise SoftpromptError(f"no task of mixture {mixture!r} has a {split!r} split")
    mixed = tf.data.Dataset.sample_from_datasets(
        datasets, rates, seed=seed, stop_on_empty_dataset=True
    )
    if pack_prompt_lengths is not None:
        longest = max(pack_prompt_lengths)
        return _packed_batches(mixed, feature_lengths, longest, batch_size, start_step)
    return mixed.batch(batch_size, drop_remainder=True).skip(start_step).as_numpy_iterator()


def _check_packable(converter: seqio.FeatureConverter | None) -> None:
    """Packing reserves prompt slots in encoder inputs: T5's encoder-decoder features only."""
    if converter is not None and not isinstance(converter, seqio.EncDecFeatureConverter):
        raise SoftpromptError(
            f"PACK=True packs encoder-decoder (T5) rows; this model's features come from "
            f"{type(converter).__name__}, which packing does not support"
        )


def _tokens(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """The examples' `inputs` and `targets` only (what packing keeps; tasks may add others)."""
    return dataset.map(lambda ex: {"inputs": ex["inputs"], "targets": ex["targets"]})


def _packed_batches(
    slotted: tf.data.Dataset,
    feature_lengths: Mapping[str, int],
    prompt_length: int,
    batch_size: int,
    start_step: int,
) -> Iterator[dict[str, np.ndarray]]:
    """seqio's packing of examples whose prompt slots are reserved, `batch_size` rows a batch."""
    lengths = packing.packed_lengths(feature_lengths, prompt_length)
    rows = packing.pack_converter()(slotted, task_feature_lengths=lengths)
    return rows.batch(batch_size, drop_remainder=True).skip(start_step).as_numpy_iterator()


def _task_features(
    task: seqio.Task,
    index: int,
    lengths: dict[str, int],
    split: str,
    seed: int,
    shard_info: seqio.ShardInfo | None,
    converter: seqio.FeatureConverter | None = None,
) -> tf.data.Dataset:
    """The task's repeated, shuffled examples as T5X features with `prompt_ids` = `index`."""
    dataset = task.get_dataset(
        lengths, split=split, shuffle=True, seed=seed, shard_info=shard_info, num_epochs=None
    )
    converter = converter or seqio.EncDecFeatureConverter(pack=False)
    converted = converter(dataset, task_feature_lengths=lengths)
    return converted.map(lambda features: {**features, PROMPT_IDS: tf.constant(index, tf.int32)})
