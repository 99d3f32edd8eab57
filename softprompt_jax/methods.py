"""What the trainer and commands need to know of a model family and a tuning method.

The trainer stays ignorant of model internals: it asks this module which seqio feature
converter the model reads (T5: encoder-decoder; GPT-2 / Llama family: prefix-LM, loss on the
targets only), how to describe the model in one line, and what the trainable parameters of a
method are:

- `"prompt"`: a soft prompt `[P, d]` in front of the input embeddings (`prompts.py`);
- `"prefix"`: key/value prefixes in every layer's self-attention (`prefixes.py` for
  decoder-only models, `t5_prefixes.py` for T5 in the paper's or PEFT's mode), through
  PEFT's MLP when `projection_dim` is set (Li & Liang's prefix tuning), else plain
  (P-tuning v2).

A prefix run's numpy checkpoints hold one 2-D table per step (`prefix_checkpoint_table`: the
MLP run once) and `MODEL_DIR/prefix.json` says how it splits into layers and heads. Every run
records its model family in `MODEL_DIR/model.json` (`write_model_info`), so an export writes
the family's format (PEFT's CAUSAL_LM or SEQ_2_SEQ_LM, T5X's layout for T5 only).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import seqio

from softprompt_jax import storage
from softprompt_jax.checkpoints.prefix_files import split_table
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.model.decoder_config import check_positions, is_decoder_only
from softprompt_jax.prefixes import init_prefix, prefix_length, prefix_table
from softprompt_jax.t5_prefixes import MODES, init_t5_prefix

METHODS = ("prompt", "prefix")
PREFIX_INFO_FILE = "prefix.json"
MODEL_INFO_FILE = "model.json"
FAMILIES = ("t5", "decoder_only")


def check_method(
    method: str, projection_dim: int | None, prompt_per_task: bool, mode: str = "paper"
) -> None:
    """Raise SoftpromptError naming METHOD, PREFIX_PROJECTION_DIM or PREFIX_MODE if wrong."""
    if method not in METHODS:
        raise SoftpromptError(f"METHOD must be one of {METHODS}, got {method!r}")
    if mode not in MODES:
        raise SoftpromptError(f"PREFIX_MODE must be one of {MODES}, got {mode!r}")
    if method == "prompt" and projection_dim is not None:
        raise SoftpromptError(
            f"PREFIX_PROJECTION_DIM={projection_dim} is for METHOD='prefix'; the prompt has no MLP"
        )
    if projection_dim is not None and (isinstance(projection_dim, bool) or projection_dim <= 0):
        raise SoftpromptError(f"PREFIX_PROJECTION_DIM must be positive, got {projection_dim!r}")
    if method == "prefix" and prompt_per_task:
        raise SoftpromptError("PROMPT_PER_TASK needs METHOD='prompt': a prefix is one per run")


def check_packing(cfg: Any, pack: bool) -> None:
    """Refuse PACK=True on a decoder-only model: packing is implemented for T5 rows."""
    if pack and is_decoder_only(cfg):
        raise SoftpromptError(
            f"PACK=True packs T5 rows only; the model is a {type(cfg).__name__}: set PACK=False"
        )


def check_lengths(
    cfg: Any,
    prompt: Any,
    feature_lengths: Mapping[str, int] | None,
    new_tokens: int | None = None,
) -> None:
    """Refuse, at start-up, GPT-2 sequences past its positions (`check_positions`).

    `prompt`: its length, or the prompt, bank or prefix itself. Training and scoring read
    inputs + targets; generation (`new_tokens` set) inputs + new tokens. `feature_lengths`
    None (whole examples) is checked per batch, by `lm_logits`.
    """
    if feature_lengths is None or not is_decoder_only(cfg):
        return
    inputs = feature_lengths["inputs"]
    if new_tokens is None:
        check_positions(cfg, _virtual_length(prompt), inputs + feature_lengths["targets"])
    else:
        check_positions(cfg, _virtual_length(prompt), inputs, new_tokens)


def _virtual_length(prompt: Any) -> int:
    """Positions a prompt `[P, d]`, a bank (its longest prompt) or a prefix puts in front."""
    if isinstance(prompt, int):
        return prompt
    if isinstance(prompt, Mapping):
        return prefix_length(prompt)
    if hasattr(prompt, "lengths"):
        return max(prompt.lengths)
    return int(np.shape(prompt)[-2])


def feature_converter(cfg: Any) -> seqio.FeatureConverter:
    """seqio's converter for the model: encoder-decoder (T5) or prefix-LM (decoder-only)."""
    if is_decoder_only(cfg):
        return seqio.PrefixLMFeatureConverter(pack=False, loss_on_targets_only=True)
    return seqio.EncDecFeatureConverter(pack=False)


def describe(cfg: Any) -> str:
    """`T5Config 512d x 8 layers`: the model's kind, width and depth, for progress lines."""
    layers = cfg.num_layers if is_decoder_only(cfg) else cfg.num_encoder_layers
    return f"{type(cfg).__name__} {cfg.emb_dim}d x {layers} layers"


