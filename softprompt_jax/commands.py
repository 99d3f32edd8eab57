"""The non-training commands: evaluate prompts, write predictions, read prompts, export one.

`evaluate` and `infer` take a frozen checkpoint plus either one prompt file (`prompt_file`),
the way the official code recommends evaluating released prompts, or a bank of named prompts
(`prompts`): each task of a mixture runs with the prompt of its name, in batches that mix
the tasks. `infer` also reads the user's own inputs from a JSON-lines file, each line naming
its prompt; `evaluate` with `ensemble` runs the K prompts of one task and reports their
vote. Settings, inputs, prompts and the output location are checked before any compute;
outputs are written atomically (a failed run leaves no partial file behind) and are strict
JSON (NaN and infinities become null).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import seqio

from softprompt_jax import infer_rows, inspection, storage
from softprompt_jax.checkpoints import official
from softprompt_jax.checkpoints.pretrained import load_pretrained
from softprompt_jax.checkpoints.prompt_files import is_prefix_file, load_prompt, save_prompt
from softprompt_jax.checkpoints.sharded import read_config
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.methods import (
    check_lengths,
    read_model_family,
    read_prefix_info,
    table_to_prefix,
)
from softprompt_jax.model.config import T5Config
from softprompt_jax.model.decoder_config import is_decoder_only
from softprompt_jax.prefixes import check_prefix
from softprompt_jax.prompt_bank import PromptBank
from softprompt_jax.prompt_eval import evaluate_ensemble, evaluate_prompt, evaluate_tasks
from softprompt_jax.t5_prefixes import check_t5_prefix, is_t5_prefix
from softprompt_jax.tasks import evaluation as task_evaluation
from softprompt_jax.tasks.vocab import get_vocabulary
from softprompt_jax.train.metrics_writer import MetricsWriter
from softprompt_jax.train.run_prompts import read_run_bank, read_run_prompt

# PROMPTS: a bank file or folder, or {prompt name: prompt file or PEFT dir}.
PromptsSetting = str | Mapping[str, str]


def evaluate(
    *,
    checkpoint_path: str,
    task: str,
    output_dir: str,
    prompt_file: str | None = None,
    prompts: PromptsSetting | None = None,
    feature_lengths: Mapping[str, int] | None = None,
    split: str = "validation",
    batch_size: int = 32,
    max_examples: int | None = None,
    dtype: str = "bfloat16",
    ensemble: bool = False,
    num_beams: int = 1,
    alpha: float = 0.6,
    length_buckets: int = 4,
    pack: bool = False,
    model_overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Metrics of prompts on a frozen checkpoint -> `output_dir/metrics.json` (and a
    `metrics.jsonl` record per task).

    With `prompt_file`: the task's metrics. With `prompts` (a bank): each task's metrics,
    keyed by task; the task, or every task of a mixture that has `split`, runs with the
    prompt of its name. With `ensemble`: the bank holds K prompts of the one task; every
    member's metrics and the ensemble's (`prompt_eval.evaluate_ensemble`). `pack` scores
    (the loss, rank tasks' candidates) several examples per row, with the same results.
    `feature_lengths=None` evaluates whole inputs and targets, as T5X does; `num_beams > 1`
    decodes by beam search with length penalty `alpha`. Batches are padded to one of
    `length_buckets` input lengths, shortest inputs first (1: every batch to the longest).
    `model_overrides` sets run-time config fields (`attention_impl`, ...), as in training.
    """
    _check_batch_size(batch_size)
    _check_positive(num_beams, "EVAL_NUM_BEAMS")
    _check_positive(length_buckets, "EVAL_LENGTH_BUCKETS")
    task_obj = _get_task(task, split)
    _check_one_prompt_setting(prompt_file, prompts)
    if ensemble:
        _check_ensemble(task_obj, prompts, num_beams, checkpoint_path)
        if pack:
            raise SoftpromptError("PACK=True does not apply to ENSEMBLE=True: set PACK=False")
    storage.check_writable(output_dir)
    settings = {
        "split": split,
        "feature_lengths": feature_lengths,
        "batch_size": batch_size,
        "max_examples": max_examples,
        "length_buckets": length_buckets,
    }
    header = {"task": task, "split": split, "checkpoint_path": str(checkpoint_path)}
    if prompts is None:
        prompt = load_prompt(prompt_file)
        cfg, params = _load_model(
            checkpoint_path, dtype, model_overrides, prompt, prompt_file, feature_lengths
        )
        metrics = evaluate_prompt(
            cfg,
            params,
            prompt,
            task=task,
            num_beams=num_beams,
            alpha=alpha,
            pack=pack,
            **settings,
        )
        header["prompt_file"] = str(prompt_file)
        return _write_eval(output_dir, header, metrics, {task: metrics})
    bank = _load_bank(prompts)
    header["prompts"] = prompts
    if ensemble:
        cfg, params = _load_model(
            checkpoint_path, dtype, model_overrides, bank, prompts, feature_lengths
        )
        metrics = evaluate_ensemble(cfg, params, bank, task=task, **settings)
        return _write_eval(output_dir, header, metrics, {task: metrics})
    tasks = _tasks_with_prompts(task_obj, split, bank)
    cfg, params = _load_model(
        checkpoint_path, dtype, model_overrides, bank, prompts, feature_lengths
    )
    by_task = evaluate_tasks(
        cfg,
        params,
        bank,
        {name: bank.index(name) for name in tasks},
        num_beams=num_beams,
        alpha=alpha,
        pack=pack,
        **settings,
    )
    return _write_eval(output_dir, header, by_task, by_task)


