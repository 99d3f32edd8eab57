"""The server's compiled programs: bucketed shapes, warm-up, and one batch of mixed prompts.

Every batch is padded to one of a few fixed shapes (`Shapes`): a batch size and an input
length from small sets, the decode length, and the bank's fixed capacity. All of them are
compiled at start-up (`Engine.warm_up`), so no request compiles anything afterwards.
Scoring encodes each distinct (input, prompt) of a batch once (`batching.share_encoder_rows`:
one input's candidates share its encoder row), padded to a fixed number of encoder rows per
batch size (`Shapes.encoder_rows`: half the batch, or all of it). So there are
`len(input_lengths) * sum(len(decode_modes) + len(encoder_rows(b)) for b in batch_sizes)`
programs. The programs call the offline path's public functions
(`inference.predict_tokens`, `losses.score_batch`) with the bank and the frozen weights as
arguments, so their outputs are those of `infer`.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from softprompt_jax import batching, inference, losses
from softprompt_jax.model.config import T5Config
from softprompt_jax.prompt_bank import PaddedBank
from softprompt_jax.serving.registry import Snapshot

log = logging.getLogger(__name__)


class PromptGone(LookupError):
    """The request's prompt was deleted before its batch ran."""


@dataclasses.dataclass(frozen=True)
class Mode:
    """What a batch computes: decoding (greedy, sampled at `temperature`, or by `num_beams`
    beams) or, with `score`, target log-likelihoods. Only equal modes share a batch."""

    score: bool = False
    temperature: float = 0.0
    num_beams: int = 1


SCORE = Mode(score=True)


