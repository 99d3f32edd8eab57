"""Adafactor as in Lester et al. (2021), partitioned so that only prompts can move.

`optax.adafactor` (optax 0.2.8) computes, per prompt update k = 0, 1, ...:

    beta2 = 1 - (k - decay_offset + 1) ** -decay_rate
    v     = beta2 * v + (1 - beta2) * (g**2 + 1e-30)        (factored when both dims >= 128)
    u     = g / sqrt(v);  u /= max(1, rms(u) / clipping_threshold)
    p     = p - lr * u - weight_decay_rate * p

which is T5X's `adafactor.py` update `p * (1 - wd) - lr * u` term for term: the
weight decay is added after the learning-rate scaling, so it is decoupled and not
scaled by lr. T5X uses its *global* step `t` instead of `k`, with
`beta2 = 1 - (t - t5x_step_offset + 1) ** -0.8`, and prompt tuning continues the
pretrained checkpoint's step (t = 1_100_000 + k for the LM-adapted models).

`step_offset` here is that starting global step, i.e. `decay_offset = -step_offset`.
(Note the sign: T5X's own `Adafactor(step_offset=...)` is *subtracted* from the
global step; ours is the step training starts at.) The default is 0, a fresh
Adafactor schedule (beta2 = 0 on the first update, as `optax`, Hugging Face's
`Adafactor` and T5X fine-tuning from step 0 do), because the frozen checkpoint's
step is unknown for Hugging Face weights and should not silently change the
optimizer. Set `step_offset=1_100_000` to reproduce the official runs on the
lm100k checkpoints: beta2 then starts at 1 - 1.5e-5, the first raw update is
about 261 * sign(g), so update clipping is active and every step moves the
prompt by an RMS-`lr` step for most of a 30k-step run.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

PROMPT_LABEL, BANK_LABEL, FROZEN_LABEL = "prompt", "bank", "frozen"


@dataclasses.dataclass(frozen=True)
class AdafactorConfig:
    """The paper's Adafactor: constant lr 0.3, decay 0.8, no parameter scaling, wd 1e-5."""

    learning_rate: float = 0.3
    decay_rate: float = 0.8
    step_offset: int = 0
    clipping_threshold: float = 1.0
    weight_decay_rate: float = 1e-5
    multiply_by_parameter_scale: bool = False
    min_dim_size_to_factor: int = 128
    epsilon: float = 1e-30


def adafactor(config: AdafactorConfig = AdafactorConfig()) -> optax.GradientTransformation:
    """`optax.adafactor` with T5X's settings and step convention (see the module doc)."""
    return optax.adafactor(
        learning_rate=config.learning_rate,
        min_dim_size_to_factor=config.min_dim_size_to_factor,
        decay_rate=config.decay_rate,
        decay_offset=-config.step_offset,
        multiply_by_parameter_scale=config.multiply_by_parameter_scale,
        clipping_threshold=config.clipping_threshold,
        weight_decay_rate=config.weight_decay_rate,
        eps=config.epsilon,
    )


def prompt_labels(tree: object) -> object:
    """Label each leaf `prompt`, `bank` (a stacked `[N, P, d]` prompt bank) or `frozen`.

    The train state hands the optimizer the prompt array (or `PromptBank`, whose arrays sit
    under its `prompts` attribute) itself; if a whole tree such as a `PromptedT5`'s is
    passed instead, everything not under a key or attribute named `prompt` is frozen.
    """

    def label(path: tuple, leaf: object) -> str:
        names = {getattr(key, "key", getattr(key, "name", None)) for key in path}
        if path and not names & {PROMPT_LABEL, "prompts"}:
            return FROZEN_LABEL
        return BANK_LABEL if jnp.ndim(leaf) == 3 else PROMPT_LABEL

    return jax.tree_util.tree_map_with_path(label, tree)


def make_optimizer(
    config: AdafactorConfig = AdafactorConfig(),
    prompt_optimizer: optax.GradientTransformation | None = None,
) -> optax.GradientTransformation:
    """The paper's Adafactor (or `prompt_optimizer`) for prompt leaves only (`prompt_only`)."""
    return prompt_only(prompt_optimizer or adafactor(config))


def prompt_only(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """`optimizer` on the prompt leaves of any tree; every other leaf stays bit-identical.

    Prompt leaves are a bare array, or any leaf under a key named `prompt` (a `PromptedT5`
    tree's `encoder/prompt/prompt/prompt`); a 3-D one is a stacked bank, each of whose
    prompts gets its own optimizer state (`per_prompt`). Other leaves get no optimizer state and an
    update of -0.0, which `optax.apply_updates` adds as an exact identity (+0.0 would turn
    a -0.0 weight into +0.0). Their gradients are never read, so under `jax.jit` XLA drops
    the weight-gradient computation. Not `optax.masked` alone: that passes the raw
    gradients of masked-out leaves through as their updates, which moves them.
    """
    return optax.transforms.partition(
        {
            PROMPT_LABEL: optimizer,
            BANK_LABEL: per_prompt(optimizer),
            FROZEN_LABEL: _keep_unchanged(),
        },
        prompt_labels,
    )


def per_prompt(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """`optimizer` run on each prompt of a stacked `[N, P, d]` bank on its own (vmapped).

    Adafactor's moments, update clipping and weight decay are then per prompt, so a prompt
    trained in a stacked bank moves as it would alone on the same examples.
    """

    def init(params):  # no stacked bank in the tree (all masked out): no state at all
        return jax.vmap(optimizer.init)(params) if jax.tree.leaves(params) else optax.EmptyState()

    def update(updates, state, params=None):
        if not jax.tree.leaves(updates):
            return updates, state
        return jax.vmap(optimizer.update)(updates, state, params)

    return optax.GradientTransformation(init, update)


def _keep_unchanged() -> optax.GradientTransformation:
    """Stateless; updates of -0.0 (the additive identity, also for -0.0 itself)."""

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map(lambda u: jnp.full_like(u, -0.0), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
