"""Training when things go wrong: kills, damaged files, a second run, bad settings, NaNs.

Each test reproduces the fault (a kill is simulated by removing what it would have
prevented, or by a real signal to a real `softprompt-jax train` process) and checks that
nothing is lost and nothing passes silently.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import seqio
import tensorflow as tf
from conftest import TINY, train_interrupted
from softprompt_jax.tasks import metrics
from softprompt_jax.tasks.demo import OUTPUT_FEATURES
from softprompt_jax.tasks.postprocessors import as_text
from softprompt_jax.tasks.rank_classification import (
    RankClassificationMetric,
    expand_to_candidates,
    rank_classification_postprocessor,
)

import softprompt_jax as sp
from softprompt_jax import cli
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.losses import LossConfig
from softprompt_jax.prompt_eval import metric_names
from softprompt_jax.train import trainer
from softprompt_jax.train.metrics_writer import MetricsWriter
from softprompt_jax.train.optimizer import AdafactorConfig
from softprompt_jax.train.run_lock import RunLock
from softprompt_jax.train.state_checkpoints import NUMPY_DIR, PROMPT_SIDECAR
from softprompt_jax.train.trainer import (
    CheckpointConfig,
    EvalConfig,
    LogConfig,
    PromptSpec,
    train,
)

TASK = "demo_multitask"  # offline, byte vocabulary


def run(model: Path, model_dir: Path, steps: int, *, period: int = 2, **changes):
    """A tiny training run: log every step, checkpoint and evaluate every `period` steps."""
    settings = dict(
        model_dir=str(model_dir),
        checkpoint_path=str(model),
        task=TASK,
        feature_lengths={"inputs": 6, "targets": 4},
        train_steps=steps,
        batch_size=4,
        prompt=PromptSpec(method="random_uniform", length=3),
        loss=LossConfig(enable_dropout=False),
        dtype="float32",
        evaluation=EvalConfig(period=period, max_examples=4),
        checkpointing=CheckpointConfig(period=period),
        logging=LogConfig(period=1, tensorboard=False),
    )
    return train(**{**settings, **changes})


def sidecar(model_dir: Path, step: int) -> Path:
    return model_dir / NUMPY_DIR / f"checkpoint_{step}" / PROMPT_SIDECAR


def read_jsonl(path: Path) -> list[dict]:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def steps_of(records: list[dict], kind: str) -> list[int]:
    return [r["step"] for r in records if r["kind"] == kind]


# 1. A kill between the checkpoint and its numpy prompt.


def test_a_checkpoint_without_its_numpy_prompt_is_repaired(frozen_model, tmp_path, capsys):
    model_dir = tmp_path / "run"
    result = run(frozen_model, model_dir, 2)
    # What a kill right after orbax committed step 2 leaves: no numpy prompt, a temporary.
    sidecar(model_dir, 2).unlink()
    stray = [
        sidecar(model_dir, 2).parent / f".{PROMPT_SIDECAR}.tmp-k1ll3d",
        model_dir / ".best.json.tmp-k1ll3d",
    ]
    for path in stray:
        path.write_bytes(b"half")
    capsys.readouterr()

    again = run(frozen_model, model_dir, 2)  # says "already holds step 2"
    out = capsys.readouterr().out
    assert "already holds step 2" in out and "missing numpy prompt of checkpoint 2" in out
    np.testing.assert_array_equal(np.load(sidecar(model_dir, 2)), result.prompt)
    np.testing.assert_array_equal(again.prompt, result.prompt)
    assert not any(path.exists() for path in stray)


# 2. Two runs in one MODEL_DIR.

HOLD_LOCK = """
import sys, time
from softprompt_jax.train.run_lock import RunLock
with RunLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_second_run_is_refused_while_another_process_holds_the_directory(frozen_model, tmp_path):
    model_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(model_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SoftpromptError) as refused:
            run(frozen_model, model_dir, 2)
        message = str(refused.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message
        assert str(model_dir) in message and len(message.splitlines()) == 1
        assert sorted(p.name for p in model_dir.iterdir()) == [".run.lock", ".run.lock.holder"]
    finally:
        holder.send_signal(signal.SIGKILL)  # the OS drops its lock; its holder file stays
        holder.wait()
    assert run(frozen_model, model_dir, 2).step == 2
    # The lock is held in-process too, and released when the run ends.
    with RunLock(model_dir), pytest.raises(SoftpromptError, match=f"pid {os.getpid()}"):
        run(frozen_model, model_dir, 2)
    assert run(frozen_model, model_dir, 2).step == 2


# 3a. Settings that are only used late fail before anything is written.


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"model_dir": " "}, "MODEL_DIR is empty"),
        ({"feature_lengths": {"inputs": 0, "targets": 4}}, "TASK_FEATURE_LENGTHS['inputs']"),
        (
            {"evaluation": EvalConfig(feature_lengths={"inputs": 8, "targets": -1})},
            "EVAL_FEATURE_LENGTHS['targets']",
        ),
        ({"train_steps": 0}, "TRAIN_STEPS"),
        ({"task": "demo_multitsak"}, "MIXTURE_OR_TASK_NAME 'demo_multitsak'"),
        ({"evaluation": EvalConfig(task="demo_mxa")}, "EVAL_TASK 'demo_mxa'"),
        ({"evaluation": EvalConfig(split="dev")}, "no split 'dev'"),
        (
            {"checkpointing": CheckpointConfig(best_metric="acuracy")},
            "BEST_METRIC 'acuracy' is not reported by eval task 'demo_multitask'; "
            "it reports ['accuracy', 'loss_per_token']",
        ),
        (
            {"task": "demo_mixture"},  # one prompt on a mixture: which task to evaluate?
            "'demo_mixture' is a mixture: evaluate one of its tasks (EVAL_TASK, one of "
            "['demo_len', 'demo_max', 'demo_min'])",
        ),
    ],
)
def test_a_bad_setting_fails_in_one_line_before_anything_is_written(
    frozen_model, tmp_path, monkeypatch, changes, message
):
    monkeypatch.chdir(tmp_path)  # where an empty MODEL_DIR would write
    model_dir = changes.pop("model_dir", tmp_path / "run")
    with pytest.raises(SoftpromptError) as error:
        run(frozen_model, model_dir, 2, **changes)
    assert message in str(error.value) and len(str(error.value).splitlines()) == 1
    assert sorted(tmp_path.iterdir()) == []


