"""One reader per pretrained-checkpoint format behind one interface; `open_pretrained` picks it.

A reader gives the model config, the stored params' shapes and dtypes under T5X '/'-paths
(`encoder/layers_0/attention/query/kernel`), and any slice of one param. The loaders
(`pretrained.load_pretrained`, `sharded.load_sharded`) are written against that alone.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from softprompt_jax.checkpoints import hf_decoder, huggingface, native, official, t5x_legacy
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.model.families import ModelConfig, param_shapes
from softprompt_jax.model.scan import Index, is_scanned, relayout

T5X, HUGGINGFACE, NATIVE = "t5x", "huggingface", "native"
_LOOKED_FOR = (
    f"a T5X step dir (with a '{t5x_legacy.CHECKPOINT_FILE}' msgpack file) or its "
    f"'{t5x_legacy.CHECKPOINT_FILE}' file; a T5X model dir with checkpoint_<N> subdirs; "
    "a Hugging Face dir (config.json + *.safetensors or model.safetensors.index.json); "
    f"a softprompt-jax save ({native.FORMAT_FILE})"
)
_MAX_REPORTED = 10


# Each gives `source` (the file or dir errors name), `config(dtype)`, `shapes()`, `dtypes()` and
# `read(key, index)`; nothing else of a format is seen outside its module.
CheckpointReader = (
    t5x_legacy.T5XCheckpoint
    | huggingface.HuggingFaceCheckpoint
    | hf_decoder.HuggingFaceDecoderCheckpoint
    | native.NativeCheckpoint
)


def detect_format(path: str | os.PathLike) -> tuple[str, str]:
    """Which format `path` holds (`t5x`, `huggingface`, `native`) and the location to read."""
    location = str(path)
    if location.startswith("gs://"):
        return T5X, t5x_legacy.step_dir_of(location)
    local = Path(location)
    if not local.exists():
        raise SoftpromptError(f"{location}: no such file or directory")
    if local.is_file():
        if local.name == t5x_legacy.CHECKPOINT_FILE:
            return T5X, str(local.parent)
        raise SoftpromptError(f"{location}: unknown checkpoint format; looked for {_LOOKED_FOR}")
    if native.is_native_dir(local):
        return NATIVE, location
    if (local / t5x_legacy.CHECKPOINT_FILE).is_file():
        return T5X, location
    has_config = (local / "config.json").is_file()
    if has_config and (
        any(local.glob("*.safetensors")) or (local / "model.safetensors.index.json").is_file()
    ):
        return HUGGINGFACE, location
    steps = t5x_legacy.step_dirs(local)
    if steps:
        return T5X, str(steps[max(steps)])
    hint = " (config.json found but no *.safetensors weights)" if has_config else ""
    raise SoftpromptError(f"{location}: unknown checkpoint format{hint}; looked for {_LOOKED_FOR}")


def open_pretrained(path: str | os.PathLike) -> CheckpointReader:
    """Detect the format of `path` once and open its reader (metadata only, no array data)."""
    kind, location = detect_format(path)
    if kind == HUGGINGFACE and hf_decoder.is_decoder_only_config(
        huggingface.read_hf_config(Path(location))
    ):
        return hf_decoder.open_hf_decoder(location)
    opener = {
        T5X: t5x_legacy.open_checkpoint,
        HUGGINGFACE: huggingface.open_huggingface,
        NATIVE: native.open_native,
    }[kind]
    return opener(location)


def model_view(
    reader: CheckpointReader, cfg: ModelConfig
) -> tuple[dict[str, tuple[int, ...]], Callable[[str, Index], np.ndarray]]:
    """The checkpoint's params in `cfg`'s layer layout, checked against `cfg` before any read.

    A prompt that the official prompt-tuning code saved inside its checkpoint is left out.
    """
    shapes = {k: v for k, v in reader.shapes().items() if not official.is_prompt_key(k)}
    check_shapes(shapes, cfg.replace(scan_layers=is_scanned(shapes)), reader.source)
    dtypes = reader.dtypes()
    for key in shapes:
        dtype = dtypes[key]
        if not jnp.issubdtype(dtype, jnp.floating):  # e.g. T5X version 2's bf16 as uint16
            raise SoftpromptError(
                f"{reader.source}: parameter {key!r} is stored as {dtype}, not floating point; "
                "refusing to cast it"
            )
    return relayout(shapes, reader.read, cfg.scan_layers)


def check_shapes(shapes: dict[str, tuple[int, ...]], cfg: ModelConfig, source: str) -> None:
    """Raise SoftpromptError naming `source`, the keys and both shapes where `shapes` miss `cfg`.

    The first line names the first mismatch; the others follow one per line.
    """
    expected = _expected_shapes(cfg)
    problems = (
        [
            f"parameter {key!r} (expected shape {expected[key]}) is missing"
            for key in sorted(expected.keys() - shapes.keys())
        ]
        + [
            f"unexpected parameter {key!r} with shape {tuple(shapes[key])} "
            "(not in the model config)"
            for key in sorted(shapes.keys() - expected.keys())
        ]
        + [
            f"parameter {key!r} has shape {tuple(shapes[key])}; the model config expects "
            f"{expected[key]}"
            for key in sorted(shapes.keys() & expected.keys())
            if tuple(shapes[key]) != expected[key]
        ]
    )
    if problems:
        first = f"{source}: checkpoint does not match the model config: {problems[0]}"
        if len(problems) == 1:
            raise SoftpromptError(first)
        rest = problems[1:]
        if len(rest) > _MAX_REPORTED:
            rest = [*rest[:_MAX_REPORTED], f"... and {len(rest) - _MAX_REPORTED} more"]
        listed = "\n  ".join(rest)
        raise SoftpromptError(f"{first} (and {len(problems) - 1} more):\n  {listed}")


@functools.lru_cache(maxsize=8)
def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {key: tuple(s.shape) for key, s in flatten_dict(param_shapes(cfg), sep="/").items()}
