"""The prompt's loss and gradient, and the jittable train, eval and score steps.

The frozen params are always a separate, non-differentiated argument: gradients
are taken with respect to the prompt (or prompt bank) alone, and the train state
holds nothing but the prompt, its optimizer slots and the step.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from softprompt_jax.model import T5Config
from softprompt_jax.prompts import prompted_logits
from softprompt_jax.train.loss import loss_weights, token_cross_entropy, weighted_cross_entropy

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """How the training loss is computed; the defaults are T5X's (official prompt tuning).

    `prompt_loss_and_grad` defaults instead to the Hugging Face definition
    (z_loss 0, mean over target tokens, no dropout) so it compares with PEFT.
    Dropout (`cfg.dropout_rate`) hits the prompt too when `prompt_dropout` is on: the
    encoder applies input dropout to the prompt and the token embeddings together, as
    T5X does; off, only the token embeddings (and the network inside) are dropped.
    """

    z_loss: float = 1e-4
    label_smoothing: float = 0.0
    normalization: str = "sum"
    enable_dropout: bool = True
    prompt_dropout: bool = True


class PromptTrainState(flax.struct.PyTreeNode):
    """What training changes: the prompt (or bank), its optimizer state and the step."""

    step: jax.Array
    prompt: jax.Array
    opt_state: optax.OptState


def init_train_state(
    prompt: jax.Array, optimizer: optax.GradientTransformation
) -> PromptTrainState:
    """A step-0 train state; the prompt and its slots are float32."""
    prompt = jnp.asarray(prompt, jnp.float32)
    return PromptTrainState(
        step=jnp.zeros((), jnp.int32), prompt=prompt, opt_state=optimizer.init(prompt)
    )


def prompt_loss(
    prompt: jax.Array,
    cfg: T5Config,
    params: Mapping[str, Any],
    batch: Batch,
    loss_config: LossConfig,
    dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """The scalar loss of a prompt on a T5X feature batch, with metrics (prompt first for grad)."""
    logits = prompted_logits(
        cfg,
        params,
        prompt,
        batch["encoder_input_tokens"],
        batch["decoder_input_tokens"],
        batch.get("prompt_ids"),
        decoder_target_tokens=batch["decoder_target_tokens"],
        enable_dropout=loss_config.enable_dropout,
        dropout_rng=dropout_rng,
        prompt_dropout=loss_config.prompt_dropout,
    )
    return weighted_cross_entropy(
        logits,
        batch["decoder_target_tokens"],
        loss_weights(batch),
        z_loss=loss_config.z_loss,
        label_smoothing=loss_config.label_smoothing,
        normalization=loss_config.normalization,
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "cfg",
        "z_loss",
        "label_smoothing",
        "loss_normalization",
        "enable_dropout",
        "prompt_dropout",
    ),
)
def prompt_loss_and_grad(
    cfg: T5Config,
    params: Mapping[str, Any],
    prompt: jax.Array,
    batch: Batch,
    *,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    loss_normalization: str = "mean_tokens",
    enable_dropout: bool = False,
    dropout_rng: jax.Array | None = None,
    prompt_dropout: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """`(loss, d loss / d prompt)`; defaults give HF's mean CE over non-padding targets.

    Pass `z_loss=1e-4, loss_normalization="sum"` for T5X's training loss, and
    `enable_dropout=True` with a `dropout_rng` for `cfg.dropout_rate` dropout
    (`prompt_dropout=False` keeps input dropout off the prompt rows).
    """
    loss_config = LossConfig(
        z_loss=z_loss,
        label_smoothing=label_smoothing,
        normalization=loss_normalization,
        enable_dropout=enable_dropout,
        prompt_dropout=prompt_dropout,
    )
    (loss, _), grad = jax.value_and_grad(prompt_loss, has_aux=True)(
        prompt, cfg, params, batch, loss_config, dropout_rng
    )
    return loss, grad


TrainStep = Callable[
    [PromptTrainState, Mapping[str, Any], Batch, jax.Array], tuple[PromptTrainState, Metrics]
]


def make_train_step(
    cfg: T5Config, optimizer: optax.GradientTransformation, loss_config: LossConfig = LossConfig()
) -> TrainStep:
    """`train_step(state, frozen_params, batch, rng) -> (state, metrics)`, ready for `jax.jit`.

    `rng` is the base dropout key; the step folds in `state.step` as T5X does, so
    the same key may be passed every step. A `prompt_ids` feature in the batch
    selects a row of a prompt bank per example (mixed-task training).
    """

    def train_step(
        state: PromptTrainState, frozen_params: Mapping[str, Any], batch: Batch, rng: jax.Array
    ) -> tuple[PromptTrainState, Metrics]:
        dropout_rng = jax.random.fold_in(rng, state.step)
        (_, metrics), grad = jax.value_and_grad(prompt_loss, has_aux=True)(
            state.prompt, cfg, frozen_params, batch, loss_config, dropout_rng
        )
        updates, opt_state = optimizer.update(grad, state.opt_state, state.prompt)
        new_state = state.replace(
            step=state.step + 1,
            prompt=optax.apply_updates(state.prompt, updates),
            opt_state=opt_state,
        )
        return new_state, {**metrics, "grad_norm": optax.tree.norm(grad)}

    return train_step


def make_eval_step(
    cfg: T5Config, loss_config: LossConfig = LossConfig()
) -> Callable[[PromptTrainState, Mapping[str, Any], Batch], Metrics]:
    """`eval_step(state, frozen_params, batch) -> metrics`: the training loss without dropout."""
    eval_config = dataclasses.replace(loss_config, enable_dropout=False)

    def eval_step(
        state: PromptTrainState, frozen_params: Mapping[str, Any], batch: Batch
    ) -> Metrics:
        return prompt_loss(state.prompt, cfg, frozen_params, batch, eval_config)[1]

    return eval_step


@functools.partial(jax.jit, static_argnames="cfg")
def score_batch(
    cfg: T5Config,
    params: Mapping[str, Any],
    prompt: jax.Array,
    batch: Batch,
    prompt_ids: jax.Array | None = None,
) -> jax.Array:
    """Per-example sum of target log-likelihoods `[batch]` (T5X `score_batch`, no z-loss)."""
    if prompt_ids is None:
        prompt_ids = batch.get("prompt_ids")
    logits = prompted_logits(
        cfg,
        params,
        prompt,
        batch["encoder_input_tokens"],
        batch["decoder_input_tokens"],
        prompt_ids,
        decoder_target_tokens=batch["decoder_target_tokens"],
    )
    token_loss, _ = token_cross_entropy(logits, batch["decoder_target_tokens"])
    return -jnp.sum(token_loss * loss_weights(batch), axis=-1)
