"""The official prompt-tuning code's T5X checkpoints: the whole tree with the prompt inside.

google-research/prompt-tuning trains a T5X model whose encoder owns the prompt, so its
checkpoints hold the frozen weights and the prompt at `encoder/prompt/prompt/prompt` (its
numpy sidecars, `encoder.prompt.prompt.prompt`, are named after that path). A frozen-model
load ignores the prompt; `read_prompt` takes it out; `write_prompt` writes that layout.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from softprompt_jax.checkpoints import t5x_legacy
from softprompt_jax.errors import SoftpromptError

PROMPT_KEY = "encoder/prompt/prompt/prompt"


def is_prompt_key(key: str) -> bool:
    """Whether a '/'-path param belongs to an official prompt, not to the frozen model."""
    return key == PROMPT_KEY or key.startswith(PROMPT_KEY + "/")


def holds_t5x_checkpoint(path: str | os.PathLike) -> bool:
    """A T5X step dir (with its `checkpoint` file) or a model dir with `checkpoint_<N>` dirs."""
    path = Path(path)
    if (path / t5x_legacy.CHECKPOINT_FILE).is_file():
        return True
    return path.is_dir() and bool(t5x_legacy.step_dirs(path))


def read_prompt(path: str | os.PathLike) -> tuple[str, np.ndarray]:
    """`(source, prompt)` from a T5X step dir, or a model dir's latest step."""
    step_dir = _latest_step_dir(Path(path))
    checkpoint = t5x_legacy.open_checkpoint(step_dir)
    if PROMPT_KEY not in checkpoint.shapes():
        raise SoftpromptError(
            f"{checkpoint.source}: this T5X checkpoint holds no prompt at {PROMPT_KEY!r} "
            "(not written by the official prompt-tuning code?)"
        )
    return checkpoint.source, checkpoint.read(PROMPT_KEY)


def write_prompt(
    prompt: np.ndarray,
    model_dir: str | os.PathLike,
    step: int,
    frozen_params: Mapping | None = None,
) -> str:
    """Write `model_dir/checkpoint_<step>` in the official layout; returns the step dir.

    With `frozen_params` (T5X names) it is a whole official checkpoint, which the official
    code can restore and continue; without, it holds the prompt alone.
    """
    params = dict(frozen_params or {})
    encoder = dict(params.get("encoder", {}))
    encoder["prompt"] = {"prompt": {"prompt": np.asarray(prompt, np.float32)}}
    params["encoder"] = encoder
    return t5x_legacy.save_t5x_checkpoint(model_dir, params, step)


def _latest_step_dir(path: Path) -> Path:
    if (path / t5x_legacy.CHECKPOINT_FILE).is_file() or path.name == t5x_legacy.CHECKPOINT_FILE:
        return path
    steps = t5x_legacy.step_dirs(path)
    if not steps:
        raise SoftpromptError(f"{path}: no T5X checkpoint_<N> step dirs here")
    return steps[max(steps)]
