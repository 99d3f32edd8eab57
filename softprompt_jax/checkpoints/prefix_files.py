"""Prefix files: PEFT prefix-tuning adapter dirs and our numpy export (`.npz`).

- PEFT (`PrefixTuningConfig`, decoder-only `CAUSAL_LM`): `adapter_config.json` (peft_type
  `PREFIX_TUNING`, `num_layers`, `num_attention_heads` = key/value heads, `token_dim` =
  `num_kv_heads * head_dim`) and `adapter_model.safetensors` holding `prompt_embeddings`
  `[num_virtual_tokens, num_layers * 2 * token_dim]`, the folded prefix (PEFT saves the MLP's
  output, never the MLP; see `model/prefix_layout.py` for the row layout).
- `.npz` (ours): arrays `key` and `value`, each float32 `[num_layers, P, num_kv_heads,
  head_dim]`; layer `i` attends to `key[i]`, `value[i]` (P-tuning v2 form, no RoPE on them).

Only plain prefixes are written (fold one made with an MLP first: `fold_prefix`).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from softprompt_jax import storage
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.model.prefix_layout import PLAIN_KEYS, prefix_table, split_table

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_KEY = "prompt_embeddings"


def plain_arrays(prefix: Mapping, source: str | Path) -> dict[str, np.ndarray]:
    """A plain prefix's `key` and `value` as float32 numpy, checked alike and finite."""
    if set(prefix) != PLAIN_KEYS:
        raise SoftpromptError(
            f"{source}: only a plain prefix {{'key', 'value'}} is written; got keys "
            f"{sorted(prefix)} (fold an MLP prefix first: sp.fold_prefix(cfg, prefix))"
        )
    arrays = {name: np.asarray(prefix[name], np.float32) for name in sorted(PLAIN_KEYS)}
    shapes = {name: array.shape for name, array in arrays.items()}
    if len(set(shapes.values())) != 1 or arrays["key"].ndim != 4:
        raise SoftpromptError(
            f"{source}: prefix key and value must both be [num_layers, P, num_kv_heads, "
            f"head_dim]; got {shapes}"
        )
    for name, array in arrays.items():
        if not np.isfinite(array).all():
            raise SoftpromptError(f"{source}: prefix {name} has non-finite values")
    return arrays


def save_peft_prefix(prefix: Mapping, directory: Path) -> None:
    """Write a plain prefix as a PEFT `PREFIX_TUNING` `CAUSAL_LM` adapter dir."""
    arrays = plain_arrays(prefix, directory)
    num_layers, length, heads, head_dim = arrays["key"].shape
    table = np.asarray(prefix_table(arrays), np.float32)
    directory.mkdir(parents=True, exist_ok=True)
    storage.write_bytes_atomic(
        directory / PEFT_WEIGHTS, save({PEFT_KEY: table}, metadata={"format": "pt"})
    )
    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": length,
        "token_dim": heads * head_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": heads,
        "num_layers": num_layers,
        "encoder_hidden_size": heads * head_dim,
        "prefix_projection": False,
        "base_model_name_or_path": None,
        "inference_mode": True,
    }
    storage.write_text_atomic(directory / PEFT_CONFIG, json.dumps(config, indent=2) + "\n")


def load_peft_prefix(directory: Path, config: Mapping) -> dict[str, np.ndarray]:
    """The plain prefix of a PEFT `PREFIX_TUNING` adapter dir (its `config` already read)."""
    config_file, weights_file = directory / PEFT_CONFIG, directory / PEFT_WEIGHTS
    sizes = {name: config.get(name) for name in ("num_virtual_tokens", "num_layers")}
    sizes["num_attention_heads"] = config.get("num_attention_heads")
    sizes["token_dim"] = config.get("token_dim")
    for name, value in sizes.items():
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise SoftpromptError(f"{config_file}: {name} is {value!r}; expected a positive int")
    if (config.get("num_transformer_submodules") or 1) != 1:
        raise SoftpromptError(
            f"{config_file}: num_transformer_submodules is "
            f"{config['num_transformer_submodules']}; decoder-only prefixes have 1"
        )
    if not weights_file.is_file():
        raise SoftpromptError(f"{weights_file} is missing (pickled .bin adapters are not read)")
    try:
        tensors = load_file(weights_file)
    except SafetensorError as error:
        raise SoftpromptError(
            f"{weights_file} is not a readable safetensors file: {error}"
        ) from error
    if PEFT_KEY not in tensors:
        raise SoftpromptError(f"{weights_file}: no tensor {PEFT_KEY!r}; found {sorted(tensors)}")
    table = tensors[PEFT_KEY]
    expected = (sizes["num_virtual_tokens"], sizes["num_layers"] * 2 * sizes["token_dim"])
    if table.shape != expected or sizes["token_dim"] % sizes["num_attention_heads"]:
        raise SoftpromptError(
            f"{weights_file}: {PEFT_KEY!r} has shape {table.shape}; {config_file} implies "
            f"{expected} = (num_virtual_tokens, num_layers * 2 * token_dim)"
        )
    plain = split_table(table.astype(np.float32), sizes["num_layers"], sizes["num_attention_heads"])
    return plain_arrays(plain, weights_file)


def save_prefix_npz(prefix: Mapping, path: Path) -> None:
    """Write a plain prefix as `.npz` with arrays `key` and `value` (no pickles)."""
    arrays = plain_arrays(prefix, path)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_bytes_atomic(path, buffer.getvalue())


def load_prefix_npz(path: Path) -> dict[str, np.ndarray]:
    """Read a prefix `.npz` written by `save_prefix_npz`."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, EOFError, ValueError) as error:
        raise SoftpromptError(f"prefix file {path} is not a readable .npz file: {error}") from error
    return plain_arrays(arrays, path)
