"""The non-training commands: evaluate a prompt, write predictions, export a prompt.

`evaluate` and `infer` take a frozen checkpoint plus a prompt file, the way the
official code recommends evaluating released prompts. Settings, inputs and the output
location are checked before any compute; outputs are written atomically (a failed run
leaves no partial file behind) and are strict JSON (NaN and infinities become null).
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import seqio

from softprompt_jax import inference, storage
from softprompt_jax.checkpoints import official
from softprompt_jax.checkpoints.pretrained import load_pretrained
from softprompt_jax.checkpoints.prompt_files import load_prompt, save_prompt
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.prompt_eval import evaluate_prompt
from softprompt_jax.tasks import evaluation as task_evaluation
from softprompt_jax.train.metrics_writer import MetricsWriter
from softprompt_jax.train.run_prompts import read_run_bank, read_run_prompt


def _load_model_and_prompt(checkpoint_path: str, prompt_file: str, dtype: str):
    cfg, params = load_pretrained(checkpoint_path, dtype=dtype)
    prompt = load_prompt(prompt_file)
    if prompt.ndim != 2 or prompt.shape[1] != cfg.emb_dim:
        raise SoftpromptError(
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
    _check_batch_size(batch_size)
    _get_task(task, split)
    storage.check_writable(output_dir)
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
    storage.write_text_atomic(out / "metrics.json", _strict_json(record, indent=2) + "\n")
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
    `top_k > 0`), reproducibly for a given `seed`. An example whose inputs were longer than
    `feature_lengths["inputs"]` (and so cut) has `"truncated": true` in its line.
    """
    if temperature < 0 or top_k < 0:
        raise SoftpromptError(f"temperature and top_k must be >= 0, got {temperature} and {top_k}")
    _check_batch_size(batch_size)
    task_obj = _get_task(task, split)
    path = Path(output_file)
    if path.is_dir():
        raise SoftpromptError(f"the output file {path} is a directory")
    storage.check_writable(path.parent)
    lengths = {"inputs": feature_lengths["inputs"], "targets": feature_lengths["targets"]}
    examples = task_evaluation.load_examples(task, split, lengths, max_examples)
    inputs = _input_texts(examples, f"{task} {split}")
    whole = task_evaluation.load_examples(task, split, None, max_examples)
    truncated = [len(example["inputs"]) > lengths["inputs"] for example in whole]
    cfg, params, prompt = _load_model_and_prompt(checkpoint_path, prompt_file, dtype)
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
    lines = [
        _strict_json({"inputs": text, "prediction": prediction, "truncated": cut})
        for text, prediction, cut in zip(inputs, predictions, truncated, strict=True)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_text_atomic(path, "".join(line + "\n" for line in lines))
    print(f"wrote {len(lines)} predictions to {path}")
    if any(truncated):
        print(
            f"{sum(truncated)} of {len(lines)} examples had inputs longer than "
            f'{lengths["inputs"]} tokens and were cut ("truncated": true in {path.name})'
        )
    return path


def export_prompt(
    model_dir: str,
    output: str | None,
    step: str = "latest",
    *,
    t5x: bool = False,
    frozen: str | None = None,
    task: str | None = None,
    bank: str | None = None,
) -> Path:
    """Copy a run's prompt (`latest`, `best` or a step number) to `.npy` or a PEFT directory.

    With `t5x`, `output` becomes a T5X model dir in the official prompt-tuning code's layout
    (`checkpoint_<step>` with the prompt at `encoder/prompt/prompt/prompt`), holding also the
    weights of the `frozen` checkpoint when given, as the official code's checkpoints do.
    A run with one prompt per task (PROMPT_PER_TASK) exports `task`'s prompt, or with `bank`
    instead of `output` all of them as one `PromptBank` (`best`: each task's best step).
    """
    if frozen and not t5x:
        raise SoftpromptError("--frozen_checkpoint only applies to --t5x exports")
    if (output is None) == (bank is None):
        raise SoftpromptError("export writes one of --output (a prompt) and --bank (a bank)")
    if bank is not None:
        return _export_bank(model_dir, bank, step, t5x=t5x, task=task)
    chosen, prompt = read_run_prompt(model_dir, step, task)
    output_path = Path(output)
    storage.check_writable(output_path if output_path.suffix != ".npy" else output_path.parent)
    if t5x:
        frozen_params = load_pretrained(frozen, dtype="float32")[1] if frozen else None
        path = Path(official.write_prompt(prompt, output_path, chosen, frozen_params))
    else:
        path = save_prompt(prompt, output)
    whose = "" if task is None else f"{task} "
    print(f"exported the {whose}prompt of step {chosen} {tuple(prompt.shape)} to {path}")
    return path


def _export_bank(model_dir: str, output: str, step: str, *, t5x: bool, task: str | None) -> Path:
    """All prompts of a per-task run as one bank: a `.safetensors` file or a folder of `.npy`."""
    if t5x or task is not None:
        raise SoftpromptError("--bank writes every task's prompt; it takes no --t5x or --task")
    steps, prompts = read_run_bank(model_dir, step)
    path = Path(output)
    storage.check_writable(path.parent if path.suffix == ".safetensors" else path)
    written = prompts.save(path)
    chosen = ", ".join(f"{name} (step {n})" for name, n in steps.items())
    print(f"exported the prompts of {chosen} to {written}")
    return written


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise SoftpromptError(
            f"batch size (BATCH_SIZE) must be a positive integer, got {batch_size!r}"
        )


def _get_task(name: str, split: str) -> seqio.Task | seqio.Mixture:
    """The registered seqio task or mixture `name`, which must have `split`.

    An unknown name comes with the close ones.
    """
    try:
        task = seqio.get_mixture_or_task(name)
    except ValueError as error:
        known = [*seqio.TaskRegistry.names(), *seqio.MixtureRegistry.names()]
        matches = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {' or '.join(matches)}?" if matches else ""
        raise SoftpromptError(f"no seqio task or mixture named {name!r}{hint}") from error
    if split not in task.splits:
        raise SoftpromptError(f"task {name!r} has no split {split!r}; it has {list(task.splits)}")
    return task


def _input_texts(examples: Sequence[Mapping[str, Any]], where: str) -> list[str]:
    """Each example's input text, checked before any compute: one not UTF-8 is named."""
    texts = []
    for index, example in enumerate(examples):
        raw = example.get("inputs_pretokenized", b"")
        try:
            texts.append(raw.decode() if isinstance(raw, bytes) else str(raw))
        except UnicodeDecodeError as error:
            raise SoftpromptError(
                f"{where} example {index}: inputs are not valid UTF-8 "
                f"({error.reason} at byte {error.start}: {raw[error.start : error.end]!r})"
            ) from error
    return texts


def _strict_json(value: Any, **kwargs) -> str:
    """JSON that strict parsers accept: NaN and infinities are written as null."""
    return json.dumps(_finite_or_none(value), allow_nan=False, **kwargs)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value
