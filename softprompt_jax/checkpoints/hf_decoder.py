"""Read Hugging Face GPT-2 and Llama-family checkpoints (`config.json` + safetensors).

The family comes from `config.json`'s `model_type` (`gpt2`, `llama`, `mistral`, `qwen2`).
Tensors are read slice by slice under our '/'-paths, kernels as `[in, out]`: Llama-family
linear weights are stored `[out, in]` (transposed on read); GPT-2's Conv1D weights are
already `[in, out]`, and its fused `c_attn` is read as three column ranges (query, key,
value). Sharded saves (`model.safetensors.index.json`) are read file by file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from softprompt_jax.checkpoints.huggingface import checked_config, read_hf_config, stored_tensors
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.model.decoder_config import (
    LLAMA_MODEL_TYPES,
    DecoderOnlyConfig,
    GPT2Config,
    LlamaConfig,
)

MODEL_TYPES = ("gpt2", *LLAMA_MODEL_TYPES)


def model_type(hf_config: Mapping) -> str | None:
    """`config.json`'s `model_type`, or None."""
    value = hf_config.get("model_type")
    return value if isinstance(value, str) else None


def is_decoder_only_config(hf_config: Mapping) -> bool:
    """Whether a Hugging Face `config.json` describes a decoder-only model we read."""
    return model_type(hf_config) in MODEL_TYPES


def config_from_hf(hf_config: Mapping, dtype: str = "float32") -> DecoderOnlyConfig:
    """Map a HF GPT-2 / Llama / Mistral / Qwen2 config dict onto ours; refuse what we lack."""
    kind = model_type(hf_config)
    if kind == "gpt2":
        return _gpt2_config(hf_config, dtype)
    if kind in LLAMA_MODEL_TYPES:
        return _llama_config(hf_config, kind, dtype)
    raise SoftpromptError(f"model_type {kind!r}; expected one of {MODEL_TYPES}")


def _unsupported(setting: str, value) -> SoftpromptError:
    return SoftpromptError(f"{setting}={value!r} is not supported")


def _gpt2_config(hf: Mapping, dtype: str) -> GPT2Config:
    for setting, supported in (
        ("scale_attn_weights", True),
        ("scale_attn_by_inverse_layer_idx", False),
        ("add_cross_attention", False),
    ):
        if hf.get(setting, supported) != supported:
            raise _unsupported(setting, hf[setting])
    emb_dim = hf["n_embd"]
    return GPT2Config(
        vocab_size=hf["vocab_size"],
        emb_dim=emb_dim,
        num_heads=hf["n_head"],
        num_layers=hf["n_layer"],
        mlp_dim=hf.get("n_inner") or 4 * emb_dim,
        max_position_embeddings=hf["n_positions"],
        layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        activation={"gelu_pytorch_tanh": "gelu_new"}.get(
            hf.get("activation_function", "gelu_new"), hf.get("activation_function", "gelu_new")
        ),
        dtype=dtype,
    )


def _rope_settings(hf: Mapping) -> dict:
    """LlamaConfig's RoPE fields from `rope_parameters` (transformers 5) or `rope_scaling` and
    `rope_theta`: plain RoPE or Llama 3's `rope_type='llama3'`; any other type is refused."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    settings = {"rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if kind == "default":
        return settings
    if kind != "llama3":
        raise _unsupported("rope_type", kind)
    try:
        return settings | {
            "rope_scaling_factor": float(rope["factor"]),
            "rope_low_freq_factor": float(rope["low_freq_factor"]),
            "rope_high_freq_factor": float(rope["high_freq_factor"]),
            "rope_original_max_positions": int(
                rope.get("original_max_position_embeddings", hf["max_position_embeddings"])
            ),
        }
    except KeyError as missing:
        raise SoftpromptError(f"rope_type='llama3' needs {missing.args[0]!r}") from None


def _llama_config(hf: Mapping, kind: str, dtype: str) -> LlamaConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise _unsupported("hidden_act", hf["hidden_act"])
    num_heads = hf["num_attention_heads"]
    attention_bias = bool(hf.get("attention_bias", False))
    if kind == "qwen2":
        if hf.get("use_sliding_window", False):
            raise _unsupported("use_sliding_window", True)
        sliding_window = None
    else:
        sliding_window = hf.get("sliding_window") if kind == "mistral" else None
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        emb_dim=hf["hidden_size"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        mlp_dim=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        **_rope_settings(hf),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=kind == "qwen2" or attention_bias,
        out_bias=kind != "qwen2" and attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=sliding_window,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        model_type=kind,
        dtype=dtype,
    )


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where one of our params lives: an HF tensor, transposed or a column range of it."""

    name: str
    transpose: bool = False
    columns: tuple[int, int] | None = None  # a range of the stored last axis


