"""tpu_scripts/*.sh: shellcheck, syntax, usage texts, and the exact gcloud commands they issue.

A fake `gcloud` on PATH records its arguments. For `install.sh` and `launch.sh` it also plays
the workers: `tpu-vm scp` copies into a fake home folder and `tpu-vm ssh --command=...` runs
the command there with bash, against fake `sudo`, `lsof`, `hostname` and `python3.11`, so the
tests see what would land on a worker (files, pip arguments, the train command's argv).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "tpu_scripts"
COMMANDS = ["create", "delete", "fetch", "install", "launch", "stop"]
TPU = ["compute", "tpus", "tpu-vm"]
ZONE = "--zone=us-central2-b"
# Every setting the scripts read: cleared from the test environment so defaults apply.
SETTINGS = {
    "TPU_NAME",
    "ZONE",
    "PROJECT",
    "ACCELERATOR_TYPE",
    "TPU_VERSION",
    "REMOTE_DIR",
    "VENV",
    "LOG_DIR",
    "PYTHON",
    "DRY_RUN",
    "CREATE_FLAGS",
    "REPO_URL",
    "REPO_REF",
    "JAX_PACKAGE",
    "MODEL_DIR",
    "GIN_FILES",
    "RUN_NAME",
    "MULTIHOST",
    "REMOTE_ENV",
    "STOP_PATTERN",
    "GRACE_SECONDS",
    "DEST",
    "FETCH_LOGS",
    "STORAGE_CP",
}
DEFAULT_GIN = [
    "--gin_file=models/t5_1_1_xxl.gin",
    "--gin_file=prompts/class_labels.gin",
    "--gin_file=runs/prompt_finetune.gin",
]

FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, shutil, subprocess, sys
args, name = sys.argv[1:], os.path.basename(sys.argv[0])
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps([name, *args]) + "\\n")
home = os.environ.get("FAKE_HOME")
if home and args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    shutil.copy(args[4], os.path.join(home, args[5].split(":", 1)[1]))
if home and args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    command = next(a for a in args if a.startswith("--command=")).removeprefix("--command=")
    env = {{**os.environ, "HOME": home, "PATH": os.environ["FAKE_BIN"] + ":" + os.environ["PATH"]}}
    sys.exit(subprocess.run(["bash", "-c", command], cwd=home, env=env).returncode)
"""

FAKE_WORKER_BIN = {
    "sudo": 'exec "$@"',
    "lsof": '[ -z "$FAKE_LSOF_PIDS" ] || printf "%s\\n" $FAKE_LSOF_PIDS',
    "hostname": "echo worker-0",
    # `python3.11 -m venv DIR` makes a venv whose pip logs its arguments.
    "python3.11": 'mkdir -p "$3/bin" && cp "$FAKE_VENV_BIN"/* "$3/bin/"',
}
FAKE_VENV_BIN = {
    "pip": 'echo "$*" >> "$HOME/pip.log"',
    "softprompt-jax": 'printf "%s\\n" "$@"; echo "REMOTE_ENV_SEEN=$RUN_TAG"',
}