def test_one_prompt_trains_on_a_mixture_evaluated_on_one_of_its_tasks(frozen_model, tmp_path):
    result = run(
        frozen_model,
        tmp_path / "run",
        2,
        task="demo_mixture",
        evaluation=EvalConfig(period=2, max_examples=4, task="demo_max"),
    )
    assert result.step == 2 and set(result.eval_metrics) == {"accuracy", "loss_per_token"}


def test_a_prompt_of_no_tokens_is_refused():
    with pytest.raises(SoftpromptError, match=r"^PROMPT_LENGTH \(PromptSpec.length\) must be"):
        PromptSpec(method="random_uniform", length=0)


def test_a_model_dir_that_cannot_be_written_is_named(frozen_model, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(SoftpromptError, match=f"MODEL_DIR {blocker}/run is not writable"):
        run(frozen_model, blocker / "run", 2)


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--gin.EVAL_TASK='demo_mxa'", "EVAL_TASK 'demo_mxa' is not a registered"),
        ("--gin.BEST_METRIC='acuracy'", "BEST_METRIC 'acuracy' is not reported"),
    ],
)
def test_the_cli_reports_a_late_setting_in_one_line(frozen_model, tmp_path, capsys, flag, message):
    model_dir = tmp_path / "run"
    assert cli.main([*cli_argv(frozen_model, model_dir, 2), flag]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not model_dir.exists()


RANK_TASK = "faults_demo_max_rank"


@pytest.fixture
def rank_task():
    """A rank-classification task over the demo's `max:` words (candidates: the letters)."""

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices(
            {"inputs": ["max: cafe", "max: bad"], "targets": ["f", "d"]}
        )

    seqio.TaskRegistry.remove(RANK_TASK)
    seqio.TaskRegistry.add(
        RANK_TASK,
        source=seqio.FunctionDataSource(dataset_fn, splits=("validation",)),
        preprocessors=[
            functools.partial(expand_to_candidates, candidates=list("abcdefgh")),
            seqio.preprocessors.tokenize,
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features=OUTPUT_FEATURES,
        postprocess_fn=rank_classification_postprocessor(lambda text, **_: as_text(text)),
        metric_fns=[RankClassificationMetric((metrics.accuracy,))],
    )
    yield RANK_TASK
    seqio.TaskRegistry.remove(RANK_TASK)


def test_metric_names_come_from_the_tasks_own_metric_functions(rank_task):
    assert metric_names(TASK, "validation") == {"accuracy", "loss_per_token"}
    assert metric_names(rank_task, "validation") == {"accuracy"}  # scores, no decoding loss


# 3b. A step is checkpointed before it is evaluated.


def test_a_failed_evaluation_loses_no_training_and_reruns_on_resume(
    frozen_model, tmp_path, monkeypatch, capsys
):
    model_dir = tmp_path / "run"
    best = CheckpointConfig(period=2, best_metric="accuracy")

    def fail(*args, **kwargs):
        raise RuntimeError("the evaluation ran out of memory")

    with monkeypatch.context() as patch:
        patch.setattr(trainer, "evaluate_prompt", fail)
        with pytest.raises(RuntimeError, match="out of memory"):
            run(frozen_model, model_dir, 2, checkpointing=best)
    assert (model_dir / "checkpoints" / "checkpoint_2").is_dir() and sidecar(model_dir, 2).exists()
    capsys.readouterr()

    result = run(frozen_model, model_dir, 2, checkpointing=best)
    assert "evaluating step 2" in capsys.readouterr().out  # the evaluation it missed
    records = read_jsonl(model_dir / "metrics.jsonl")
    assert steps_of(records, "eval") == [2] and steps_of(records, "train") == [1, 2]
    assert json.loads((model_dir / "best.json").read_text())["step"] == 2
    assert result.eval_metrics.keys() == {"accuracy", "loss_per_token"}


def test_the_best_step_outlives_the_last_n(frozen_model, tmp_path, monkeypatch):
    accuracy = iter([90.0, 10.0, 20.0, 30.0])
    monkeypatch.setattr(trainer, "evaluate_prompt", lambda *a, **k: {"accuracy": next(accuracy)})
    model_dir = tmp_path / "run"
    keep_one = CheckpointConfig(period=1, keep=1, best_metric="accuracy")
    run(frozen_model, model_dir, 4, period=1, checkpointing=keep_one)
    kept = sorted(p.name for p in (model_dir / "checkpoints").iterdir())
    assert kept == ["checkpoint_1", "checkpoint_4"]
    assert json.loads((model_dir / "best.json").read_text())["step"] == 1
    export = ["export", f"--model_dir={model_dir}", f"--output={tmp_path / 'best.npy'}"]
    assert cli.main([*export, "--step=best"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "best.npy"), np.load(sidecar(model_dir, 1)))


# 4. Resuming on another frozen model or prompt length.


def test_resuming_with_another_model_or_prompt_length_is_refused(frozen_model, tmp_path):
    model_dir = tmp_path / "run"
    run(frozen_model, model_dir, 2)
    before = sorted(str(p) for p in model_dir.rglob("*"))
    with pytest.raises(SoftpromptError) as error:
        run(frozen_model, model_dir, 4, prompt=PromptSpec(method="random_uniform", length=5))
    assert "prompt_length (saved 3, now 5)" in str(error.value)

    wider = tmp_path / "wider"
    sp.save_pretrained(wider, TINY.replace(emb_dim=32), sp.init_params(TINY.replace(emb_dim=32)))
    with pytest.raises(SoftpromptError) as error:
        run(wider, model_dir, 4)
    message = str(error.value)
    assert f"checkpoint_path (saved '{frozen_model}', now '{wider}')" in message
    assert "model_architecture.emb_dim (saved 16, now 32)" in message
    assert len(message.splitlines()) == 1
    assert sorted(str(p) for p in model_dir.rglob("*")) == before


# 5. One metrics history after a resume.


def test_a_resumed_run_keeps_one_metrics_history(frozen_model, tmp_path):
    model_dir = tmp_path / "run"
    run(frozen_model, model_dir, 4)
    # A kill while saving step 4: its checkpoint never completed, its records were written,
    # and the last line was cut short.
    os.rename(model_dir / "checkpoints" / "checkpoint_4", tmp_path / "unfinished")
    with (model_dir / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "st')

    run(frozen_model, model_dir, 4)
    records = read_jsonl(model_dir / "metrics.jsonl")
    assert steps_of(records, "train") == [1, 2, 3, 4] and steps_of(records, "eval") == [2, 4]


# 7. A loss that turns NaN.


def test_a_non_finite_loss_stops_the_run_and_is_not_saved(frozen_model, tmp_path):
    # A negative weight decay multiplies the prompt by 1e30 per step: finite after step 1,
    # infinite after step 2, so the loss of step 3 is NaN.
    exploding = AdafactorConfig(weight_decay_rate=-1e30)
    model_dir = tmp_path / "run"
    run(frozen_model, model_dir, 1, optimizer=exploding)
    with pytest.raises(SoftpromptError) as error:
        run(
            frozen_model,
            model_dir,
            6,
            optimizer=exploding,
            period=10,
            logging=LogConfig(period=3, tensorboard=False),
        )
    assert str(error.value) == "loss is nan at step 3; the last good checkpoint is step 1"
    assert sorted(p.name for p in (model_dir / "checkpoints").iterdir()) == ["checkpoint_1"]
    assert steps_of(read_jsonl(model_dir / "metrics.jsonl"), "train") == [1]

    # Checkpointing every step, the infinite prompt of step 2 is refused before its save.
    with pytest.raises(SoftpromptError) as error:
        run(frozen_model, tmp_path / "every_step", 6, optimizer=exploding, period=1)
    assert str(error.value) == (
        "the prompt is not finite after step 2; the last good checkpoint is step 1"
    )


def test_metrics_jsonl_stays_json_when_a_value_is_not_finite(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.write("eval", 3, {"loss_per_token": float("inf"), "accuracy": float("nan"), "f1": 1.5})
    (record,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert record["loss_per_token"] is None and record["accuracy"] is None and record["f1"] == 1.5


# 10. A damaged latest checkpoint.


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(frozen_model, tmp_path, capsys):
    model_dir = tmp_path / "run"
    run(frozen_model, model_dir, 4)
    (model_dir / "checkpoints" / "checkpoint_4" / "state" / "manifest.ocdbt").unlink()
    capsys.readouterr()

    result = run(frozen_model, model_dir, 6)
    lines = capsys.readouterr().out.splitlines()
    damaged = [line for line in lines if " is damaged " in line]
    assert len(damaged) == 1 and damaged[0].startswith("checkpoint 4 is damaged")
    assert "falling back" in damaged[0]
    assert f"resuming from step 2 in {model_dir}" in lines
    assert [p.name.split("-")[0] for p in (model_dir / "checkpoints").glob("*.damaged-*")] == [
        "checkpoint_4.damaged"
    ]
    reference = run(frozen_model, tmp_path / "reference", 6)
    np.testing.assert_array_equal(result.prompt, reference.prompt)
    np.testing.assert_array_equal(np.load(sidecar(model_dir, 6)), reference.prompt)


# 13. Progress lines.


def test_progress_is_said_before_each_slow_part(frozen_model, tmp_path, capsys):
    run(frozen_model, tmp_path / "run", 2)
    out = capsys.readouterr().out
    ordered = [
        f"loading the frozen model from {frozen_model}",
        "compiling the train step",
        "compiled the train step and ran step 1",
        "evaluating step 2 on demo_multitask validation",
    ]
    positions = [out.index(line) for line in ordered]
    assert positions == sorted(positions)


# 3c. SIGINT to a real `softprompt-jax train` process.


def cli_argv(model: Path, model_dir: Path, steps: int, **macros) -> list[str]:
    flags = {
        "INITIAL_CHECKPOINT_PATH": f"'{model}'",
        "MIXTURE_OR_TASK_NAME": f"'{TASK}'",
        "TASK_FEATURE_LENGTHS": "{'inputs': 16, 'targets': 8}",
        "PROMPT_LENGTH": 4,
        "MODEL_DIR": f"'{model_dir}'",
        "TRAIN_STEPS": steps,
        "BATCH_SIZE": 4,
        "EVAL_EXAMPLES": 4,
        **macros,
    }
    return [
        "train",
        "--gin_file=models/t5_1_1_tiny.gin",
        "--gin_file=runs/prompt_finetune.gin",
        *(f"--gin.{name}={value}" for name, value in flags.items()),
    ]


INTERRUPTED = re.compile(
    r"interrupted at step (\d+) \(SIGINT\); checkpoint saved; run the same command to resume"
)


@pytest.mark.slow
def test_sigint_during_training_saves_a_checkpoint_and_the_rerun_ends_as_an_uninterrupted_run(
    frozen_model, tmp_path
):
    """(SIGINT during an evaluation: tests/test_train_per_task.py, for each task of a mixture.)"""
    interrupted, reference, steps = tmp_path / "interrupted", tmp_path / "reference", 300
    argv = lambda model_dir: cli_argv(frozen_model, model_dir, steps, EVAL_PERIOD=steps)
    # Dropout on (the tiny gin keeps DROPOUT_RATE=0.1): the rng schedule must resume too.
    returncode, text = train_interrupted(
        argv(interrupted),
        lambda line: "compiled the train step and ran step 1" in line,
        argv(reference),
    )
    assert returncode == cli.EXIT_INTERRUPTED, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    stopped = [int(m.group(1)) for m in INTERRUPTED.finditer(text)]
    assert len(stopped) == 1, text[-3000:]
    step = stopped[0]
    assert 0 < step < steps and (interrupted / "checkpoints" / f"checkpoint_{step}").is_dir()

    assert cli.main(argv(interrupted)) == 0
    np.testing.assert_array_equal(
        np.load(sidecar(interrupted, steps)), np.load(sidecar(reference, steps))
    )