def init_prefix_params(
    cfg: Any, length: int, projection_dim: int | None = None, seed: int = 0, mode: str = "paper"
) -> dict:
    """A new prefix of `length` positions for `cfg`; `mode` (T5 only): 'paper' or 'peft'."""
    if is_decoder_only(cfg):
        return init_prefix(cfg, length, projection_dim, seed)
    return init_t5_prefix(cfg, length, projection_dim, seed, mode)


def prefix_checkpoint_table(prefix: Mapping) -> np.ndarray:
    """The 2-D float32 table a prefix's numpy checkpoint holds (its MLP run once).

    Decoder-only, and T5 in PEFT's mode: PEFT's `[P, num_layers * 2 * kv_dim]`; T5 in the
    paper's mode: the encoder's table and then the decoder's, side by side.
    """
    if "peft" in prefix:
        table = prefix_table(prefix["peft"])
    elif "encoder" in prefix:
        table = np.concatenate([prefix_table(prefix[p]) for p in ("encoder", "decoder")], 1)
    else:
        table = prefix_table(prefix)
    return np.asarray(table, np.float32)


def model_family(cfg: Any) -> str:
    """`"decoder_only"` (GPT-2, Llama family) or `"t5"`."""
    return "decoder_only" if is_decoder_only(cfg) else "t5"


def write_model_info(model_dir: str, cfg: Any) -> None:
    """Record in `model_dir` the run's model family and config class, for its exports."""
    info = {"family": model_family(cfg), "config": type(cfg).__name__}
    storage.write_text_atomic(storage.as_path(model_dir) / MODEL_INFO_FILE, json.dumps(info))


def read_model_family(model_dir: str) -> str:
    """The family `write_model_info` (or a prefix run's prefix.json) recorded; else T5.

    Runs from before families were recorded trained T5 (the only family then).
    """
    for name in (MODEL_INFO_FILE, PREFIX_INFO_FILE):
        path = storage.as_path(model_dir) / name
        if path.exists():
            family = json.loads(path.read_text()).get("family")
            if family not in FAMILIES:
                raise SoftpromptError(f"{path}: family {family!r}; expected one of {FAMILIES}")
            return family
    return "t5"


def write_prefix_info(model_dir: str, cfg: Any, projection_dim: int | None, mode: str) -> None:
    """Record in `model_dir` how the run's prefix tables split into layers and heads."""
    if is_decoder_only(cfg):
        info = {"family": "decoder_only", "layers": {"decoder": cfg.num_layers}}
        info |= {"num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim}
    else:
        layers = {"encoder": cfg.num_encoder_layers, "decoder": cfg.num_decoder_layers}
        info = {"family": "t5", "mode": mode, "layers": layers}
        info |= {"num_kv_heads": cfg.num_heads, "head_dim": cfg.head_dim}
    info["projection_dim"] = projection_dim
    storage.write_text_atomic(storage.as_path(model_dir) / PREFIX_INFO_FILE, json.dumps(info))


def read_prefix_info(model_dir: str) -> dict | None:
    """What `write_prefix_info` recorded, or None for a prompt run."""
    path = storage.as_path(model_dir) / PREFIX_INFO_FILE
    return json.loads(path.read_text()) if path.exists() else None


def table_to_prefix(table: np.ndarray, info: dict, source: str) -> dict:
    """The plain prefix (numpy) a checkpoint table holds, as `info` says it splits.

    Decoder-only: `{"key", "value"}` `[layers, P, kv_heads, head_dim]`; T5, paper's mode:
    `{"encoder": {"key", "value"}, "decoder": {...}}`; T5, PEFT's mode: `{"peft": {"table"}}`.
    """
    heads, kv_dim = info["num_kv_heads"], info["num_kv_heads"] * info["head_dim"]
    parts = ("decoder",) if info.get("mode") == "peft" else tuple(info["layers"])
    if info["family"] == "t5" and info["mode"] == "peft":
        widths = [info["layers"]["decoder"] * 2 * kv_dim]
    else:
        widths = [info["layers"][part] * 2 * kv_dim for part in parts]
    if np.ndim(table) != 2 or np.shape(table)[1] != sum(widths):
        raise SoftpromptError(
            f"prefix table {source} has shape {tuple(np.shape(table))}; the run's model "
            f"expects (length, {sum(widths)})"
        )
    table = np.asarray(table, np.float32)
    if info["family"] == "t5" and info["mode"] == "peft":
        return {"peft": {"table": table}}
    split = {}
    for part, start, width in zip(parts, np.cumsum([0, *widths]), widths, strict=False):
        plain = split_table(table[:, start : start + width], info["layers"][part], heads)
        split[part] = {name: np.asarray(array, np.float32) for name, array in plain.items()}
    return split["decoder"] if info["family"] == "decoder_only" else split
