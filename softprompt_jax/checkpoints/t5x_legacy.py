"""Read and write T5X legacy checkpoints: a msgpack state dict plus one zarr array per big leaf.

Layout (T5X `checkpoints.py`, version 3): `checkpoint_<step>/checkpoint` is the flax msgpack of
`{'version': 3, 'optimizer': {'target': params, 'state': {'step': ..., 'param_states': ...}}}`.
Each leaf is either inline (flax ndarray ext type 1, numpy scalar ext type 3, or a
`__msgpack_chunked_array__` dict of those) or a TensorStore spec whose zarr v2 array lives in a
directory named by the dotted path, relative to the step dir. Only `target` and the step are
decoded: optimizer slots stay undecoded bytes and their zarr dirs are never opened.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.serialization
import jax.numpy as jnp
import msgpack
import numpy as np
import tensorstore as ts
from flax.traverse_util import flatten_dict, unflatten_dict

from softprompt_jax.errors import SoftpromptError
from softprompt_jax.model.config import T5Config, infer_config_from_shapes

CHECKPOINT_FILE = "checkpoint"
STEP_DIR_PATTERN = re.compile(r"checkpoint_(\d+)")
# Leaves up to this size are inlined in the msgpack by `save_t5x_checkpoint`; larger go to zarr.
DEFAULT_INLINE_MAX_BYTES = 64 * 1024
_CHUNK_BUDGET_BYTES = 64 * 1024**2  # T5X `_choose_chunk_shape`: at most 64 MiB per zarr chunk
_EXT_NDARRAY, _EXT_NPSCALAR = 1, 3
_CHUNKED = "__msgpack_chunked_array__"
_GCS = re.compile(r"gs://([^/]+)/?(.*)", re.DOTALL)

# An inline array, or a TensorStore spec dict as stored in the msgpack (path relative).
Leaf = np.ndarray | dict
Index = tuple[slice, ...]


@dataclasses.dataclass(frozen=True)
class T5XCheckpoint:
    """An opened legacy checkpoint: its step and param leaves, with no zarr data read yet."""

    step_dir: str
    step: int | None
    leaves: dict[str, Leaf]  # flat '/'-path ('encoder/layers_0/...') -> leaf

    @property
    def source(self) -> str:
        """The msgpack file, as errors name it."""
        return posixpath.join(self.step_dir, CHECKPOINT_FILE)

    def config(self, dtype: str) -> T5Config:
        """The model config, inferred from the param shapes (T5X stores none)."""
        try:
            return infer_config_from_shapes(self.shapes(), dtype=dtype)
        except ValueError as error:
            raise SoftpromptError(f"{self.source}: {error}; pass config= explicitly") from error

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every param's shape, from the msgpack (zarr metadata only where the spec lacks it)."""
        return {key: leaf_shape(self.step_dir, leaf) for key, leaf in self.leaves.items()}

    def dtypes(self) -> dict[str, np.dtype]:
        """Every param's stored dtype, from the msgpack (zarr metadata where the spec lacks it)."""
        return {key: leaf_dtype(self.step_dir, leaf) for key, leaf in self.leaves.items()}

    def read(self, key: str, index: Index | None = None, dtype: Any = None) -> np.ndarray:
        """Read one param, or only `index` of it, optionally cast to `dtype`."""
        try:
            return read_array(self.step_dir, self._leaf(key), index, dtype)
        except ValueError as error:
            raise SoftpromptError(f"{self.source}: parameter {key!r}: {error}") from error

    def read_all(self, dtype: Any = None) -> dict:
        """The whole params tree as nested dicts of numpy arrays."""
        flat = {tuple(key.split("/")): self.read(key, dtype=dtype) for key in self.leaves}
        return unflatten_dict(flat)

    def _leaf(self, key: str) -> Leaf:
        if key not in self.leaves:
            raise KeyError(f"{self.source}: no parameter {key!r} in optimizer/target")
        return self.leaves[key]