def infer(
    *,
    checkpoint_path: str,
    output_file: str,
    feature_lengths: Mapping[str, int],
    task: str | None = None,
    prompt_file: str | None = None,
    prompts: PromptsSetting | None = None,
    input_file: str | None = None,
    vocabulary_path: str | None = None,
    split: str = "validation",
    batch_size: int = 32,
    max_examples: int | None = None,
    dtype: str = "bfloat16",
    decode_length: int | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    num_beams: int = 1,
    alpha: float = 0.6,
    length_buckets: int = 4,
    model_overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Predictions, one JSON line per input in order; labels not needed.

    The inputs are a task's split (with `prompts`: every task of a mixture, each with the
    prompt of its name) or, with `input_file`, a JSON-lines file of the user's own inputs,
    each line naming its prompt and optionally candidates to rank (`infer_rows`), tokenized
    with the SentencePiece model at `vocabulary_path`, else the task's vocabulary. A line
    holds `inputs`, `prediction` and `truncated` (the inputs were longer than
    `feature_lengths["inputs"]` and cut), plus `prompt` with a bank and `scores` for ranked
    candidates. Greedy unless `temperature > 0`: then sampled (from the `top_k` best tokens
    when `top_k > 0`), reproducibly for a given `seed`; `num_beams > 1` searches beams.
    Batches are padded to one of `length_buckets` input lengths, shortest inputs first (1:
    every batch to the inputs length); the lines keep the inputs' order. `model_overrides`
    sets run-time config fields (`attention_impl`, ...), as in training.
    """
    _check_decoding(temperature, top_k, num_beams)
    _check_positive(length_buckets, "INFER_LENGTH_BUCKETS")
    _check_batch_size(batch_size)
    _check_one_prompt_setting(prompt_file, prompts)
    path = Path(output_file)
    if path.is_dir():
        raise SoftpromptError(f"the output file {path} is a directory")
    storage.check_writable(path.parent)
    lengths = {"inputs": feature_lengths["inputs"], "targets": feature_lengths["targets"]}
    prompt = load_prompt(prompt_file) if prompts is None else _load_bank(prompts)
    if input_file is None:
        rows, features = _task_rows(task, split, lengths, max_examples, prompt, vocabulary_path)
    else:
        rows, features = _file_rows(input_file, lengths, prompt, task, vocabulary_path)
    source = prompt_file if prompts is None else prompts
    new_tokens = decode_length or lengths["targets"]
    cfg, params = _load_model(
        checkpoint_path, dtype, model_overrides, prompt, source, lengths, new_tokens
    )
    predictions = infer_rows.predict(
        cfg,
        params,
        prompt,
        rows,
        features["targets"],
        inputs_length=lengths["inputs"],
        batch_size=batch_size,
        max_length=decode_length or lengths["targets"],
        temperature=temperature,
        top_k=top_k,
        seed=seed,
        num_beams=num_beams,
        alpha=alpha,
        length_buckets=length_buckets,
    )
    lines = [_prediction_line(row, p) for row, p in zip(rows, predictions, strict=True)]
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_text_atomic(path, "".join(line + "\n" for line in lines))
    print(f"wrote {len(lines)} predictions to {path}")
    truncated = sum(row.truncated for row in rows)
    if truncated:
        print(
            f"{truncated} of {len(lines)} examples had inputs longer than "
            f'{lengths["inputs"]} tokens and were cut ("truncated": true in {path.name})'
        )
    return path


def inspect_prompts(
    *,
    checkpoint_path: str,
    prompt_file: str | None = None,
    bank_path: str | None = None,
    vocabulary_path: str | None = None,
    task: str | None = None,
    labels: Sequence[str] | None = None,
    k: int = 5,
    json_file: str | None = None,
) -> dict[str, Any]:
    """Print what prompts read as: each position's `k` nearest vocabulary pieces by cosine,
    the task's label words marked, and for a bank its prompt-to-prompt similarity.

    The pieces are those of the SentencePiece model at `vocabulary_path`, else of the task's
    vocabulary; label words are `labels`, else the task's (`inspection.label_words`). With
    `json_file`, the same report is written there as JSON.
    """
    if k < 1:
        raise SoftpromptError(f"--k must be a positive integer, got {k}")
    if json_file is not None:
        storage.check_writable(Path(json_file).parent)
    task_obj = None if task is None else _get_task(task)
    vocabulary = _inspect_vocabulary(vocabulary_path, task_obj)
    if labels is None:
        labels = [] if task is None else inspection.label_words(task)
    bank, source = _inspect_prompts(prompt_file, bank_path)
    _, params = _load_model(checkpoint_path, "float32", None, bank, source)
    report = inspection.report(
        bank, params, vocabulary, labels, k, similarity=bank_path is not None
    )
    print(inspection.format_report(report, task))
    if json_file is not None:
        storage.write_text_atomic(json_file, storage.strict_json(report, indent=2) + "\n")
    return report


def _inspect_vocabulary(
    vocabulary_path: str | None, task: seqio.Task | seqio.Mixture | None
) -> seqio.Vocabulary:
    """The SentencePiece model at `vocabulary_path`, else the task's inputs vocabulary."""
    if vocabulary_path is not None:
        return _sentencepiece(vocabulary_path, "--vocabulary")
    if task is None:
        raise SoftpromptError("inspect needs --vocabulary (a SentencePiece model) or --task")
    return task.output_features["inputs"].vocabulary


