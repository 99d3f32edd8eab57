"""The offline demo: prompt tuning makes a frozen model do a task it is not told about.

1. Pre-train a tiny T5 from scratch on several byte-level tasks, each selected
   by a text prefix (`reverse: abcd` -> `dcba`, `sort: ...`, ...). This is the
   only step that trains all weights; it stands in for a pretrained checkpoint.
2. Freeze it and save it as a checkpoint.
3. Evaluate on one task *without* its prefix: the model cannot know which task
   is meant, so it mostly fails. Then prompt-tune a soft prompt (the real
   trainer, frozen weights) on that prefix-less task and evaluate again.
4. One frozen model, many tasks: train a prompt per task of the prefix-less mixture in one
   run, then answer one batch that mixes all three tasks, each example with its task's
   prompt.

Runs in a few minutes on a laptop CPU; nothing is downloaded.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from softprompt_jax.checkpoints.pretrained import load_pretrained, save_pretrained
from softprompt_jax.inference import ids_to_texts, predict_tokens
from softprompt_jax.losses import LossConfig, loss_weights, weighted_cross_entropy
from softprompt_jax.model.config import T5Config
from softprompt_jax.model.network import T5, init_params
from softprompt_jax.prompt_bank import PromptBank
from softprompt_jax.prompt_eval import evaluate_prompt
from softprompt_jax.tasks.demo import DEMO_TASKS, TASKLESS_DEMO_MIXTURE, VOCABULARY
from softprompt_jax.tasks.evaluation import load_examples
from softprompt_jax.train.data import train_batches
from softprompt_jax.train.optimizer import AdafactorConfig
from softprompt_jax.train.trainer import (
    CheckpointConfig,
    EvalConfig,
    LogConfig,
    PromptSpec,
    train,
)

# A small T5 1.1 over seqio's byte vocabulary (259 ids, padded to a multiple of 128).
DEMO_MODEL = T5Config(
    vocab_size=384,
    emb_dim=64,
    num_heads=4,
    head_dim=16,
    mlp_dim=128,
    num_encoder_layers=2,
    num_decoder_layers=2,
    dtype="float32",
)
FEATURE_LENGTHS = {"inputs": 16, "targets": 4}
TUNED_TASK = "min"


def pretrain(model_dir: Path, steps: int, batch_size: int, seed: int, log) -> Path:
    """Train every weight on the prefixed multitask mixture; save a frozen checkpoint."""
    checkpoint = model_dir / "pretrained"
    if checkpoint.exists():
        log(f"reusing the pre-trained model in {checkpoint}")
        return checkpoint
    params = init_params(DEMO_MODEL, seed)
    warmup = min(50, steps // 8)
    tx = optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, 3e-3, warmup, steps, 1e-4), weight_decay=0.0
    )
    opt_state = tx.init(params)
    model = T5(DEMO_MODEL)

    def loss_fn(params, batch):
        logits = model.apply(
            {"params": params},
            batch["encoder_input_tokens"],
            batch["decoder_input_tokens"],
            batch["decoder_target_tokens"],
            enable_dropout=False,
        )
        return weighted_cross_entropy(
            logits, batch["decoder_target_tokens"], loss_weights(batch), normalization="mean_tokens"
        )

    @jax.jit
    def step(params, opt_state, batch):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batches = train_batches("demo_multitask", FEATURE_LENGTHS, batch_size, seed=seed)
    start = time.perf_counter()
    for i in range(1, steps + 1):
        batch = {k: jnp.asarray(v) for k, v in next(batches).items()}
        params, opt_state, loss = step(params, opt_state, batch)
        if i % 100 == 0 or i == steps:
            log(
                f"  pre-training step {i}/{steps}  loss {float(loss):.4f}  "
                f"({time.perf_counter() - start:.0f}s)"
            )
    save_pretrained(checkpoint, DEMO_MODEL, params)
    return checkpoint


def run_demo(
    workdir: str | Path = "softprompt_demo",
    *,
    pretrain_steps: int = 400,
    tune_steps: int = 200,
    batch_size: int = 64,
    prompt_length: int = 8,
    eval_examples: int = 200,
    seed: int = 0,
) -> dict[str, float]:
    """Run the whole demo; prints progress and a results table, returns the accuracies."""
    workdir = Path(workdir)
    log = lambda line: print(line, flush=True)
    log(
        f"[1/4] pre-training a tiny T5 ({DEMO_MODEL.emb_dim}d, "
        f"{DEMO_MODEL.num_encoder_layers}+{DEMO_MODEL.num_decoder_layers} layers) "
        "on prefixed byte-level tasks"
    )
    checkpoint = pretrain(workdir, pretrain_steps, batch_size, seed, log)
    cfg, params = load_pretrained(checkpoint, dtype="float32")

    taskless = f"taskless_demo_{TUNED_TASK}"

    def tune(model_dir: Path, task: str, **settings):
        """The real trainer with the paper's optimizer on the frozen checkpoint."""
        if model_dir.exists():  # a previous demo's run: start afresh
            shutil.rmtree(model_dir)
        return train(
            model_dir=str(model_dir),
            checkpoint_path=str(checkpoint),
            task=task,
            feature_lengths=FEATURE_LENGTHS,
            train_steps=tune_steps,
            batch_size=batch_size,
            dtype="float32",
            seed=seed,
            prompt=PromptSpec(method="sampled_vocab", length=prompt_length, seed=seed),
            optimizer=AdafactorConfig(),
            loss=LossConfig(z_loss=1e-4, normalization="sum"),
            logging=LogConfig(period=50, tensorboard=False),
            evaluation=EvalConfig(
                period=tune_steps,
                max_examples=eval_examples,
                batch_size=100,
                feature_lengths=FEATURE_LENGTHS,
            ),
            checkpointing=CheckpointConfig(period=tune_steps),
            **settings,
        )

    evaluate = lambda task, prompt: evaluate_prompt(
        cfg,
        params,
        prompt,
        task=task,
        split="validation",
        feature_lengths=FEATURE_LENGTHS,
        batch_size=100,
        max_examples=eval_examples,
    )["accuracy"]
    empty_prompt = jnp.zeros((0, cfg.emb_dim), jnp.float32)
    with_prefix = evaluate(f"demo_{TUNED_TASK}", empty_prompt)
    before = evaluate(taskless, empty_prompt)
    log(
        f"[2/4] frozen model, '{TUNED_TASK}' without its prefix: accuracy {before:.1f}% "
        f"(with the prefix typed in: {with_prefix:.1f}%)"
    )

    log(
        f"[3/4] prompt tuning a {prompt_length}-token soft prompt on {taskless} "
        "(frozen weights, Adafactor lr 0.3)"
    )
    prompt_dir = workdir / f"prompt_{TUNED_TASK}"
    result = tune(prompt_dir, taskless)
    after = result.eval_metrics["accuracy"]
    rows = [
        ("frozen model, task prefix typed in", with_prefix),
        ("frozen model, no prefix", before),
        (f"frozen model + tuned {prompt_length}-token prompt", after),
    ]
    log(f"\nResults on {eval_examples} validation examples of '{TUNED_TASK}':")
    log(f"  {'setting':<42} accuracy")
    for name, value in rows:
        log(f"  {name:<42} {value:6.1f}%")
    log(f"the prompt's checkpoints and metrics.jsonl are in {prompt_dir}")

    log(
        f"\n[4/4] one frozen model, many tasks: a {prompt_length}-token prompt per task of "
        f"{TASKLESS_DEMO_MIXTURE}, trained in one run, then one batch mixing all tasks"
    )
    bank_dir = workdir / "prompt_per_task"
    bank = tune(bank_dir, TASKLESS_DEMO_MIXTURE, prompt_per_task=True).prompt
    mixed = mixed_batch_accuracy(cfg, params, bank, eval_examples)
    log(f"\nOne mixed batch of {eval_examples} validation examples per task:")
    log(f"  {'task':<24} accuracy (each example with its task's prompt)")
    for task, value in mixed.items():
        log(f"  {task:<24} {value:6.1f}%")
    log(f"the bank's checkpoints and metrics.jsonl are in {bank_dir}")
    return {"with_prefix": with_prefix, "before": before, "after": after, **mixed}


def mixed_batch_accuracy(
    cfg: T5Config, params: dict, bank: PromptBank, examples_per_task: int
) -> dict[str, float]:
    """Exact-match accuracy per task when all tasks' examples share one decoded batch."""
    tasks = [f"taskless_demo_{name}" for name in DEMO_TASKS]
    examples = {
        task: load_examples(task, "validation", FEATURE_LENGTHS, examples_per_task)
        for task in tasks
    }
    inputs = [ex["inputs"] for task in tasks for ex in examples[task]]
    tokens = jnp.asarray(
        [list(ids) + [0] * (FEATURE_LENGTHS["inputs"] - len(ids)) for ids in inputs], jnp.int32
    )
    names = [task for task in tasks for _ in examples[task]]
    decoded = predict_tokens(
        cfg, params, bank, tokens, bank.ids(names), max_length=FEATURE_LENGTHS["targets"]
    )
    predictions = iter(ids_to_texts(VOCABULARY, decoded))
    return {
        task: 100.0
        * sum(next(predictions) == ex["targets_pretokenized"].decode() for ex in examples[task])
        / len(examples[task])
        for task in tasks
    }
