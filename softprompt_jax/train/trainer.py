"""The prompt-tuning loop: load the frozen model, train the prompt, evaluate, checkpoint.

A short loop of train steps plus hooks (`train/hooks.py`) for logging, evaluation and
checkpointing. Settings are keyword arguments and small dataclasses (`EvalConfig`,
`CheckpointConfig`, `MeshConfig`, `LogConfig`); gin binds them at the command line
(`softprompt_jax.gin_config`). Restarting the same command resumes from the
last finished checkpoint in `model_dir` and reproduces the uninterrupted run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import seqio
from jax.sharding import Mesh

from softprompt_jax import storage
from softprompt_jax.checkpoints.sharded import load_sharded, read_config
from softprompt_jax.losses import LossConfig
from softprompt_jax.model.config import T5Config
from softprompt_jax.partitioning import (
    Rules,
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
from softprompt_jax.prompt_eval import evaluate_prompt
from softprompt_jax.prompts import init_prompt
from softprompt_jax.train.data import train_batches
from softprompt_jax.train.hooks import Hook, Hooks, StepInfo, StepMeter
from softprompt_jax.train.metrics_writer import MetricsWriter, format_eta
from softprompt_jax.train.optimizer import AdafactorConfig, make_optimizer
from softprompt_jax.train.state_checkpoints import TrainCheckpointer
from softprompt_jax.train.train_step import init_train_state, make_train_step


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """How to initialise the prompt (see `softprompt_jax.init_prompt`); paper defaults."""

    method: str = "class_labels"
    length: int = 100
    labels: Sequence[str] = ()
    text: str | None = None
    path: str | None = None
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainResult:
    step: int
    prompt: np.ndarray
    train_loss: float | None
    eval_metrics: dict[str, float]


def load_frozen_model(
    checkpoint_path: str,
    dtype: str,
    dropout_rate: float | None,
    overrides: Mapping[str, Any] | None,
    mesh: Mesh,
    rules: Rules | None = None,
) -> tuple[T5Config, dict]:
    """The frozen model in its compute dtype, each device holding only its slice.

    Run-time settings (dropout, scan, remat) are applied to the checkpoint's config;
    a scanned model stacks the checkpoint's `layers_N` while loading.
    """
    changes = dict(overrides or {})
    if dropout_rate is not None:
        changes["dropout_rate"] = dropout_rate
    cfg = read_config(checkpoint_path, dtype).replace(**changes)
    return cfg, load_sharded(checkpoint_path, cfg, param_shardings(cfg, mesh, rules))


def make_prompt(spec: PromptSpec, params: dict, task: str) -> jax.Array:
    vocabulary = seqio.get_mixture_or_task(task).output_features["inputs"].vocabulary
    return init_prompt(
        spec.method,
        spec.length,
        params=params,
        vocab=vocabulary,
        labels=list(spec.labels),
        text=spec.text,
        path=spec.path,
        seed=spec.seed,
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
) -> TrainResult:
    """Prompt-tune `task` on the frozen model at `checkpoint_path`; artefacts go to `model_dir`.

    The frozen params are sharded over the device mesh; the prompt and its optimizer state
    are replicated and each process feeds its share of every global batch. Logging,
    evaluation and checkpointing run as hooks after every N-th step and after the last.
    """
    for name, value in (
        ("train_steps", train_steps),
        ("batch_size", batch_size),
        ("log period", logging.period),
        ("eval period", evaluation.period),
        ("checkpoint period", checkpointing.period),
    ):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    # Everything that can fail on bad input happens before anything is written.
    device_mesh = make_mesh(mesh.data, mesh.model)
    rules = standard_logical_axis_rules(
        mesh.activation_partitioning_dims, mesh.parameter_partitioning_dims
    )
    cfg, params = load_frozen_model(
        checkpoint_path, dtype, dropout_rate, model_overrides, device_mesh, rules
    )
    local_batch = local_batch_size(batch_size, device_mesh)
    tx = make_optimizer(optimizer)
    state = place(init_train_state(make_prompt(prompt, params, task), tx), replicated(device_mesh))
    model_dir_path = storage.as_path(model_dir)
    model_dir_path.mkdir(parents=True, exist_ok=True)
    writer = MetricsWriter(model_dir_path, tensorboard=logging.tensorboard)
    run_info = {
        "task": task,
        "seed": seed,
        "batch_size": batch_size,
        "feature_lengths": dict(feature_lengths),
    }
    checkpointer = TrainCheckpointer(
        model_dir_path,
        keep=checkpointing.keep,
        best_metric=checkpointing.best_metric,
        best_mode=checkpointing.best_mode,
    )
    start_step = checkpointer.latest_step() or 0
    if start_step:
        state, saved_info = checkpointer.restore(state, start_step)
        _check_resumable(saved_info, run_info, model_dir_path)
        writer.console(f"resuming from step {start_step} in {model_dir_path}")

    meter = StepMeter()
    hooks = Hooks()
    hooks.add(_log_hook(writer, meter, batch_size), every=logging.period)
    hooks.add(
        _eval_hook(writer, cfg, params, task, batch_size, evaluation), every=evaluation.period
    )
    hooks.add(_checkpoint_hook(checkpointer, run_info), every=checkpointing.period)

    step_fn = partitioned_train_step(
        make_train_step(cfg, tx, loss),
        device_mesh,
        param_shardings(cfg, device_mesh, rules),
        rules=rules,
    )
    rng = place(jax.random.PRNGKey(seed), replicated(device_mesh))
    batches = train_batches(
        task,
        feature_lengths,
        local_batch,
        seed=seed,
        start_step=start_step,
        shard_info=seqio_shard_info(device_mesh),
    )
    writer.console(
        f"training a {prompt.length}-token prompt on {task}: steps {start_step}->{train_steps}, "
        f"batch {batch_size}, model {cfg.emb_dim}d x {cfg.num_encoder_layers} layers ({dtype}), "
        f"mesh data={device_mesh.shape['data']} x model={device_mesh.shape['model']}"
    )

    latest: dict[str, Any] = {}  # the latest of what the hooks produced
    for step in range(start_step, train_steps):
        batch = global_batch(next(batches), device_mesh, rules)
        state, metrics = step_fn(state, params, batch, rng)
        meter.record(metrics["loss"])
        if step == start_step:  # the first step compiles: keep it out of throughput and ETA
            jax.block_until_ready(state)
            writer.console(f"compiled the train step and ran step {step + 1}")
            meter.restart_clock()
        info = StepInfo(step + 1, train_steps, state, results={})
        with meter.paused():
            hooks.run(info)
        latest.update(info.results)
    if start_step >= train_steps:
        writer.console(f"{model_dir_path} already holds step {start_step} >= {train_steps}")
    checkpointer.close()
    return TrainResult(
        max(start_step, train_steps),
        to_host(state.prompt),
        latest.get("train_loss"),
        latest.get("eval_metrics", {}),
    )


def _log_hook(writer: MetricsWriter, meter: StepMeter, batch_size: int) -> Hook:
    """Mean loss, examples/s and ETA since the last log, to the console and metrics.jsonl."""

    def log(info: StepInfo) -> None:
        loss = meter.mean_loss()
        values, line = {"loss": loss}, f"step {info.step}/{info.last_step}  loss {loss:.4f}"
        seconds_per_step = meter.seconds_per_step()
        if seconds_per_step is not None:
            values["examples_per_second"] = batch_size / seconds_per_step
            eta = format_eta((info.last_step - info.step) * seconds_per_step)
            line += f"  {values['examples_per_second']:.1f} ex/s  ETA {eta}"
        writer.console(line)
        writer.write("train", info.step, values)
        info.results["train_loss"] = loss
        meter.reset()

    return log


def _eval_hook(
    writer: MetricsWriter,
    cfg: T5Config,
    params: dict,
    task: str,
    train_batch_size: int,
    config: EvalConfig,
) -> Hook:
    """The task's metrics for the current prompt, left in `info.results["eval_metrics"]`."""
    eval_task = config.task or task

    def evaluate(info: StepInfo) -> None:
        writer.console(f"evaluating step {info.step} on {eval_task} {config.split}")
        metrics = evaluate_prompt(
            cfg,
            params,
            info.state.prompt,
            task=eval_task,
            split=config.split,
            feature_lengths=config.feature_lengths,
            batch_size=config.batch_size or train_batch_size,
            max_examples=config.max_examples,
        )
        writer.console(f"eval at step {info.step}: " + _format_metrics(metrics))
        writer.write("eval", info.step, {"split": config.split, **metrics})
        info.results["eval_metrics"] = metrics

    return evaluate


def _checkpoint_hook(checkpointer: TrainCheckpointer, run_info: dict) -> Hook:
    """Save the state; this step's eval metrics (if it evaluated) decide the best step."""

    def save(info: StepInfo) -> None:
        checkpointer.save(info.step, info.state, run_info, info.results.get("eval_metrics"))

    return save


def _check_resumable(saved: dict, current: dict, model_dir: storage.PathLike) -> None:
    for key in ("task", "seed", "batch_size", "feature_lengths"):
        if saved.get(key) != current[key]:
            raise ValueError(
                f"{model_dir} holds a run with {key}={saved.get(key)!r}, but this run asks for "
                f"{key}={current[key]!r}; use another model_dir or the same settings"
            )


def _format_metrics(metrics: Mapping[str, float]) -> str:
    return "  ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(metrics.items())
    )