def _inspect_prompts(
    prompt_file: str | None, bank_path: str | None
) -> tuple[PromptBank, PromptsSetting]:
    """The prompts to read, as a bank (one prompt file: a bank of one, named by its file),
    and where they came from."""
    if (prompt_file is None) == (bank_path is None):
        raise SoftpromptError(
            "inspect takes one of --prompt (a prompt file) and --prompts (a bank)"
        )
    if bank_path is not None:
        return PromptBank.load(bank_path), bank_path
    name = Path(prompt_file).name
    return PromptBank.from_arrays({name: load_prompt(prompt_file)}), {name: prompt_file}


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
    family = read_model_family(model_dir)
    if t5x and family != "t5":
        raise SoftpromptError(
            f"{model_dir} trained a decoder-only model; --t5x writes T5's layout: export to "
            ".npy or a PEFT directory"
        )
    chosen, prompt = read_run_prompt(model_dir, step, task)
    prefix_info = read_prefix_info(model_dir)
    if prefix_info is not None:  # a prefix run: its per-layer keys and values, MLP folded
        if t5x:
            raise SoftpromptError(f"{model_dir} trained a prefix; --t5x exports prompts only")
        prompt = table_to_prefix(prompt, prefix_info, f"of step {chosen} in {model_dir}")
    output_path = Path(output)
    storage.check_writable(output_path if output_path.suffix != ".npy" else output_path.parent)
    if t5x:
        frozen_params = load_pretrained(frozen, dtype="float32")[1] if frozen else None
        path = Path(official.write_prompt(prompt, output_path, chosen, frozen_params))
    else:
        path = _save_prefix_or_prompt(prompt, output, prefix_info, family)
    whose = "" if task is None else f"{task} "
    what = "prompt" if prefix_info is None else "prefix"
    shape = jax.tree.map(lambda x: tuple(x.shape), prompt) if prefix_info else prompt.shape
    print(f"exported the {whose}{what} of step {chosen} {shape} to {path}")
    return path


