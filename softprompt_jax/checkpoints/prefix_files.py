"""Prefix files, every layout in one place: our `.npz` and PEFT prefix-tuning adapter dirs.

A plain prefix comes in one of three layouts (`LAYOUTS`), each a tree of float32 arrays:

- `"decoder_only"`: `{"key", "value"}`, each `[num_layers, P, num_kv_heads, head_dim]`; layer
  `i` attends to `key[i]`, `value[i]` (P-tuning v2 form, no RoPE on them).
- `"t5_paper"`: `{"encoder": {"key", "value"}, "decoder": {"key", "value"}}` (Li & Liang).
- `"t5_peft"`: `{"peft": {"table"}}`, PEFT's T5 table (`t5_prefixes.py` says how it is read).

PEFT's table (`prompt_embeddings`) is `[P, num_layers * 2 * kv_dim]`, `kv_dim = num_kv_heads *
head_dim`: each row viewed as `[num_layers, 2 (key, value), num_kv_heads, head_dim]`
(`kv_table`, `split_table`). PEFT saves it folded (the MLP's output, never the MLP).

Files:

- `.npz` (ours): the arrays by '/'-joined tree path, plus `layout`, a string naming the
  layout. A file without `layout` is a decoder-only `{"key", "value"}` (written before T5
  prefixes existed).
- PEFT `PREFIX_TUNING` adapter dir: `adapter_config.json` (`num_layers`,
  `num_attention_heads` = key/value heads, `token_dim` = kv_dim) and
  `adapter_model.safetensors` holding the table. `CAUSAL_LM` (decoder-only, one submodule)
  or `SEQ_2_SEQ_LM` (T5 in PEFT's mode, two submodules), told apart by `task_type`.

Only plain prefixes are written (fold one made with an MLP first). Paths may be `gs://`.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from safetensors import SafetensorError
from safetensors.numpy import load, save

from softprompt_jax import storage
from softprompt_jax.errors import SoftpromptError

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_KEY = "prompt_embeddings"
PLAIN_KEYS = frozenset({"key", "value"})
LAYOUT_FIELD = "layout"
# Each layout's top-level keys, and its PEFT task type (None: no PEFT equivalent).
LAYOUTS = {
    "decoder_only": (PLAIN_KEYS, "CAUSAL_LM"),
    "t5_paper": (frozenset({"encoder", "decoder"}), None),
    "t5_peft": (frozenset({"peft"}), "SEQ_2_SEQ_LM"),
}
PEFT_SUBMODULES = {"CAUSAL_LM": 1, "SEQ_2_SEQ_LM": 2}


def kv_table(kv: Mapping[str, Any]) -> jax.Array:
    """PEFT's `[P, num_layers * 2 * kv_dim]` table of plain `{"key", "value"}`."""
    key, value = jnp.asarray(kv["key"]), jnp.asarray(kv["value"])
    stacked = jnp.stack([key, value], axis=1)  # [layers, 2, P, heads, head_dim]
    return jnp.transpose(stacked, (2, 0, 1, 3, 4)).reshape(key.shape[1], -1)


def split_table(table: jax.Array, num_layers: int, num_kv_heads: int) -> dict[str, jax.Array]:
    """The plain prefix `{"key", "value"}` of PEFT's table `[P, num_layers * 2 * kv_dim]`."""
    length = table.shape[0]
    rows = jnp.asarray(table).reshape(length, num_layers, 2, num_kv_heads, -1)
    rows = jnp.transpose(rows, (1, 2, 0, 3, 4))  # [layers, 2, P, heads, head_dim]
    return {"key": rows[:, 0], "value": rows[:, 1]}


def layout_of(prefix: Mapping, source: Any) -> str:
    """Which of `LAYOUTS` a plain prefix tree is in; SoftpromptError naming `source` if none."""
    for layout, (keys, _) in LAYOUTS.items():
        if set(prefix) == keys:
            return layout
    wanted = " or ".join(str(sorted(keys)) for keys, _ in LAYOUTS.values())
    raise SoftpromptError(
        f"{source}: a plain prefix has keys {wanted}; got {sorted(prefix)} (fold an MLP prefix "
        "first: sp.fold_prefix(cfg, prefix); a T5 run's `export` writes it folded)"
    )


def checked_prefix(prefix: Mapping, source: Any, layout: str | None = None) -> dict:
    """`prefix` as float32 numpy in its (or the given) layout, its parts checked and finite."""
    found = layout_of(prefix, source)
    if layout is not None and found != layout:
        raise SoftpromptError(f"{source}: says layout {layout!r} but holds a {found!r} prefix")
    if found == "decoder_only":
        return plain_arrays(prefix, source)
    if found == "t5_paper":
        return {part: plain_arrays(prefix[part], f"{source} ({part})") for part in sorted(prefix)}
    part = prefix["peft"]
    if not isinstance(part, Mapping) or set(part) != {"table"}:
        raise SoftpromptError(f"{source}: a PEFT-mode T5 prefix is {{'peft': {{'table'}}}}")
    table = np.asarray(part["table"], np.float32)
    if table.ndim != 2 or not np.isfinite(table).all():
        raise SoftpromptError(
            f"{source}: the PEFT table must be finite [P, width]; got shape {table.shape}"
        )
    return {"peft": {"table": table}}