def _names(cfg: DecoderOnlyConfig) -> dict[str, _Source]:
    """Our '/'-path -> its HF tensor, for every param of `cfg`."""
    if isinstance(cfg, GPT2Config):
        return _gpt2_names(cfg)
    return _llama_names(cfg)


def _gpt2_names(cfg: GPT2Config) -> dict[str, _Source]:
    names = {
        "token_embedder/embedding": _Source("transformer.wte.weight"),
        "position_embedder/embedding": _Source("transformer.wpe.weight"),
        "decoder/decoder_norm/scale": _Source("transformer.ln_f.weight"),
        "decoder/decoder_norm/bias": _Source("transformer.ln_f.bias"),
    }
    d = cfg.emb_dim
    for i in range(cfg.num_layers):
        ours, theirs = f"decoder/layers_{i}", f"transformer.h.{i}"
        for norm, hf_norm in (("pre_attention_layer_norm", "ln_1"), ("pre_mlp_layer_norm", "ln_2")):
            for leaf, hf_leaf in (("scale", "weight"), ("bias", "bias")):
                names[f"{ours}/{norm}/{leaf}"] = _Source(f"{theirs}.{hf_norm}.{hf_leaf}")
        for j, proj in enumerate(("query", "key", "value")):
            for leaf, hf_leaf in (("kernel", "weight"), ("bias", "bias")):
                names[f"{ours}/attention/{proj}/{leaf}"] = _Source(
                    f"{theirs}.attn.c_attn.{hf_leaf}", columns=(j * d, (j + 1) * d)
                )
        for proj, hf_proj in (("attention/out", "attn.c_proj"), ("mlp/wi", "mlp.c_fc")):
            for leaf, hf_leaf in (("kernel", "weight"), ("bias", "bias")):
                names[f"{ours}/{proj}/{leaf}"] = _Source(f"{theirs}.{hf_proj}.{hf_leaf}")
        for leaf, hf_leaf in (("kernel", "weight"), ("bias", "bias")):
            names[f"{ours}/mlp/wo/{leaf}"] = _Source(f"{theirs}.mlp.c_proj.{hf_leaf}")
    return names


def _llama_names(cfg: LlamaConfig) -> dict[str, _Source]:
    names = {
        "token_embedder/embedding": _Source("model.embed_tokens.weight"),
        "decoder/decoder_norm/scale": _Source("model.norm.weight"),
    }
    if not cfg.tie_word_embeddings:
        names["decoder/logits_dense/kernel"] = _Source("lm_head.weight", transpose=True)
    linears = {
        "attention/query": ("self_attn.q_proj", cfg.qkv_bias),
        "attention/key": ("self_attn.k_proj", cfg.qkv_bias),
        "attention/value": ("self_attn.v_proj", cfg.qkv_bias),
        "attention/out": ("self_attn.o_proj", cfg.out_bias),
        "mlp/wi_0": ("mlp.gate_proj", cfg.mlp_bias),
        "mlp/wi_1": ("mlp.up_proj", cfg.mlp_bias),
        "mlp/wo": ("mlp.down_proj", cfg.mlp_bias),
    }
    for i in range(cfg.num_layers):
        ours, theirs = f"decoder/layers_{i}", f"model.layers.{i}"
        names[f"{ours}/pre_attention_layer_norm/scale"] = _Source(
            f"{theirs}.input_layernorm.weight"
        )
        names[f"{ours}/pre_mlp_layer_norm/scale"] = _Source(
            f"{theirs}.post_attention_layernorm.weight"
        )
        for proj, (hf_proj, bias) in linears.items():
            names[f"{ours}/{proj}/kernel"] = _Source(f"{theirs}.{hf_proj}.weight", transpose=True)
            if bias:
                names[f"{ours}/{proj}/bias"] = _Source(f"{theirs}.{hf_proj}.bias")
    return names


