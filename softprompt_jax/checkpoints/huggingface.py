"""Read Hugging Face T5 checkpoints (`config.json` + `*.safetensors`) without torch.

Covers `t5-*` (ReLU, tied embeddings), `google/t5-v1_1-*`, `t5-*-lm-adapt` and
`flan-t5-*` (gated GELU, separate `lm_head`). HF stores linear weights as
`[out, in]`, the transpose of T5X kernels, and the relative-position table as
`[buckets, heads]` in block 0 of each stack.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors import SafetensorError, safe_open

from softprompt_jax.errors import SoftpromptError
from softprompt_jax.model.config import T5Config

_TIED_FALLBACKS = {
    "shared.weight": "encoder.embed_tokens.weight",
    "lm_head.weight": "shared.weight",
}
_FEED_FORWARD = {"relu": ("relu",), "gated-gelu": ("gelu", "linear")}


def config_from_hf(hf_config: Mapping, dtype: str = "float32") -> T5Config:
    """Map a HF `T5Config` dict (as in `config.json`) onto our `T5Config`."""
    feed_forward = hf_config.get("feed_forward_proj", "relu")
    if feed_forward not in _FEED_FORWARD:
        raise SoftpromptError(
            f"feed_forward_proj={feed_forward!r} is not supported; expected one of "
            f"{sorted(_FEED_FORWARD)}"
        )
    num_layers = hf_config["num_layers"]
    # Original T5 rescales the decoder output and reads logits through the
    # embedding; 1.1 does neither. transformers 5 records this as
    # `scale_decoder_outputs` (and always ties); older configs as `tie_word_embeddings`.
    rescaled = hf_config.get("scale_decoder_outputs", hf_config.get("tie_word_embeddings", True))
    return T5Config(
        vocab_size=hf_config["vocab_size"],
        emb_dim=hf_config["d_model"],
        num_heads=hf_config["num_heads"],
        head_dim=hf_config["d_kv"],
        mlp_dim=hf_config["d_ff"],
        num_encoder_layers=num_layers,
        num_decoder_layers=hf_config.get("num_decoder_layers") or num_layers,
        mlp_activations=_FEED_FORWARD[feed_forward],
        logits_via_embedding=bool(rescaled),
        relative_attention_num_buckets=hf_config.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf_config.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=hf_config.get("layer_norm_epsilon", 1e-6),
        dtype=dtype,
    )


def _hf_to_t5x_names(cfg: T5Config) -> dict[str, tuple[str, bool]]:
    """Our flat param path -> (HF tensor name, whether to transpose)."""
    names: dict[str, tuple[str, bool]] = {"token_embedder/embedding": ("shared.weight", False)}
    mlp = (
        ["wi"]
        if len(cfg.mlp_activations) == 1
        else [f"wi_{i}" for i in range(len(cfg.mlp_activations))]
    )

    def attention(ours: str, theirs: str) -> None:
        for proj, hf_proj in zip(("query", "key", "value", "out"), "qkvo"):
            names[f"{ours}/{proj}/kernel"] = (f"{theirs}.{hf_proj}.weight", True)

    def mlp_block(ours: str, theirs: str) -> None:
        for name in [*mlp, "wo"]:
            names[f"{ours}/{name}/kernel"] = (f"{theirs}.DenseReluDense.{name}.weight", True)

    for i in range(cfg.num_encoder_layers):
        ours, theirs = f"encoder/layers_{i}", f"encoder.block.{i}.layer"
        names[f"{ours}/pre_attention_layer_norm/scale"] = (f"{theirs}.0.layer_norm.weight", False)
        attention(f"{ours}/attention", f"{theirs}.0.SelfAttention")
        names[f"{ours}/pre_mlp_layer_norm/scale"] = (f"{theirs}.1.layer_norm.weight", False)
        mlp_block(f"{ours}/mlp", f"{theirs}.1")
    for i in range(cfg.num_decoder_layers):
        ours, theirs = f"decoder/layers_{i}", f"decoder.block.{i}.layer"
        names[f"{ours}/pre_self_attention_layer_norm/scale"] = (
            f"{theirs}.0.layer_norm.weight",
            False,
        )
        attention(f"{ours}/self_attention", f"{theirs}.0.SelfAttention")
        names[f"{ours}/pre_cross_attention_layer_norm/scale"] = (
            f"{theirs}.1.layer_norm.weight",
            False,
        )
        attention(f"{ours}/encoder_decoder_attention", f"{theirs}.1.EncDecAttention")
        names[f"{ours}/pre_mlp_layer_norm/scale"] = (f"{theirs}.2.layer_norm.weight", False)
        mlp_block(f"{ours}/mlp", f"{theirs}.2")
    for stack in ("encoder", "decoder"):
        names[f"{stack}/relpos_bias/rel_embedding"] = (
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            True,
        )
        names[f"{stack}/{stack}_norm/scale"] = (f"{stack}.final_layer_norm.weight", False)
    if not cfg.logits_via_embedding:
        names["decoder/logits_dense/kernel"] = ("lm_head.weight", True)
    return names


def params_from_hf_state_dict(
    state_dict: Mapping[str, np.ndarray], cfg: T5Config, *, source: str = "state dict"
) -> dict:
    """Convert HF T5 tensors (numpy, jax or anything `np.asarray` takes) to our params tree."""
    flat = {}
    for ours, (theirs, transpose) in _hf_to_t5x_names(cfg).items():
        theirs = _present(theirs, state_dict)
        if theirs not in state_dict:
            raise SoftpromptError(f"{source}: tensor {theirs!r} (for {ours}) is missing")
        flat[tuple(ours.split("/"))] = state_dict[theirs].T if transpose else state_dict[theirs]
    return unflatten_dict(flat)


def hf_tensors_from_params(params: Mapping, cfg: T5Config) -> Iterator[tuple[str, Any]]:
    """`(HF tensor name, array)` for each of our (unscanned) params, one at a time.

    The inverse of `params_from_hf_state_dict` (kernels transposed to `[out, in]`), lazy so a
    caller can copy each tensor to another framework before the next transpose is made.
    """
    flat = {"/".join(path): leaf for path, leaf in flatten_dict(params).items()}
    for ours, (theirs, transpose) in _hf_to_t5x_names(cfg).items():
        yield theirs, flat[ours].T if transpose else flat[ours]


def _present(name: str, available: Mapping) -> str:
    """`name`, or the tensor it is tied to when saved once (`lm_head` and stacks share `shared`)."""
    return name if name in available else _TIED_FALLBACKS.get(name, name)


@dataclasses.dataclass(frozen=True)
class HuggingFaceCheckpoint:
    """A Hugging Face T5 dir, read tensor by tensor under T5X names (kernels as `[in, out]`)."""

    directory: Path
    hf_config: dict
    # Our '/'-path -> (safetensors file, HF tensor name, whether HF stores it transposed, shape).
    tensors: dict[str, tuple[Path, str, bool, tuple[int, ...]]]

    @property
    def source(self) -> str:
        return str(self.directory)

    def config(self, dtype: str) -> T5Config:
        return _config(self.hf_config, self.directory / "config.json", dtype)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: shape[::-1] if t else shape for key, (_, _, t, shape) in self.tensors.items()}

    def dtypes(self) -> dict[str, np.dtype]:
        # An empty slice reads no data but comes back in the tensor's dtype.
        empty = lambda shape: tuple(slice(0, 0) for _ in shape)
        return {key: self.read(key, empty(shape)).dtype for key, shape in self.shapes().items()}

    def read(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        """Only `index` of one tensor is read (safetensors slices the file)."""
        file, name, transpose, _ = self.tensors[key]
        try:
            with safe_open(str(file), framework="numpy") as handle:
                part = handle.get_slice(name)[index[::-1] if transpose else index]
        except (OSError, SafetensorError) as error:  # changed or cut short since opened
            raise SoftpromptError(f"{file}: tensor {name!r}: {error}") from error
        return part.T if transpose else part


def open_huggingface(path: str | Path) -> HuggingFaceCheckpoint:
    """Open a HF T5 dir: its config and where each of our params lives (no tensor data read)."""
    directory = Path(path)
    hf_config = read_hf_config(directory)
    stored = stored_tensors(directory)
    tensors = {
        ours: (stored[name][0], name, transpose, stored[name][1])
        for ours, (theirs, transpose) in _hf_to_t5x_names(
            _config(hf_config, directory / "config.json", "float32")
        ).items()
        if (name := _present(theirs, stored)) in stored
    }
    return HuggingFaceCheckpoint(directory, hf_config, tensors)


def read_hf_config(directory: Path) -> dict:
    """`config.json` of a Hugging Face dir as a dict; unreadable is a user mistake."""
    config_file = directory / "config.json"
    try:
        hf_config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:  # unreadable, not UTF-8, not JSON
        raise SoftpromptError(f"cannot read Hugging Face config {config_file}: {error}") from error
    if not isinstance(hf_config, dict):
        raise SoftpromptError(f"{config_file}: expected a JSON object")
    return hf_config


def stored_tensors(directory: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Every tensor of a dir's `*.safetensors` files (sharded saves too): name -> (file, shape)."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise SoftpromptError(f"no *.safetensors file in {directory}")
    stored = {}
    for file in files:
        try:
            with safe_open(str(file), framework="numpy") as handle:
                for name in handle.keys():
                    stored[name] = (file, tuple(handle.get_slice(name).get_shape()))
        except (OSError, SafetensorError) as error:  # cut short, not safetensors
            raise SoftpromptError(f"{file} is not a readable safetensors file: {error}") from error
    return stored


def checked_config(
    config_from_hf: Callable[..., Any], hf_config: Mapping, config_file: Path, dtype: str
) -> Any:
    """`config_from_hf(hf_config)`, with a missing or unsupported setting named in `config_file`."""
    try:
        return config_from_hf(hf_config, dtype=dtype)
    except KeyError as error:
        raise SoftpromptError(f"{config_file}: no {error} setting") from error
    except SoftpromptError as error:
        raise SoftpromptError(f"{config_file}: {error}") from error


def _config(hf_config: Mapping, config_file: Path, dtype: str) -> T5Config:
    return checked_config(config_from_hf, hf_config, config_file, dtype)
