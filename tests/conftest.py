"""Shared test helpers: the test-data folder, and subprocess work started early."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

# Keep JAX on the CPU and quiet; tests are CPU-only by design.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# One persistent compilation cache for the whole run, inherited by the subprocesses tests
# start (CLI runs, multi-device checks): a program compiled once is loaded after that, also
# when a test re-jits the same function. A developer may point it at a lasting folder.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="softprompt-jax-xla-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import softprompt_jax as sp  # noqa: E402  (after the environment above)

# The tiny T5 the end-to-end tests train on the offline demo tasks (byte vocabulary).
TINY = sp.T5Config(
    vocab_size=384,
    emb_dim=16,
    num_heads=2,
    head_dim=8,
    mlp_dim=32,
    num_encoder_layers=1,
    num_decoder_layers=1,
    dtype="float32",
)


def train_interrupted(
    argv: list[str], interrupt_at: Callable[[str], bool], reference_argv: list[str]
) -> tuple[int, str]:
    """`softprompt-jax <argv>` in a subprocess, sent SIGINT at the first output line that
    `interrupt_at` accepts; meanwhile the uninterrupted `reference_argv` runs in this process.
    Returns the subprocess's exit status and its output."""
    from softprompt_jax import cli

    process = subprocess.Popen(
        [sys.executable, "-m", "softprompt_jax.cli", *argv],
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []

    def interrupt_on_trigger() -> None:
        for line in process.stdout:
            output.append(line)
            if interrupt_at(line):
                process.send_signal(signal.SIGINT)

    reader = threading.Thread(target=interrupt_on_trigger, daemon=True)
    reader.start()
    assert cli.main(reference_argv) == 0
    reader.join(timeout=300)
    process.wait(timeout=60)
    return process.returncode, "".join(output)


@pytest.fixture(scope="module")
def frozen_model(tmp_path_factory) -> Path:
    """`TINY` with random weights, saved as a checkpoint (one per test module)."""
    path = tmp_path_factory.mktemp("frozen") / "model"
    sp.save_pretrained(path, TINY, sp.init_params(TINY, 0))
    return path


REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = REPO_ROOT / "tests" / "data"  # every artifact a test reads; see its README.md


# Multi-device checks run in subprocesses (forced CPU devices, jax.distributed). A test module
# that defines `start_subprocesses(workdir: Path) -> list[subprocess.Popen]` has them started
# as soon as collection ends, so they run beside the in-process tests instead of after them;
# its fixtures collect them with `started_subprocesses(__name__)`.
_STARTED: dict[str, tuple[Path, list[subprocess.Popen]]] = {}


def pytest_collection_finish(session: pytest.Session) -> None:
    modules = {getattr(item, "module", None) for item in session.items} - {None}
    for module in sorted(modules, key=lambda m: m.__name__):
        start = getattr(module, "start_subprocesses", None)
        if start is not None:
            workdir = Path(tempfile.mkdtemp(prefix=f"{module.__name__}-"))
            _STARTED[module.__name__] = (workdir, start(workdir))


def started_subprocesses(module_name: str) -> tuple[Path, list[subprocess.Popen]]:
    """The work folder and the processes that `start_subprocesses` launched for a module."""
    return _STARTED[module_name]


def pytest_sessionfinish(session: pytest.Session) -> None:
    for workdir, processes in _STARTED.values():
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
