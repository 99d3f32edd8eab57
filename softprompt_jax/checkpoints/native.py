"""Our own pretrained-model format: orbax params + `config.json` + a format marker, atomic.

Layout of a saved model dir:
    softprompt_jax.json   {"format": "softprompt-jax-pretrained", "version": 1}
    config.json           `T5Config.to_dict()`
    params/               `orbax.checkpoint.StandardCheckpointer` save of the params tree
                          (OCDBT holding one zarr array per param, read slice by slice)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax.traverse_util import flatten_dict

from softprompt_jax.errors import SoftpromptError
from softprompt_jax.model.config import T5Config

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
        raise SoftpromptError(f"{path} already exists; pass overwrite=True to replace it")
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


@dataclasses.dataclass(frozen=True)
class NativeCheckpoint:
    """A model dir written by `save_native`: its config and each param's zarr array in OCDBT."""

    path: Path
    saved_config: T5Config
    arrays: dict[str, Any]  # '/'-path -> orbax `ArrayMetadata` (name, shape, dtype)

    @property
    def source(self) -> str:
        return str(self.path / PARAMS_DIR)

    def config(self, dtype: str) -> T5Config:
        return self.saved_config.replace(dtype=dtype)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: tuple(array.shape) for key, array in self.arrays.items()}

    def dtypes(self) -> dict[str, np.dtype]:
        return {key: np.dtype(array.dtype) for key, array in self.arrays.items()}

    def read(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        """Only the chunks under `index` of one param are read."""
        spec = {
            "driver": "zarr",  # what orbax's StandardCheckpointer writes inside its OCDBT store
            "kvstore": {
                "driver": "ocdbt",
                "base": {"driver": "file", "path": self.source + "/"},
                "path": self.arrays[key].name + "/",
            },
            "fill_missing_data_reads": False,  # a missing chunk is an error, as orbax has it
        }
        try:
            return ts.open(spec, open=True, read=True).result()[index].read().result()
        except ValueError as error:  # a damaged or missing data file
            raise SoftpromptError(
                f"{self.source}: parameter {key!r}: {_ts_message(error)}"
            ) from error


def open_native(path: str | os.PathLike) -> NativeCheckpoint:
    """Open a model dir written by `save_native`: format marker, config and orbax metadata."""
    path = Path(path).absolute()  # orbax accepts absolute paths only
    marker = _read_json(path / FORMAT_FILE)
    if marker.get("format") != FORMAT_NAME or marker.get("version") != FORMAT_VERSION:
        raise SoftpromptError(
            f"{path / FORMAT_FILE}: format {marker.get('format')!r} version "
            f"{marker.get('version')!r}; this reader knows {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    try:
        cfg = T5Config.from_dict(_read_json(path / CONFIG_FILE))
    except (TypeError, ValueError) as error:  # unknown keys, wrong values
        raise SoftpromptError(f"{path / CONFIG_FILE}: {error}") from error
    return NativeCheckpoint(path, cfg, _array_metadata(path / PARAMS_DIR))


def _array_metadata(params_dir: Path) -> dict[str, Any]:
    """Each param's orbax `ArrayMetadata`; a damaged store is one error naming `params_dir`.

    The OCDBT store is opened synchronously first: a damaged manifest read through orbax
    fails inside its event loop and floods the console with "Event loop is closed".
    """
    store = {"driver": "ocdbt", "base": {"driver": "file", "path": f"{params_dir}/"}}
    try:
        ts.KvStore.open(store).result().list().result()
    except ValueError as error:
        raise SoftpromptError(
            f"{params_dir}: damaged model params: {_ts_message(error)}"
        ) from error
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            metadata = checkpointer.metadata(params_dir).item_metadata
    except (OSError, ValueError) as error:
        raise SoftpromptError(f"{params_dir}: damaged model params: {error}") from error
    if not metadata:  # orbax logs why and returns None
        raise SoftpromptError(
            f"{params_dir}: damaged model params: orbax finds no array metadata in it"
        )
    return flatten_dict(dict(metadata), sep="/")


def _read_json(file: Path) -> dict:
    try:
        value = json.loads(file.read_text())
    except (OSError, ValueError) as error:  # unreadable, not UTF-8, not JSON
        raise SoftpromptError(f"{file}: cannot read JSON: {error}") from error
    if not isinstance(value, dict):
        raise SoftpromptError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def _ts_message(error: Exception) -> str:
    """TensorStore's first line, without the long spec dump it appends."""
    return str(error).split(" [tensorstore_spec=")[0].splitlines()[0]


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path`; an existing `path` is swapped out first and removed after."""
    if not path.exists():
        os.rename(tmp, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.rename(path, old / path.name)
    os.rename(tmp, path)
    shutil.rmtree(old)
