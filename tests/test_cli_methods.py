"""Every method on every model family from the command line: train, report the metric, export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
import transformers
from softprompt_jax.tasks.demo import DEMO_MIXTURE

import softprompt_jax as sp
from softprompt_jax import cli
from softprompt_jax.train.state_checkpoints import sidecar_path

TASK = "demo_max"  # offline, byte vocabulary (259 ids)
LENGTHS = "{'inputs': 12, 'targets': 4}"


def save_tiny(family: str, path: Path) -> Path:
    """A tiny random Hugging Face decoder-only model whose vocabulary covers the task's."""
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=300, n_embd=16, n_layer=2, n_head=2, n_positions=64, eos_token_id=1
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(
            vocab_size=300,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(path)
    return path


def train_argv(model: Path, model_file: str, run: Path, **macros) -> list[str]:
    return [
        "train",
        f"--gin_file=models/{model_file}",
        "--gin_file=runs/prompt_finetune.gin",
        f"--gin.INITIAL_CHECKPOINT_PATH='{model}'",
        f"--gin.MIXTURE_OR_TASK_NAME='{TASK}'",
        f"--gin.MODEL_DIR='{run}'",
        f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}",
        "--gin.PROMPT_LENGTH=3",
        "--gin.TRAIN_STEPS=3",
        "--gin.BATCH_SIZE=4",
        "--gin.EVAL_PERIOD=3",
        "--gin.EVAL_EXAMPLES=4",
        "--gin.ACTIVATION_DTYPE='float32'",
        *[f"--gin.{name}={value}" for name, value in macros.items()],
    ]


def train(model: Path, model_file: str, run: Path, **macros) -> dict:
    """Three steps and an evaluation on 4 examples; the last eval record of metrics.jsonl."""
    assert cli.main(train_argv(model, model_file, run, **macros)) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "eval"][-1]


def test_packing_is_refused_on_decoder_only_models(tmp_path, capsys):
    model = save_tiny("gpt2", tmp_path / "gpt2")
    argv = train_argv(model, "gpt2.gin", tmp_path / "run", PACK=True)
    assert cli.main(argv) == 2
    assert "PACK=True packs T5 rows only; the model is a GPT2Config" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_gpt2_lengths_past_its_positions_are_refused(tmp_path, capsys):
    model = save_tiny("gpt2", tmp_path / "gpt2")
    lengths = "{'inputs': 58, 'targets': 4}"  # + PROMPT_LENGTH 3 = 65 > 64 positions
    argv = train_argv(model, "gpt2.gin", tmp_path / "run", TASK_FEATURE_LENGTHS=lengths)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "GPT-2 has 64 positions (max_position_embeddings); 3 prompt/prefix" in err
    assert "+ 62 tokens (TASK_FEATURE_LENGTHS) + 0 new tokens (max_new_tokens) = 65" in err
    assert not (tmp_path / "run").exists()


