"""Decoder-only architectures as frozen dataclasses: GPT-2 and the Llama family.

Like `T5Config` they are hashable (jit static arguments), carry the compute `dtype`
and the run-time settings `scan_layers` / `remat_policy`. `LlamaConfig` holds the
fields Llama, Mistral and Qwen2 checkpoints share (RoPE base, RMSNorm epsilon,
grouped-query attention, attention biases, tied embeddings, head_dim, sliding window).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from softprompt_jax.errors import SoftpromptError
from softprompt_jax.model.config import REMAT_POLICIES

GPT2_ACTIVATIONS = ("gelu_new", "gelu", "relu")
LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2")
# How a decoder-only run computes, not what the network is (as `config.RUN_TIME_FIELDS`).
DECODER_RUN_TIME_FIELDS = frozenset({"dtype", "scan_layers", "remat_policy"})


class _DecoderConfigMethods:
    """What every decoder-only config offers beside its fields (as `T5Config` does)."""

    dtype: str
    remat_policy: str

    def _check(self) -> None:
        if self.remat_policy not in REMAT_POLICIES:
            raise SoftpromptError(
                f"remat_policy={self.remat_policy!r}; expected one of {REMAT_POLICIES}"
            )

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def architecture(self) -> dict:
        """The fields that define the network and its weights (no run-time settings)."""
        return {k: v for k, v in self.to_dict().items() if k not in DECODER_RUN_TIME_FIELDS}


@dataclasses.dataclass(frozen=True)
class GPT2Config(_DecoderConfigMethods):
    """GPT-2: learned positions, pre-LayerNorm blocks, GELU MLP, logits via the tied embedding."""

    vocab_size: int = 50257
    emb_dim: int = 768
    num_heads: int = 12
    num_layers: int = 12
    mlp_dim: int = 3072
    max_position_embeddings: int = 1024
    layer_norm_epsilon: float = 1e-5
    activation: str = "gelu_new"
    dtype: str = "bfloat16"
    scan_layers: bool = False
    remat_policy: str = "none"

    def __post_init__(self) -> None:
        self._check()
        if self.activation not in GPT2_ACTIVATIONS:
            raise SoftpromptError(
                f"GPT-2 activation {self.activation!r}; expected one of {GPT2_ACTIVATIONS}"
            )
        if self.emb_dim % self.num_heads:
            raise SoftpromptError(
                f"GPT-2 emb_dim {self.emb_dim} is not divisible by num_heads {self.num_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def tie_word_embeddings(self) -> bool:
        return True


@dataclasses.dataclass(frozen=True)
class LlamaConfig(_DecoderConfigMethods):
    """Llama / Mistral / Qwen2: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention.

    `qkv_bias` / `out_bias`: biases on the query-key-value and output projections (Llama's
    `attention_bias` sets both, Qwen2 has only the first); `sliding_window`: Mistral's window
    (a key is seen when `query - key < sliding_window`), None for full attention;
    `rope_scaling_factor` (None: plain RoPE) and the three after it: Llama 3.x's
    `rope_type='llama3'` frequency scaling (`rope_scaling` of its config.json).
    """

    vocab_size: int = 32000
    emb_dim: int = 4096
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    mlp_dim: int = 11008
    num_layers: int = 32
    rope_theta: float = 10000.0
    rope_scaling_factor: float | None = None
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_positions: int = 8192
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 4096
    model_type: str = "llama"
    dtype: str = "bfloat16"
    scan_layers: bool = False
    remat_policy: str = "none"

    def __post_init__(self) -> None:
        self._check()
        if self.num_heads % self.num_kv_heads:
            raise SoftpromptError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.rope_scaling_factor is not None and not (
            self.rope_high_freq_factor > self.rope_low_freq_factor > 0
            and self.rope_scaling_factor > 0
        ):
            raise SoftpromptError(
                f"llama3 rope_scaling needs factor > 0 and high_freq_factor > low_freq_factor "
                f"> 0; got factor={self.rope_scaling_factor}, low_freq_factor="
                f"{self.rope_low_freq_factor}, high_freq_factor={self.rope_high_freq_factor}"
            )
        if self.head_dim % 2:
            raise SoftpromptError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.model_type not in LLAMA_MODEL_TYPES:
            raise SoftpromptError(
                f"model_type {self.model_type!r}; expected one of {LLAMA_MODEL_TYPES}"
            )


DecoderOnlyConfig = GPT2Config | LlamaConfig


def check_positions(cfg: Any, virtual: int, tokens: int, new_tokens: int = 0) -> None:
    """Refuse a GPT-2 sequence longer than its learned position table (reading past it is NaN).

    `virtual` prompt or prefix positions, `tokens` input (and target) tokens, `new_tokens`
    generated ones. Shapes are static, so this runs in Python, at trace time under jit.
    """
    total = virtual + tokens + new_tokens
    if isinstance(cfg, GPT2Config) and total > cfg.max_position_embeddings:
        raise SoftpromptError(
            f"GPT-2 has {cfg.max_position_embeddings} positions (max_position_embeddings); "
            f"{virtual} prompt/prefix (PROMPT_LENGTH) + {tokens} tokens (TASK_FEATURE_LENGTHS) "
            f"+ {new_tokens} new tokens (max_new_tokens) = {total}: shorten one of them"
        )


def is_decoder_only(cfg: Any) -> bool:
    """Whether `cfg` describes a decoder-only model (GPT-2 or Llama family), not T5."""
    return isinstance(cfg, (GPT2Config, LlamaConfig))
