"""Named prompts of any lengths used together: each example of a batch sees its own prompt.

A `PromptBank` is a pytree of separate `[length_i, emb_dim]` float32 arrays, so an optimizer
keeps separate statistics for each (Adafactor's factored moments, update clipping and weight
decay are per array): a prompt trained in a bank moves as it would alone on its examples.
In the model, shorter prompts are padded on the left with masked rows; relative positions
between real tokens are unchanged, so each example's output equals its prompt run alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save as save_safetensors

from softprompt_jax import storage
from softprompt_jax.checkpoints.prompt_files import load_prompt
from softprompt_jax.errors import SoftpromptError

FORMAT = "softprompt_jax.PromptBank"


@flax.struct.dataclass
class PromptBank:
    """Prompts by name; `bank.ids(names)` gives the `prompt_ids` that pick them per example."""

    prompts: tuple[jax.Array, ...]
    names: tuple[str, ...] = flax.struct.field(pytree_node=False)

    @classmethod
    def from_arrays(cls, prompts: Mapping[str, jax.Array | np.ndarray]) -> PromptBank:
        """A bank of these `[length, emb_dim]` arrays, in the mapping's order."""
        if not prompts:
            raise SoftpromptError("a prompt bank needs at least one prompt")
        arrays = tuple(jnp.asarray(p, jnp.float32) for p in prompts.values())
        names = tuple(prompts)
        widths = {name: a.shape for name, a in zip(names, arrays, strict=True)}
        bad = {n: s for n, s in widths.items() if len(s) != 2 or s[0] == 0}
        if bad:
            raise SoftpromptError(f"bank prompts must be [length > 0, emb_dim]; got shapes {bad}")
        if len({s[1] for s in widths.values()}) > 1:
            raise SoftpromptError(f"bank prompts have different embedding widths: {widths}")
        return cls(arrays, names)

    @classmethod
    def from_files(cls, files: Mapping[str, str | os.PathLike] | str | os.PathLike) -> PromptBank:
        """From `{name: prompt file or PEFT dir}`, or a folder of `<name>.npy` files."""
        if not isinstance(files, Mapping):
            folder = Path(files)
            files = {path.stem: path for path in sorted(folder.glob("*.npy"))}
            if not files:
                raise SoftpromptError(f"{folder}: no .npy prompt files in this folder")
        prompts = {name: load_prompt(path) for name, path in files.items()}
        for name, prompt in prompts.items():
            if isinstance(prompt, Mapping):  # a prefix's keys and values: one per run
                raise SoftpromptError(
                    f"PROMPTS member {name!r} ({files[name]}) is a prefix; a bank holds prompts "
                    "[length, emb_dim]: give a prefix alone as PROMPT_FILE"
                )
        return cls.from_arrays(prompts)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PromptBank:
        """A bank saved by `save`: one `.safetensors` file, or a folder of `.npy` files."""
        path = Path(path)
        if path.is_dir():
            return cls.from_files(path)
        try:
            file = safe_open(path, framework="numpy")
        except Exception as error:  # safetensors raises its own types for bad headers
            raise SoftpromptError(f"{path}: not a readable safetensors file ({error})") from error
        with file:
            metadata = file.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise SoftpromptError(
                    f"{path}: not a prompt bank file (metadata format {metadata.get('format')!r})"
                )
            names = json.loads(metadata["names"])
            missing = sorted(set(names) - set(file.keys()))
            if missing:
                raise SoftpromptError(f"{path}: the bank lists prompts {missing} it does not hold")
            return cls.from_arrays({name: file.get_tensor(name) for name in names})

    def save(self, path: str | os.PathLike) -> Path:
        """One `.safetensors` file (names and order in its metadata), else a folder of `.npy`."""
        path = Path(path)
        arrays = {name: np.asarray(p, np.float32) for name, p in zip(self.names, self.prompts)}
        if path.suffix == ".safetensors":
            metadata = {"format": FORMAT, "names": json.dumps(list(self.names))}
            path.parent.mkdir(parents=True, exist_ok=True)
            storage.write_bytes_atomic(path, save_safetensors(arrays, metadata=metadata))
            return path
        path.mkdir(parents=True, exist_ok=True)
        for name, array in arrays.items():
            storage.write_npy_atomic(path / f"{name}.npy", array)
        return path

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(p.shape[0] for p in self.prompts)

    @property
    def emb_dim(self) -> int:
        return self.prompts[0].shape[1]

    def __getitem__(self, name: str) -> jax.Array:
        return self.prompts[self.index(name)]

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise SoftpromptError(
                f"no prompt named {name!r} in the bank; it holds {self.names}"
            ) from None

    def ids(self, names: Sequence[str]) -> jax.Array:
        """`prompt_ids` `[len(names)]` (int32) for one prompt name per example."""
        return jnp.asarray([self.index(name) for name in names], jnp.int32)

    def padded(self) -> tuple[jax.Array, jax.Array]:
        """`[num_prompts, max_length, emb_dim]` prompts padded on the left, and their mask."""
        longest = max(self.lengths)
        rows = [jnp.pad(p, ((longest - p.shape[0], 0), (0, 0))) for p in self.prompts]
        mask = [jnp.arange(longest) >= longest - p.shape[0] for p in self.prompts]
        return jnp.stack(rows), jnp.stack(mask)


@flax.struct.dataclass
class PaddedBank:
    """Prompts already padded, as `PromptBank.padded` pads them, to a fixed capacity.

    A server's bank: its shape is fixed and it holds no names, so a jitted function taking it
    as an argument compiles once whatever prompts its rows hold (an unused row is all masked).
    """

    prompts: jax.Array  # [capacity, max_length, emb_dim]; a prompt sits at the end of its row
    mask: jax.Array  # [capacity, max_length] bool: True on a prompt's rows

    def padded(self) -> tuple[jax.Array, jax.Array]:
        return self.prompts, self.mask