def _save_prefix_or_prompt(
    prompt: Any, output: str, prefix_info: dict | None, family: str
) -> os.PathLike:
    """`save_prompt`: PEFT's task type of the run's `family`, a prefix's heads for T5's."""
    if prefix_info is None:
        task_type = "CAUSAL_LM" if family == "decoder_only" else "SEQ_2_SEQ_LM"
        return save_prompt(prompt, output, task_type=task_type)
    heads, head_dim = prefix_info["num_kv_heads"], prefix_info["head_dim"]
    return save_prompt(prompt, output, num_heads=heads, head_dim=head_dim)


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


def _check_positive(value: int, setting: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SoftpromptError(f"{setting} must be a positive integer, got {value!r}")


def _check_decoding(temperature: float, top_k: int, num_beams: int) -> None:
    """Sampling settings are >= 0, and beam search (`num_beams > 1`) does not sample."""
    if temperature < 0 or top_k < 0:
        raise SoftpromptError(f"temperature and top_k must be >= 0, got {temperature} and {top_k}")
    _check_positive(num_beams, "INFER_NUM_BEAMS")
    if num_beams > 1 and temperature > 0:
        raise SoftpromptError(
            f"INFER_NUM_BEAMS = {num_beams} searches beams and INFER_TEMPERATURE = "
            f"{temperature} samples; set one of them"
        )


def _check_one_prompt_setting(prompt_file: str | None, prompts: PromptsSetting | None) -> None:
    if (prompt_file is None) == (prompts is None):
        got = "neither is set" if prompt_file is None else "both are set"
        raise SoftpromptError(
            "set one of PROMPT_FILE (a prompt file) and PROMPTS (a bank of named prompts); " + got
        )


def _check_ensemble(
    task: seqio.Task | seqio.Mixture,
    prompts: PromptsSetting | None,
    num_beams: int,
    checkpoint_path: str,
) -> None:
    """An ensemble is the K soft prompts (PROMPTS) of one task on a T5 model, decoded greedily
    (checked from the checkpoint's metadata and the prompt files' kind, before any weights)."""
    if prompts is None:
        raise SoftpromptError("ENSEMBLE = True needs PROMPTS: the K prompts of the task")
    if not isinstance(task, seqio.Task):
        raise SoftpromptError(f"ENSEMBLE = True evaluates one task; {task.name} is a mixture")
    if num_beams > 1:
        raise SoftpromptError(
            f"ENSEMBLE = True decodes greedily; EVAL_NUM_BEAMS must be 1, got {num_beams}"
        )
    cfg = read_config(checkpoint_path, "float32")
    if is_decoder_only(cfg):
        raise SoftpromptError(
            f"ENSEMBLE = True runs T5 models; {checkpoint_path} is a decoder-only model "
            f"({type(cfg).__name__})"
        )
    if isinstance(prompts, Mapping):
        for name, path in prompts.items():
            if is_prefix_file(path):
                raise SoftpromptError(
                    f"ENSEMBLE = True ensembles soft prompts; PROMPTS member {name!r} ({path}) "
                    "is a prefix"
                )


def _load_bank(prompts: PromptsSetting) -> PromptBank:
    """The bank PROMPTS names: a bank file or folder, or {prompt name: prompt file}."""
    if isinstance(prompts, str):
        return PromptBank.load(prompts)
    if isinstance(prompts, Mapping) and all(
        isinstance(key, str) and isinstance(value, str) for key, value in prompts.items()
    ):
        return PromptBank.from_files(prompts)
    raise SoftpromptError(
        "PROMPTS must be a bank file or folder ('bank.safetensors') or a dict of prompt "
        f"name -> prompt file ({{'boolq': 'boolq.npy'}}), got {prompts!r}"
    )


def _load_model(
    checkpoint_path: str,
    dtype: str,
    overrides: Mapping[str, Any] | None,
    prompt: jax.Array | PromptBank,
    source: PromptsSetting,
    feature_lengths: Mapping[str, int] | None = None,
    new_tokens: int | None = None,
) -> tuple[T5Config, dict]:
    """The frozen model, once the prompts and lengths are known to fit it (from its config).

    `source` is where the prompts came from: a file or bank path, or {name: file};
    `feature_lengths` and `new_tokens` as `methods.check_lengths` takes them.
    """
    cfg = read_config(checkpoint_path, dtype, overrides)
    check_lengths(cfg, prompt, feature_lengths, new_tokens)
    if isinstance(prompt, Mapping):  # a prefix (.npz or PEFT prefix dir)
        if is_t5_prefix(prompt):
            check_t5_prefix(cfg, prompt, str(source))
        else:
            check_prefix(cfg, prompt)
    elif isinstance(prompt, PromptBank):
        if prompt.emb_dim != cfg.emb_dim:
            name = prompt.names[0]
            where = f"({source[name]})" if isinstance(source, Mapping) else f"of {source}"
            raise SoftpromptError(
                f"prompt {name!r} {where} has embedding width {prompt.emb_dim}; the model at "
                f"{checkpoint_path} has {cfg.emb_dim}"
            )
    elif prompt.ndim != 2 or prompt.shape[1] != cfg.emb_dim:
        raise SoftpromptError(
            f"prompt file {source} has shape {tuple(prompt.shape)}; the model at "
            f"{checkpoint_path} expects (length, {cfg.emb_dim})"
        )
    return load_pretrained(checkpoint_path, dtype=dtype, config=cfg)


def _tasks_with_prompts(
    task: seqio.Task | seqio.Mixture, split: str, bank: PromptBank
) -> list[str]:
    """The task, or each task of the mixture that has `split`; each runs with the bank's
    prompt of its name."""
    names = (
        [task.name]
        if isinstance(task, seqio.Task)
        else [each.name for each in task.tasks if split in each.splits]
    )
    missing = [name for name in names if name not in bank.names]
    if missing:
        raise SoftpromptError(
            f"PROMPTS has no prompt for task {', '.join(missing)} (each task runs with the "
            f"prompt of its name); it holds {', '.join(bank.names)}"
        )
    return names


def _task_rows(
    task: str | None,
    split: str,
    lengths: Mapping[str, int],
    max_examples: int | None,
    prompt: jax.Array | PromptBank,
    vocabulary_path: str | None,
) -> tuple[list[infer_rows.InferRow], Mapping[str, seqio.Feature]]:
    """A task's examples to predict (with a bank: each task of a mixture, with its prompt)."""
    if task is None:
        raise SoftpromptError(
            "infer needs MIXTURE_OR_TASK_NAME (a task's examples to predict) or "
            "INFER_INPUT_FILE (your own inputs)"
        )
    if vocabulary_path is not None:
        raise SoftpromptError(
            "VOCABULARY_PATH tokenizes INFER_INPUT_FILE; a task's examples are tokenized by it"
        )
    task_obj = _get_task(task, split)
    if not isinstance(prompt, PromptBank):
        return _example_rows(task, split, lengths, max_examples, None), task_obj.output_features
    rows = [
        row
        for name in _tasks_with_prompts(task_obj, split, prompt)
        for row in _example_rows(name, split, lengths, max_examples, name)
    ]
    return rows, task_obj.output_features


def _example_rows(
    task: str,
    split: str,
    lengths: Mapping[str, int],
    max_examples: int | None,
    prompt_name: str | None,
) -> list[infer_rows.InferRow]:
    """The task's examples cut to `lengths`, each marked if it was cut."""
    examples = task_evaluation.load_examples(task, split, lengths, max_examples)
    texts = _input_texts(examples, f"{task} {split}")
    whole = task_evaluation.load_examples(task, split, None, max_examples)
    return [
        infer_rows.InferRow(
            prompt_name, text, ex["inputs"], len(full["inputs"]) > lengths["inputs"]
        )
        for text, ex, full in zip(texts, examples, whole, strict=True)
    ]


def _file_rows(
    input_file: str,
    lengths: Mapping[str, int],
    prompt: jax.Array | PromptBank,
    task: str | None,
    vocabulary_path: str | None,
) -> tuple[list[infer_rows.InferRow], Mapping[str, seqio.Feature]]:
    """The lines of INFER_INPUT_FILE, checked and tokenized, and the features that did it."""
    if not isinstance(prompt, PromptBank):
        raise SoftpromptError(
            "INFER_INPUT_FILE's lines name their prompt: set PROMPTS (a bank), not PROMPT_FILE"
        )
    if vocabulary_path is not None:
        vocabulary = _sentencepiece(vocabulary_path, "VOCABULARY_PATH")
        features = {name: seqio.Feature(vocabulary, add_eos=True) for name in lengths}
    elif task is not None:
        features = _get_task(task).output_features
    else:
        raise SoftpromptError(
            "set VOCABULARY_PATH (a SentencePiece model) or MIXTURE_OR_TASK_NAME (a task whose "
            "vocabulary to use) to tokenize INFER_INPUT_FILE"
        )
    rows = infer_rows.read_jsonl(input_file, prompt.names, features["inputs"], lengths["inputs"])
    return rows, features


def _sentencepiece(path: str, setting: str) -> seqio.Vocabulary:
    """T5's kind of SentencePiece vocabulary from `path`, read now rather than at first use."""
    vocabulary = get_vocabulary(path)
    try:
        vocabulary.encode("")
    except Exception as error:  # TensorFlow's file errors, protobuf's parse errors
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise SoftpromptError(
            f"{setting} {path}: not a readable SentencePiece model ({first})"
        ) from error
    return vocabulary


def _prediction_line(row: infer_rows.InferRow, prediction: infer_rows.Prediction) -> str:
    line: dict[str, Any] = {} if row.prompt is None else {"prompt": row.prompt}
    line |= {"inputs": row.text, "prediction": prediction.text}
    if prediction.scores is not None:
        line["scores"] = list(prediction.scores)
    return storage.strict_json({**line, "truncated": row.truncated})


def _write_eval(
    output_dir: str,
    header: Mapping[str, Any],
    metrics: Mapping[str, Any],
    by_task: Mapping[str, Mapping[str, float]],
) -> dict[str, Any]:
    """`metrics.json` (`header` and `metrics`), and a `metrics.jsonl` record and a console
    line per task."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {**header, "metrics": metrics}
    storage.write_text_atomic(out / "metrics.json", storage.strict_json(record, indent=2) + "\n")
    writer = MetricsWriter(out, tensorboard=False)
    split = header["split"]
    for task, each in by_task.items():
        writer.write("eval", 0, {"task": task, "split": split, **each})
        print(f"{task} {split}: " + "  ".join(f"{k} {v:.4g}" for k, v in sorted(each.items())))
    return dict(metrics)


def _get_task(name: str, split: str | None = None) -> seqio.Task | seqio.Mixture:
    """The registered seqio task or mixture `name`, which must have `split` (when given).

    An unknown name comes with the close ones.
    """
    try:
        task = seqio.get_mixture_or_task(name)
    except ValueError as error:
        known = [*seqio.TaskRegistry.names(), *seqio.MixtureRegistry.names()]
        matches = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {' or '.join(matches)}?" if matches else ""
        raise SoftpromptError(f"no seqio task or mixture named {name!r}{hint}") from error
    if split is not None and split not in task.splits:
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
