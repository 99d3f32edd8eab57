"""The non-training commands: evaluate a prompt, write predictions, export a prompt.

`evaluate` and `infer` take a frozen checkpoint plus a prompt file, the way the
official code recommends evaluating released prompts. Outputs are written
atomically: a failed run leaves no partial file behind.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import seqio

from softprompt_jax import inference, storage
from softprompt_jax.checkpoints.pretrained import load_pretrained
from softprompt_jax.checkpoints.prompt_files import load_prompt, save_prompt
from softprompt_jax.prompt_eval import evaluate_prompt
from softprompt_jax.tasks import evaluation as task_evaluation
from softprompt_jax.train.metrics_writer import MetricsWriter
from softprompt_jax.train.state_checkpoints import (
    NUMPY_DIR,
    PROMPT_SIDECAR,
    best_step,
)


def _load_model_and_prompt(checkpoint_path: str, prompt_file: str, dtype: str):
    cfg, params = load_pretrained(checkpoint_path, dtype=dtype)
    prompt = load_prompt(prompt_file)
    if prompt.ndim != 2 or prompt.shape[1] != cfg.emb_dim:
        raise ValueError(
            f"prompt file {prompt_file} has shape {tuple(prompt.shape)}; the model at "
            f"{checkpoint_path} expects (length, {cfg.emb_dim})"
        )
    return cfg, params, jnp.asarray(prompt)


def evaluate(
    *,
    checkpoint_path: str,
    prompt_file: str,
    task: str,
    output_dir: str,
    feature_lengths: Mapping[str, int] | None = None,
    split: str = "validation",
    batch_size: int = 32,
    max_examples: int | None = None,
    dtype: str = "bfloat16",
) -> dict[str, float]:
    """The task's metrics for a prompt file on a frozen checkpoint -> `output_dir/metrics.json`.

    `feature_lengths=None` evaluates whole inputs and targets, as T5X does.
    """
    seqio.get_mixture_or_task(task)  # an unknown task fails before the model loads
    cfg, params, prompt = _load_model_and_prompt(checkpoint_path, prompt_file, dtype)
    metrics = evaluate_prompt(
        cfg,
        params,
        prompt,
        task=task,
        split=split,
        feature_lengths=feature_lengths,
        batch_size=batch_size,
        max_examples=max_examples,
    )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "task": task,
        "split": split,
        "prompt_file": str(prompt_file),
        "checkpoint_path": str(checkpoint_path),
        "metrics": metrics,
    }
    storage.write_text_atomic(out / "metrics.json", json.dumps(record, indent=2) + "\n")
    MetricsWriter(out, tensorboard=False).write("eval", 0, {"split": split, **metrics})
    print(f"{task} {split}: " + "  ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())))
    return metrics


def infer(
    *,
    checkpoint_path: str,
    prompt_file: str,
    task: str,
    output_file: str,
    feature_lengths: Mapping[str, int],
    split: str = "validation",
    batch_size: int = 32,
    max_examples: int | None = None,
    dtype: str = "bfloat16",
    decode_length: int | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
) -> Path:
    """Predictions for a task's split, one JSON line per example; labels not needed.

    Greedy unless `temperature > 0`: then sampled (from the `top_k` best tokens when
    `top_k > 0`), reproducibly for a given `seed`.
    """
    if temperature < 0 or top_k < 0:
        raise ValueError(f"temperature and top_k must be >= 0, got {temperature} and {top_k}")
    task_obj = seqio.get_mixture_or_task(task)
    cfg, params, prompt = _load_model_and_prompt(checkpoint_path, prompt_file, dtype)
    lengths = {"inputs": feature_lengths["inputs"], "targets": feature_lengths["targets"]}
    examples = task_evaluation.load_examples(task, split, lengths, max_examples)
    vocabulary = task_obj.output_features["targets"].vocabulary
    predictions = inference.predict_texts(
        cfg,
        params,
        prompt,
        vocabulary,
        task_evaluation.t5x_batches(examples, lengths, batch_size),
        max_length=decode_length or lengths["targets"],
        temperature=temperature,
        top_k=top_k,
        seed=seed,
    )
    lines = []
    for example, prediction in zip(examples, predictions, strict=True):
        inputs = example.get("inputs_pretokenized", b"")
        lines.append(
            json.dumps(
                {
                    "inputs": inputs.decode() if isinstance(inputs, bytes) else str(inputs),
                    "prediction": prediction,
                }
            )
        )
    path = Path(output_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_text_atomic(path, "".join(line + "\n" for line in lines))
    print(f"wrote {len(lines)} predictions to {path}")
    return path


def export_prompt(model_dir: str, output: str, step: str = "latest") -> Path:
    """Copy a run's prompt (`latest`, `best` or a step number) to `.npy` or a PEFT directory."""
    numpy_dir = Path(model_dir) / NUMPY_DIR
    steps = sorted(
        int(p.name.removeprefix("checkpoint_"))
        for p in numpy_dir.glob("checkpoint_*")
        if p.name.removeprefix("checkpoint_").isdigit()
    )
    if not steps:
        raise FileNotFoundError(f"no prompt checkpoints under {numpy_dir}")
    if step == "latest":
        chosen = steps[-1]
    elif step == "best":
        chosen = best_step(model_dir)
        if chosen is None:
            raise FileNotFoundError(f"{model_dir} records no best step (no eval metric was kept)")
    else:
        chosen = int(step)
        if chosen not in steps:
            raise FileNotFoundError(f"no prompt for step {chosen} in {numpy_dir}; have {steps}")
    prompt = load_prompt(numpy_dir / f"checkpoint_{chosen}" / PROMPT_SIDECAR)
    path = save_prompt(prompt, output)
    print(f"exported the prompt of step {chosen} {tuple(prompt.shape)} to {path}")
    return path
