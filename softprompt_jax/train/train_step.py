"""The jittable train and eval steps, and the train state they carry.

The frozen params are always a separate, non-differentiated argument: gradients
are taken with respect to the prompt (or prompt bank) alone, and the train state
holds nothing but the prompt, its optimizer slots and the step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from softprompt_jax.losses import LossConfig, prompt_loss
from softprompt_jax.model import T5Config
from softprompt_jax.prompt_bank import PromptBank

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


class PromptTrainState(flax.struct.PyTreeNode):
    """What training changes: the prompt (or bank), its optimizer state and the step."""

    step: jax.Array
    prompt: jax.Array | PromptBank
    opt_state: optax.OptState


def init_train_state(
    prompt: jax.Array | PromptBank, optimizer: optax.GradientTransformation
) -> PromptTrainState:
    """A step-0 train state; the prompt (or each prompt of a bank) and its slots are float32."""
    prompt = jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float32), prompt)
    return PromptTrainState(
        step=jnp.zeros((), jnp.int32), prompt=prompt, opt_state=optimizer.init(prompt)
    )


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
