"""The prompt-tuning loop: load the frozen model, train the prompt, evaluate, checkpoint.

A short loop of train steps plus hooks (`train/hooks.py`) for logging, evaluation and
checkpointing. Settings are keyword arguments and small dataclasses (`EvalConfig`,
`CheckpointConfig`, `MeshConfig`, `LogConfig`); gin binds them at the command line
(`softprompt_jax.gin_config`). Restarting the same command resumes from the
last finished checkpoint in `model_dir` and reproduces the uninterrupted run.

With `prompt_per_task`, a seqio Mixture trains one prompt per task in one run: a
`PromptBank` named by task, each example reaching its task's prompt through the batch's
`prompt_ids` (`train/data.per_task_batches`). The prompts train independently (separate
arrays, separate Adafactor statistics, a summed loss); each task is evaluated with its own
prompt, and its metrics, best step and numpy prompts are kept per task.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import seqio
from jax.experimental import multihost_utils

from softprompt_jax import storage
from softprompt_jax.checkpoints.sharded import load_sharded, read_config
from softprompt_jax.errors import SoftpromptError, TrainingInterrupted
from softprompt_jax.losses import LossConfig
from softprompt_jax.methods import (
    check_lengths,
    check_method,
    check_packing,
    describe,
    feature_converter,
    init_prefix_params,
    write_model_info,
    write_prefix_info,
)
from softprompt_jax.model.config import T5Config
from softprompt_jax.partitioning import (
    global_batch,
    local_batch_size,
    make_mesh,
    param_shardings,
    partitioned_train_step,
    place,
    replicated,
    seqio_shard_info,
    standard_logical_axis_rules,
    to_host,
)
from softprompt_jax.prompt_bank import PromptBank
from softprompt_jax.prompt_eval import evaluate_prompt
from softprompt_jax.prompts import check_packed_dropout, init_prompt
from softprompt_jax.train import preflight
from softprompt_jax.train.data import mixture_task_names, per_task_batches, train_batches
from softprompt_jax.train.hooks import Hook, Hooks, StepInfo, StepMeter
from softprompt_jax.train.interrupts import StopRequests
from softprompt_jax.train.metrics_writer import MetricsWriter, console, format_eta
from softprompt_jax.train.optimizer import AdafactorConfig, adafactor, make_optimizer
from softprompt_jax.train.parameters import parameter_summary
from softprompt_jax.train.resume import make_run_info, repair_sidecars, restore_latest
from softprompt_jax.train.run_lock import RunLock
from softprompt_jax.train.state_checkpoints import TrainCheckpointer
from softprompt_jax.train.train_step import init_train_state, make_train_step


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """How to initialise the prompt (see `softprompt_jax.init_prompt`); paper defaults.

    With one prompt per task, `labels` may map each task to its own class labels; every
    task's prompt uses the same method with seed `seed + i` for the i-th task.
    """

    method: str = "class_labels"
    length: int = 100
    labels: Sequence[str] | Mapping[str, Sequence[str]] = ()
    text: str | None = None
    path: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length <= 0:
            raise SoftpromptError(
                f"PROMPT_LENGTH (PromptSpec.length) must be a positive integer, got {self.length!r}"
            )


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """The last step, the prompt (a `PromptBank` per task), and the latest numbers.

    With one prompt per task, `eval_metrics` keys are `<task>/<metric>`.
    """

    step: int
    prompt: np.ndarray | PromptBank
    train_loss: float | None
    eval_metrics: dict[str, float]


def model_config(
    checkpoint_path: str,
    dtype: str,
    dropout_rate: float | None,
    overrides: Mapping[str, Any] | None,
) -> T5Config:
    """The checkpoint's config (read from metadata alone) with the run-time settings applied.

    Run-time settings: dropout, scan, remat (`overrides`); a scanned model stacks the
    checkpoint's `layers_N` while loading.
    """
    cfg = read_config(checkpoint_path, dtype, overrides)
    return cfg if dropout_rate is None else cfg.replace(dropout_rate=dropout_rate)


def make_prompt(
    spec: PromptSpec, params: dict, task: str, labels: Sequence[str] | None = None, seed: int = 0
) -> jax.Array:
    """The prompt `spec` describes for `task` (`labels` and `seed + spec.seed` may override)."""
    vocabulary = seqio.get_mixture_or_task(task).output_features["inputs"].vocabulary
    return init_prompt(
        spec.method,
        spec.length,
        params=params,
        vocab=vocabulary,
        labels=list(spec.labels if labels is None else labels),
        text=spec.text,
        path=spec.path,
        seed=spec.seed + seed,
    )


def make_prompt_bank(spec: PromptSpec, params: dict, tasks: Sequence[str]) -> PromptBank:
    """One prompt per task, named by task: its own class labels if given, seed `spec.seed + i`."""
    per_task = isinstance(spec.labels, Mapping)
    return PromptBank.from_arrays(
        {
            task: make_prompt(spec, params, task, spec.labels[task] if per_task else None, seed=i)
            for i, task in enumerate(tasks)
        }
    )


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """In-training evaluation. `feature_lengths=None` scores full-length inputs, as T5X does."""

    period: int = 1000
    task: str | None = None  # None: the training task
    split: str = "validation"
    max_examples: int | None = None  # None: the whole split
    batch_size: int | None = None  # None: the training batch size
    feature_lengths: Mapping[str, int] | None = None
    pack: bool = False  # score several examples per row (decoding stays unpacked)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """What to keep (T5X's `SaveCheckpointConfig`): the last `keep` steps and the best one."""

    period: int = 1000
    keep: int = 3
    best_metric: str | None = None  # an eval metric, e.g. "accuracy"
    best_mode: str = "max"


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The `(data, model)` device mesh and T5X's standard partitioning rules.

    `data=-1` takes what `model` leaves; `parameter_partitioning_dims=2` also splits the
    weights' `embed` dimension over `data` (FSDP-like), for when frozen weights dominate.
    """

    data: int = -1
    model: int = 1
    activation_partitioning_dims: int = 1
    parameter_partitioning_dims: int = 1


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """How often the loss and throughput reach the console and `metrics.jsonl`."""

    period: int = 100
    tensorboard: bool = True


def train(
    *,
    model_dir: str,
    checkpoint_path: str,
    task: str,
    feature_lengths: Mapping[str, int],
    train_steps: int,
    batch_size: int = 32,
    prompt: PromptSpec = PromptSpec(),
    optimizer: AdafactorConfig = AdafactorConfig(),
    loss: LossConfig = LossConfig(),
    dtype: str = "bfloat16",
    dropout_rate: float | None = None,
    model_overrides: Mapping[str, Any] | None = None,
    seed: int = 0,
    evaluation: EvalConfig = EvalConfig(),
    checkpointing: CheckpointConfig = CheckpointConfig(),
    mesh: MeshConfig = MeshConfig(),
    logging: LogConfig = LogConfig(),
    pack: bool = False,
    prompt_per_task: bool = False,
    method: str = "prompt",
    prefix_projection_dim: int | None = None,
    prefix_mode: str = "paper",
) -> TrainResult:
    """Prompt-tune `task` on the frozen model at `checkpoint_path`; artefacts go to `model_dir`.

    `prompt_per_task` (a seqio Mixture as `task`) trains one prompt per task of the mixture
    (see the module doc). `method="prefix"` trains key/value prefixes of `prompt.length`
    positions instead of a prompt (`methods.py`), through an MLP of `prefix_projection_dim`
    hidden units when set (prefix tuning), else plain (P-tuning v2). On T5, `prefix_mode`
    'paper' prefixes the encoder and decoder self-attention (Li & Liang), 'peft' the decoder's
    alone, exactly as PEFT's prefix tuning does (`t5_prefixes.py`).

    `pack` puts several examples in each of the `batch_size` rows (seqio's packing, each
    example with its own copy of its prompt; `train/data.py`): the loss is that of the same
    examples unpacked, and the logs count examples (`examples_per_step`, `examples_per_second`).

    The frozen params are sharded over the device mesh; the prompt and its optimizer state
    are replicated and each process feeds its share of every global batch. Logging,
    checkpointing and evaluation run as hooks, in that order, after every N-th step and
    after the last. What a caller can rely on when things go wrong:

    - Settings (tasks, BEST_METRIC, lengths, periods, MODEL_DIR) are checked before anything
      is written; a mistake raises SoftpromptError with one line.
    - `model_dir` is locked for the run (`RunLock`; not on gs://): a second run refuses.
    - A rerun resumes from the newest checkpoint that restores (a damaged one is set aside)
      and refuses a checkpoint of another run (task, data, frozen model, prompt length);
      it writes any missing numpy prompt and drops `metrics.jsonl` records after its step.
    - A step is saved before it is evaluated; an evaluation a crash prevented runs on resume.
    - SIGINT/SIGTERM (one process): the current step ends, a checkpoint is saved, one line is
      printed and `TrainingInterrupted` (a KeyboardInterrupt) is raised.
    - A NaN or infinite loss (checked at each log and before each save) raises
      SoftpromptError naming the step and the last good checkpoint; nothing bad is saved.
    """
    eval_task = evaluation.task or task
    check_method(method, prefix_projection_dim, prompt_per_task, prefix_mode)
    _check_settings(
        model_dir,
        task,
        eval_task,
        feature_lengths,
        train_steps,
        batch_size,
        evaluation,
        checkpointing,
        logging,
    )
    prompt_names = _prompt_names(task, prompt_per_task, evaluation.task, prompt)
    packing = _packing(pack, method, prompt, prompt_names, loss)
    targets = _eval_targets(prompt_names, eval_task)
    _check_evaluations(targets.values(), evaluation, checkpointing)
    device_mesh = make_mesh(mesh.data, mesh.model)
    rules = standard_logical_axis_rules(
        mesh.activation_partitioning_dims, mesh.parameter_partitioning_dims
    )
    local_batch = local_batch_size(batch_size, device_mesh)
    cfg = model_config(checkpoint_path, dtype, dropout_rate, model_overrides)
    check_packing(cfg, pack or evaluation.pack)
    check_lengths(cfg, prompt.length, feature_lengths)
    check_lengths(cfg, prompt.length, evaluation.feature_lengths)
    run_info = make_run_info(
        task=task,
        seed=seed,
        batch_size=batch_size,
        feature_lengths=feature_lengths,
        checkpoint_path=checkpoint_path,
        model=cfg,
        prompt_length=prompt.length,
        prompt_names=prompt_names,
    )
    with contextlib.ExitStack() as stack:
        if jax.process_index() == 0:  # the other processes of a multi-host run follow it
            stack.enter_context(RunLock(model_dir))
        console(f"loading the frozen model from {checkpoint_path}")
        params = load_sharded(checkpoint_path, cfg, param_shardings(cfg, device_mesh, rules))
        # A prefix's every leaf trains (prompt_only would freeze leaves not named prompt).
        tx = make_optimizer(optimizer) if method == "prompt" else adafactor(optimizer)
        if method == "prefix":
            initial = init_prefix_params(
                cfg, prompt.length, prefix_projection_dim, prompt.seed, prefix_mode
            )
        elif prompt_names:
            initial = make_prompt_bank(prompt, params, prompt_names)
        else:
            initial = make_prompt(prompt, params, task)
        state = place(init_train_state(initial, tx), replicated(device_mesh))
        model_dir_path = storage.as_path(model_dir)
        writer = MetricsWriter(model_dir_path, tensorboard=logging.tensorboard)
        writer.console(parameter_summary(params, state.prompt))
        if jax.process_index() == 0:
            write_model_info(model_dir, cfg)
            if method == "prefix":
                write_prefix_info(model_dir, cfg, prefix_projection_dim, prefix_mode)
        checkpointer = TrainCheckpointer(
            model_dir_path,
            keep=checkpointing.keep,
            best_metric=checkpointing.best_metric,
            best_mode=checkpointing.best_mode,
            prompt_names=prompt_names,
        )
        stack.callback(checkpointer.close)
        start_step, state, records = _resume(checkpointer, state, run_info, writer)

        meter = StepMeter()
        evaluate = _eval_hook(writer, checkpointer, cfg, params, targets, batch_size, evaluation)
        hooks = Hooks()
        examples: list[float] = []  # examples of each step since the last log
        hooks.add(_log_hook(writer, meter, examples, checkpointer), every=logging.period)
        hooks.add(_checkpoint_hook(checkpointer, run_info, meter), every=checkpointing.period)
        hooks.add(evaluate, every=evaluation.period)
        latest: dict[str, Any] = {}  # the latest of what the hooks produced
        if _missed_evaluation(records, start_step, train_steps, evaluation.period):
            info = StepInfo(start_step, train_steps, state, results={})
            evaluate(info)
            latest.update(info.results)

        step_fn = partitioned_train_step(
            make_train_step(cfg, tx, loss),
            device_mesh,
            param_shardings(cfg, device_mesh, rules),
            rules=rules,
        )
        rng = place(jax.random.PRNGKey(seed), replicated(device_mesh))
        batches = (per_task_batches if prompt_names else train_batches)(
            task,
            feature_lengths,
            local_batch,
            seed=seed,
            start_step=start_step,
            shard_info=seqio_shard_info(device_mesh),
            **packing,
            converter=feature_converter(cfg),
        )
        what = (
            f"{len(prompt_names)} prompts of {prompt.length} tokens, one per task of"
            if prompt_names
            else f"a {prompt.length}-token {method} on"
        )
        writer.console(
            f"training {what} {task}: "
            f"steps {start_step}->{train_steps}, batch {batch_size}, "
            f"model {describe(cfg)} ({dtype}), "
            f"mesh data={device_mesh.shape['data']} x model={device_mesh.shape['model']}"
        )
        with StopRequests() as stop:
            for step in range(start_step, train_steps):
                if stop.signal:
                    _save_and_stop(checkpointer, run_info, meter, step, state, stop.signal, writer)
                host_batch = next(batches)
                examples.append(_examples_in(host_batch, batch_size))
                batch = global_batch(host_batch, device_mesh, rules)
                if step == start_step:
                    writer.console("compiling the train step (the first step takes longer)")
                state, metrics = step_fn(state, params, batch, rng)
                meter.record(metrics["loss"])
                if step == start_step:  # the compile stays out of throughput and ETA
                    jax.block_until_ready(state)
                    writer.console(f"compiled the train step and ran step {step + 1}")
                    meter.restart_clock()
                info = StepInfo(step + 1, train_steps, state, results={})
                with meter.paused():
                    hooks.run(info)
                latest.update(info.results)
        if start_step >= train_steps:
            writer.console(f"{model_dir_path} already holds step {start_step} >= {train_steps}")
    return TrainResult(
        max(start_step, train_steps),
        to_host(state.prompt),
        latest.get("train_loss"),
        latest.get("eval_metrics", {}),
    )


def _packing(
    pack: bool,
    method: str,
    prompt: PromptSpec,
    prompt_names: Sequence[str] | None,
    loss: LossConfig,
) -> dict[str, Any]:
    """The data's packing arguments (none without `pack`); packing's settings checked first."""
    if not pack:
        return {}
    if method != "prompt":
        raise SoftpromptError(f"PACK=True needs METHOD='prompt'; METHOD={method!r} is not packed")
    check_packed_dropout(loss.enable_dropout, loss.prompt_dropout)
    if prompt_names:
        return {"pack_prompt_lengths": [prompt.length] * len(prompt_names)}
    return {"pack_prompt_length": prompt.length}


def _check_settings(
    model_dir: str,
    task: str,
    eval_task: str,
    feature_lengths: Mapping[str, int],
    train_steps: int,
    batch_size: int,
    evaluation: EvalConfig,
    checkpointing: CheckpointConfig,
    logging: LogConfig,
) -> None:
    """Every setting a run uses late, checked before anything is loaded or written."""
    preflight.check_model_dir(model_dir)
    preflight.check_positive(
        {
            "TRAIN_STEPS": train_steps,
            "BATCH_SIZE": batch_size,
            "LogConfig.period": logging.period,
            "EVAL_PERIOD (EvalConfig.period)": evaluation.period,
            "CheckpointConfig.period": checkpointing.period,
            "CheckpointConfig.keep": checkpointing.keep,
        }
    )
    preflight.check_feature_lengths("TASK_FEATURE_LENGTHS", feature_lengths)
    preflight.check_feature_lengths("EVAL_FEATURE_LENGTHS", evaluation.feature_lengths)
    preflight.check_task("MIXTURE_OR_TASK_NAME", task)
    preflight.check_task("EVAL_TASK", eval_task)


def _prompt_names(
    task: str, prompt_per_task: bool, eval_task_setting: str | None, prompt: PromptSpec
) -> tuple[str, ...] | None:
    """The tasks that get their own prompt (None: one prompt), their settings checked first."""
    preflight.check_prompt_per_task(task, prompt_per_task, eval_task_setting)
    names = tuple(mixture_task_names(task)) if prompt_per_task else None
    preflight.check_labels(prompt.labels, names)
    return names


def _check_evaluations(
    eval_tasks: Iterable[str], evaluation: EvalConfig, checkpointing: CheckpointConfig
) -> None:
    """Each evaluated task has the eval split and reports BEST_METRIC."""
    for eval_task in eval_tasks:
        preflight.check_evaluation(
            eval_task, evaluation.split, checkpointing.best_metric, checkpointing.best_mode
        )


def _resume(
    checkpointer: TrainCheckpointer, state: Any, run_info: dict, writer: MetricsWriter
) -> tuple[int, Any, list[dict]]:
    """The step and state to go on from, and the metrics records up to that step.

    The run directory is made whole first: stray temporary files removed, damaged
    checkpoints set aside, missing numpy prompts written, later metrics records dropped.
    """
    for path in checkpointer.remove_temporaries():
        writer.console(f"removed {path}, left by a write that was killed")
    start_step, state = restore_latest(checkpointer, state, run_info, writer.console)
    repair_sidecars(checkpointer, state, writer.console)
    records = writer.keep_until(start_step)
    if start_step:
        writer.console(f"resuming from step {start_step} in {checkpointer.model_dir}")
    return start_step, state, records


def _missed_evaluation(records: list[dict], start_step: int, train_steps: int, period: int) -> bool:
    """Whether the step resumed from was due an evaluation that a crash or kill prevented."""
    due = start_step > 0 and (start_step % period == 0 or start_step == train_steps)
    if not due:
        return False
    recorded = any(r.get("kind") == "eval" and r.get("step") == start_step for r in records)
    # Process 0 alone reads metrics.jsonl; every process must agree to evaluate.
    return bool(multihost_utils.broadcast_one_to_all(np.bool_(not recorded)))


def _examples_in(host_batch: Mapping[str, np.ndarray], batch_size: int) -> float:
    """Examples in a global batch: its rows, or a packed batch's segments (this process's
    count scaled to the global batch)."""
    if "encoder_segment_ids" not in host_batch:
        return float(batch_size)
    segments = host_batch["encoder_segment_ids"]
    return float(segments.max(axis=1).sum()) * batch_size / len(segments)


def _log_hook(
    writer: MetricsWriter, meter: StepMeter, examples: list[float], checkpointer: TrainCheckpointer
) -> Hook:
    """Mean loss, examples/s and ETA since the last log, to the console and metrics.jsonl.

    `examples` holds each step's examples (packed rows hold several), emptied at every log.
    """

    def log(info: StepInfo) -> None:
        _check_finite(meter, info, checkpointer)
        loss = meter.mean_loss()
        values, line = {"loss": loss}, f"step {info.step}/{info.last_step}  loss {loss:.4f}"
        if examples:
            values["examples_per_step"] = float(np.mean(examples))
        examples.clear()
        seconds_per_step = meter.seconds_per_step()
        if seconds_per_step is not None and "examples_per_step" in values:
            values["examples_per_second"] = values["examples_per_step"] / seconds_per_step
            eta = format_eta((info.last_step - info.step) * seconds_per_step)
            line += f"  {values['examples_per_second']:.1f} ex/s  ETA {eta}"
        writer.console(line)
        writer.write("train", info.step, values)
        info.results["train_loss"] = loss
        meter.reset()

    return log


def _checkpoint_hook(checkpointer: TrainCheckpointer, run_info: dict, meter: StepMeter) -> Hook:
    """Save the state, if its losses and prompt are finite, before anything evaluates it."""

    def save(info: StepInfo) -> None:
        _check_finite(meter, info, checkpointer)
        checkpointer.save(info.step, info.state, run_info)

    return save


def _eval_targets(prompt_names: Sequence[str] | None, eval_task: str) -> dict[str | None, str]:
    """Which prompt is evaluated on which task: each task's own, or (None) the one prompt."""
    return {name: name for name in prompt_names} if prompt_names else {None: eval_task}


def _eval_hook(
    writer: MetricsWriter,
    checkpointer: TrainCheckpointer,
    cfg: T5Config,
    params: dict,
    targets: Mapping[str | None, str],
    train_batch_size: int,
    config: EvalConfig,
) -> Hook:
    """Each target task's metrics for its prompt, left in `info.results["eval_metrics"]`.

    `targets` maps a bank's prompt name (None: the one prompt) to its task. The metrics are
    also recorded with the step's checkpoint, to pick each prompt's best step; every task is
    evaluated before any record is written, so a step's records are all there or none.
    """

    def evaluate(info: StepInfo) -> None:
        results = {}
        for name, eval_task in targets.items():
            writer.console(f"evaluating step {info.step} on {eval_task} {config.split}")
            results[name] = evaluate_prompt(
                cfg,
                params,
                info.state.prompt if name is None else info.state.prompt[name],
                task=eval_task,
                split=config.split,
                feature_lengths=config.feature_lengths,
                batch_size=config.batch_size or train_batch_size,
                pack=config.pack,
                max_examples=config.max_examples,
            )
            whose = "" if name is None else f" ({name})"
            writer.console(f"eval at step {info.step}{whose}: " + _format_metrics(results[name]))
        for name, metrics in results.items():
            task_key = {} if name is None else {"task": name}
            writer.write("eval", info.step, {**task_key, "split": config.split, **metrics})
            checkpointer.record_eval(info.step, metrics, task=name)
        info.results["eval_metrics"] = _flat_metrics(results)

    return evaluate


def _flat_metrics(results: Mapping[str | None, Mapping[str, float]]) -> dict[str, float]:
    """One prompt's metrics as they are; a bank's as `<task>/<metric>`."""
    if None in results:
        return dict(results[None])
    return {f"{task}/{key}": value for task, each in results.items() for key, value in each.items()}


def _check_finite(meter: StepMeter, info: StepInfo, checkpointer: TrainCheckpointer) -> None:
    """Stop on a NaN or infinite loss or prompt, before it reaches a checkpoint or a log.

    Reading the losses waits for the device, so this runs only where the loop syncs anyway.
    """
    bad = meter.first_non_finite()
    what = None
    if bad is not None:
        steps_back, loss = bad
        what = f"loss is {loss} at step {info.step - steps_back}"
    elif not all(np.isfinite(p).all() for p in jax.tree.leaves(to_host(info.state.prompt))):
        what = f"the prompt is not finite after step {info.step}"
    if what is not None:
        last = checkpointer.latest_step()
        raise SoftpromptError(
            f"{what}; the last good checkpoint is step {last}"
            if last is not None
            else f"{what}; no checkpoint was saved before it"
        )


def _save_and_stop(
    checkpointer: TrainCheckpointer,
    run_info: dict,
    meter: StepMeter,
    step: int,
    state: Any,
    signal_name: str,
    writer: MetricsWriter,
) -> None:
    """On a stop request after `step`: save it (unless saved or bad), say so, and stop."""
    info = StepInfo(step, step, state, results={})
    _check_finite(meter, info, checkpointer)
    checkpointer.save(step, state, run_info)
    writer.console(
        f"interrupted at step {step} ({signal_name}); checkpoint saved; "
        "run the same command to resume"
    )
    raise TrainingInterrupted(step)


def _format_metrics(metrics: Mapping[str, float]) -> str:
    return "  ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(metrics.items())
    )
