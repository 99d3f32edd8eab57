"""One run per run directory: an exclusive lock on `MODEL_DIR` for as long as a run lives.

The lock is an OS file lock (`filelock`) on `MODEL_DIR/.run.lock`, so it ends with the
process that holds it: a run killed with SIGKILL leaves no lock behind, and the next run
simply takes it. The holder's pid, host and start time go to `.run.lock.holder`, so a
refused run can name it. Object stores (`gs://`) have no locks: there no lock is taken.
"""

from __future__ import annotations

import json
import os
import socket
import time
from types import TracebackType

import filelock

from softprompt_jax import storage
from softprompt_jax.errors import SoftpromptError

LOCK_FILE = ".run.lock"
HOLDER_FILE = ".run.lock.holder"


class RunLock:
    """Held while a `with RunLock(model_dir):` block runs; refuses a directory in use.

    Entering creates `model_dir` if needed and raises SoftpromptError, naming the holder,
    when another live process holds the lock, or naming the directory when it cannot be
    written. A `gs://` directory is not locked (object stores have no locks).
    """

    def __init__(self, model_dir: storage.PathLike) -> None:
        self.model_dir = storage.as_path(model_dir)
        self._lock: filelock.BaseFileLock | None = None

    def __enter__(self) -> RunLock:
        if not storage.is_local(self.model_dir):
            return self
        try:
            self.model_dir.mkdir(parents=True, exist_ok=True)
            lock = filelock.FileLock(os.fspath(self.model_dir / LOCK_FILE))
            lock.acquire(timeout=0)
        except filelock.Timeout:
            raise SoftpromptError(
                f"MODEL_DIR {self.model_dir} is in use by another run ({self._holder()}); "
                "wait for it to end or use another MODEL_DIR"
            ) from None
        except OSError as error:
            raise SoftpromptError(
                f"MODEL_DIR {self.model_dir} is not writable: {error.strerror or error}"
            ) from error
        self._lock = lock
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        storage.write_text_atomic(self.model_dir / HOLDER_FILE, json.dumps(holder) + "\n")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._lock is not None:
            (self.model_dir / HOLDER_FILE).unlink(missing_ok=True)
            self._lock.release()
            self._lock = None

    def _holder(self) -> str:
        """`pid N on host H since T` from the holder file, or why it is unknown."""
        try:
            holder = json.loads((self.model_dir / HOLDER_FILE).read_text())
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"]))
            return f"pid {holder['pid']} on host {holder['host']} since {since}"
        except (OSError, ValueError, KeyError):
            return "holder unknown: it has not recorded itself yet"