def _write_tools(folder: Path, tools: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in tools.items():
        path = folder / name
        path.write_text(body if body.startswith("#!") else f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)


class FakeCloud:
    """Runs a script with the fake gcloud/gsutil first on PATH and returns what they saw."""

    def __init__(self, root: Path) -> None:
        self.root, self.home, self.log = root, root / "home", root / "calls.jsonl"
        self.home.mkdir()
        _write_tools(root / "bin", {"gcloud": FAKE_GCLOUD, "gsutil": FAKE_GCLOUD})
        _write_tools(root / "worker_bin", FAKE_WORKER_BIN)
        _write_tools(root / "venv_bin", FAKE_VENV_BIN)

    def run(
        self, script: str, *args: str, workers: bool = False, **settings: str
    ) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
        """Run tpu_scripts/<script>.sh; `workers` makes ssh/scp act on the fake home."""
        env = {key: value for key, value in os.environ.items() if key not in SETTINGS}
        env.update(
            PATH=f"{self.root / 'bin'}:{os.environ['PATH']}",
            FAKE_LOG=str(self.log),
            FAKE_BIN=str(self.root / "worker_bin"),
            FAKE_VENV_BIN=str(self.root / "venv_bin"),
            TPU_NAME="pod",
            **settings,
        )
        if workers:
            env["FAKE_HOME"] = str(self.home)
        self.log.write_text("")
        proc = subprocess.run(
            ["bash", str(SCRIPTS / f"{script}.sh"), *args],
            env=env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=60,
        )
        calls = [json.loads(line) for line in self.log.read_text().splitlines()]
        return proc, calls


@pytest.fixture
def cloud(tmp_path: Path) -> FakeCloud:
    return FakeCloud(tmp_path)


def _remote_command(call: list[str]) -> str:
    (command,) = [arg.removeprefix("--command=") for arg in call if arg.startswith("--command=")]
    return command


def _ssh_all(command: str) -> list[str]:
    return ["gcloud", *TPU, "ssh", "pod", "--worker=all", f"--command={command}", ZONE]


def test_every_script_is_tested():
    assert sorted(path.stem for path in SCRIPTS.glob("*.sh")) == sorted([*COMMANDS, "common"])
    for name in COMMANDS:
        assert (SCRIPTS / f"{name}.sh").stat().st_mode & stat.S_IXUSR, f"{name}.sh not executable"


@pytest.mark.skipif(
    shutil.which("shellcheck") is None and not os.environ.get("CI"),
    reason="shellcheck is not installed (apt-get install -y shellcheck); CI requires it",
)
def test_shellcheck_is_clean():
    scripts = sorted(str(path) for path in SCRIPTS.glob("*.sh"))
    proc = subprocess.run(
        ["shellcheck", "--external-sources", *scripts], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", [*COMMANDS, "common"])
def test_bash_syntax(script):
    proc = subprocess.run(
        ["bash", "-n", str(SCRIPTS / f"{script}.sh")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", COMMANDS)
def test_help_prints_usage_and_runs_nothing(cloud, script):
    for flag in ("--help", "-h"):
        proc, calls = cloud.run(script, flag, ZONE="europe-west4-a")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("Usage: ")
        assert "TPU_NAME=pod" in proc.stdout and "ZONE=europe-west4-a" in proc.stdout
        assert calls == []


def test_create(cloud):
    proc, calls = cloud.run(
        "create", ACCELERATOR_TYPE="v4-32", CREATE_FLAGS="--spot", PROJECT="my-project"
    )
    assert proc.returncode == 0, proc.stderr
    assert calls == [
        [
            "gcloud",
            *TPU,
            "create",
            "pod",
            "--accelerator-type=v4-32",
            "--version=tpu-ubuntu2204-base",
            "--spot",
            ZONE,
            "--project=my-project",
        ]
    ]


def test_create_uses_gcloud_default_project(cloud):
    _, calls = cloud.run("create", TPU_VERSION="v2-alpha-tpuv5-lite", ZONE="us-west4-a")
    assert calls == [
        [
            "gcloud",
            *TPU,
            "create",
            "pod",
            "--accelerator-type=v4-8",
            "--version=v2-alpha-tpuv5-lite",
            "--zone=us-west4-a",
        ]
    ]


def test_delete(cloud):
    _, calls = cloud.run("delete")
    assert calls == [["gcloud", *TPU, "delete", "pod", "--quiet", ZONE]]


def test_dry_run_prints_commands_instead(cloud):
    proc, calls = cloud.run("delete", DRY_RUN="1")
    assert calls == [] and proc.returncode == 0
    assert proc.stdout == f"gcloud compute tpus tpu-vm delete pod --quiet {ZONE} \n"


def test_install_copies_this_checkout_and_pip_installs_on_every_worker(cloud):
    proc, calls = cloud.run("install", workers=True)
    assert proc.returncode == 0, proc.stderr
    scp, ssh = calls
    assert scp[:5] == ["gcloud", *TPU, "scp"] and scp[5].endswith("/softprompt-jax.tar.gz")
    assert scp[6:] == ["pod:softprompt-jax.tar.gz", "--worker=all", ZONE]
    assert ssh == _ssh_all(_remote_command(ssh))
    # What a worker ends up with: the checkout (without .git), the archive gone, a venv.
    code = cloud.home / "softprompt-jax"
    assert (code / "pyproject.toml").is_file() and (code / "tpu_scripts" / "launch.sh").is_file()
    assert (code / "softprompt_jax" / "gin").is_symlink() and not (code / ".git").exists()
    assert not (cloud.home / "softprompt-jax.tar.gz").exists()
    assert (cloud.home / "pip.log").read_text().splitlines() == [
        "install -q --upgrade pip",
        "install -q -e softprompt-jax jax[tpu]",
    ]
    assert "worker-0: softprompt-jax installed" in proc.stdout


def test_install_clones_repo_url(cloud):
    _, calls = cloud.run(
        "install",
        REPO_URL="https://example.com/sp.git",
        REPO_REF="v0.1",
        JAX_PACKAGE="jax[tpu]==0.10.2",
        VENV="venvs/sp",
    )
    (ssh,) = calls
    command = _remote_command(ssh)
    assert ssh == _ssh_all(command)
    assert command.startswith(
        "set -e; rm -rf softprompt-jax && git clone -q "
        "https://example.com/sp.git softprompt-jax && "
        "git -C softprompt-jax checkout -q v0.1\n"
    )
    assert "venvs/sp/bin/pip install -q -e softprompt-jax jax\\[tpu\\]==0.10.2" in command
    assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0


@pytest.mark.parametrize("remote_dir", ["/", ".", "..", "a/../.."])
def test_install_refuses_paths_outside_home(cloud, remote_dir):
    proc, calls = cloud.run("install", REMOTE_DIR=remote_dir)
    assert proc.returncode == 2 and "relative paths inside the home" in proc.stderr
    assert calls == []


def test_launch_starts_train_in_background_on_every_worker(cloud):
    _write_tools(cloud.home / "softprompt-venv" / "bin", FAKE_VENV_BIN)
    proc, calls = cloud.run(
        "launch",
        "--gin.MESH_MODEL=8",
        "--gin.MIXTURE_OR_TASK_NAME='taskless_super_glue_rte'",
        workers=True,
        MODEL_DIR="gs://bucket/runs/rte",
        REMOTE_ENV="RUN_TAG=a-b",
        FAKE_LSOF_PIDS="",
    )
    assert proc.returncode == 0, proc.stderr
    (ssh,) = calls
    assert ssh == _ssh_all(_remote_command(ssh))
    log = cloud.home / "softprompt-logs" / "rte.worker-0.log"
    assert "worker-0: started, log ~/softprompt-logs/rte.worker-0.log" in proc.stdout
    for _ in range(100):  # the run is in the background: wait for its last line
        if log.exists() and "REMOTE_ENV_SEEN" in log.read_text():
            break
        time.sleep(0.1)
    # The argv the (fake) softprompt-jax received on the worker, gin quotes intact.
    assert log.read_text().splitlines() == [
        "train",
        "--multihost",
        *DEFAULT_GIN,
        "--gin.MODEL_DIR='gs://bucket/runs/rte'",
        "--gin.MESH_MODEL=8",
        "--gin.MIXTURE_OR_TASK_NAME='taskless_super_glue_rte'",
        "REMOTE_ENV_SEEN=a-b",
    ]


def test_launch_refuses_when_the_tpu_is_held(cloud):
    proc, _ = cloud.run(
        "launch",
        workers=True,
        MODEL_DIR="gs://bucket/run",
        MULTIHOST="0",
        FAKE_LSOF_PIDS="4242 4243",
    )
    assert proc.returncode == 1
    assert "worker-0: processes 4242 4243 hold the TPU; stop.sh ends them" in proc.stderr
    assert not (cloud.home / "softprompt-logs").exists()


@pytest.mark.parametrize("model_dir", ["", "/tmp/run", "runs/x"])
def test_launch_needs_a_gs_model_dir(cloud, model_dir):
    proc, calls = cloud.run("launch", MODEL_DIR=model_dir)
    assert proc.returncode == 2 and "gs://" in proc.stderr and calls == []


def test_stop_kills_by_pattern_and_tpu_holders_and_removes_lock(cloud):
    proc, calls = cloud.run("stop", GRACE_SECONDS="3")
    assert proc.returncode == 0, proc.stderr
    (ssh,) = calls
    command = _remote_command(ssh)
    assert ssh == _ssh_all(command)
    pattern, quoted = "[s]oftprompt[-_]jax", r"\[s\]oftprompt\[-_\]jax"
    for step in (
        f"pkill -TERM -f {quoted}",
        "$(seq 3)",
        f"pkill -KILL -f {quoted}",
        "sudo lsof -t -w /dev/accel* /dev/vfio/*",
        "sudo kill -9 $holders",
        "sudo rm -f /tmp/libtpu_lockfile",
    ):
        assert step in command
    assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0
    # pkill -f matches full command lines: the runs, but not the shell carrying this command.
    assert re.search(pattern, "python3 softprompt-venv/bin/softprompt-jax train --multihost")
    assert re.search(pattern, "python -m softprompt_jax.cli train")
    assert not re.search(pattern, command)


def test_fetch_uploads_worker_logs_then_copies_the_run(cloud):
    proc, calls = cloud.run("fetch", MODEL_DIR="gs://bucket/runs/rte/", DEST="out")
    assert proc.returncode == 0, proc.stderr
    ssh, copy = calls
    command = _remote_command(ssh)
    assert ssh == _ssh_all(command)
    assert command.startswith(
        "gcloud storage cp softprompt-logs/rte.*.log gs://bucket/runs/rte/logs/ ||"
    )
    assert copy == ["gcloud", "storage", "cp", "-r", "gs://bucket/runs/rte", "out/"]
    assert (cloud.root / "out").is_dir()


def test_fetch_with_gsutil_and_without_logs(cloud):
    _, calls = cloud.run(
        "fetch", MODEL_DIR="gs://bucket/run", FETCH_LOGS="0", STORAGE_CP="gsutil -m cp"
    )
    assert calls == [["gsutil", "-m", "cp", "-r", "gs://bucket/run", "results/"]]