def _check_causal_lm_exports(model: Path, run: Path, tmp_path: Path, capsys) -> None:
    """A decoder-only prompt run exports a CAUSAL_LM PEFT adapter giving our logits; no --t5x."""
    adapter = tmp_path / "peft_prompt"
    assert cli.main(["export", f"--model_dir={run}", f"--output={adapter}"]) == 0
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    base = transformers.AutoModelForCausalLM.from_pretrained(model).eval()
    theirs = peft.PeftModel.from_pretrained(base, adapter).eval()
    ids = np.random.default_rng(0).integers(1, 300, (2, 5))
    mask = np.ones_like(ids)
    with torch.no_grad():
        out = theirs(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    cfg, params = sp.load_pretrained(model, dtype="float32")
    ours = sp.lm_logits(cfg, params, ids, mask, sp.load_prompt(adapter))
    np.testing.assert_allclose(np.asarray(ours), out[:, -5:].numpy(), rtol=0, atol=1e-5)
    t5x = ["export", f"--model_dir={run}", f"--output={tmp_path / 't5x'}", "--t5x"]
    capsys.readouterr()
    assert cli.main(t5x) == 2
    assert "trained a decoder-only model; --t5x writes T5's layout" in capsys.readouterr().err
    assert not (tmp_path / "t5x").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "method", "projection"),
    [("gpt2", "prompt", None), ("gpt2", "prefix", 8), ("llama", "prefix", None)],
)
def test_decoder_only_methods_train_report_and_export(tmp_path, capsys, family, method, projection):
    model = save_tiny(family, tmp_path / family)
    run = tmp_path / "run"
    macros = {"METHOD": f"'{method}'", "PREFIX_PROJECTION_DIM": projection}
    record = train(model, f"{family}.gin", run, **macros)
    assert record["step"] == 3 and 0.0 <= record["accuracy"] <= 100.0
    assert np.isfinite(record["loss_per_token"])
    out = capsys.readouterr().out
    assert f"3-token {method} on {TASK}" in out and "trainable params" in out

    exported = tmp_path / ("prefix.npz" if method == "prefix" else "prompt.npy")
    assert cli.main(["export", f"--model_dir={run}", f"--output={exported}"]) == 0
    if method == "prefix":  # plain per-layer keys and values [layers, P, kv_heads, head_dim]
        kv_heads, head_dim = (2, 8) if family == "gpt2" else (2, 4)
        with np.load(exported, allow_pickle=False) as arrays:
            assert arrays["key"].shape == arrays["value"].shape == (2, 3, kv_heads, head_dim)
    else:
        assert np.load(exported).shape == (3, 16)
        _check_causal_lm_exports(model, run, tmp_path, capsys)

    argv = [
        "eval",
        f"--gin_file=models/{family}.gin",
        "--gin_file=runs/prompt_eval.gin",
        f"--gin.INITIAL_CHECKPOINT_PATH='{model}'",
        f"--gin.MIXTURE_OR_TASK_NAME='{TASK}'",
        f"--gin.PROMPT_FILE='{exported}'",
        f"--gin.EVAL_OUTPUT_DIR='{tmp_path / 'eval'}'",
        "--gin.EVAL_EXAMPLES=4",
        "--gin.BATCH_SIZE=4",
        "--gin.ACTIVATION_DTYPE='float32'",
    ]
    assert cli.main(argv) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    # The exported prompt or folded prefix scores the examples as the run's own evaluation.
    np.testing.assert_allclose(
        metrics["metrics"]["loss_per_token"], record["loss_per_token"], rtol=1e-5
    )


