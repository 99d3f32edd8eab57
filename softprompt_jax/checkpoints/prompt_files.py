"""Prompt files: the official code's `.npy`, its numpy sidecars, and PEFT adapter dirs.

- `.npy` (google-research/prompt-tuning): `[length, emb_dim]` float32, C order.
- Official sidecar: `numpy_checkpoints/checkpoint_<step>/encoder.prompt.prompt.prompt`,
  a `.npy` written without the suffix (pass the file or its directory).
- Official T5X checkpoint: a step dir (or a model dir: its latest step) holding the whole
  tree with the prompt at `encoder/prompt/prompt/prompt` (see `official.py`).
- PEFT: a directory with `adapter_config.json` and `adapter_model.safetensors`
  holding `prompt_embeddings` `[num_virtual_tokens * num_transformer_submodules,
  emb_dim]`. For seq2seq models PEFT keeps 2 * length rows and feeds only the
  first `length` to the encoder; we read those and write the same layout (or, with
  `task_type="CAUSAL_LM"`, PEFT's decoder-only layout: the prompt alone).
- Prefixes (a mapping: decoder-only `{"key", "value"}` or a T5 prefix): PEFT
  `PREFIX_TUNING` adapter dirs and `.npz` files, see `prefix_files.py`.

Any float dtype is read and cast to float32; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from softprompt_jax import storage
from softprompt_jax.checkpoints import official, prefix_files
from softprompt_jax.errors import SoftpromptError

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_KEY = "prompt_embeddings"
# PEFT's `num_transformer_submodules` for SEQ_2_SEQ_LM (an unused decoder half).
PEFT_SEQ2SEQ_SUBMODULES = 2
PEFT_TASK_TYPES = {"SEQ_2_SEQ_LM": PEFT_SEQ2SEQ_SUBMODULES, "CAUSAL_LM": 1}
OFFICIAL_SIDECAR = "encoder.prompt.prompt.prompt"


def save_prompt(
    prompt: jax.Array | np.ndarray | Mapping,
    path: str | Path,
    *,
    task_type: str = "SEQ_2_SEQ_LM",
    num_heads: int | None = None,
    head_dim: int | None = None,
) -> os.PathLike:
    """Write a prompt as `.npy` (path ends in `.npy`) or else as a PEFT adapter directory.

    `task_type` is PEFT's: `SEQ_2_SEQ_LM` (T5) or `CAUSAL_LM` (GPT-2, Llama family). A plain
    prefix (decoder-only, or T5's) is written as `.npz` (path ends in `.npz`) or a PEFT prefix
    dir (`prefix_files.save_prefix`; a T5 PEFT-mode prefix needs `num_heads` and `head_dim`).
    """
    if isinstance(prompt, Mapping):
        return prefix_files.save_prefix(prompt, path, num_heads, head_dim)
    path = Path(path)
    if task_type not in PEFT_TASK_TYPES:
        raise SoftpromptError(f"task_type {task_type!r}; expected one of {sorted(PEFT_TASK_TYPES)}")
    array = np.asarray(prompt, np.float32)
    if path.suffix == ".npy":
        if array.ndim not in (2, 3):
            raise SoftpromptError(
                f"{path}: a prompt or bank has 2 or 3 dims, got shape {array.shape}"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        storage.write_npy_atomic(path, array)
        return path
    if array.ndim != 2:
        raise SoftpromptError(
            f"{path}: a PEFT adapter holds one [length, emb_dim] prompt, got shape {array.shape}"
        )
    _save_peft(array, path, task_type)
    return path


def is_prefix_file(path: str | os.PathLike) -> bool:
    """Whether `path` holds a prefix (`.npz`, PEFT prefix-tuning dir), read without its arrays."""
    if str(path).endswith(".npz"):
        return True
    config = Path(path) / PEFT_CONFIG
    return config.is_file() and _read_peft_config(config).get("peft_type") == "PREFIX_TUNING"


def load_prompt(
    path: str | Path, expected_shape: tuple[int, ...] | None = None
) -> jax.Array | dict[str, jax.Array]:
    """Read a prompt (`.npy`, official sidecar or T5X checkpoint, PEFT dir) as float32.

    A PEFT prefix-tuning dir or a `.npz` prefix gives a plain prefix in its layout
    (`prefix_files.load_prefix`). A prompt with NaN or infinite values is refused: it would
    only yield NaN scores.
    """
    if str(path).endswith(".npz"):
        return jax.tree.map(jnp.asarray, prefix_files.load_prefix(path))
    path = Path(path)
    if (path / PEFT_CONFIG).is_file():
        config = _read_peft_config(path / PEFT_CONFIG)
        if config.get("peft_type") == "PREFIX_TUNING":
            return jax.tree.map(jnp.asarray, prefix_files.load_prefix(path, config))
        source, array = path, _load_peft(path)
    elif (path / OFFICIAL_SIDECAR).is_file():
        source = path / OFFICIAL_SIDECAR
        array = _load_npy(source)
    elif path.is_file():
        source, array = path, _load_npy(path)
    elif official.holds_t5x_checkpoint(path):
        source, array = official.read_prompt(path)
        array = _as_float32(array, source)
    else:
        raise SoftpromptError(
            f"{path}: not a prompt file, a PEFT adapter dir ({PEFT_CONFIG}), an official "
            f"numpy checkpoint dir ({OFFICIAL_SIDECAR}) or an official T5X checkpoint"
        )
    non_finite = array.size - int(np.isfinite(array).sum())
    if non_finite:
        raise SoftpromptError(
            f"prompt file {source} has {non_finite} non-finite values (NaN or infinity) "
            f"among its {array.size}"
        )
    if expected_shape is not None and array.shape != tuple(expected_shape):
        raise SoftpromptError(
            f"prompt file {source} has shape {array.shape}; model expects {tuple(expected_shape)}"
        )
    return jax.device_put(array)  # a transfer: jnp.asarray compiles a copy per shape


def _as_float32(array: np.ndarray, source: Path) -> np.ndarray:
    """Cast any float prompt to float32; reject other dtypes and ranks."""
    if not np.issubdtype(array.dtype, np.floating):
        raise SoftpromptError(
            f"prompt file {source} has dtype {array.dtype}; expected a float dtype"
        )
    if array.ndim not in (2, 3):
        raise SoftpromptError(
            f"prompt file {source} has shape {array.shape}; expected [length, emb_dim] "
            "or a bank [num_prompts, length, emb_dim]"
        )
    return array.astype(np.float32)


def _load_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError) as error:  # empty, cut short, pickled, not numpy
        raise SoftpromptError(f"prompt file {path} is not a readable .npy file: {error}") from error
    if not isinstance(array, np.ndarray):
        raise SoftpromptError(f"prompt file {path} is a .npz archive; expected one .npy array")
    return _as_float32(array, path)


def _load_peft(directory: Path) -> np.ndarray:
    """The encoder rows (the first `num_virtual_tokens`) of a PEFT prompt-tuning adapter."""
    config_file, weights_file = directory / PEFT_CONFIG, directory / PEFT_WEIGHTS
    config = _read_peft_config(config_file)
    if config.get("peft_type") != "PROMPT_TUNING":
        raise SoftpromptError(
            f"{config_file}: peft_type is {config.get('peft_type')!r}; expected 'PROMPT_TUNING'"
        )
    if not weights_file.is_file():
        raise SoftpromptError(f"{weights_file} is missing (pickled .bin adapters are not read)")
    try:
        tensors = load_file(weights_file)
    except SafetensorError as error:  # cut short or not safetensors at all
        raise SoftpromptError(
            f"{weights_file} is not a readable safetensors file: {error}"
        ) from error
    if PEFT_KEY not in tensors:
        raise SoftpromptError(f"{weights_file}: no tensor {PEFT_KEY!r}; found {sorted(tensors)}")
    length = config.get("num_virtual_tokens")
    submodules = config.get("num_transformer_submodules") or 1
    if not _positive_int(length) or not _positive_int(submodules):
        raise SoftpromptError(
            f"{config_file}: num_virtual_tokens {length!r} and num_transformer_submodules "
            f"{submodules!r} must be positive integers"
        )
    rows = length * submodules
    table = _as_float32(tensors[PEFT_KEY], weights_file)
    if table.ndim != 2 or table.shape[0] != rows:
        raise SoftpromptError(
            f"{weights_file}: {PEFT_KEY!r} has shape {table.shape}; {config_file} implies "
            f"({rows}, emb_dim) = num_virtual_tokens * num_transformer_submodules rows"
        )
    return table[:length]


def _read_peft_config(config_file: Path) -> dict:
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:  # unreadable, not UTF-8, not JSON
        raise SoftpromptError(f"{config_file}: cannot read JSON: {error}") from error
    if not isinstance(config, dict):
        raise SoftpromptError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    return config


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _save_peft(prompt: np.ndarray, directory: Path, task_type: str) -> None:
    """Write PEFT's layout: the prompt, then (SEQ_2_SEQ_LM) an unused all-zero decoder half."""
    length, emb_dim = prompt.shape
    submodules = PEFT_TASK_TYPES[task_type]
    directory.mkdir(parents=True, exist_ok=True)
    unused = np.zeros(((submodules - 1) * length, emb_dim), np.float32)
    storage.write_bytes_atomic(
        directory / PEFT_WEIGHTS,
        save({PEFT_KEY: np.concatenate([prompt, unused])}, metadata={"format": "pt"}),
    )
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": task_type,
        "num_virtual_tokens": length,
        "token_dim": emb_dim,
        "num_transformer_submodules": submodules,
        # PEFT fills these from the base model's config when they are null.
        "num_attention_heads": None,
        "num_layers": None,
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
    }
    storage.write_text_atomic(directory / PEFT_CONFIG, json.dumps(config, indent=2) + "\n")
