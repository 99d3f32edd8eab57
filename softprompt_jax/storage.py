"""Files in a run directory, on local disk or in a bucket (`gs://...`), written all-or-nothing.

Orbax already writes checkpoints wherever `etils.epath` reaches; the run's small files
(`metrics.jsonl`, `best.json`, the numpy prompt beside each checkpoint) go through the same
paths, so `MODEL_DIR=gs://bucket/run` works on a TPU pod. A local file is written to a
temporary sibling, synced and renamed into place; an object in a bucket appears only when
its upload completes, so a plain write is already all-or-nothing there.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import secrets
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from etils import epath

from softprompt_jax.errors import SoftpromptError

PathLike = str | os.PathLike
TEMP_MARK = ".tmp-"  # a local atomic write's temporary sibling is `.<name>.tmp-<random>`


def as_path(path: PathLike) -> epath.Path:
    """An `epath.Path` for a `gs://` (or other `scheme://`) URL, or an absolute local path.

    Local paths are made absolute because orbax refuses relative ones.
    """
    return epath.Path(path if not is_local(path) else os.path.abspath(path))


def is_local(path: PathLike) -> bool:
    return "://" not in os.fspath(path)


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one."""
    path = as_path(path)
    if not is_local(path):
        path.write_bytes(data)
        return
    local = Path(os.fspath(path))
    tmp = local.parent / f".{local.name}{TEMP_MARK}{secrets.token_hex(8)}"
    # Created as open() would (0o666 less the umask), not 0o600 as tempfile.mkstemp makes it.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, local)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_temporaries(folder: PathLike) -> list[str]:
    """Delete the temporary files that killed atomic writes left in `folder`; their names.

    Only a local folder can hold them (a bucket object appears whole or not at all).
    """
    if not is_local(folder) or not os.path.isdir(folder):
        return []
    stray = sorted(Path(folder).glob(f".*{TEMP_MARK}*"))
    for path in stray:
        path.unlink(missing_ok=True)
    return [str(path) for path in stray]


def check_writable(folder: PathLike) -> None:
    """Fail now, not after the compute, if files cannot be written in local `folder`.

    Creates the missing folders and a probe file in the last, then removes all of them.
    """
    if not is_local(folder):
        return
    folder = Path(os.path.abspath(folder))
    if folder.exists() and not folder.is_dir():
        raise SoftpromptError(f"cannot write to {folder}: it is a file, not a folder")
    missing = [path for path in (folder, *folder.parents) if not path.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        culprit = f" ({error.filename})" if error.filename not in (None, str(folder)) else ""
        raise SoftpromptError(
            f"cannot write to {folder}: {error.strerror or error}{culprit}"
        ) from error
    finally:
        for path in missing:
            with contextlib.suppress(OSError):
                path.rmdir()


def write_text_atomic(path: PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_npy_atomic(path: PathLike, array: np.ndarray) -> None:
    """Write `array` in numpy's `.npy` format (whatever the file name), all or nothing."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    write_bytes_atomic(path, buffer.getvalue())


def append_text(path: PathLike, text: str) -> None:
    """Append to a log-like file (a bucket object is rewritten whole: objects are immutable)."""
    with as_path(path).open("a") as f:
        f.write(text)


def strict_json(value: Any, **kwargs: Any) -> str:
    """JSON that strict parsers accept: NaN and infinities are written as null."""
    return json.dumps(finite_or_none(value), allow_nan=False, **kwargs)


def finite_or_none(value: Any) -> Any:
    """`value` with every NaN or infinite float (nested in dicts and lists too) as None."""
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value