@pytest.mark.slow
def test_gpt2_trains_a_prompt_per_task_exports_the_bank_and_evaluates_with_it(tmp_path, capsys):
    model = save_tiny("gpt2", tmp_path / "gpt2")
    per_task = {"MIXTURE_OR_TASK_NAME": f"'{DEMO_MIXTURE}'", "PROMPT_PER_TASK": True}
    prefix = train_argv(model, "gpt2.gin", tmp_path / "prefix", METHOD="'prefix'", **per_task)
    capsys.readouterr()
    assert cli.main(prefix) == 2  # a prefix is one per run: refused in one line, nothing written
    err = capsys.readouterr().err.strip()
    assert "PROMPT_PER_TASK needs METHOD='prompt'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "prefix").exists()

    run = tmp_path / "run"
    assert cli.main(train_argv(model, "gpt2.gin", run, **per_task)) == 0
    assert "training 3 prompts of 3 tokens, one per task of demo_mixture" in capsys.readouterr().out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    records = {r["task"]: r for r in records if r["kind"] == "eval"}
    tasks = ["demo_len", "demo_max", "demo_min"]  # the mixture's, in order: the bank's names
    assert list(records) == tasks and all(r["step"] == 3 for r in records.values())

    bank_file = tmp_path / "bank.safetensors"
    assert cli.main(["export", f"--model_dir={run}", f"--bank={bank_file}"]) == 0
    bank = sp.PromptBank.load(bank_file)
    assert bank.names == tuple(tasks) and bank.lengths == (3, 3, 3)
    for task in tasks:
        np.testing.assert_array_equal(bank[task], np.load(sidecar_path(run, 3, task)))
    one = tmp_path / "max.npy"
    assert cli.main(["export", f"--model_dir={run}", "--task=demo_max", f"--output={one}"]) == 0
    np.testing.assert_array_equal(np.load(one), bank["demo_max"])

    argv = [
        "eval",
        "--gin_file=models/gpt2.gin",
        "--gin_file=runs/prompt_eval.gin",
        f"--gin.INITIAL_CHECKPOINT_PATH='{model}'",
        f"--gin.MIXTURE_OR_TASK_NAME='{DEMO_MIXTURE}'",
        f"--gin.PROMPTS='{bank_file}'",
        f"--gin.EVAL_OUTPUT_DIR='{tmp_path / 'eval'}'",
        f"--gin.EVAL_FEATURE_LENGTHS={LENGTHS}",
        "--gin.EVAL_EXAMPLES=4",
        "--gin.BATCH_SIZE=4",
        "--gin.ACTIVATION_DTYPE='float32'",
    ]
    assert cli.main(argv) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    # Mixed batches, each row with its task's prompt: the run's own evaluation of that prompt.
    assert sorted(metrics) == tasks
    for task in tasks:
        assert metrics[task]["accuracy"] == records[task]["accuracy"]
        np.testing.assert_allclose(
            metrics[task]["loss_per_token"], records[task]["loss_per_token"], rtol=1e-5
        )


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "projection"), [("paper", 8), ("peft", None)])
def test_t5_prefix_trains_reports_and_exports(frozen_model, tmp_path, mode, projection):
    run = tmp_path / "run"
    macros = {"METHOD": "'prefix'", "PREFIX_PROJECTION_DIM": projection, "PREFIX_MODE": f"'{mode}'"}
    record = train(frozen_model, "t5_1_1_tiny.gin", run, **macros)
    assert record["step"] == 3 and np.isfinite(record["loss_per_token"])
    assert 0.0 <= record["accuracy"] <= 100.0
    if mode == "peft":  # PEFT's adapter dir: its table, config for Hugging Face T5
        exported = tmp_path / "peft_prefix"
        assert cli.main(["export", f"--model_dir={run}", f"--output={exported}"]) == 0
        config = json.loads((exported / "adapter_config.json").read_text())
        assert config["task_type"] == "SEQ_2_SEQ_LM" and config["num_transformer_submodules"] == 2
        return
    exported = tmp_path / "prefix.npz"
    assert cli.main(["export", f"--model_dir={run}", f"--output={exported}"]) == 0
    with np.load(exported, allow_pickle=False) as arrays:  # MLP folded: plain keys and values
        assert sorted(arrays.files) == [
            "decoder/key",
            "decoder/value",
            "encoder/key",
            "encoder/value",
            "layout",
        ]
        assert str(arrays["layout"]) == "t5_paper"
        assert arrays["encoder/key"].shape == (1, 3, 2, 8)
    argv = [
        "eval",
        "--gin_file=models/t5_1_1_tiny.gin",
        "--gin_file=runs/prompt_eval.gin",
        f"--gin.INITIAL_CHECKPOINT_PATH='{frozen_model}'",
        f"--gin.MIXTURE_OR_TASK_NAME='{TASK}'",
        f"--gin.PROMPT_FILE='{exported}'",
        f"--gin.EVAL_OUTPUT_DIR='{tmp_path / 'eval'}'",
        "--gin.EVAL_EXAMPLES=4",
        "--gin.BATCH_SIZE=4",
    ]
    assert cli.main(argv) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    np.testing.assert_allclose(metrics["loss_per_token"], record["loss_per_token"], rtol=1e-5)
