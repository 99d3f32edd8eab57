"""Host-side batch shapes for eval, infer and serving: length buckets and shared encoder rows.

Padding every batch to the longest input wastes most of the compute on short inputs; padding
each to one of a few bucket lengths keeps the number of compiled shapes small. Rank
classification scores each candidate in its own row with the input repeated; grouping the
identical encoder rows lets the model encode each input once (`losses.score_batch` with an
`encoder_index`). Numpy only, so benchmarks and servers without seqio use it too.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from softprompt_jax.errors import SoftpromptError

MIN_BUCKET = 32  # shorter buckets save too little to be worth another compiled shape
ROUND_TO = 8


def bucket_lengths(max_length: int, count: int, minimum: int = MIN_BUCKET) -> tuple[int, ...]:
    """At most `count` padded lengths, shortest first: `max_length` and its halvings.

    Halvings round up to a multiple of 8 and stop at `minimum`; `count=1` is no bucketing.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise SoftpromptError(
            f"the number of length buckets must be a positive integer, got {count!r}"
        )
    lengths = {max_length}
    for halvings in range(1, count):
        length = -(-max_length // 2**halvings)
        length = max(-(-length // ROUND_TO) * ROUND_TO, minimum)
        if length < max_length:
            lengths.add(length)
    return tuple(sorted(lengths))


def by_length(
    input_lengths: Sequence[int],
    max_length: int,
    count: int,
    keys: Sequence[Hashable] | None = None,
) -> list[tuple[int, np.ndarray]]:
    """Rows grouped by bucket: `(padded length, row indices)`, shortest bucket first.

    One bucket (`count=1`, or a `max_length` too short to halve) keeps the rows' order.
    Within a bucket rows run by length, then `keys` (e.g. the input tokens and prompt, so
    that rows sharing an input sit together), then their original position; the
    concatenated indices are the processing order to undo with `restore_order`.
    """
    lengths = np.minimum(np.asarray(input_lengths, np.int64), max_length)
    buckets = bucket_lengths(max_length, count)
    if len(buckets) == 1:
        return [(max_length, np.arange(len(lengths)))] if len(lengths) else []
    order = sorted(
        range(len(lengths)), key=lambda i: (lengths[i], 0 if keys is None else keys[i], i)
    )
    where = np.searchsorted(buckets, lengths[order])
    return [
        (length, np.asarray(order, np.int64)[where == b])
        for b, length in enumerate(buckets)
        if np.any(where == b)
    ]


def restore_order(values: Sequence[Any], order: Sequence[int]) -> list[Any]:
    """`values` computed in `order` (row indices), put back in the rows' original order."""
    if len(values) != len(order):
        raise ValueError(f"{len(values)} values for {len(order)} rows")
    restored: list[Any] = [None] * len(values)
    for value, row in zip(values, order, strict=True):
        restored[int(row)] = value
    return restored


def input_batches(
    inputs: Sequence[np.ndarray],
    prompt_ids: Sequence[int] | None,
    *,
    max_length: int,
    batch_size: int,
    length_buckets: int = 1,
) -> tuple[list[tuple[dict[str, np.ndarray], int]], np.ndarray]:
    """Batches of input ids to decode, `(features, real rows)`, and the row order they hold.

    Each batch holds `encoder_input_tokens` (cut to `max_length`, or to its bucket) and, when
    `prompt_ids` are given, `prompt_ids`, zero-padded to `batch_size` rows; `restore_order`
    with the returned order puts per-row outputs back in the inputs' order.
    """
    groups = by_length([len(tokens) for tokens in inputs], max_length, length_buckets)
    batches = []
    for length, indices in groups:
        for start in range(0, len(indices), batch_size):
            chosen = indices[start : start + batch_size]
            ids = None if prompt_ids is None else [prompt_ids[i] for i in chosen]
            batch = t5x_features(
                [inputs[i] for i in chosen], None, ids, inputs_length=length, batch_size=batch_size
            )
            batches.append((batch, len(chosen)))
    return batches, np.concatenate([i for _, i in groups] or [np.zeros(0, np.int64)])


def shift_right(targets: Any) -> Any:
    """T5's decoder inputs: each row of `targets` one step right behind the start id 0.

    Takes numpy or jax arrays (under jit too), through the array's own namespace.
    """
    xp = targets.__array_namespace__()
    start = xp.zeros_like(targets[..., :1])
    return xp.concatenate([start, targets[..., :-1]], axis=-1)


def pad_tokens(
    rows: Sequence[Sequence[int]], length: int, batch_size: int | None = None
) -> np.ndarray:
    """Rows of token ids cut to `length`, zero-padded to `[batch_size, length]` int32.

    `batch_size` defaults to one row per given row.
    """
    tokens = np.zeros((len(rows) if batch_size is None else batch_size, length), np.int32)
    for row, ids in enumerate(rows):
        cut = np.asarray(ids)[:length]
        tokens[row, : len(cut)] = cut
    return tokens


def t5x_features(
    inputs: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]] | None,
    prompt_ids: Sequence[int] | None,
    *,
    inputs_length: int,
    batch_size: int,
    targets_length: int | None = None,
) -> dict[str, np.ndarray]:
    """Unpacked T5X features of the examples, zero-padded to `batch_size` rows.

    As seqio's `EncDecFeatureConverter(pack=False)` builds them: `encoder_input_tokens` and,
    with `targets` (cut to `targets_length`), `decoder_input_tokens` (`shift_right`),
    `decoder_target_tokens` and `decoder_loss_weights`; with `prompt_ids`, `prompt_ids`.
    """
    features = {"encoder_input_tokens": pad_tokens(inputs, inputs_length, batch_size)}
    if targets is not None:
        if targets_length is None:
            raise ValueError("targets need a targets_length")
        decoder = pad_tokens(targets, targets_length, batch_size)
        features["decoder_input_tokens"] = shift_right(decoder)
        features["decoder_target_tokens"] = decoder
        features["decoder_loss_weights"] = (decoder > 0).astype(np.int32)
    if prompt_ids is not None:
        features["prompt_ids"] = padded_rows(np.asarray(prompt_ids, np.int32), batch_size)
    return features


def share_encoder_rows(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch with each distinct (encoder row, prompt id) once, and `encoder_index` per row.

    `encoder_input_tokens` (and `prompt_ids`) become the distinct rows, padded with zero
    rows to a multiple of an eighth of the batch so few shapes compile; the decoder features
    keep one row per example. A batch with nothing to share comes back unchanged. All-padding
    rows (no inputs, no targets) read row 0: their scores are ignored.
    """
    tokens = np.asarray(batch["encoder_input_tokens"])
    rows = len(tokens)
    ids = batch.get("prompt_ids")
    padding = ~tokens.any(axis=1) & ~np.asarray(batch["decoder_target_tokens"]).any(axis=1)
    first: dict[tuple[bytes, int], int] = {}
    index = np.full(rows, -1, np.int64)  # each row's source row; -1: padding
    for row in range(rows):
        if not padding[row]:
            key = (tokens[row].tobytes(), -1 if ids is None else int(ids[row]))
            index[row] = first.setdefault(key, row)
    sources = sorted(set(first.values())) or [0]
    granule = max(1, rows // 8)
    size = min(rows, -(-len(sources) // granule) * granule)
    if size == rows:
        return dict(batch)
    position = {source: n for n, source in enumerate(sources)}
    shared = {
        **batch,
        "encoder_input_tokens": padded_rows(tokens[sources], size),
        "encoder_index": np.asarray([position.get(i, 0) for i in index], np.int32),
    }
    if ids is not None:
        shared["prompt_ids"] = padded_rows(np.asarray(ids)[sources], size)
    return shared


def padded_rows(array: np.ndarray, size: int) -> np.ndarray:
    """`array` with zero rows appended along its first axis up to `size` rows."""
    return np.pad(array, [(0, size - len(array))] + [(0, 0)] * (array.ndim - 1))
