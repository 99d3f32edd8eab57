"""A Flax T5 that owns its prompt as a parameter, for users' own Flax training loops.

`PromptedT5(cfg, prompt_length=...)` has T5X's parameter tree (`token_embedder`,
`encoder/layers_N/...`, `decoder/...`) plus the prompt at the official prompt-tuning code's
path, `encoder/prompt/prompt/prompt` (its numpy exports are named after it,
`encoder.prompt.prompt.prompt`), so official checkpoints map onto it without renaming. Its
logits equal `prompted_logits` with the same prompt. Train it with a whole-tree
`jax.grad` and `prompt_only(optimizer)` (see `train/optimizer.py`): only the prompt moves,
and XLA drops the unused weight gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from softprompt_jax.model import T5, T5Config
from softprompt_jax.model.layers import Embed
from softprompt_jax.model.network import Decoder, Encoder
from softprompt_jax.prompts import BANK_AXES, PROMPT_AXES, prepend_prompt

PROMPT_PATH = ("encoder", "prompt", "prompt", "prompt")
Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


def paper_uniform(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """U[-0.5, 0.5], the paper's random initialisation."""
    return jax.random.uniform(key, shape, dtype, -0.5, 0.5)


class Prompt(nn.Module):
    """The trainable prompt `[length, emb_dim]`, or a bank `[num_prompts, length, emb_dim]`."""

    shape: tuple[int, ...]
    init_fn: Initializer

    @nn.compact
    def __call__(self) -> jax.Array:
        axes = PROMPT_AXES if len(self.shape) == 2 else BANK_AXES
        init = nn.with_logical_partitioning(self.init_fn, axes)
        return self.param("prompt", init, self.shape, jnp.float32)


class _PromptWrapper(nn.Module):
    """The official training wrapper's scope: the param sits at `prompt/prompt/prompt`."""

    shape: tuple[int, ...]
    init_fn: Initializer

    @nn.compact
    def __call__(self) -> jax.Array:
        return Prompt(self.shape, self.init_fn, name="prompt")()


class PromptEncoder(nn.Module):
    """T5's encoder stack (its params at `encoder/...`) with the prompt beside its layers."""

    config: T5Config
    prompt_shape: tuple[int, ...]
    prompt_init: Initializer

    def setup(self) -> None:
        self.stack = Encoder(self.config)
        nn.share_scope(self, self.stack)  # the stack's params keep T5X's names
        self.prompt = _PromptWrapper(self.prompt_shape, self.prompt_init)

    def __call__(self, embeddings: jax.Array, mask: jax.Array, **kwargs: Any) -> jax.Array:
        return self.stack(embeddings, mask, **kwargs)


class PromptedT5(T5):
    """T5 with a trainable prompt (or bank, `num_prompts`) prepended to the encoder input.

    `prompt_init` is a Flax initializer or an array of the prompt's shape (e.g. from
    `sp.init_prompt` or `sp.load_prompt`); by default U[-0.5, 0.5] as in the paper.
    """

    prompt_length: int = 100
    num_prompts: int | None = None
    prompt_init: Initializer | np.ndarray | jax.Array | None = None

    def setup(self) -> None:
        cfg = self.config
        if self.prompt_length <= 0:
            raise ValueError(f"prompt_length must be positive, got {self.prompt_length}")
        self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, cfg.compute_dtype)
        self.encoder = PromptEncoder(cfg, self.prompt_shape, _initializer(self.prompt_init))
        self.decoder = Decoder(cfg, shared_embedding=self.token_embedder)

    @property
    def prompt_shape(self) -> tuple[int, ...]:
        bank = () if self.num_prompts is None else (self.num_prompts,)
        return (*bank, self.prompt_length, self.config.emb_dim)

    def __call__(
        self,
        encoder_input_tokens: jax.Array,
        decoder_input_tokens: jax.Array,
        decoder_target_tokens: jax.Array | None = None,
        prompt_ids: jax.Array | None = None,
        *,
        enable_dropout: bool = False,
        prompt_dropout: bool = True,
    ) -> jax.Array:
        """Teacher-forced float32 logits `[batch, target_len, vocab]`, as `prompted_logits`."""
        embeddings, mask = prepend_prompt(
            self.encoder.prompt(),
            self.embed(encoder_input_tokens),
            encoder_input_tokens > 0,
            prompt_ids,
        )
        return super().__call__(
            None,
            decoder_input_tokens,
            decoder_target_tokens,
            encoder_input_embeddings=embeddings,
            encoder_mask=mask,
            enable_dropout=enable_dropout,
            undropped_prefix=0 if prompt_dropout else self.prompt_length,
        )


def _initializer(init: Initializer | np.ndarray | jax.Array | None) -> Initializer:
    if init is None:
        return paper_uniform
    if callable(init):
        return init
    array = jnp.asarray(init, jnp.float32)

    def from_array(_key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32):
        if array.shape != tuple(shape):
            raise ValueError(f"prompt_init has shape {array.shape}; the model expects {shape}")
        return array.astype(dtype)

    return from_array


def join_prompt(frozen_params: dict, prompt: jax.Array) -> dict:
    """The whole `PromptedT5` tree: T5X-named frozen params with the prompt at its path."""
    encoder = {**frozen_params["encoder"], "prompt": {"prompt": {"prompt": prompt}}}
    return {**frozen_params, "encoder": encoder}


def split_prompt(params: dict) -> tuple[dict, jax.Array]:
    """`(frozen_params, prompt)` of a `PromptedT5` tree (the inverse of `join_prompt`)."""
    encoder = dict(params["encoder"])
    prompt = encoder.pop("prompt")["prompt"]["prompt"]
    return {**params, "encoder": encoder}, prompt
