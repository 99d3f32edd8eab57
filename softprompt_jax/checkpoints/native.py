"""Our own pretrained-model format: orbax params + `config.json` + a format marker, atomic.

Layout of a saved model dir:
    softprompt_jax.json   {"format": "softprompt-jax-pretrained", "version": 1}
    config.json           `T5Config.to_dict()`
    params/               `orbax.checkpoint.StandardCheckpointer` save of the params tree
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from softprompt_jax.model.config import T5Config
from softprompt_jax.model.network import param_shapes

FORMAT_FILE = "softprompt_jax.json"
FORMAT_NAME = "softprompt-jax-pretrained"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def is_native_dir(path: str | os.PathLike) -> bool:
    """Whether `path` is a model dir written by `save_native` (has the format marker)."""
    return (Path(path) / FORMAT_FILE).is_file()


def save_native(
    path: str | os.PathLike, cfg: T5Config, params: dict, *, overwrite: bool = False
) -> Path:
    """Save `(cfg, params)` to `path`; built in a sibling temp dir, renamed into place at the end.

    Single-process: every file is written by this process.
    """
    path = Path(path).absolute()  # orbax accepts absolute paths only
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(tmp / PARAMS_DIR, params)
            checkpointer.wait_until_finished()
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        marker = {"format": FORMAT_NAME, "version": FORMAT_VERSION}
        (tmp / FORMAT_FILE).write_text(json.dumps(marker) + "\n")
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_native(path: str | os.PathLike, dtype: str = "bfloat16") -> tuple[T5Config, dict]:
    """Load a model dir written by `save_native`; orbax casts each array to `dtype` on read."""
    path = Path(path).absolute()  # orbax accepts absolute paths only
    marker = _read_json(path / FORMAT_FILE)
    if marker.get("format") != FORMAT_NAME or marker.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path / FORMAT_FILE}: format {marker.get('format')!r} version "
            f"{marker.get('version')!r}; this reader knows {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    cfg = T5Config.from_dict(_read_json(path / CONFIG_FILE))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype), sharding=device),
        param_shapes(cfg),
    )
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(path / PARAMS_DIR, target)
    except (ValueError, FileNotFoundError) as error:
        raise ValueError(
            f"{path / PARAMS_DIR}: params do not match {path / CONFIG_FILE}: {error}"
        ) from error
    return cfg, params


def _read_json(file: Path) -> dict:
    try:
        value = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{file}: cannot read JSON: {error}") from error
    if not isinstance(value, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path`; an existing `path` is swapped out first and removed after."""
    if not path.exists():
        os.rename(tmp, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.rename(path, old / path.name)
    os.rename(tmp, path)
    shutil.rmtree(old)
