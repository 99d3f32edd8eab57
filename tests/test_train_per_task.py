"""One frozen model, many prompts: a prompt per task of a mixture, trained in one run.

The mixed stream says each example's task (`prompt_ids`), so every example reaches its own
task's prompt; metrics, best steps and numpy prompts are kept per task; a killed run resumes
to the uninterrupted result; `export` gives one task's prompt or the whole bank.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, train_interrupted
from softprompt_jax.tasks.demo import DEMO_MIXTURE, VOCABULARY

import softprompt_jax as sp
from softprompt_jax import cli
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.losses import LossConfig
from softprompt_jax.train.data import mixture_task_names, per_task_batches, train_batches
from softprompt_jax.train.optimizer import make_optimizer
from softprompt_jax.train.state_checkpoints import (
    TrainCheckpointer,
    sidecar_path,
    write_prompt_sidecar,
)
from softprompt_jax.train.train_step import init_train_state
from softprompt_jax.train.trainer import (
    CheckpointConfig,
    EvalConfig,
    LogConfig,
    PromptSpec,
    make_prompt_bank,
    train,
)

TASKS = ["demo_len", "demo_max", "demo_min"]  # the mixture's tasks, by name: the bank's order
LENGTHS = {"inputs": 12, "targets": 4}  # "max: abcdef" + EOS fits whole
PROMPT_LENGTH = 3


def run(model: Path, model_dir: Path, steps: int, **changes):
    """A tiny per-task run: log every step, checkpoint and evaluate every 2 steps."""
    settings = dict(
        model_dir=str(model_dir),
        checkpoint_path=str(model),
        task=DEMO_MIXTURE,
        feature_lengths=LENGTHS,
        train_steps=steps,
        batch_size=4,
        prompt=PromptSpec(method="random_uniform", length=PROMPT_LENGTH),
        loss=LossConfig(enable_dropout=False),
        dtype="float32",
        evaluation=EvalConfig(period=2, max_examples=4),
        checkpointing=CheckpointConfig(period=2, best_metric="loss_per_token", best_mode="min"),
        logging=LogConfig(period=1, tensorboard=False),
        prompt_per_task=True,
    )
    return train(**{**settings, **changes})


@pytest.fixture(scope="module")
def reference(frozen_model, tmp_path_factory):
    """An uninterrupted 4-step per-task run: (its result, its MODEL_DIR, its console output)."""
    model_dir = tmp_path_factory.mktemp("reference") / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = run(frozen_model, model_dir, 4)
    return result, model_dir, out.getvalue()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def eval_records(model_dir: Path) -> list[dict]:
    """The eval records without their wall time."""
    records = read_jsonl(model_dir / "metrics.jsonl")
    return [{k: v for k, v in r.items() if k != "time"} for r in records if r["kind"] == "eval"]


# The data: each example's prompt is its task's.


def test_the_mixed_stream_is_seqios_with_each_examples_task_as_prompt_ids():
    assert mixture_task_names(DEMO_MIXTURE) == TASKS
    ours = list(itertools.islice(per_task_batches(DEMO_MIXTURE, LENGTHS, 4, seed=3), 6))
    seqios = itertools.islice(train_batches(DEMO_MIXTURE, LENGTHS, 4, seed=3), 6)
    for batch, expected in zip(ours, seqios, strict=True):
        assert set(batch) == {*expected, "prompt_ids"}
        for name, value in expected.items():
            np.testing.assert_array_equal(batch[name], value)
    seen = set()
    for batch in ours:  # the input's prefix says the task: "max: cafe" is demo_max's
        for tokens, prompt_id in zip(batch["encoder_input_tokens"], batch["prompt_ids"]):
            prefix = VOCABULARY.decode(tokens.tolist()).split(":")[0]
            assert TASKS[prompt_id] == f"demo_{prefix}"
            seen.add(prefix)
    assert seen == {"len", "max", "min"}
    # The data position is the step: a resumed run skips exactly the batches it saw.
    resumed = per_task_batches(DEMO_MIXTURE, LENGTHS, 4, seed=3, start_step=4)
    for batch, expected in zip(resumed, ours[4:]):
        for name, value in expected.items():
            np.testing.assert_array_equal(batch[name], value)


def test_each_tasks_prompt_starts_from_its_own_labels_or_seed():
    params = sp.init_params(TINY, 0)
    labels = {"demo_len": ["3", "4"], "demo_max": ["h"], "demo_min": ["a", "b"]}
    spec = PromptSpec(method="class_labels", length=PROMPT_LENGTH, labels=labels, seed=5)
    bank = make_prompt_bank(spec, params, TASKS)
    assert bank.names == tuple(TASKS)
    for i, task in enumerate(TASKS):
        alone = sp.init_prompt(
            "class_labels",
            PROMPT_LENGTH,
            params=params,
            vocab=VOCABULARY,
            labels=labels[task],
            seed=5 + i,
        )
        np.testing.assert_array_equal(bank[task], alone)
    uniform = make_prompt_bank(PromptSpec(method="random_uniform", length=2), params, TASKS)
    assert len({np.asarray(p).tobytes() for p in uniform.prompts}) == len(TASKS)


# Training: per-task metrics, best steps and numpy prompts; the parameter counts.


def test_a_run_reports_and_keeps_each_tasks_metrics_and_prompt(reference):
    result, model_dir, _ = reference
    records = eval_records(model_dir)
    assert [(r["step"], r["task"]) for r in records] == [(s, t) for s in (2, 4) for t in TASKS]
    assert all({"accuracy", "loss_per_token"} <= set(r) for r in records)
    assert set(result.eval_metrics) == {
        f"{t}/{m}" for t in TASKS for m in ("accuracy", "loss_per_token")
    }
    for task in TASKS:
        losses = {r["step"]: r["loss_per_token"] for r in records if r["task"] == task}
        assert result.eval_metrics[f"{task}/loss_per_token"] == losses[4]
        best = json.loads((model_dir / f"best_{task}.json").read_text())
        assert best["step"] == min(losses, key=losses.get)  # BEST_METRIC, per task
        for step in (2, 4):
            assert np.load(sidecar_path(model_dir, step, task)).shape == (PROMPT_LENGTH, 16)
        np.testing.assert_array_equal(
            np.load(sidecar_path(model_dir, 4, task)), result.prompt[task]
        )
    assert not (model_dir / "best.json").exists()


def test_the_run_says_its_trainable_and_frozen_parameter_counts(reference):
    frozen = sum(leaf.size for leaf in jax.tree.leaves(sp.init_params(TINY, 0)))
    trainable = len(TASKS) * PROMPT_LENGTH * TINY.emb_dim
    total = frozen + trainable
    line = (
        f"trainable params: {trainable:,} || all params: {total:,} || "
        f"trainable%: {100 * trainable / total:.4f} || frozen params: {frozen:,}"
    )
    assert line in reference[2].splitlines()


def bank_state(step: int):
    bank = sp.PromptBank.from_arrays({t: np.full((2, 4), step + i) for i, t in enumerate(TASKS)})
    return init_train_state(bank, make_optimizer()).replace(step=jnp.asarray(step, jnp.int32))


def test_each_tasks_best_step_is_kept_and_its_prompt_written_in_its_folder(tmp_path):
    settings = dict(keep=1, best_metric="accuracy", prompt_names=TASKS)
    checkpointer = TrainCheckpointer(tmp_path, **settings)
    best_at = {"demo_len": 1, "demo_max": 2, "demo_min": 4}
    for step in range(1, 5):
        checkpointer.save(step, bank_state(step), {})
        for task, best in best_at.items():
            checkpointer.record_eval(step, {"accuracy": float(step == best)}, task=task)
    assert checkpointer.all_steps() == [1, 2, 4]
    for i, (task, best) in enumerate(best_at.items()):
        assert json.loads((tmp_path / f"best_{task}.json").read_text())["step"] == best
        np.testing.assert_array_equal(
            np.load(sidecar_path(tmp_path, 3, task)), np.full((2, 4), 3 + i)
        )
    checkpointer.close()
    reopened = TrainCheckpointer(tmp_path, **settings)  # the best steps come back from disk
    reopened.save(5, bank_state(5), {})
    assert reopened.all_steps() == [1, 2, 4, 5] and reopened.missing_sidecars() == []
    sidecar_path(tmp_path, 5, "demo_min").unlink()
    assert reopened.missing_sidecars() == [5]
    reopened.close()


# A kill, then the same command: the uninterrupted run's result.


def test_a_killed_run_resumes_to_the_uninterrupted_result(
    frozen_model, reference, tmp_path, capsys
):
    result, reference_dir, _ = reference
    model_dir = tmp_path / "run"
    run(frozen_model, model_dir, 2)
    # What a kill after the first numpy prompt of step 2 leaves: the orbax checkpoint, one
    # task's numpy prompt, no evaluation of step 2 (no eval records, no best step yet).
    for task in TASKS[1:]:
        sidecar_path(model_dir, 2, task).unlink()
    for task in TASKS:
        (model_dir / f"best_{task}.json").unlink()
    metrics = model_dir / "metrics.jsonl"
    kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["kind"] != "eval"]
    metrics.write_text("".join(line + "\n" for line in kept))
    capsys.readouterr()

    resumed = run(frozen_model, model_dir, 4)
    out = capsys.readouterr().out
    assert "wrote the missing numpy prompt of checkpoint 2" in out
    assert f"resuming from step 2 in {model_dir}" in out and "evaluating step 2 on demo_len" in out
    for task in TASKS:
        np.testing.assert_array_equal(resumed.prompt[task], result.prompt[task])
        for step in (2, 4):
            np.testing.assert_array_equal(
                np.load(sidecar_path(model_dir, step, task)),
                np.load(sidecar_path(reference_dir, step, task)),
            )
        best = f"best_{task}.json"
        assert (model_dir / best).read_text() == (reference_dir / best).read_text()
    assert eval_records(model_dir) == eval_records(reference_dir)
    losses = lambda d: [r["loss"] for r in read_jsonl(d / "metrics.jsonl") if r["kind"] == "train"]
    assert losses(model_dir) == losses(reference_dir)


def test_a_single_prompt_run_does_not_continue_a_per_task_run(frozen_model, reference, tmp_path):
    model_dir = tmp_path / "run"
    shutil.copytree(reference[1], model_dir)
    with pytest.raises(SoftpromptError, match=r"prompt_names \(saved \['demo_len'"):
        one_prompt = EvalConfig(period=2, max_examples=4, task="demo_max")
        run(frozen_model, model_dir, 6, prompt_per_task=False, evaluation=one_prompt)


# Settings that cannot work fail before anything is written.


@pytest.mark.parametrize(
    "changes,message",
    [
        (
            {"task": "demo_max"},
            "PROMPT_PER_TASK needs a seqio Mixture as MIXTURE_OR_TASK_NAME; "
            "'demo_max' is a single task",
        ),
        (
            {"evaluation": EvalConfig(task="demo_max")},
            "EVAL_TASK 'demo_max' does not apply with PROMPT_PER_TASK",
        ),
        (
            {"prompt": PromptSpec(length=3, labels={"demo_max": ["h"]})},
            "CLASS_LABELS (PromptSpec.labels) has no labels for tasks ['demo_len', 'demo_min']",
        ),
        (
            {"prompt": PromptSpec(length=3, labels={"demo_max": ["h"]}), "prompt_per_task": False},
            "CLASS_LABELS (PromptSpec.labels) maps tasks to labels; that needs PROMPT_PER_TASK",
        ),
        (
            {"checkpointing": CheckpointConfig(best_metric="acuracy")},
            "BEST_METRIC 'acuracy' is not reported by eval task 'demo_len'",
        ),
    ],
)
def test_a_per_task_setting_that_cannot_work_fails_in_one_line(
    frozen_model, tmp_path, changes, message
):
    with pytest.raises(SoftpromptError) as error:
        run(frozen_model, tmp_path / "run", 2, **changes)
    assert message in str(error.value) and len(str(error.value).splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_the_cli_refuses_a_prompt_per_task_of_a_single_task(frozen_model, tmp_path, capsys):
    argv = train_argv(frozen_model, tmp_path / "run", 2, MIXTURE_OR_TASK_NAME="'demo_max'")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "PROMPT_PER_TASK needs a seqio Mixture" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


# export: one task's prompt, or the whole bank.


def export(model_dir: Path, *args: str) -> int:
    return cli.main(["export", f"--model_dir={model_dir}", *args])


def test_export_gives_one_tasks_prompt_or_the_whole_bank(reference, tmp_path):
    _, model_dir, _ = reference
    sidecar = lambda step, task: np.load(sidecar_path(model_dir, step, task))
    best = {t: json.loads((model_dir / f"best_{t}.json").read_text())["step"] for t in TASKS}

    assert export(model_dir, "--task=demo_max", f"--output={tmp_path / 'max.npy'}") == 0
    np.testing.assert_array_equal(np.load(tmp_path / "max.npy"), sidecar(4, "demo_max"))
    args = ("--task=demo_len", "--step=best", f"--output={tmp_path / 'len.npy'}")
    assert export(model_dir, *args) == 0
    np.testing.assert_array_equal(
        np.load(tmp_path / "len.npy"), sidecar(best["demo_len"], "demo_len")
    )

    assert export(model_dir, f"--bank={tmp_path / 'bank.safetensors'}") == 0
    bank = sp.PromptBank.load(tmp_path / "bank.safetensors")
    assert bank.names == tuple(TASKS)
    for task in TASKS:
        np.testing.assert_array_equal(bank[task], sidecar(4, task))
    assert export(model_dir, f"--bank={tmp_path / 'best'}", "--step=best") == 0
    best_bank = sp.PromptBank.load(tmp_path / "best")  # a folder of <task>.npy
    for task in TASKS:
        np.testing.assert_array_equal(best_bank[task], sidecar(best[task], task))


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--output=OUT/p.npy"],
            "trained one prompt per task (demo_len, demo_max, demo_min); choose one with --task",
        ),
        (["--task=demo_mxa", "--output=OUT/p.npy"], "has no prompt for task 'demo_mxa'"),
        (["--bank=OUT/b.safetensors", "--task=demo_max"], "it takes no --t5x or --task"),
    ],
)
def test_export_of_a_per_task_run_says_what_to_give(reference, tmp_path, capsys, args, message):
    args = [arg.replace("OUT", str(tmp_path)) for arg in args]
    assert export(reference[1], *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_export_of_a_one_prompt_run_takes_no_task_or_bank(tmp_path, capsys):
    write_prompt_sidecar(tmp_path / "run", 2, np.ones((3, 16), np.float32))
    assert export(tmp_path / "run", "--task=demo_max", f"--output={tmp_path / 'p.npy'}") == 2
    assert "trained one prompt; --task applies to a run" in capsys.readouterr().err
    assert export(tmp_path / "run", f"--bank={tmp_path / 'b.safetensors'}") == 2
    assert "trained one prompt; --bank applies to a run" in capsys.readouterr().err


# Through the command line, end to end.


def train_argv(model: Path, model_dir: Path, steps: int, **macros) -> list[str]:
    flags = {
        "INITIAL_CHECKPOINT_PATH": f"'{model}'",
        "MIXTURE_OR_TASK_NAME": f"'{DEMO_MIXTURE}'",
        "PROMPT_PER_TASK": True,
        "TASK_FEATURE_LENGTHS": str(LENGTHS),
        "PROMPT_LENGTH": 4,
        "MODEL_DIR": f"'{model_dir}'",
        "TRAIN_STEPS": steps,
        "BATCH_SIZE": 4,
        "EVAL_EXAMPLES": 4,
        "EVAL_PERIOD": 2,
        **macros,
    }
    return [
        "train",
        "--gin_file=models/t5_1_1_tiny.gin",
        "--gin_file=runs/prompt_finetune.gin",
        *(f"--gin.{name}={value}" for name, value in flags.items()),
    ]


@pytest.mark.slow
def test_the_cli_trains_a_prompt_per_task_and_exports_the_bank(frozen_model, tmp_path, capsys):
    model_dir = tmp_path / "run"
    assert cli.main(train_argv(frozen_model, model_dir, 2, BEST_METRIC="'accuracy'")) == 0
    out = capsys.readouterr().out
    trainable = len(TASKS) * 4 * TINY.emb_dim
    assert f"trainable params: {trainable:,} || all params: " in out
    records = eval_records(model_dir)
    assert [(r["step"], r["task"]) for r in records] == [(2, task) for task in TASKS]
    assert all("accuracy" in r for r in records)
    assert all((model_dir / f"best_{task}.json").exists() for task in TASKS)
    assert export(model_dir, f"--bank={tmp_path / 'bank.safetensors'}") == 0
    bank = sp.PromptBank.load(tmp_path / "bank.safetensors")
    assert bank.names == tuple(TASKS) and bank.lengths == (4, 4, 4)
    for task in TASKS:
        np.testing.assert_array_equal(bank[task], np.load(sidecar_path(model_dir, 2, task)))


@pytest.mark.slow
def test_sigint_during_a_tasks_evaluation_then_the_rerun_ends_as_an_uninterrupted_run(
    frozen_model, tmp_path
):
    interrupted, reference_dir = tmp_path / "interrupted", tmp_path / "reference"
    # Dropout on (the tiny gin keeps DROPOUT_RATE=0.1): the rng schedule must resume too.
    returncode, text = train_interrupted(
        train_argv(frozen_model, interrupted, 6),
        lambda line: line.startswith("evaluating step 2 on demo_max"),
        train_argv(frozen_model, reference_dir, 6),
    )
    assert returncode == cli.EXIT_INTERRUPTED, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    stopped = "interrupted at step 2 (SIGINT); checkpoint saved; run the same command to resume"
    assert text.count("interrupted at step") == 1 and stopped in text, text[-3000:]
    assert (interrupted / "checkpoints" / "checkpoint_2").is_dir()
    # The evaluation of every task ends first, then the run stops.
    assert [(r["step"], r["task"]) for r in eval_records(interrupted)] == [(2, t) for t in TASKS]

    assert cli.main(train_argv(frozen_model, interrupted, 6)) == 0
    for task in TASKS:
        np.testing.assert_array_equal(
            np.load(sidecar_path(interrupted, 6, task)),
            np.load(sidecar_path(reference_dir, 6, task)),
        )
    assert eval_records(interrupted) == eval_records(reference_dir)
