"""gin at the edges: the configurables the packaged `gin/` files bind, and how files are found.

The library itself takes plain arguments and dataclasses; this module only
registers them with gin under T5X-like names (`train.*`, `evaluate.*`,
`infer.*`, `PromptSpec.*`, `AdafactorConfig.*`, `LossConfig.*`, and the trainer's
`EvalConfig.*`, `CheckpointConfig.*`, `MeshConfig.*`, `LogConfig.*`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import gin
from softprompt_jax import commands, losses
from softprompt_jax.train import optimizer, trainer

train = gin.external_configurable(trainer.train, name="train")
evaluate = gin.external_configurable(commands.evaluate, name="evaluate")
infer = gin.external_configurable(commands.infer, name="infer")
gin.external_configurable(trainer.PromptSpec, name="PromptSpec")
gin.external_configurable(trainer.EvalConfig, name="EvalConfig")
gin.external_configurable(trainer.CheckpointConfig, name="CheckpointConfig")
gin.external_configurable(trainer.MeshConfig, name="MeshConfig")
gin.external_configurable(trainer.LogConfig, name="LogConfig")
gin.external_configurable(optimizer.AdafactorConfig, name="AdafactorConfig")
gin.external_configurable(losses.LossConfig, name="LossConfig")


def gin_dir() -> Path:
    """The packaged gin folder (T5X layout: models/, prompts/, runs/)."""
    return Path(__file__).resolve().parent / "gin"


def parse(files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = ()) -> None:
    """Parse gin files (resolved against the packaged folder) and `NAME=VALUE` bindings.

    Raises ValueError naming the file or the binding that failed.
    """
    gin.clear_config()
    # gin logs an ERROR for every search path a file is not in; failures raise anyway.
    logging.getLogger().disabled = True
    try:
        _parse(files, bindings, search_paths)
    finally:
        logging.getLogger().disabled = False


def _parse(files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str]) -> None:
    for path in [*search_paths, str(gin_dir()), "."]:
        gin.add_config_file_search_path(path)
    for file in files:
        try:
            gin.parse_config_file(file)
        except OSError as error:
            raise ValueError(
                f"gin file {file!r} not found (looked in the packaged gin/ folder "
                f"{gin_dir()} and the current directory)"
            ) from error
        except Exception as error:
            raise ValueError(f"gin file {file!r}: {error}") from error
    for binding in bindings:
        try:
            gin.parse_config(binding)
        except Exception as error:
            raise ValueError(f"gin binding {binding!r}: {error}") from error
