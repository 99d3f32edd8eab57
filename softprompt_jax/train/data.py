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
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import seqio
import tensorflow as tf

from softprompt_jax.errors import SoftpromptError

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
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of `batch_size` T5X features (`encoder_input_tokens`, ...) from this data shard.

    With several processes, `batch_size` is this process's share of the global batch and
    `shard_info` (from `partitioning.seqio_shard_info`) names its slice of the data.
    """
    dataset = seqio.get_dataset(
        task,
        task_feature_lengths=dict(feature_lengths),
        dataset_split=split,
        shuffle=True,
        num_epochs=None,
        feature_converter=seqio.EncDecFeatureConverter(pack=False),
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
) -> Iterator[dict[str, np.ndarray]]:
    """`train_batches` of a mixture plus `prompt_ids`: each example's task, as its index.

    The index is the task's position in `mixture_task_names`, the names of the prompt bank.
    Without `prompt_ids` the batches are those of `train_batches(mixture, ...)`.
    """
    mix = seqio.get_mixture_or_task(mixture)
    lengths = dict(feature_lengths)
    datasets, rates = [], []
    for index, task in enumerate(mix.tasks):
        if split not in task.splits:  # seqio skips such a task too
            continue
        datasets.append(_task_features(task, index, lengths, split, seed, shard_info))
        rates.append(mix.get_rate(task))
    if not datasets:
        raise SoftpromptError(f"no task of mixture {mixture!r} has a {split!r} split")
    mixed = tf.data.Dataset.sample_from_datasets(
        datasets, rates, seed=seed, stop_on_empty_dataset=True
    )
    return mixed.batch(batch_size, drop_remainder=True).skip(start_step).as_numpy_iterator()


def _task_features(
    task: seqio.Task,
    index: int,
    lengths: dict[str, int],
    split: str,
    seed: int,
    shard_info: seqio.ShardInfo | None,
) -> tf.data.Dataset:
    """The task's repeated, shuffled examples as T5X features with `prompt_ids` = `index`."""
    dataset = task.get_dataset(
        lengths, split=split, shuffle=True, seed=seed, shard_info=shard_info, num_epochs=None
    )
    converted = seqio.EncDecFeatureConverter(pack=False)(dataset, task_feature_lengths=lengths)
    return converted.map(lambda features: {**features, PROMPT_IDS: tf.constant(index, tf.int32)})
