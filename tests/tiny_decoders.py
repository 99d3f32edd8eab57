"""Tiny random Hugging Face decoder-only models (GPT-2, Llama family), saved for the tests."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

VOCAB = 64


def hf_config(family: str) -> transformers.PretrainedConfig:
    """GPT-2, Llama (grouped-query, head_dim != hidden / heads; llama3: RoPE scaled), Qwen2
    (biases, tied), Mistral."""
    llama_like = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=16,
            n_layer=2,
            n_head=4,
            n_positions=32,
            bos_token_id=0,
            eos_token_id=0,
        )
    if family == "llama":
        return transformers.LlamaConfig(
            **llama_like, head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 500.0}
        )
    if family == "llama3":  # Llama 3.x's RoPE scaling: one frequency kept, one smoothed, two slowed
        rope = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0}
        rope |= {"high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        return transformers.LlamaConfig(**llama_like, head_dim=8, rope_parameters=rope)
    if family == "qwen2":
        return transformers.Qwen2Config(**llama_like, tie_word_embeddings=True)
    if family == "mistral":
        return transformers.MistralConfig(**llama_like, sliding_window=3)
    raise ValueError(family)


def save_tiny(family: str, directory: Path, *, seed: int = 0, sharded: bool = False):
    """A random-weight model of `family` (every weight drawn, biases too), saved; returns it."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(directory, max_shard_size="20KB" if sharded else "1GB")
    return model
