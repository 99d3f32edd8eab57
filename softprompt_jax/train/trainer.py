"""The prompt-tuning loop: load the frozen model, train the prompt, evaluate, checkpoint.

Plain keyword arguments and dataclasses; gin binds them at the command line
(`softprompt_jax.gin_config`). Restarting the same command resumes from the
last finished checkpoint in `model_dir` and reproduces the uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import time
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
    log_period: int = 100,
    eval_period: int = 1000,
    eval_task: str | None = None,
    eval_split: str = "validation",
    eval_examples: int | None = None,
    eval_batch_size: int | None = None,
    checkpoint_period: int = 1000,
    keep_checkpoints: int = 3,
    best_metric: str | None = None,
    best_mode: str = "max",
    tensorboard: bool = True,
    mesh_data: int = -1,
    mesh_model: int = 1,
    activation_partitioning_dims: int = 1,
    parameter_partitioning_dims: int = 1,
) -> TrainResult:
    """Prompt-tune `task` on the frozen model at `checkpoint_path`; artefacts go to `model_dir`.

    The frozen params are sharded over a `(data, model)` mesh of all devices (`mesh_data=-1`
    takes what `mesh_model` leaves); the prompt and its optimizer state are replicated and
    each process feeds its share of every global batch. The partitioning dims pick T5X's
    standard logical-axis rules; `parameter_partitioning_dims=2` also splits the weights'
    `embed` dimension over `data` (FSDP-like), for when frozen weights dominate memory.
    """
    for name, value in (
        ("train_steps", train_steps),
        ("batch_size", batch_size),
        ("log_period", log_period),
        ("eval_period", eval_period),
        ("checkpoint_period", checkpoint_period),
    ):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    # Everything that can fail on bad input happens before anything is written.
    mesh = make_mesh(mesh_data, mesh_model)
    rules = standard_logical_axis_rules(activation_partitioning_dims, parameter_partitioning_dims)
    cfg, params = load_frozen_model(
        checkpoint_path, dtype, dropout_rate, model_overrides, mesh, rules
    )
    local_batch = local_batch_size(batch_size, mesh)
    tx = make_optimizer(optimizer)
    state = place(init_train_state(make_prompt(prompt, params, task), tx), replicated(mesh))
    model_dir_path = storage.as_path(model_dir)
    model_dir_path.mkdir(parents=True, exist_ok=True)
    writer = MetricsWriter(model_dir_path, tensorboard=tensorboard)
    run_info = {
        "task": task,
        "seed": seed,
        "batch_size": batch_size,
        "feature_lengths": dict(feature_lengths),
    }

    checkpointer = TrainCheckpointer(
        model_dir_path, keep=keep_checkpoints, best_metric=best_metric, best_mode=best_mode
    )
    start_step = checkpointer.latest_step() or 0
    if start_step:
        state, saved_info = checkpointer.restore(state, start_step)
        _check_resumable(saved_info, run_info, model_dir_path)
        writer.console(f"resuming from step {start_step} in {model_dir_path}")

    evaluate = lambda prompt_now: evaluate_prompt(
        cfg,
        params,
        prompt_now,
        task=eval_task or task,
        split=eval_split,
        feature_lengths=feature_lengths,
        batch_size=eval_batch_size or batch_size,
        max_examples=eval_examples,
    )
    step_fn = partitioned_train_step(
        make_train_step(cfg, tx, loss), mesh, param_shardings(cfg, mesh, rules), rules=rules
    )
    rng = place(jax.random.PRNGKey(seed), replicated(mesh))
    batches = train_batches(
        task,
        feature_lengths,
        local_batch,
        seed=seed,
        start_step=start_step,
        shard_info=seqio_shard_info(mesh),
    )
    writer.console(
        f"training a {prompt.length}-token prompt on {task}: steps {start_step}->{train_steps}, "
        f"batch {batch_size}, model {cfg.emb_dim}d x {cfg.num_encoder_layers} layers ({dtype}), "
        f"mesh data={mesh.shape['data']} x model={mesh.shape['model']}"
    )

    train_loss, eval_metrics = None, {}
    window_start, window_steps, window_loss = time.perf_counter(), 0, []
    for step in range(start_step, train_steps):
        state, metrics = step_fn(state, params, global_batch(next(batches), mesh, rules), rng)
        window_steps += 1
        window_loss.append(metrics["loss"])
        done = step + 1
        if done % log_period == 0 or done == train_steps:
            train_loss = float(np.mean(to_host(window_loss)))
            elapsed = time.perf_counter() - window_start
            examples_per_second = window_steps * batch_size / elapsed
            eta = (train_steps - done) * elapsed / window_steps
            writer.console(
                f"step {done}/{train_steps}  loss {train_loss:.4f}  "
                f"{examples_per_second:.1f} ex/s  ETA {format_eta(eta)}"
            )
            writer.write(
                "train", done, {"loss": train_loss, "examples_per_second": examples_per_second}
            )
            window_start, window_steps, window_loss = time.perf_counter(), 0, []
        step_metrics = None
        if done % eval_period == 0 or done == train_steps:
            eval_metrics = evaluate(state.prompt)
            step_metrics = eval_metrics
            writer.console(f"eval at step {done}: " + _format_metrics(eval_metrics))
            writer.write("eval", done, {"split": eval_split, **eval_metrics})
            window_start = time.perf_counter()  # do not count eval time as training time
        if done % checkpoint_period == 0 or done == train_steps:
            checkpointer.save(done, state, run_info, step_metrics)
    if start_step >= train_steps:
        writer.console(f"{model_dir_path} already holds step {start_step} >= {train_steps}")
    checkpointer.close()
    return TrainResult(
        max(start_step, train_steps), to_host(state.prompt), train_loss, eval_metrics
    )


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
