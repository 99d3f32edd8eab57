"""User mistakes through the command line: one line naming what is wrong, exit status 2,
checked before any compute; bugs keep their traceback; outputs are strict JSON."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import seqio
import tensorflow as tf
from conftest import TINY
from softprompt_jax.tasks import demo
from test_cli import LENGTHS, TASK, gin_flags
from tiny_decoders import save_tiny

import softprompt_jax as sp
from softprompt_jax import cli, commands
from softprompt_jax.checkpoints import native
from softprompt_jax.checkpoints.prompt_files import PEFT_WEIGHTS
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.t5_prefixes import init_t5_prefix
from softprompt_jax.train.state_checkpoints import NUMPY_DIR, PROMPT_SIDECAR

TRAIN_FILES = ["--gin_file=models/t5_1_1_tiny.gin", "--gin_file=runs/prompt_finetune.gin"]
EVAL_FILES = ["--gin_file=models/t5_1_1_tiny.gin", "--gin_file=runs/prompt_eval.gin"]
INFER_FILES = ["--gin_file=models/t5_1_1_tiny.gin", "--gin_file=runs/prompt_infer.gin"]
BAD_UTF8_TASK = "test_cli_errors_bad_utf8"


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompt.npy"
    np.save(path, np.random.default_rng(0).normal(size=(4, TINY.emb_dim)).astype(np.float32))
    return path


@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if a command gets as far as loading the model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was found")

    monkeypatch.setattr(commands, "load_pretrained", refuse)


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"softprompt-jax {command}: error: "), err
    return err


def eval_argv(model: Path, prompt: Path, out: Path, **macros) -> list[str]:
    flags = gin_flags(model, PROMPT_FILE=f"'{prompt}'", EVAL_OUTPUT_DIR=f"'{out}'", **macros)
    return ["eval", *EVAL_FILES, *flags]


def infer_argv(model: Path, prompt: Path, out: Path, **macros) -> list[str]:
    macros.setdefault("TASK_FEATURE_LENGTHS", LENGTHS)
    flags = gin_flags(model, PROMPT_FILE=f"'{prompt}'", INFER_OUTPUT_FILE=f"'{out}'", **macros)
    return ["infer", *INFER_FILES, *flags]


# --- one error type: user mistakes exit 2, bugs keep their traceback --------------------------


def test_a_bug_is_not_reported_as_a_user_mistake(monkeypatch, tmp_path):
    """A plain ValueError (or any non-SoftpromptError) propagates with its traceback."""

    def broken(*args, **kwargs):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(commands, "export_prompt", broken)
    with pytest.raises(ValueError, match="an internal invariant broke"):
        cli.main(["export", f"--model_dir={tmp_path}", f"--output={tmp_path / 'p.npy'}"])


def test_a_user_mistake_prints_its_first_line_only(monkeypatch, tmp_path, capsys):
    def mistaken(*args, **kwargs):
        raise SoftpromptError("the first line\nand details below")

    monkeypatch.setattr(commands, "export_prompt", mistaken)
    argv = ["export", f"--model_dir={tmp_path}", f"--output={tmp_path / 'p.npy'}"]
    assert cli.main(argv) == 2
    assert one_error_line(capsys, "export").endswith("error: the first line")


def run_with_prompt(tmp_path: Path) -> Path:
    """A run directory holding the numpy prompt of step 1, as training leaves it."""
    run = tmp_path / "run"
    (run / NUMPY_DIR / "checkpoint_1").mkdir(parents=True)
    with open(run / NUMPY_DIR / "checkpoint_1" / PROMPT_SIDECAR, "wb") as f:
        np.save(f, np.zeros((4, TINY.emb_dim), np.float32))
    return run


def test_export_without_checkpoints_is_one_line(tmp_path, capsys):
    assert cli.main(["export", f"--model_dir={tmp_path}", f"--output={tmp_path / 'p.npy'}"]) == 2
    assert "no prompt checkpoints under" in one_error_line(capsys, "export")


def test_export_of_a_step_that_is_no_number_is_one_line(tmp_path, capsys):
    run = run_with_prompt(tmp_path)
    argv = ["export", f"--model_dir={run}", f"--output={tmp_path / 'p.npy'}", "--step=lastest"]
    assert cli.main(argv) == 2
    assert "--step 'lastest': expected 'latest', 'best' or a step number" in one_error_line(
        capsys, "export"
    )


def test_unknown_task_names_close_ones(frozen_model, prompt_file, tmp_path, capsys, no_compute):
    argv = eval_argv(
        frozen_model, prompt_file, tmp_path / "out", MIXTURE_OR_TASK_NAME="'demo_multitsk'"
    )
    assert cli.main(argv) == 2
    err = one_error_line(capsys, "eval")
    assert "no seqio task or mixture named 'demo_multitsk'; did you mean demo_multitask" in err


# --- gin: typos, unset macros, wrong types ------------------------------------------------------


@pytest.mark.parametrize(
    "flag,message",
    [
        (
            "--gin.TRAIN_STEP=2",
            "unknown macro TRAIN_STEP: no gin file of this run defines or uses it; "
            "did you mean TRAIN_STEPS?",
        ),
        (
            "--gin.TRAIN_STEPS='10'",
            "TRAIN_STEPS = '10' is a str, but train.train_steps takes an int",
        ),
        ("--gin.BATCH_SIZE=2.5", "BATCH_SIZE = 2.5 is a float, but train.batch_size takes an int"),
        ("--gin.TRAIN_STEPS=%STEPS", "macro STEPS is not set (TRAIN_STEPS = %STEPS)"),
        (
            "--gin.train.train_step=3",
            "doesn't have a parameter named 'train_step'; did you mean train.train_steps",
        ),
    ],
)
def test_gin_typos_and_wrong_types_are_named(frozen_model, tmp_path, capsys, flag, message):
    run = tmp_path / "run"
    flags = gin_flags(frozen_model, MODEL_DIR=f"'{run}'", TASK_FEATURE_LENGTHS=LENGTHS)
    assert cli.main(["train", *TRAIN_FILES, *flags, flag]) == 2
    assert message in one_error_line(capsys, "train")
    assert not run.exists()


def test_a_prompt_setting_mistake_is_one_line(frozen_model, tmp_path, capsys):
    run = tmp_path / "run"
    flags = gin_flags(frozen_model, MODEL_DIR=f"'{run}'", TASK_FEATURE_LENGTHS=LENGTHS)
    assert cli.main(["train", *TRAIN_FILES, *flags, "--gin.PromptSpec.method='uniform'"]) == 2
    assert "unknown prompt init method 'uniform'" in one_error_line(capsys, "train")


def test_a_macro_the_command_does_not_use_is_named(frozen_model, prompt_file, tmp_path, capsys):
    """TASK_FEATURE_LENGTHS means nothing to eval: it would be silently ignored."""
    argv = eval_argv(frozen_model, prompt_file, tmp_path / "out", TASK_FEATURE_LENGTHS=LENGTHS)
    assert cli.main(argv) == 2
    err = one_error_line(capsys, "eval")
    assert "unknown macro TASK_FEATURE_LENGTHS" in err and "EVAL_FEATURE_LENGTHS" in err


def test_a_missing_macro_says_how_to_set_it(prompt_file, tmp_path, capsys):
    argv = [
        "eval",
        *EVAL_FILES,
        f"--gin.MIXTURE_OR_TASK_NAME='{TASK}'",
        f"--gin.PROMPT_FILE='{prompt_file}'",
        f"--gin.EVAL_OUTPUT_DIR='{tmp_path / 'out'}'",
    ]
    assert cli.main(argv) == 2
    err = one_error_line(capsys, "eval")
    assert "macro INITIAL_CHECKPOINT_PATH is not set" in err
    assert "evaluate.checkpoint_path" in err and "--gin.INITIAL_CHECKPOINT_PATH=" in err


# --- infer: inputs checked before compute, truncation reported ---------------------------------


def _bad_utf8_dataset(split: str, shuffle_files: bool, seed: int | None = None):
    inputs = [b"max: abc", b"min: ca\xff\xfefe", b"len: abcd"]
    return tf.data.Dataset.from_tensor_slices({"inputs": inputs, "targets": [b"c", b"a", b"4"]})


@pytest.fixture
def bad_utf8_task():
    seqio.TaskRegistry.add(
        BAD_UTF8_TASK,
        source=seqio.FunctionDataSource(_bad_utf8_dataset, splits=("validation",)),
        preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
        output_features=demo.OUTPUT_FEATURES,
        metric_fns=[],
    )
    yield BAD_UTF8_TASK
    seqio.TaskRegistry.remove(BAD_UTF8_TASK)


def test_infer_names_an_example_that_is_not_utf8_before_compute(
    frozen_model, prompt_file, tmp_path, capsys, bad_utf8_task, no_compute
):
    out = tmp_path / "predictions.jsonl"
    argv = infer_argv(frozen_model, prompt_file, out, MIXTURE_OR_TASK_NAME=f"'{bad_utf8_task}'")
    assert cli.main(argv) == 2
    err = one_error_line(capsys, "infer")
    assert f"{bad_utf8_task} validation example 1: inputs are not valid UTF-8" in err
    assert not out.exists()


def test_infer_reports_truncated_inputs(frozen_model, prompt_file, tmp_path, capsys):
    out = tmp_path / "predictions.jsonl"
    # 10 input tokens: "max: abc" + EOS fits, a word of 4 letters or more is cut.
    lengths = "{'inputs': 10, 'targets': 4}"
    argv = infer_argv(
        frozen_model, prompt_file, out, TASK_FEATURE_LENGTHS=lengths, INFER_EXAMPLES=12
    )
    assert cli.main(argv) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    expected = [len(line["inputs"].encode()) + 1 > 10 for line in lines]
    assert [line["truncated"] for line in lines] == expected
    assert 0 < sum(expected) < len(lines)
    assert (
        f"{sum(expected)} of 12 examples had inputs longer than 10 tokens"
        in capsys.readouterr().out
    )


# --- damaged files, unwritable outputs, bad settings: one line, before compute ------------------


def _empty_npy(tmp_path: Path) -> Path:
    path = tmp_path / "empty.npy"
    path.write_bytes(b"")
    return path


def _truncated_peft(tmp_path: Path) -> Path:
    sp.save_prompt(np.zeros((4, TINY.emb_dim), np.float32), tmp_path / "adapter")
    weights = tmp_path / "adapter" / PEFT_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-30])
    return tmp_path / "adapter"


def _corrupt_npz(tmp_path: Path) -> Path:
    path = tmp_path / "bad.npz"
    path.write_bytes(b"PK\x03\x04 not a zip archive")
    return path


def _nan_prompt(tmp_path: Path) -> Path:
    path = tmp_path / "nan.npy"
    np.save(path, np.full((4, TINY.emb_dim), np.nan, np.float32))
    return path


@pytest.mark.parametrize(
    "make,message",
    [
        (_empty_npy, "empty.npy is not a readable .npy file"),
        (_truncated_peft, "adapter_model.safetensors is not a readable safetensors file"),
        (_nan_prompt, f"nan.npy has {4 * TINY.emb_dim} non-finite values"),
        (_corrupt_npz, "bad.npz is not a readable .npz file"),
    ],
)
def test_damaged_prompt_file_is_one_line(frozen_model, tmp_path, capsys, make, message):
    out = tmp_path / "out"
    assert cli.main(eval_argv(frozen_model, make(tmp_path), out)) == 2
    assert message in one_error_line(capsys, "eval")
    assert not out.exists()


def test_damaged_native_model_is_one_line(frozen_model, prompt_file, tmp_path, capsys):
    model = tmp_path / "model"
    sp.save_pretrained(model, TINY, sp.init_params(TINY, 0))
    (model / native.PARAMS_DIR / "manifest.ocdbt").write_bytes(b"")
    assert cli.main(eval_argv(model, prompt_file, tmp_path / "out")) == 2
    err = one_error_line(capsys, "eval")
    assert f"{model / native.PARAMS_DIR}: damaged model params" in err


def test_unwritable_outputs_fail_before_compute(
    frozen_model, prompt_file, tmp_path, capsys, no_compute
):
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("not a folder")
    assert cli.main(eval_argv(frozen_model, prompt_file, in_the_way / "eval")) == 2
    assert f"cannot write to {in_the_way / 'eval'}" in one_error_line(capsys, "eval")
    out = in_the_way / "predictions.jsonl"
    assert cli.main(infer_argv(frozen_model, prompt_file, out)) == 2
    assert f"cannot write to {in_the_way}" in one_error_line(capsys, "infer")

    run = run_with_prompt(tmp_path)
    for output in (in_the_way / "p.npy", in_the_way / "peft_dir"):
        argv = ["export", f"--model_dir={run}", f"--output={output}"]
        assert cli.main(argv) == 2
        assert "cannot write to" in one_error_line(capsys, "export")


@pytest.mark.parametrize("size", [0, -4])
def test_batch_size_must_be_positive(frozen_model, prompt_file, tmp_path, capsys, no_compute, size):
    for command, argv in [
        ("eval", eval_argv(frozen_model, prompt_file, tmp_path / "eval", BATCH_SIZE=size)),
        ("infer", infer_argv(frozen_model, prompt_file, tmp_path / "p.jsonl", BATCH_SIZE=size)),
    ]:
        assert cli.main(argv) == 2
        err = one_error_line(capsys, command)
        assert f"batch size (BATCH_SIZE) must be a positive integer, got {size}" in err


def test_eval_of_no_examples_is_one_line(frozen_model, prompt_file, tmp_path, capsys):
    argv = eval_argv(frozen_model, prompt_file, tmp_path / "eval", EVAL_EXAMPLES=0)
    assert cli.main(argv) == 2
    err = one_error_line(capsys, "eval")
    assert f"task '{TASK}' has no examples in split 'validation'" in err


# --- strict JSON outputs -------------------------------------------------------------------------


def test_eval_writes_nan_metrics_as_null(frozen_model, prompt_file, tmp_path, monkeypatch):
    monkeypatch.setattr(
        commands, "evaluate_prompt", lambda *a, **k: {"accuracy": 0.5, "loss_per_token": math.nan}
    )
    out = tmp_path / "eval"
    assert cli.main(eval_argv(frozen_model, prompt_file, out)) == 0

    def refuse(constant: str):
        raise ValueError(f"not strict JSON: {constant}")

    record = json.loads((out / "metrics.json").read_text(), parse_constant=refuse)
    assert record["metrics"] == {"accuracy": 0.5, "loss_per_token": None}


# --- the console: no TensorFlow/CUDA start-up lines ----------------------------------------------


@pytest.mark.slow
def test_no_tensorflow_start_up_lines_reach_the_console(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    argv = [sys.executable, "-m", "softprompt_jax.cli", "export", f"--model_dir={tmp_path}"]
    result = subprocess.run(
        [*argv, f"--output={tmp_path / 'p.npy'}"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"softprompt-jax export: error: no prompt checkpoints under {tmp_path}/numpy_checkpoints"
    ]


@pytest.mark.parametrize(
    "command,family,key,message",
    [
        ("eval", "t5", "num_heads", "'num_heads' is an architecture field (the weights fix it)"),
        ("infer", "t5", "attention", "'attention' is no field of T5Config"),
        ("eval", "gpt2", "attention_impl", "'attention_impl' is no field of GPT2Config"),
    ],
)
def test_a_model_override_of_no_run_time_field_is_one_line(
    frozen_model, prompt_file, tmp_path, capsys, no_compute, command, family, key, message
):
    model = frozen_model
    if family == "gpt2":  # its own run-time fields: no attention_impl
        model = tmp_path / "gpt2"
        save_tiny("gpt2", model)
        capsys.readouterr()  # transformers' progress bar
    argv = eval_argv if command == "eval" else infer_argv
    overrides = f"{{'{key}': 2}}"
    out = tmp_path / "out"
    assert cli.main(argv(model, prompt_file, out, MODEL_OVERRIDES=overrides)) == 2
    assert f"MODEL_OVERRIDES key {message}" in one_error_line(capsys, command)


def test_an_ensemble_of_prefixes_or_of_a_decoder_only_model_is_one_line(
    frozen_model, prompt_file, tmp_path, capsys, no_compute
):
    prefix = sp.save_prompt(init_t5_prefix(TINY, 4), tmp_path / "prefix.npz")
    gpt2 = tmp_path / "gpt2"
    save_tiny("gpt2", gpt2)
    capsys.readouterr()  # transformers' progress bar
    for model, prompts, message in [
        (
            frozen_model,
            {"a": str(prompt_file), "b": str(prefix)},
            f"PROMPTS member 'b' ({prefix}) is a prefix",
        ),
        (gpt2, {"a": str(prompt_file)}, "is a decoder-only model (GPT2Config)"),
    ]:
        flags = gin_flags(
            model, PROMPTS=repr(prompts), ENSEMBLE=True, EVAL_OUTPUT_DIR=f"'{tmp_path / 'out'}'"
        )
        assert cli.main(["eval", *EVAL_FILES, *flags]) == 2
        err = one_error_line(capsys, "eval")
        assert err.startswith("softprompt-jax eval: error: ENSEMBLE = True") and message in err, err
        assert not (tmp_path / "out").exists()
