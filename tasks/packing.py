"""Packing with soft prompts: reserve each example's prompt positions, then pack as seqio does.

A packed row holds several examples, each a segment (T5X's `encoder_segment_ids`,
`encoder_positions`, `decoder_segment_ids`, ...). So that every segment gets its own copy of
its prompt, `reserve_prompt_slots` puts `prompt_length` slot tokens in front of each
example's (already trimmed) `inputs` before seqio packs: the packer counts them, and the
segment's `encoder_positions` are 0..P-1 on them. The model side writes the prompt over the
slots (`softprompt_jax.prompts.fill_prompt_slots`); the slot token carries the prompt's id for a
bank (`softprompt_jax.prompts.prompt_slot_token`). The packed inputs length is then the
configured inputs length plus the (longest) prompt length.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import seqio
import tensorflow as tf

Example = Mapping[str, Any]
Slots = tuple[int, int]  # (prompt length, slot token) of one example


def reserve_prompt_slots(
    dataset: tf.data.Dataset, prompt_length: int, slot_token: int
) -> tf.data.Dataset:
    """Each example's `inputs` with `prompt_length` copies of `slot_token` in front."""
    if prompt_length <= 0 or slot_token <= 0:
        raise ValueError(
            f"need prompt_length > 0 and slot_token > 0, got {prompt_length}, {slot_token}"
        )

    def reserve(example: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        inputs = example["inputs"]
        slots = tf.fill([prompt_length], tf.cast(slot_token, inputs.dtype))
        return {**example, "inputs": tf.concat([slots, inputs], axis=0)}

    return dataset.map(reserve, num_parallel_calls=tf.data.AUTOTUNE)


def packed_lengths(feature_lengths: Mapping[str, int], prompt_length: int) -> dict[str, int]:
    """The packed rows' lengths: the inputs' plus the prompt's, the targets' as configured."""
    return {**feature_lengths, "inputs": feature_lengths["inputs"] + prompt_length}


def pack_converter() -> seqio.EncDecFeatureConverter:
    """seqio's packing feature converter (T5X's `EncDecFeatureConverter(pack=True)`)."""
    return seqio.EncDecFeatureConverter(pack=True)


def packed_batches(
    examples: Sequence[Example],
    feature_lengths: Mapping[str, int],
    batch_size: int,
    slots: Sequence[Slots],
) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """Packed T5X batches of the examples, in order, and each row's number of examples.

    Example i's inputs are cut to `feature_lengths["inputs"]` and its targets to
    `feature_lengths["targets"]` (as `t5x_batches` cuts them), its `slots[i]` reserved, and
    seqio packs them in order into rows of the inputs length plus the longest prompt; row
    r's segments 1..n_r are the next n_r examples. The last batch is padded with empty rows.
    """
    if len(slots) != len(examples):
        raise ValueError(f"{len(examples)} examples but {len(slots)} prompt slots")
    inputs_length, targets_length = feature_lengths["inputs"], feature_lengths["targets"]
    longest = max([length for length, _ in slots] + [0])

    def generate() -> Iterator[dict[str, np.ndarray]]:
        for example, (length, token) in zip(examples, slots, strict=True):
            inputs = np.asarray(example["inputs"], np.int32)[:inputs_length]
            reserved = np.concatenate([np.full([length], token, np.int32), inputs])
            yield {
                "inputs": reserved,
                "targets": np.asarray(example["targets"], np.int32)[:targets_length],
            }

    tokens = tf.data.Dataset.from_generator(
        generate,
        output_signature={
            "inputs": tf.TensorSpec([None], tf.int32),
            "targets": tf.TensorSpec([None], tf.int32),
        },
    )
    lengths = {"inputs": inputs_length + longest, "targets": targets_length}
    rows = pack_converter()(tokens, lengths).batch(batch_size)
    for batch in rows.as_numpy_iterator():
        size = len(batch["encoder_input_tokens"])
        padded = {
            name: np.pad(array, [(0, batch_size - size)] + [(0, 0)] * (array.ndim - 1))
            for name, array in batch.items()
        }
        yield padded, padded["encoder_segment_ids"].max(axis=1)