def plain_arrays(prefix: Mapping, source: Any) -> dict[str, np.ndarray]:
    """A plain prefix's `key` and `value` as float32 numpy, checked alike and finite."""
    if not isinstance(prefix, Mapping) or set(prefix) != PLAIN_KEYS:
        keys = sorted(prefix) if isinstance(prefix, Mapping) else type(prefix).__name__
        raise SoftpromptError(
            f"{source}: only a plain prefix {{'key', 'value'}} is written; got keys {keys} "
            "(fold an MLP prefix first: sp.fold_prefix(cfg, prefix))"
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


def save_prefix(
    prefix: Mapping,
    path: storage.PathLike,
    num_heads: int | None = None,
    head_dim: int | None = None,
) -> epath.Path:
    """Write a plain prefix as `.npz` (path ends in `.npz`) or else as a PEFT adapter dir.

    A T5 PEFT-mode adapter needs the model's `num_heads` and `head_dim` (its table's rows
    do not say how they split).
    """
    target = storage.as_path(path)
    layout = layout_of(prefix, path)
    arrays = checked_prefix(prefix, path, layout)
    if target.suffix == ".npz":
        flat = {
            "/".join(str(getattr(k, "key", k)) for k in keys): leaf
            for keys, leaf in jax.tree_util.tree_flatten_with_path(arrays)[0]
        }
        buffer = io.BytesIO()
        np.savez(buffer, **flat, **{LAYOUT_FIELD: np.array(layout)})
        target.parent.mkdir(parents=True, exist_ok=True)
        storage.write_bytes_atomic(target, buffer.getvalue())
        return target
    task_type = LAYOUTS[layout][1]
    if task_type is None:
        raise SoftpromptError(
            f"{path}: PEFT has no format for a {layout!r} prefix; write it as .npz"
        )
    if layout == "decoder_only":
        num_layers, _, num_heads, head_dim = arrays["key"].shape
        table = np.asarray(kv_table(arrays), np.float32)
        token_dim = num_heads * head_dim
    else:
        if num_heads is None or head_dim is None:
            raise ValueError("a T5 PEFT-mode adapter needs num_heads and head_dim")
        table = arrays["peft"]["table"]
        token_dim = num_heads * head_dim
        num_layers = table.shape[1] // (2 * token_dim)
    target.mkdir(parents=True, exist_ok=True)
    storage.write_bytes_atomic(
        target / PEFT_WEIGHTS, save({PEFT_KEY: table}, metadata={"format": "pt"})
    )
    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": task_type,
        "num_virtual_tokens": table.shape[0],
        "token_dim": token_dim,
        "num_transformer_submodules": PEFT_SUBMODULES[task_type],
        "num_attention_heads": num_heads,
        "num_layers": num_layers,
        "encoder_hidden_size": token_dim,
        "prefix_projection": False,
        "base_model_name_or_path": None,
        "inference_mode": True,
    }
    storage.write_text_atomic(target / PEFT_CONFIG, json.dumps(config, indent=2) + "\n")
    return target


def load_prefix(path: storage.PathLike, config: Mapping | None = None) -> dict:
    """The plain prefix (float32 numpy tree) of a `.npz` or PEFT adapter dir `save_prefix` wrote.

    `config`: the dir's `adapter_config.json`, when the caller has read it already.
    """
    target = storage.as_path(path)
    if target.suffix == ".npz":
        return _load_npz(target, path)
    if config is None:
        config = _read_json(target / PEFT_CONFIG)
    return _load_peft(target, config)


def _load_npz(target: epath.Path, source: Any) -> dict:
    try:
        with np.load(io.BytesIO(target.read_bytes()), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
        raise SoftpromptError(
            f"prefix file {source} is not a readable .npz file: {error}"
        ) from error
    layout = str(arrays.pop(LAYOUT_FIELD, "decoder_only"))
    if layout not in LAYOUTS:
        raise SoftpromptError(
            f"prefix file {source}: layout {layout!r}; expected one of {sorted(LAYOUTS)}"
        )
    prefix: dict = {}
    for name, array in arrays.items():
        *parents, leaf = name.split("/")
        node = prefix
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = array
    return checked_prefix(prefix, f"prefix file {source}", layout)


def _load_peft(directory: epath.Path, config: Mapping) -> dict:
    config_file, weights_file = directory / PEFT_CONFIG, directory / PEFT_WEIGHTS
    task_type = config.get("task_type") or "CAUSAL_LM"
    if task_type not in PEFT_SUBMODULES:
        raise SoftpromptError(
            f"{config_file}: task_type {task_type!r}; expected one of {sorted(PEFT_SUBMODULES)}"
        )
    sizes = {
        name: config.get(name)
        for name in ("num_virtual_tokens", "num_layers", "num_attention_heads", "token_dim")
    }
    for name, value in sizes.items():
        if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise SoftpromptError(f"{config_file}: {name} is {value!r}; expected a positive int")
    submodules = config.get("num_transformer_submodules") or PEFT_SUBMODULES[task_type]
    if submodules != PEFT_SUBMODULES[task_type]:
        raise SoftpromptError(
            f"{config_file}: num_transformer_submodules is {submodules}; a {task_type} prefix "
            f"has {PEFT_SUBMODULES[task_type]}"
        )
    if not weights_file.exists():
        raise SoftpromptError(f"{weights_file} is missing (pickled .bin adapters are not read)")
    try:
        tensors = load(weights_file.read_bytes())
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
    table = table.astype(np.float32)
    if task_type == "SEQ_2_SEQ_LM":
        return checked_prefix({"peft": {"table": table}}, weights_file, "t5_peft")
    plain = split_table(table, sizes["num_layers"], sizes["num_attention_heads"])
    return checked_prefix(plain, weights_file, "decoder_only")


def _read_json(path: epath.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SoftpromptError(f"{path} is not a readable JSON file: {error}") from error
