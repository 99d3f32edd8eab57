"""gin at the edges: the configurables the packaged `gin/` files bind, and how files are found.

The library itself takes plain arguments and dataclasses; this module only
registers them with gin under T5X-like names (`train.*`, `evaluate.*`,
`infer.*`, `serve.*`, `PromptSpec.*`, `AdafactorConfig.*`, `LossConfig.*`, and the trainer's
`EvalConfig.*`, `CheckpointConfig.*`, `MeshConfig.*`, `LogConfig.*`; the server's
`ServeConfig.*`).
"""

from __future__ import annotations

import logging
import tokenize
from collections.abc import Sequence
from pathlib import Path

import gin
from softprompt_jax import commands, gin_checks, losses
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.serving import config as serve_config
from softprompt_jax.serving import server
from softprompt_jax.train import optimizer, trainer

train = gin.external_configurable(trainer.train, name="train")
evaluate = gin.external_configurable(commands.evaluate, name="evaluate")
infer = gin.external_configurable(commands.infer, name="infer")
serve = gin.external_configurable(server.serve, name="serve")
gin.external_configurable(serve_config.ServeConfig, name="ServeConfig")
gin.external_configurable(trainer.PromptSpec, name="PromptSpec")
gin.external_configurable(trainer.EvalConfig, name="EvalConfig")
gin.external_configurable(trainer.CheckpointConfig, name="CheckpointConfig")
gin.external_configurable(trainer.MeshConfig, name="MeshConfig")
gin.external_configurable(trainer.LogConfig, name="LogConfig")
gin.external_configurable(optimizer.AdafactorConfig, name="AdafactorConfig")
gin.external_configurable(losses.LossConfig, name="LossConfig")
CONFIGURABLES = (
    "train",
    "evaluate",
    "infer",
    "serve",
    "ServeConfig",
    "PromptSpec",
    "EvalConfig",
    "CheckpointConfig",
    "MeshConfig",
    "LogConfig",
    "AdafactorConfig",
    "LossConfig",
)
# What gin raises for a file or binding it cannot read: missing files and includes, syntax,
# unknown configurables, parameters and imports.
_GIN_ERRORS = (OSError, ValueError, SyntaxError, tokenize.TokenError, ModuleNotFoundError)


def gin_dir() -> Path:
    """The packaged gin folder (T5X layout: models/, prompts/, runs/)."""
    return Path(__file__).resolve().parent / "gin"


def parse(
    files: Sequence[str],
    bindings: Sequence[str],
    search_paths: Sequence[str] = (),
    entry: str | None = None,
) -> None:
    """Parse gin files (resolved against the packaged folder) and `NAME=VALUE` bindings.

    Raises SoftpromptError naming the file, binding or macro that is wrong: gin's own errors,
    a command-line macro no file defines or uses (with close matches), and, for the
    configurable `entry` (e.g. "train"), a macro it needs that is unset or holds a value of
    the wrong type.
    """
    gin.clear_config()
    # gin logs an ERROR for every search path a file is not in; failures raise anyway.
    logging.getLogger().disabled = True
    try:
        _parse(files, bindings, search_paths)
    finally:
        logging.getLogger().disabled = False
    if entry is not None:
        gin_checks.check_reachable(entry)


def _parse(files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str]) -> None:
    for path in [*search_paths, str(gin_dir()), "."]:
        gin.add_config_file_search_path(path)
    for file in files:
        try:
            gin.parse_config_file(file)
        except _GIN_ERRORS as error:
            raise SoftpromptError(f"gin file {file!r}: {_first_line(error)}") from error
    file_macros = gin_checks.defined_macros()
    settings = gin_checks.setting_names(CONFIGURABLES)
    for binding in bindings:
        try:
            gin.parse_config(binding)
        except _GIN_ERRORS as error:
            name = binding.split("=", 1)[0].strip()
            raise SoftpromptError(
                f"gin binding {binding!r}: {_first_line(error)}"
                + gin_checks.did_you_mean(name, file_macros | settings)
            ) from error
    command_line = gin_checks.defined_macros() - file_macros
    gin_checks.check_unused(sorted(command_line), file_macros, settings)


def _first_line(error: BaseException) -> str:
    """gin's message without the location lines it appends."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