@dataclasses.dataclass(frozen=True)
class Work:
    """One row of a batch: an input (its ids, cut and EOS kept) under a named prompt, with a
    candidate target to score or a number of decoded tokens to keep."""

    mode: Mode
    prompt: str
    tokens: np.ndarray
    target: np.ndarray | None = None
    decode_length: int = 0


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The compiled shapes: batch sizes, input lengths, the target length (decoded tokens and
    the longest candidate scored) and the decode modes."""

    batch_sizes: tuple[int, ...]
    input_lengths: tuple[int, ...]
    target_length: int
    decode_modes: tuple[Mode, ...] = (Mode(),)

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch_sizes", tuple(sorted(set(self.batch_sizes))))
        object.__setattr__(self, "input_lengths", tuple(sorted(set(self.input_lengths))))

    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]

    @property
    def max_input_length(self) -> int:
        return self.input_lengths[-1]

    @staticmethod
    def encoder_rows(batch_size: int) -> tuple[int, ...]:
        """The encoder row counts compiled to score a batch of `batch_size` rows: half of it
        (two or more candidates per input) or all of it."""
        return tuple(sorted({-(-batch_size // 2), batch_size}))

    @property
    def programs(self) -> int:
        """How many programs `Engine.warm_up` compiles."""
        per_length = sum(
            len(self.decode_modes) + len(self.encoder_rows(b)) for b in self.batch_sizes
        )
        return len(self.input_lengths) * per_length


def bucket(sizes: Sequence[int], needed: int) -> int:
    """The smallest of the sorted `sizes` that holds `needed`."""
    index = bisect.bisect_left(sizes, needed)
    if index == len(sizes):
        raise ValueError(f"{needed} exceeds the largest bucket {sizes[-1]}")
    return sizes[index]


def _predict(
    cfg, params, bank, tokens, prompt_ids, rng, *, max_length, temperature, num_beams, alpha
):
    return inference.predict_tokens(
        cfg,
        params,
        bank,
        tokens,
        prompt_ids,
        max_length=max_length,
        temperature=temperature,
        rng=rng,
        num_beams=num_beams,
        alpha=alpha,
    )


def _score(cfg, params, bank, features):
    return losses.score_batch(cfg, params, bank, features)


class Engine:
    """Runs batches of `Work` on the frozen model with a bank snapshot, in the compiled shapes.

    Not thread-safe: the server calls it from one worker thread.
    """

    def __init__(
        self,
        cfg: T5Config,
        params: Mapping[str, Any],
        vocabulary: Any,
        shapes: Shapes,
        *,
        alpha: float = 0.6,
        seed: int = 0,
    ) -> None:
        self.params, self.vocabulary, self.shapes = params, vocabulary, shapes
        self.alpha, self.seed = alpha, seed
        self._batches = 0
        statics = ("max_length", "temperature", "num_beams", "alpha")
        self._predict = jax.jit(functools.partial(_predict, cfg), static_argnames=statics)
        self._score = jax.jit(functools.partial(_score, cfg))

    def compiled(self) -> int:
        """How many programs the engine has compiled (its jitted functions' cache sizes)."""
        return self._predict._cache_size() + self._score._cache_size()

    def warm_up(self, bank: PaddedBank) -> int:
        """Compile every program of `shapes` (on all-padding batches); returns their number."""
        empty = np.zeros([0], np.int32)
        for size in self.shapes.batch_sizes:
            for length in self.shapes.input_lengths:
                works = [Work(Mode(), "", np.zeros([length], np.int32), empty, 1)] * size
                for mode in self.shapes.decode_modes:
                    self._compute(mode, works, bank, [0] * size)
                tokens = np.zeros((size, length), np.int32)
                features = self._score_features(tokens, np.zeros([size], np.int32), works)
                features = batching.share_encoder_rows(features)  # all padding: fewest rows
                for rows in self.shapes.encoder_rows(size):
                    self._score(self.params, bank, _encoder_rows(features, rows))
        return self.compiled()

    def run(self, mode: Mode, works: Sequence[Work], snapshot: Snapshot) -> list[Any]:
        """Each work's decoded text or score, or the exception that stopped it: a work whose
        prompt is gone, or one that fails (alone, after its batch failed), fails only itself."""
        results: list[Any] = [None] * len(works)
        live = []
        for i, work in enumerate(works):
            if work.prompt in snapshot.rows:
                live.append(i)
            else:
                results[i] = PromptGone(f"prompt {work.prompt!r} was deleted")
        rows = lambda indices: [snapshot.rows[works[i].prompt] for i in indices]
        try:
            done = self._compute(mode, [works[i] for i in live], snapshot.bank, rows(live))
            for i, result in zip(live, done, strict=True):
                results[i] = result
        except Exception:
            log.exception("a batch of %d failed; running its rows one by one", len(live))
            for i in live:
                try:
                    results[i] = self._compute(mode, [works[i]], snapshot.bank, rows([i]))[0]
                except Exception as error:
                    log.exception("a row failed alone")
                    results[i] = error
        return results

    def _compute(
        self, mode: Mode, works: Sequence[Work], bank: PaddedBank, rows: Sequence[int]
    ) -> list[Any]:
        if not works:
            return []
        size = bucket(self.shapes.batch_sizes, len(works))
        length = bucket(self.shapes.input_lengths, max(len(w.tokens) for w in works))
        tokens = batching.pad_tokens([work.tokens for work in works], length, size)
        prompt_ids = batching.padded_rows(np.asarray(rows, np.int32), size)
        if mode.score:
            shared = batching.share_encoder_rows(self._score_features(tokens, prompt_ids, works))
            needed = len(shared["encoder_input_tokens"])
            features = _encoder_rows(shared, bucket(self.shapes.encoder_rows(size), needed))
            scores = self._score(self.params, bank, features)
            return [float(s) for s in np.asarray(scores)[: len(works)]]
        self._batches += 1
        rng = np.asarray([self.seed, self._batches], np.uint32)  # a raw PRNG key
        ids = self._predict(
            self.params,
            bank,
            tokens,
            prompt_ids,
            rng,
            max_length=self.shapes.target_length,
            temperature=mode.temperature,
            num_beams=mode.num_beams,
            alpha=self.alpha,
        )
        ids = np.asarray(ids)
        return [
            inference.ids_to_texts(self.vocabulary, ids[row : row + 1, : work.decode_length])[0]
            for row, work in enumerate(works)
        ]

    def _score_features(
        self, tokens: np.ndarray, prompt_ids: np.ndarray, works: Sequence[Work]
    ) -> dict[str, np.ndarray]:
        """T5X features to score each work's target, as seqio's `EncDecFeatureConverter`
        (unpacked) builds them (`batching.t5x_features`)."""
        return batching.t5x_features(
            tokens,
            [work.target for work in works],
            prompt_ids,
            inputs_length=tokens.shape[1],
            batch_size=len(tokens),
            targets_length=self.shapes.target_length,
        )


def _encoder_rows(features: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Score features with exactly `rows` encoder rows (zero rows appended) and an
    `encoder_index` (each row its own when nothing was shared): one program per count."""
    tokens, ids = features["encoder_input_tokens"], features["prompt_ids"]
    index = features.get("encoder_index", np.arange(len(tokens), dtype=np.int32))
    return {
        **features,
        "encoder_input_tokens": batching.padded_rows(tokens, rows),
        "prompt_ids": batching.padded_rows(ids, rows),
        "encoder_index": np.asarray(index, np.int32),
    }
