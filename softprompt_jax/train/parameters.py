"""How many parameters train and how many stay frozen, said the way PEFT says it."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def count_parameters(tree: Any) -> int:
    """The number of values in a tree's arrays (a prompt, a bank, or the frozen params)."""
    return sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree.leaves(tree))


def parameter_summary(frozen_params: Any, prompt: Any) -> str:
    """PEFT's `print_trainable_parameters` line for the prompt (or bank), plus the frozen count.

    All params are the frozen model's and the prompt's together.
    """
    trainable, frozen = count_parameters(prompt), count_parameters(frozen_params)
    total = trainable + frozen
    return (
        f"trainable params: {trainable:,d} || all params: {total:,d} || "
        f"trainable%: {100 * trainable / total:.4f} || frozen params: {frozen:,d}"
    )
