"""End to end through the command line: gin files, train, eval, export, infer, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY

from softprompt_jax import cli, commands
from softprompt_jax.train.state_checkpoints import NUMPY_DIR, PROMPT_SIDECAR

TASK = "demo_multitask"  # offline, byte vocabulary
LENGTHS = "{'inputs': 16, 'targets': 8}"


def gin_flags(model: Path, **macros) -> list[str]:
    """The flags every command takes, and `macros` (TASK_FEATURE_LENGTHS: train and infer)."""
    flags = [
        f"--gin.INITIAL_CHECKPOINT_PATH='{model}'",
        f"--gin.MIXTURE_OR_TASK_NAME='{TASK}'",
        "--gin.PROMPT_LENGTH=4",
    ]
    return flags + [f"--gin.{name}={value}" for name, value in macros.items()]


def train_argv(model: Path, model_dir: Path, steps: int, **macros) -> list[str]:
    return [
        "train",
        "--gin_file=models/t5_1_1_tiny.gin",
        "--gin_file=runs/prompt_finetune.gin",
        *gin_flags(
            model,
            MODEL_DIR=f"'{model_dir}'",
            TASK_FEATURE_LENGTHS=LENGTHS,
            TRAIN_STEPS=steps,
            BATCH_SIZE=4,
            **macros,
        ),
    ]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_train_eval_export_reload(frozen_model, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert cli.main(train_argv(frozen_model, run, 4, EVAL_PERIOD=4, EVAL_EXAMPLES=8)) == 0
    assert "step 4/4" in capsys.readouterr().out
    records = read_jsonl(run / "metrics.jsonl")
    train_eval = [r for r in records if r["kind"] == "eval"][-1]
    assert train_eval["step"] == 4 and {"accuracy", "loss_per_token"} <= set(train_eval)
    assert any(r["kind"] == "train" and np.isfinite(r["loss"]) for r in records)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    exported = tmp_path / "prompt.npy"
    assert cli.main(["export", f"--model_dir={run}", f"--output={exported}"]) == 0
    prompt = np.load(exported)
    assert prompt.shape == (4, TINY.emb_dim) and prompt.dtype == np.float32
    np.testing.assert_array_equal(
        prompt, np.load(run / NUMPY_DIR / "checkpoint_4" / PROMPT_SIDECAR)
    )

    out = tmp_path / "eval"
    argv = [
        "eval",
        "--gin_file=models/t5_1_1_tiny.gin",
        "--gin_file=runs/prompt_eval.gin",
        *gin_flags(
            frozen_model,
            PROMPT_FILE=f"'{exported}'",
            EVAL_OUTPUT_DIR=f"'{out}'",
            EVAL_EXAMPLES=8,
            BATCH_SIZE=4,
        ),
    ]
    assert cli.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["accuracy"] == train_eval["accuracy"]
    assert metrics["loss_per_token"] == pytest.approx(train_eval["loss_per_token"], rel=1e-6)

    predictions = tmp_path / "predictions.jsonl"
    argv = [
        "infer",
        "--gin_file=models/t5_1_1_tiny.gin",
        "--gin_file=runs/prompt_infer.gin",
        *gin_flags(
            frozen_model,
            PROMPT_FILE=f"'{exported}'",
            INFER_OUTPUT_FILE=f"'{predictions}'",
            TASK_FEATURE_LENGTHS=LENGTHS,
            INFER_EXAMPLES=5,
        ),
    ]
    assert cli.main(argv) == 0
    lines = read_jsonl(predictions)
    assert len(lines) == 5
    assert all(set(line) == {"inputs", "prediction", "truncated"} for line in lines)
    assert not any(line["truncated"] for line in lines)  # 16 input tokens hold every demo input
    # Sampling from the single best token is greedy decoding, whatever the temperature; and
    # MODEL_OVERRIDES' fused attention (which the model is seen to get) computes the same.
    impls = []

    def predict(cfg, *args, **kwargs):
        impls.append(cfg.attention_impl)
        return predict_rows(cfg, *args, **kwargs)

    predict_rows = commands.infer_rows.predict
    monkeypatch.setattr(commands.infer_rows, "predict", predict)
    sampled = tmp_path / "sampled.jsonl"
    argv = [
        "infer",
        "--gin_file=models/t5_1_1_tiny.gin",
        "--gin_file=runs/prompt_infer.gin",
        *gin_flags(
            frozen_model,
            PROMPT_FILE=f"'{exported}'",
            INFER_OUTPUT_FILE=f"'{sampled}'",
            TASK_FEATURE_LENGTHS=LENGTHS,
            INFER_EXAMPLES=5,
            INFER_TEMPERATURE=2.0,
            INFER_TOP_K=1,
            INFER_SEED=3,
            MODEL_OVERRIDES="{'attention_impl': 'fused'}",
        ),
    ]
    assert cli.main(argv) == 0
    assert impls == ["fused"]
    assert read_jsonl(sampled) == lines


@pytest.mark.slow
def test_train_on_a_sharded_mesh_matches_one_device(frozen_model, tmp_path):
    """`train` on 4 forced CPU devices, mesh 2x2 with FSDP-like rules, equals one device."""
    steps, macros = 3, {"EVAL_PERIOD": 3, "EVAL_EXAMPLES": 4}
    sharded = tmp_path / "sharded"
    # A relative MODEL_DIR (orbax itself accepts only absolute paths).
    argv = [
        sys.executable,
        "-m",
        "softprompt_jax.cli",
        *train_argv(
            frozen_model,
            Path("sharded"),
            steps,
            **macros,
            MESH_MODEL=2,
            PARAMETER_PARTITIONING_DIMS=2,
        ),
    ]
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
    }
    process = subprocess.Popen(
        argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    single = tmp_path / "single"
    assert cli.main(train_argv(frozen_model, single, steps, **macros)) == 0  # meanwhile
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-4000:]
    assert "mesh data=2 x model=2" in output

    prompt = lambda run: np.load(run / NUMPY_DIR / f"checkpoint_{steps}" / PROMPT_SIDECAR)
    # float32; the sharded matmuls and all-reduces only reorder sums.
    np.testing.assert_allclose(prompt(sharded), prompt(single), atol=1e-5)
    evals = [
        [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "eval"][-1]
        for run in (sharded, single)
    ]
    assert evals[0]["accuracy"] == evals[1]["accuracy"]
    assert evals[0]["loss_per_token"] == pytest.approx(evals[1]["loss_per_token"], rel=1e-5)


@pytest.mark.parametrize(
    "bad_flag,message",
    [
        ("--gin.MIXTURE_OR_TASK_NAME='no_such_task'", "no_such_task"),
        ("--gin.INITIAL_CHECKPOINT_PATH='/nonexistent/ckpt'", "/nonexistent/ckpt"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    frozen_model, tmp_path, capsys, bad_flag, message
):
    run = tmp_path / "run"
    assert cli.main([*train_argv(frozen_model, run, 2), bad_flag]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("softprompt-jax train: error:") and message in err
    assert len(err.splitlines()) == 1
    assert not run.exists()


def test_prompt_that_does_not_fit_is_rejected(frozen_model, tmp_path, capsys):
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((4, 7), np.float32))
    out = tmp_path / "eval"
    argv = [
        "eval",
        "--gin_file=models/t5_1_1_tiny.gin",
        "--gin_file=runs/prompt_eval.gin",
        *gin_flags(frozen_model, PROMPT_FILE=f"'{wrong}'", EVAL_OUTPUT_DIR=f"'{out}'"),
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "wrong.npy" in err and "(4, 7)" in err and str(TINY.emb_dim) in err
    assert not out.exists()


def test_unknown_gin_file_is_named(capsys):
    assert cli.main(["train", "--gin_file=models/no_such_model.gin"]) == 2
    assert "models/no_such_model.gin" in capsys.readouterr().err


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_prompt(frozen_model, tmp_path):
    """A real process killed with SIGKILL mid-run, restarted, ends where a clean run ends."""
    steps = 9  # three checkpoints, each after an evaluation; killed after the first
    interrupted = tmp_path / "interrupted"
    argv = [
        sys.executable,
        "-m",
        "softprompt_jax.cli",
        *train_argv(frozen_model, interrupted, steps, EVAL_PERIOD=3, EVAL_EXAMPLES=4),
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_checkpoint = interrupted / NUMPY_DIR / "checkpoint_3"

    def kill_after_first_checkpoint() -> None:
        while not first_checkpoint.exists() and process.poll() is None:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)

    # The uninterrupted reference trains here while the subprocess starts up and trains.
    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    reference = tmp_path / "reference"
    # Dropout on (the tiny gin keeps DROPOUT_RATE=0.1) so the rng schedule must resume too.
    assert cli.main(train_argv(frozen_model, reference, steps, EVAL_PERIOD=3, EVAL_EXAMPLES=4)) == 0
    killer.join(timeout=240)
    assert not killer.is_alive(), "the training subprocess never checkpointed"
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"the run ended on its own: {process.returncode}"
    saved = sorted(p.name for p in (interrupted / "checkpoints").glob("checkpoint_*"))
    assert saved and f"checkpoint_{steps}" not in saved, f"the run was not interrupted: {saved}"

    assert (
        cli.main(train_argv(frozen_model, interrupted, steps, EVAL_PERIOD=3, EVAL_EXAMPLES=4)) == 0
    )
    final = lambda run: np.load(run / NUMPY_DIR / f"checkpoint_{steps}" / PROMPT_SIDECAR)
    np.testing.assert_array_equal(final(interrupted), final(reference))
    assert not np.array_equal(
        final(reference), np.load(reference / NUMPY_DIR / "checkpoint_3" / PROMPT_SIDECAR)
    )