@dataclasses.dataclass(frozen=True)
class HuggingFaceDecoderCheckpoint:
    """A HF GPT-2 / Llama-family dir, read tensor by tensor (slices only) under our names."""

    directory: Path
    hf_config: dict
    # Our '/'-path -> (safetensors file, where in it, the stored tensor's shape).
    tensors: dict[str, tuple[Path, _Source, tuple[int, ...]]]

    @property
    def source(self) -> str:
        return str(self.directory)

    def config(self, dtype: str) -> DecoderOnlyConfig:
        return _config(self.hf_config, self.directory / "config.json", dtype)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: _our_shape(src, shape) for key, (_, src, shape) in self.tensors.items()}

    def dtypes(self) -> dict[str, np.dtype]:
        empty = lambda shape: tuple(slice(0, 0) for _ in shape)
        return {key: self.read(key, empty(shape)).dtype for key, shape in self.shapes().items()}

    def read(self, key: str, index: tuple[slice, ...]) -> np.ndarray:
        """Only `index` of one param is read from its file (safetensors slices it)."""
        file, src, stored_shape = self.tensors[key]
        shape = _our_shape(src, stored_shape)
        index = tuple(s if isinstance(s, slice) else slice(s, s + 1) for s in index)
        bounds = [s.indices(n)[:2] for s, n in zip(index, shape)]
        if src.columns is not None:
            start, stop = bounds[-1]
            bounds[-1] = (src.columns[0] + start, src.columns[0] + max(stop, start))
        if src.transpose:
            bounds = bounds[::-1]
        stored_index = tuple(slice(start, max(stop, start)) for start, stop in bounds)
        try:
            with safe_open(str(file), framework="numpy") as handle:
                part = handle.get_slice(src.name)[stored_index]
        except (OSError, SafetensorError) as error:
            raise SoftpromptError(f"{file}: tensor {src.name!r}: {error}") from error
        return part.T if src.transpose else part


def _our_shape(src: _Source, stored: tuple[int, ...]) -> tuple[int, ...]:
    if src.columns is not None:
        return (*stored[:-1], src.columns[1] - src.columns[0])
    return stored[::-1] if src.transpose else stored


def open_hf_decoder(path: str | Path) -> HuggingFaceDecoderCheckpoint:
    """Open a HF GPT-2 / Llama-family dir: its config and where each param lives (no data)."""
    directory = Path(path)
    hf_config = read_hf_config(directory)
    cfg = _config(hf_config, directory / "config.json", "float32")
    stored = stored_tensors(directory)
    tensors = {}
    for ours, src in _names(cfg).items():
        if src.name not in stored:
            # GPT-2 saves may keep the `transformer.` names without the prefix.
            bare = src.name.removeprefix("transformer.")
            if bare not in stored:
                continue  # reported as missing by the shape check
            src = dataclasses.replace(src, name=bare)
        file, shape = stored[src.name]
        tensors[ours] = (file, src, shape)
    return HuggingFaceDecoderCheckpoint(directory, hf_config, tensors)


def _config(hf_config: Mapping, config_file: Path, dtype: str) -> DecoderOnlyConfig:
    return checked_config(config_from_hf, hf_config, config_file, dtype)
