"""What the trainer and commands need to know of a model family and a tuning method.

The trainer stays ignorant of model internals: it asks this module which seqio feature
converter the model reads (T5: encoder-decoder; GPT-2 / Llama family: prefix-LM, loss on the
targets only), how to describe the model in one line, and what the trainable parameters of a
method are:

- `"prompt"`: a soft prompt `[P, d]` in front of the input embeddings (`prompts.py`);
- `"prefix"`: key/value prefixes in every layer's self-attention (`prefixes.py`), through
  PEFT's MLP when `projection_dim` is set (Li & Liang's prefix tuning), else plain
  (P-tuning v2).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import seqio

from softprompt_jax import storage
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.model.decoder_config import is_decoder_only
from softprompt_jax.model.prefix_layout import split_table
from softprompt_jax.prefixes import init_prefix

METHODS = ("prompt", "prefix")
# In a prefix run's MODEL_DIR: what its numpy checkpoints (PEFT's prefix tables) need to be
# split into per-layer keys and values at export.
PREFIX_INFO_FILE = "prefix.json"


def check_method(method: str, projection_dim: int | None, prompt_per_task: bool) -> None:
    """Raise SoftpromptError naming METHOD or PREFIX_PROJECTION_DIM when they do not fit."""
    if method not in METHODS:
        raise SoftpromptError(f"METHOD must be one of {METHODS}, got {method!r}")
    if method == "prompt" and projection_dim is not None:
        raise SoftpromptError(
            f"PREFIX_PROJECTION_DIM={projection_dim} is for METHOD='prefix'; the prompt has no MLP"
        )
    if projection_dim is not None and (isinstance(projection_dim, bool) or projection_dim <= 0):
        raise SoftpromptError(f"PREFIX_PROJECTION_DIM must be positive, got {projection_dim!r}")
    if method == "prefix" and prompt_per_task:
        raise SoftpromptError("PROMPT_PER_TASK needs METHOD='prompt': a prefix is one per run")


def feature_converter(cfg: Any) -> seqio.FeatureConverter:
    """seqio's converter for the model: encoder-decoder (T5) or prefix-LM (decoder-only)."""
    if is_decoder_only(cfg):
        return seqio.PrefixLMFeatureConverter(pack=False, loss_on_targets_only=True)
    return seqio.EncDecFeatureConverter(pack=False)


def describe(cfg: Any) -> str:
    """`512d x 8 layers`: the model's width and depth, for progress lines."""
    layers = cfg.num_layers if is_decoder_only(cfg) else cfg.num_encoder_layers
    return f"{type(cfg).__name__} {cfg.emb_dim}d x {layers} layers"


def init_prefix_params(
    cfg: Any, length: int, projection_dim: int | None = None, seed: int = 0
) -> dict:
    """A new prefix of `length` positions for `cfg` (see `prefixes.init_prefix`)."""
    if not is_decoder_only(cfg):
        raise SoftpromptError(
            f"METHOD='prefix' is implemented for decoder-only models; got {type(cfg).__name__}"
        )
    return init_prefix(cfg, length, projection_dim, seed)


def write_prefix_info(model_dir: str, cfg: Any, projection_dim: int | None) -> None:
    """Record in `model_dir` how the run's prefix tables split into layers and heads."""
    info = {
        "num_layers": cfg.num_layers,
        "num_kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "projection_dim": projection_dim,
    }
    storage.write_text_atomic(storage.as_path(model_dir) / PREFIX_INFO_FILE, json.dumps(info))


def read_prefix_info(model_dir: str) -> dict | None:
    """What `write_prefix_info` recorded, or None for a prompt run."""
    path = storage.as_path(model_dir) / PREFIX_INFO_FILE
    return json.loads(path.read_text()) if path.exists() else None


def table_to_prefix(table: np.ndarray, info: dict, source: str) -> dict[str, np.ndarray]:
    """The plain prefix `{"key", "value"}` (numpy) of PEFT's table `[P, layers * 2 * kv_dim]`."""
    width = info["num_layers"] * 2 * info["num_kv_heads"] * info["head_dim"]
    if np.ndim(table) != 2 or np.shape(table)[1] != width:
        raise SoftpromptError(
            f"prefix table {source} has shape {tuple(np.shape(table))}; the run's model "
            f"expects (length, {width})"
        )
    plain = split_table(table, info["num_layers"], info["num_kv_heads"])
    return {name: np.asarray(array, np.float32) for name, array in plain.items()}
