"""Training batches from a seqio task: deterministic, shuffled, repeated, per-host shard.

The data position is the step: the pipeline is a pure function of the seed, so
a resumed run skips the batches already consumed and sees exactly what an
uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import seqio


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
