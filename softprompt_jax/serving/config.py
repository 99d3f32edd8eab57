"""The server's settings (gin binds them as `ServeConfig.*` from `runs/prompt_serve.gin`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from softprompt_jax.errors import SoftpromptError
from softprompt_jax.serving.engine import Mode, Shapes

DEFAULT_MAX_PROMPT_LENGTH = 100  # with no prompt at start-up: the paper's prompt length

# PROMPTS: a bank file or folder of .npy, {name: prompt file}, or a PROMPT_PER_TASK run dir.
PromptsSetting = str | Mapping[str, str]


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """What to serve and within which shapes and limits.

    `feature_lengths["inputs"]` is the longest compiled input length (longer inputs are cut),
    `feature_lengths["targets"]` the decode length and the longest candidate to score.
    `input_lengths` (None: the inputs length, its half and its quarter) and `batch_sizes`
    are the compiled buckets; `temperatures` and `num_beams` the decode modes compiled.
    A batch forms within `max_wait_ms` of its oldest request, mixing prompts unless
    `mix_prompts` is False (then one prompt per batch, for comparison). At most
    `max_queued_rows` rows wait (more: 503). `POST /v1/prompts` reads `path`s only inside
    `prompt_dir` (None: never). `model_overrides`: run-time config fields, as in training.
    """

    checkpoint_path: str
    feature_lengths: Mapping[str, int]
    prompts: PromptsSetting | None = None
    vocabulary_path: str | None = None
    task: str | None = None
    dtype: str = "bfloat16"
    model_overrides: Mapping[str, Any] | None = None
    batch_sizes: Sequence[int] = (1, 8, 32)
    input_lengths: Sequence[int] | None = None
    max_wait_ms: float = 5.0
    mix_prompts: bool = True
    max_prompts: int = 64
    max_prompt_length: int | None = None
    max_rows: int = 256
    max_request_bytes: int = 1 << 20
    max_queued_rows: int = 4096
    prompt_dir: str | None = None
    temperatures: Sequence[float] = (0.0,)
    num_beams: Sequence[int] = (1,)
    alpha: float = 0.6
    seed: int = 0

    def shapes(self) -> Shapes:
        """The compiled shapes, every setting checked (a mistake names its gin macro)."""
        lengths = self.feature_lengths
        if not isinstance(lengths, Mapping) or not {"inputs", "targets"} <= set(lengths):
            raise SoftpromptError(
                f"TASK_FEATURE_LENGTHS must give 'inputs' and 'targets', got {lengths!r}"
            )
        _positive_ints([lengths["inputs"], lengths["targets"]], "TASK_FEATURE_LENGTHS")
        longest = lengths["inputs"]
        inputs = self.input_lengths
        if inputs is None:
            inputs = sorted({max(1, longest // 4), max(1, longest // 2), longest})
        _positive_ints(inputs, "SERVE_INPUT_LENGTHS")
        if max(inputs) != longest:
            raise SoftpromptError(
                f"SERVE_INPUT_LENGTHS {list(inputs)} must end at TASK_FEATURE_LENGTHS['inputs'] "
                f"= {longest}"
            )
        _positive_ints(self.batch_sizes, "SERVE_BATCH_SIZES")
        _positive_ints(self.num_beams, "SERVE_NUM_BEAMS")
        temperatures = list(self.temperatures)
        if not temperatures or any(
            isinstance(t, bool) or not isinstance(t, (int, float)) or t < 0 for t in temperatures
        ):
            raise SoftpromptError(
                f"SERVE_TEMPERATURES must be numbers >= 0 (0: greedy), got {temperatures!r}"
            )
        for value, name in [
            (self.max_prompts, "SERVE_MAX_PROMPTS"),
            (self.max_rows, "SERVE_MAX_ROWS"),
            (self.max_request_bytes, "SERVE_MAX_REQUEST_BYTES"),
            (self.max_queued_rows, "SERVE_MAX_QUEUED_ROWS"),
        ]:
            _positive_ints([value], name)
        if self.max_queued_rows < self.max_rows:
            raise SoftpromptError(
                f"SERVE_MAX_QUEUED_ROWS {self.max_queued_rows} must be at least SERVE_MAX_ROWS "
                f"{self.max_rows}: a request of SERVE_MAX_ROWS rows must fit in the queue"
            )
        if self.prompt_dir is not None and not os.path.isdir(self.prompt_dir):
            raise SoftpromptError(
                f"SERVE_PROMPT_DIR {self.prompt_dir}: not a local directory (None: refuse paths)"
            )
        if self.max_prompt_length is not None:
            _positive_ints([self.max_prompt_length], "SERVE_MAX_PROMPT_LENGTH")
        if isinstance(self.max_wait_ms, bool) or not self.max_wait_ms >= 0:
            raise SoftpromptError(f"SERVE_MAX_WAIT_MS must be >= 0, got {self.max_wait_ms!r}")
        modes = [Mode(temperature=float(t)) for t in dict.fromkeys(temperatures)]
        modes += [Mode(num_beams=b) for b in dict.fromkeys(self.num_beams) if b > 1]
        return Shapes(tuple(self.batch_sizes), tuple(inputs), lengths["targets"], tuple(modes))


def _positive_ints(values: Sequence[int], name: str) -> None:
    if (
        not isinstance(values, (list, tuple))
        or not values
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values)
    ):
        raise SoftpromptError(f"{name} must be positive integers, got {values!r}")