def step_dirs(model_dir: Path) -> dict[int, Path]:
    """Finished `checkpoint_<N>` step dirs of a T5X model dir (in-progress `.tmp-` ones skipped)."""
    steps = {}
    for child in model_dir.iterdir():
        match = STEP_DIR_PATTERN.fullmatch(child.name)
        if match and (child / CHECKPOINT_FILE).is_file():
            steps[int(match[1])] = child
    return steps


def step_dir_of(path: str | os.PathLike) -> str:
    """Accept a step dir or its `checkpoint` file (local or gs://); return the step dir."""
    path = str(path).rstrip("/")
    if posixpath.basename(path) == CHECKPOINT_FILE:
        return posixpath.dirname(path)
    return path


def kvstore_spec(directory: str) -> dict:
    """TensorStore kvstore spec for a local directory or a `gs://bucket/dir` one."""
    match = _GCS.fullmatch(directory)
    if match:
        return {"driver": "gcs", "bucket": match[1], "path": _as_dir(match[2])}
    return {"driver": "file", "path": _as_dir(os.path.abspath(directory))}


def tensorstore_spec(step_dir: str, spec: Mapping) -> dict:
    """Resolve a stored spec (`file`/`gfile`/`gcs` driver, relative path) for reading."""
    spec = dict(spec)
    stored = dict(spec.get("kvstore") or {})
    # tensorstore < 0.1.14 specs put the path at the top level; both parts may be present.
    parts = [p for p in (stored.get("path", ""), spec.pop("path", "")) if p]
    if not parts:
        raise SoftpromptError(f"{step_dir}: TensorStore spec has no path: {dict(spec)}")
    kvstore = kvstore_spec(step_dir)
    kvstore["path"] = _as_dir(posixpath.join(kvstore["path"], *parts))
    spec["kvstore"] = kvstore
    # Like T5X: trust the zarr metadata on disk for chunking and compression.
    spec["metadata"] = {
        k: v for k, v in (spec.get("metadata") or {}).items() if k not in ("chunks", "compressor")
    }
    # T5X writes no fill value: a missing chunk file is a broken copy, never zeros.
    spec["fill_missing_data_reads"] = False
    return spec


def open_checkpoint(path: str | os.PathLike) -> T5XCheckpoint:
    """Parse `checkpoint_<N>/checkpoint` (or the step dir) into a `T5XCheckpoint`."""
    step_dir = step_dir_of(path)
    file = posixpath.join(step_dir, CHECKPOINT_FILE)
    state = _unpack(_read_file(step_dir, CHECKPOINT_FILE), file)
    version = state.get("version", 0)
    # Version >= 2 wraps the train state in 'optimizer'; older files are a bare flax state dict.
    optimizer = state.get("optimizer") if isinstance(version, int) and version >= 2 else state
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("target"), dict):
        raise SoftpromptError(
            f"{file}: no 'optimizer/target' params in this T5X checkpoint "
            f"(top-level keys: {sorted(map(str, state))})"
        )
    leaves = _decode_target(optimizer["target"], file)
    if not leaves:
        raise SoftpromptError(f"{file}: 'optimizer/target' holds no parameters")
    step = (optimizer.get("state") or {}).get("step")
    if isinstance(step, msgpack.ExtType):
        step = _decode_ext(step, f"{file} [state/step]")
    return T5XCheckpoint(step_dir, None if step is None else int(step), leaves)


def load_t5x_checkpoint(path: str | os.PathLike, dtype: Any = None) -> tuple[dict, int | None]:
    """Read all params of a legacy checkpoint (cast to `dtype` if given) and its step."""
    checkpoint = open_checkpoint(path)
    return checkpoint.read_all(dtype), checkpoint.step


def leaf_shape(step_dir: str, leaf: Leaf) -> tuple[int, ...]:
    """Shape of one leaf without reading its data."""
    if isinstance(leaf, np.ndarray):
        return leaf.shape
    shape = (leaf.get("metadata") or {}).get("shape")
    if shape is None:
        shape = _open(step_dir, leaf).shape
    return tuple(int(d) for d in shape)


