"""The server's prompts: named rows of one padded array of fixed capacity.

The bank a batch runs with is a `PaddedBank` of shape `[capacity, max_length, emb_dim]` and
its mask, passed to the jitted programs as an argument: adding, replacing or deleting a
prompt writes a row and makes a new device copy of the same shape, so no program recompiles
and the next batch sees the change. A prompt sits at the end of its row, left-padded with
masked rows as `PromptBank.padded` pads a bank, so its outputs are those of the prompt alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np

from softprompt_jax.errors import SoftpromptError
from softprompt_jax.prompt_bank import PaddedBank, PromptBank


class BankFull(SoftpromptError):
    """Every row of the bank holds a prompt."""


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The bank as one batch sees it: device arrays and each prompt's row."""

    bank: PaddedBank
    rows: Mapping[str, int]


class PromptRegistry:
    """Named prompts in a fixed-capacity bank. Changed from one thread (the server's event
    loop); `snapshot()` may be read from any (it swaps one immutable object)."""

    def __init__(self, capacity: int, max_length: int, emb_dim: int) -> None:
        self.capacity, self.max_length, self.emb_dim = capacity, max_length, emb_dim
        self._prompts = np.zeros((capacity, max_length, emb_dim), np.float32)
        self._mask = np.zeros((capacity, max_length), bool)
        self._rows: dict[str, int] = {}
        self._lengths: dict[str, int] = {}
        self._snapshot = self._publish()

    @classmethod
    def of(cls, bank: PromptBank | None, capacity: int, max_length: int, emb_dim: int):
        """A registry holding `bank`'s prompts (in its order), or empty."""
        registry = cls(capacity, max_length, emb_dim)
        for name, prompt in zip(bank.names, bank.prompts) if bank is not None else ():
            registry.put(name, np.asarray(prompt))
        return registry

    def put(self, name: str, prompt: np.ndarray) -> bool:
        """Add the prompt `[length, emb_dim]` under `name`, or replace it; True if replaced."""
        prompt = np.asarray(prompt, np.float32)
        if prompt.ndim != 2 or prompt.shape[1] != self.emb_dim or not prompt.shape[0]:
            raise SoftpromptError(
                f"prompt {name!r} has shape {tuple(prompt.shape)}; the model takes "
                f"(length, {self.emb_dim})"
            )
        if prompt.shape[0] > self.max_length:
            raise SoftpromptError(
                f"prompt {name!r} has {prompt.shape[0]} rows; the server's limit is "
                f"{self.max_length} (SERVE_MAX_PROMPT_LENGTH)"
            )
        if not np.all(np.isfinite(prompt)):
            raise SoftpromptError(f"prompt {name!r} holds NaN or infinite values")
        replaced = name in self._rows
        row = self._rows[name] if replaced else self._free_row(name)
        length = prompt.shape[0]
        self._prompts[row] = 0.0
        self._prompts[row, self.max_length - length :] = prompt
        self._mask[row] = np.arange(self.max_length) >= self.max_length - length
        self._rows[name], self._lengths[name] = row, length
        self._snapshot = self._publish()
        return replaced

    def delete(self, name: str) -> None:
        """Forget the prompt `name`; its row is free for the next one."""
        if name not in self._rows:
            raise KeyError(name)
        row = self._rows.pop(name)
        del self._lengths[name]
        self._prompts[row] = 0.0
        self._mask[row] = False
        self._snapshot = self._publish()

    def lengths(self) -> dict[str, int]:
        """Each prompt's length, by name, in the order they were added."""
        return dict(self._lengths)

    def __contains__(self, name: str) -> bool:
        return name in self._rows

    def snapshot(self) -> Snapshot:
        """The current bank; later changes make a new one and leave this one as it is."""
        return self._snapshot

    def _free_row(self, name: str) -> int:
        used = set(self._rows.values())
        free = [row for row in range(self.capacity) if row not in used]
        if not free:
            raise BankFull(
                f"cannot add prompt {name!r}: all {self.capacity} rows hold prompts "
                "(SERVE_MAX_PROMPTS); delete one first"
            )
        return free[0]

    def _publish(self) -> Snapshot:
        # Copies: the device arrays may share memory with numpy on the CPU backend, and the
        # host arrays change in place while a batch may still read the previous bank.
        bank = PaddedBank(jax.device_put(self._prompts.copy()), jax.device_put(self._mask.copy()))
        return Snapshot(bank, dict(self._rows))
