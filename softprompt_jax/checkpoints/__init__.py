"""Checkpoint readers and writers: T5X legacy, Hugging Face safetensors and our own format."""

from softprompt_jax.checkpoints.pretrained import check_params, load_pretrained, save_pretrained
from softprompt_jax.checkpoints.reader import detect_format, open_pretrained
from softprompt_jax.checkpoints.t5x_legacy import (
    T5XCheckpoint,
    load_t5x_checkpoint,
    open_checkpoint,
    read_array,
    save_t5x_checkpoint,
)

__all__ = [
    "T5XCheckpoint",
    "check_params",
    "detect_format",
    "load_pretrained",
    "load_t5x_checkpoint",
    "open_checkpoint",
    "open_pretrained",
    "read_array",
    "save_pretrained",
    "save_t5x_checkpoint",
]
