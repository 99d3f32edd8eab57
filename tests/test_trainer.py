"""The training loop's hooks, its step meter, and in-training evaluation at full length."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from conftest import TINY

import softprompt_jax as sp
from softprompt_jax.losses import LossConfig
from softprompt_jax.prompt_eval import evaluate_prompt
from softprompt_jax.train.hooks import Hooks, StepInfo, StepMeter
from softprompt_jax.train.trainer import (
    CheckpointConfig,
    EvalConfig,
    LogConfig,
    PromptSpec,
    train,
)

TRAIN_LENGTHS = {"inputs": 6, "targets": 4}  # demo inputs ("max: cafe" + EOS) are longer


def test_hooks_run_every_n_steps_and_after_the_last_in_order():
    calls = []
    hooks = Hooks()
    hooks.add(lambda info: calls.append(("log", info.step)), every=2)
    hooks.add(lambda info: calls.append(("eval", info.step)), every=3)
    for step in range(1, 6):
        hooks.run(StepInfo(step, 5, state=None, results={}))
    assert calls == [("log", 2), ("eval", 3), ("log", 4), ("log", 5), ("eval", 5)]
    with pytest.raises(ValueError, match="every=0"):
        hooks.add(print, every=0)


def test_step_meter_leaves_hook_time_out():
    meter = StepMeter()
    meter.record(np.float32(2.0))
    with meter.paused():
        time.sleep(0.2)
    meter.record(np.float32(4.0))
    assert meter.mean_loss() == 3.0
    assert meter.seconds_per_step() < 0.05
    meter.restart_clock()
    assert meter.seconds_per_step() is None and len(meter.losses) == 2
    with meter.paused():  # a log hook resets the meter while paused
        time.sleep(0.2)
        meter.reset()
    meter.record(np.float32(1.0))
    assert 0 < meter.seconds_per_step() < 0.05


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Three steps with truncated training inputs and the default (full-length) evaluation."""
    root = tmp_path_factory.mktemp("trainer")
    sp.save_pretrained(root / "model", TINY, sp.init_params(TINY, 0))
    result = train(
        model_dir=str(root / "run"),
        checkpoint_path=str(root / "model"),
        task="demo_multitask",
        feature_lengths=TRAIN_LENGTHS,
        train_steps=3,
        batch_size=4,
        prompt=PromptSpec(method="random_uniform", length=3),
        loss=LossConfig(enable_dropout=False),
        dtype="float32",
        evaluation=EvalConfig(max_examples=6),
        checkpointing=CheckpointConfig(period=3),
        logging=LogConfig(period=1, tensorboard=False),
    )
    return sp.load_pretrained(root / "model", dtype="float32"), result, root / "run"


def test_training_evaluates_full_length_inputs_by_default(trained):
    (cfg, params), result, _ = trained

    def evaluate(lengths):
        return evaluate_prompt(
            cfg,
            params,
            result.prompt,
            task="demo_multitask",
            split="validation",
            feature_lengths=lengths,
            batch_size=4,
            max_examples=6,
        )

    assert result.eval_metrics == evaluate(None)
    truncated = evaluate(TRAIN_LENGTHS)
    assert truncated["loss_per_token"] != result.eval_metrics["loss_per_token"]


def test_the_loop_logs_every_step_and_keeps_the_compile_out_of_throughput(trained):
    _, result, _ = trained
    records = [json.loads(line) for line in (trained[2] / "metrics.jsonl").open()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3]
    assert "examples_per_second" not in train_records[0]  # step 1 compiled: not timed
    assert all(r["examples_per_second"] > 0 for r in train_records[1:])
    assert [r["step"] for r in records if r["kind"] == "eval"] == [3]
    assert result.step == 3 and result.train_loss == train_records[-1]["loss"]