def leaf_dtype(step_dir: str, leaf: Leaf) -> np.dtype:
    """Stored dtype of one leaf without reading its data."""
    if isinstance(leaf, np.ndarray):
        return leaf.dtype
    name = leaf.get("dtype") or (leaf.get("metadata") or {}).get("dtype")
    return jnp.dtype(name) if name else _open(step_dir, leaf).dtype.numpy_dtype


def read_array(
    step_dir: str, leaf: Leaf, index: Index | None = None, dtype: Any = None
) -> np.ndarray:
    """Read a leaf, or just `index` of it (only the zarr chunks it touches), cast to `dtype`."""
    if isinstance(leaf, np.ndarray):
        array = leaf if index is None else leaf[index]
    else:
        store = _open(step_dir, leaf)
        try:
            array = (store if index is None else store[index]).read().result()
        except ValueError as error:
            raise SoftpromptError(
                f"cannot read zarr array {_location(step_dir, leaf)}: {_ts_message(error)}"
            ) from error
    if dtype is None:
        return array
    if not jnp.issubdtype(array.dtype, jnp.floating):
        where = "inline array" if isinstance(leaf, np.ndarray) else _location(step_dir, leaf)
        raise SoftpromptError(
            f"{step_dir}: {where} is stored as {array.dtype}, not floating point; "
            f"refusing to cast it to {dtype} (T5X version 2 stored bf16 as uint16)"
        )
    return array.astype(jnp.dtype(dtype), copy=False)


def save_t5x_checkpoint(
    model_dir: str | os.PathLike,
    params: Mapping,
    step: int,
    *,
    dtype: Any = None,
    inline_max_bytes: int = DEFAULT_INLINE_MAX_BYTES,
) -> str:
    """Write `params` as `model_dir/checkpoint_<step>` in T5X's legacy layout, atomically.

    Leaves over `inline_max_bytes` become gzip zarr arrays (relative `file` specs, as T5X writes
    them), smaller ones are inlined. Returns the step dir.
    """
    model_dir = str(model_dir)
    if _GCS.fullmatch(model_dir):
        raise SoftpromptError(
            f"{model_dir}: writing to gs:// is not supported; write locally and copy"
        )
    final = os.path.join(model_dir, f"checkpoint_{step}")
    if os.path.exists(final):
        raise SoftpromptError(f"{final} already exists; T5X never overwrites a step")
    os.makedirs(model_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"checkpoint_{step}.tmp-", dir=model_dir)
    try:
        target = {}
        for key, value in flatten_dict(dict(params)).items():
            array = np.asarray(value)
            if dtype is not None:
                array = array.astype(jnp.dtype(dtype), copy=False)
            target[key] = (
                array
                if array.nbytes <= inline_max_bytes
                else _write_zarr(tmp, "target." + ".".join(key), array)
            )
        state = {
            "version": 3,
            "optimizer": {
                "target": unflatten_dict(target),
                "state": {"step": np.asarray(step, np.int32)},
            },
        }
        with open(os.path.join(tmp, CHECKPOINT_FILE), "wb") as file:
            file.write(flax.serialization.msgpack_serialize(state, in_place=True))
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _as_dir(path: str) -> str:
    return path if not path or path.endswith("/") else path + "/"


def _read_file(directory: str, name: str) -> bytes:
    location = posixpath.join(directory, name)
    try:
        result = ts.KvStore.open(kvstore_spec(directory)).result().read(name).result()
    except ValueError as error:
        raise SoftpromptError(f"{location}: cannot read: {_ts_message(error)}") from error
    if result.state != "value":
        raise SoftpromptError(f"{location}: no such T5X checkpoint file")
    return bytes(result.value)


def _unpack(raw: bytes, file: str) -> dict:
    """Decode the msgpack structure, leaving ext types (arrays) as undecoded bytes."""
    try:
        state = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise SoftpromptError(f"{file}: not a valid T5X msgpack checkpoint: {error}") from error
    if not isinstance(state, dict):
        raise SoftpromptError(
            f"{file}: expected a msgpack map at the top, got {type(state).__name__}"
        )
    return state


