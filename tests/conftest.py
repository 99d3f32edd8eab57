"""Shared test helpers: the test-data folder, one folder per run, and subprocesses started early."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

# Keep JAX on the CPU and quiet; tests are CPU-only by design.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# One folder per test run, made by the first pytest process: with `-n` (pytest-xdist) that is
# the controller, whose workers inherit the environment, so they and every subprocess a test
# starts (CLI runs, multi-device checks) share it. It holds the persistent XLA compilation
# cache (a program compiled once is loaded after that, in any process; a developer may point
# JAX_COMPILATION_CACHE_DIR at a lasting folder) and the early subprocesses' work folders.
_RUN_DIR_VARIABLE = "SOFTPROMPT_JAX_TEST_RUN_DIR"
_OWN_RUN_DIR = _RUN_DIR_VARIABLE not in os.environ
if _OWN_RUN_DIR:
    os.environ[_RUN_DIR_VARIABLE] = tempfile.mkdtemp(prefix="softprompt-jax-tests-")
RUN_DIR = Path(os.environ[_RUN_DIR_VARIABLE])
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(RUN_DIR / "xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
_XDIST_WORKER = "PYTEST_XDIST_WORKER" in os.environ

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


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """`-n auto` (pyproject's addopts): xdist's worker per core for the suite or a folder, and
    no workers when files or tests are named, whose few tests need not wait for workers."""
    here = config.invocation_params.dir
    named = [here / arg.split("::")[0] for arg in config.args]
    return None if all(path.is_dir() for path in named) else 0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules in an order that ends a parallel run soon (`--dist loadfile` hands whole modules
    to workers in this order): first those with end-to-end (`slow`) tests, as a rule the
    longest; then the others; last those whose subprocesses started early, by then ended.
    A module's tests keep their order."""
    slow = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> int:
        if hasattr(getattr(item, "module", None), "start_subprocesses"):
            return 2
        return 0 if item.path in slow else 1

    items.sort(key=rank)


# Multi-device checks run in subprocesses (forced CPU devices, jax.distributed). A test module
# that defines `start_subprocesses(workdir: Path) -> list[subprocess.Popen]` has them started
# as soon as collection ends, once per run (by the xdist controller, or by the one pytest
# process), so they run beside the other tests instead of after them; its fixtures collect
# them with `started_subprocesses(__name__)`, from whichever process runs the module.
_STARTED: dict[str, tuple[Path, list[subprocess.Popen]]] = {}
_START_FILE = ".started.json"  # the pids, in the module's work folder
_collection_seen: list[bool] = []  # on the xdist controller: a worker has collected


def _subprocess_dir(module_name: str) -> Path:
    return RUN_DIR / "subprocesses" / module_name


def _start(module, elsewhere: bool) -> None:
    """Run `module.start_subprocesses`. `elsewhere`: its tests run in another process (an xdist
    worker), so the pids are recorded and, for each process, a thread here copies its piped
    output to a file and writes its exit status when it ends (read by `StartedProcess`)."""
    workdir = _subprocess_dir(module.__name__)
    workdir.mkdir(parents=True)
    processes = module.start_subprocesses(workdir)
    _STARTED[module.__name__] = (workdir, processes)
    if elsewhere:
        for index, process in enumerate(processes):
            if process.stdout is not None:
                (workdir / f".stdout-{index}").touch()
            threading.Thread(target=_mirror, args=(process, workdir, index), daemon=True).start()
        (workdir / _START_FILE).write_text(json.dumps([process.pid for process in processes]))


def _mirror(process: subprocess.Popen, workdir: Path, index: int) -> None:
    """Copy the process's piped output line by line, then write its exit status."""
    if process.stdout is not None:
        with (workdir / f".stdout-{index}").open("a") as copy:
            for line in process.stdout:
                copy.write(line if isinstance(line, str) else line.decode(errors="replace"))
                copy.flush()
    code = process.wait()
    partial = workdir / f".exit-{index}.partial"
    partial.write_text(str(code))
    partial.replace(workdir / f".exit-{index}")


def pytest_collection_finish(session: pytest.Session) -> None:
    if _XDIST_WORKER:
        return  # the controller started them (pytest_xdist_node_collection_finished)
    modules = {getattr(item, "module", None) for item in session.items} - {None}
    for module in sorted(modules, key=lambda m: m.__name__):
        if hasattr(module, "start_subprocesses"):
            _start(module, elsewhere=False)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids: list[str]) -> None:
    """On the xdist controller, when the first worker has collected: start the subprocesses
    of the modules it collected (the controller collects nothing itself)."""
    if _collection_seen:
        return
    _collection_seen.append(True)
    for file in sorted({nodeid.split("::")[0] for nodeid in ids}):
        path = REPO_ROOT / file
        if "\ndef start_subprocesses(" in path.read_text():
            _start(importlib.import_module(path.stem), elsewhere=True)


class StartedProcess:
    """A process the xdist controller started, as the worker running its module sees it: the
    part of Popen's interface tests use, from its pid and the files the controller writes."""

    def __init__(self, pid: int, workdir: Path, index: int) -> None:
        self.pid, self._status = pid, workdir / f".exit-{index}"
        output = workdir / f".stdout-{index}"
        self.stdout = _Output(output, self._status) if output.exists() else None

    @property
    def returncode(self) -> int | None:
        return int(self._status.read_text()) if self._status.exists() else None

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.1)
        return self.returncode

    def send_signal(self, number: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, number)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _Output(io.TextIOBase):
    """A started process's piped output (text), read while it is written: a line or the rest
    waits for the process to write it or to end (its exit status is written after its output)."""

    def __init__(self, path: Path, status: Path) -> None:
        self._file, self._status = path.open(), status

    def readable(self) -> bool:
        return True

    def readline(self, size: int | None = -1) -> str:
        line = ""
        while not line.endswith("\n"):
            ended = self._status.exists()  # before reading: then the output is all there
            line += self._file.readline()
            if ended:
                break
            if not line.endswith("\n"):
                time.sleep(0.05)
        return line

    def read(self, size: int | None = -1) -> str:
        while not self._status.exists():
            time.sleep(0.05)
        return self._file.read()


def started_subprocesses(module_name: str) -> tuple[Path, list]:
    """The work folder and the processes that `start_subprocesses` launched for a module."""
    if module_name in _STARTED:
        return _STARTED[module_name]
    workdir = _subprocess_dir(module_name)
    pids = json.loads((workdir / _START_FILE).read_text())
    return workdir, [StartedProcess(pid, workdir, index) for index, pid in enumerate(pids)]


def pytest_sessionfinish(session: pytest.Session) -> None:
    for _, processes in _STARTED.values():
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    if _OWN_RUN_DIR:
        shutil.rmtree(RUN_DIR, ignore_errors=True)
