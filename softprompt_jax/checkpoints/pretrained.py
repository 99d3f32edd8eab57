"""One entry point for frozen T5 weights: detect the format, load, cast to `dtype`, validate."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from softprompt_jax.checkpoints import native, t5x_legacy
from softprompt_jax.model.config import T5Config, infer_config_from_shapes
from softprompt_jax.model.network import param_shapes

T5X, HUGGINGFACE, NATIVE = "t5x", "huggingface", "native"
_LOOKED_FOR = (
    f"a T5X step dir (with a '{t5x_legacy.CHECKPOINT_FILE}' msgpack file) or its "
    f"'{t5x_legacy.CHECKPOINT_FILE}' file; a T5X model dir with checkpoint_<N> subdirs; "
    "a Hugging Face dir (config.json + *.safetensors or model.safetensors.index.json); "
    f"a softprompt-jax save ({native.FORMAT_FILE})"
)
_MAX_REPORTED = 10
_STACKS = ("encoder", "decoder")


def detect_format(path: str | os.PathLike) -> tuple[str, str]:
    """Which format `path` holds (`t5x`, `huggingface`, `native`) and the location to read."""
    location = str(path)
    if location.startswith("gs://"):
        return T5X, t5x_legacy.step_dir_of(location)
    local = Path(location)
    if not local.exists():
        raise FileNotFoundError(f"{location}: no such file or directory")
    if local.is_file():
        if local.name == t5x_legacy.CHECKPOINT_FILE:
            return T5X, str(local.parent)
        raise ValueError(f"{location}: unknown checkpoint format; looked for {_LOOKED_FOR}")
    if native.is_native_dir(local):
        return NATIVE, location
    if (local / t5x_legacy.CHECKPOINT_FILE).is_file():
        return T5X, location
    has_config = (local / "config.json").is_file()
    if has_config and (
        any(local.glob("*.safetensors")) or (local / "model.safetensors.index.json").is_file()
    ):
        return HUGGINGFACE, location
    steps = _t5x_steps(local)
    if steps:
        return T5X, str(steps[max(steps)])
    hint = " (config.json found but no *.safetensors weights)" if has_config else ""
    raise ValueError(f"{location}: unknown checkpoint format{hint}; looked for {_LOOKED_FOR}")


def load_pretrained(
    path: str | os.PathLike, dtype: str = "bfloat16", config: T5Config | None = None
) -> tuple[T5Config, dict]:
    """Load `(config, params)` from a T5X, Hugging Face or native checkpoint, cast to `dtype`.

    Without `config` it comes from the checkpoint (inferred from shapes for T5X); either way its
    compute dtype becomes `dtype` and every param is checked against `param_shapes(config)`.
    """
    dtype_name = _float_dtype_name(dtype)
    kind, location = detect_format(path)
    if kind == T5X:
        checkpoint = t5x_legacy.open_checkpoint(location)
        source = checkpoint.checkpoint_file
        shapes = checkpoint.shapes()
        loaded_cfg = None if config else _infer_config(shapes, source)
        # Shapes are known from the msgpack alone: fail before reading any array data.
        scanned = any(key.startswith(("encoder/layers/", "decoder/layers/")) for key in shapes)
        _check_shapes(shapes, (config or loaded_cfg).replace(scan_layers=scanned), source)
        params = checkpoint.read_all(dtype_name)
    elif kind == HUGGINGFACE:
        from softprompt_jax.checkpoints.huggingface import load_huggingface

        source = location
        loaded_cfg, params = load_huggingface(location, dtype_name)
    else:
        source = location
        loaded_cfg, params = native.load_native(location, dtype_name)
    cfg = (config or loaded_cfg).replace(dtype=dtype_name)
    params = _match_layer_layout(params, cfg)
    check_params(params, cfg, source)
    return cfg, jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype_name), params)


def save_pretrained(
    path: str | os.PathLike, cfg: T5Config, params: dict, *, overwrite: bool = False
) -> Path:
    """Check `params` against `cfg`, then save both in our own format (orbax + config.json)."""
    check_params(params, cfg, str(path))
    return native.save_native(path, cfg, params, overwrite=overwrite)


def check_params(params: dict, cfg: T5Config, source: str) -> None:
    """Raise `ValueError` naming `source`, key and shapes if `params` do not fit `cfg`."""
    flat = flatten_dict(params, sep="/")
    for key, value in flat.items():
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise ValueError(
                f"{source}: parameter {key!r} has dtype {value.dtype}; "
                "expected a floating-point array"
            )
    _check_shapes({key: value.shape for key, value in flat.items()}, cfg, source)


@functools.lru_cache(maxsize=8)
def _expected_shapes(cfg: T5Config) -> dict[str, tuple[int, ...]]:
    return {key: tuple(s.shape) for key, s in flatten_dict(param_shapes(cfg), sep="/").items()}


def _check_shapes(shapes: dict[str, tuple[int, ...]], cfg: T5Config, source: str) -> None:
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
        if len(problems) > _MAX_REPORTED:
            problems = [*problems[:_MAX_REPORTED], f"... and {len(problems) - _MAX_REPORTED} more"]
        listed = "\n  ".join(problems)
        raise ValueError(f"{source}: checkpoint does not match the model config:\n  {listed}")


def _float_dtype_name(dtype: str) -> str:
    resolved = jnp.dtype(dtype)
    if not jnp.issubdtype(resolved, jnp.floating):
        raise ValueError(f"dtype={dtype!r}: expected a floating-point dtype such as 'bfloat16'")
    return resolved.name


def _infer_config(shapes: dict[str, tuple[int, ...]], source: str) -> T5Config:
    try:
        return infer_config_from_shapes(shapes)
    except ValueError as error:
        raise ValueError(f"{source}: {error}; pass config= explicitly") from error


def _t5x_steps(model_dir: Path) -> dict[int, Path]:
    """Finished `checkpoint_<N>` step dirs of a T5X model dir (in-progress `.tmp-` ones skipped)."""
    steps = {}
    for child in model_dir.iterdir():
        match = t5x_legacy.STEP_DIR_PATTERN.fullmatch(child.name)
        if match and (child / t5x_legacy.CHECKPOINT_FILE).is_file():
            steps[int(match[1])] = child
    return steps


def _match_layer_layout(params: dict, cfg: T5Config) -> dict:
    """Stack `layers_N` into one scanned `layers` axis (or split it) to fit `cfg.scan_layers`."""
    params = dict(params)
    for stack in _STACKS:
        if not isinstance(params.get(stack), dict):
            continue  # check_params reports it
        layers = dict(params[stack])
        count = sum(1 for name in layers if name.startswith("layers_"))
        if cfg.scan_layers and count and all(f"layers_{i}" in layers for i in range(count)):
            per_layer = [layers.pop(f"layers_{i}") for i in range(count)]
            layers["layers"] = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *per_layer)
        elif not cfg.scan_layers and "layers" in layers:
            stacked = layers.pop("layers")
            count = len(jax.tree_util.tree_leaves(stacked)[0])
            for i in range(count):
                layers[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
        params[stack] = layers
    return params