def _decode_target(tree: dict, file: str, prefix: str = "") -> dict[str, Leaf]:
    leaves: dict[str, Leaf] = {}
    for name, node in tree.items():
        key = f"{prefix}{name}"
        where = f"{file} [optimizer/target/{key}]"
        if isinstance(node, msgpack.ExtType):
            leaves[key] = _decode_ext(node, where)
        elif isinstance(node, dict) and node.get(_CHUNKED):
            leaves[key] = _unchunk(node, where)
        elif isinstance(node, dict) and isinstance(node.get("driver"), str):
            leaves[key] = node
        elif isinstance(node, dict):
            leaves.update(_decode_target(node, file, f"{key}/"))
        else:
            raise SoftpromptError(
                f"{where}: expected an array or a TensorStore spec, got {type(node).__name__}"
            )
    return leaves


def _decode_ext(ext: msgpack.ExtType, where: str) -> np.ndarray:
    """Flax ndarray ext: msgpack `[shape, dtype name, C-order bytes]`."""
    if ext.code not in (_EXT_NDARRAY, _EXT_NPSCALAR):
        raise SoftpromptError(
            f"{where}: unsupported msgpack ext type {ext.code} "
            f"(expected a flax ndarray, code 1 or 3)"
        )
    try:
        shape, dtype_name, buffer = msgpack.unpackb(ext.data, raw=True)
        dtype = jnp.dtype(dtype_name.decode("ascii"))
        return np.frombuffer(buffer, dtype).reshape([int(d) for d in shape]).copy()
    except (ValueError, TypeError, AttributeError, msgpack.UnpackException) as error:
        raise SoftpromptError(f"{where}: corrupt inline array: {error}") from error


def _unchunk(node: dict, where: str) -> np.ndarray:
    """Re-assemble flax's `__msgpack_chunked_array__` (inline arrays over 1 GiB)."""
    try:
        shape = [int(node["shape"][str(i)]) for i in range(len(node["shape"]))]
        chunks = [_decode_ext(node["chunks"][str(i)], where) for i in range(len(node["chunks"]))]
        return np.concatenate(chunks).reshape(shape)
    except (KeyError, TypeError, ValueError) as error:
        raise SoftpromptError(f"{where}: corrupt chunked inline array: {error}") from error


def _location(step_dir: str, spec: Mapping) -> str:
    kvstore = tensorstore_spec(step_dir, spec)["kvstore"]
    if kvstore["driver"] == "gcs":
        return f"gs://{kvstore['bucket']}/{kvstore['path']}"
    return kvstore["path"]


def _open(step_dir: str, spec: Mapping) -> ts.TensorStore:
    try:
        return ts.open(tensorstore_spec(step_dir, spec), open=True, read=True).result()
    except ValueError as error:
        raise SoftpromptError(
            f"cannot open zarr array {_location(step_dir, spec)}: {_ts_message(error)}"
        ) from error


def _ts_message(error: Exception) -> str:
    """TensorStore's message without the long spec dump it appends."""
    return str(error).split(" [tensorstore_spec=")[0]


def _write_zarr(step_dir: str, name: str, array: np.ndarray) -> dict:
    """Write `array` to `step_dir/name` as T5X does; return the relative spec for the msgpack."""
    spec = {
        "driver": "zarr",
        "dtype": array.dtype.name,
        "kvstore": {"driver": "file", "path": name},
        "metadata": {
            "chunks": _chunk_shape(array.shape, _CHUNK_BUDGET_BYTES // array.itemsize),
            "compressor": {"id": "gzip", "level": 1},
            "shape": list(array.shape),
        },
    }
    absolute = {**spec, "kvstore": kvstore_spec(os.path.join(step_dir, name))}
    ts.open(absolute, create=True, open=False).result().write(array).result()
    return spec


def _chunk_shape(shape: tuple[int, ...], max_elements: int) -> list[int]:
    """T5X's rule: shrink the largest chunk dim to its next divisor until the chunk fits."""
    chunks = list(shape)
    while int(np.prod(chunks)) > max(1, max_elements):
        dim = int(np.argmax(chunks))
        size = shape[dim]
        chunks[dim] = max(d for d in range(1, chunks[dim]) if size % d == 0)
    return chunks
