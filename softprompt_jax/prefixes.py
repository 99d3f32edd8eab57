"""Key/value prefixes for decoder-only models: prefix tuning and P-tuning v2.

A prefix gives every layer's self-attention `P` extra keys and values in front of its own,
as PEFT's `PrefixTuningConfig` does through `past_key_values`: always visible, not rotated by
RoPE, the input tokens' positions starting after them. It is a pytree: plain per-layer keys
and values (P-tuning v2, `{"key", "value"}` as `checkpoints/prefix_files.py` lays them out),
or an embedding and an MLP that produce PEFT's table (Li & Liang's reparameterisation, PEFT's
`prefix_projection`): `{"embedding": [P, kv_dim], "mlp": {"wi": {"kernel": [kv_dim,
projection_dim], "bias"}, "wo": {"kernel": [projection_dim, num_layers * 2 * kv_dim],
"bias"}}}`, `tanh(embedding @ wi + b) @ wo + b`. `fold_prefix` turns the second into the
first, with the same logits, for export. `prefix_table` and `init_mlp` serve T5's prefixes
(`t5_prefixes.py`) too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from softprompt_jax.checkpoints.prefix_files import PLAIN_KEYS, kv_table, split_table
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.model.decoder_config import DecoderOnlyConfig, is_decoder_only

Prefix = dict
MLP_KEYS = frozenset({"embedding", "mlp"})


def is_prefix(prompt: Any) -> bool:
    """Whether `prompt` is a prefix (a mapping of arrays) rather than a prompt array."""
    return isinstance(prompt, Mapping)


def has_mlp(prefix: Mapping[str, Any]) -> bool:
    """Whether `prefix` is reparameterised through the MLP (`{"embedding", "mlp"}`)."""
    return set(prefix) == MLP_KEYS


def prefix_table(prefix: Mapping[str, Any]) -> jax.Array:
    """PEFT's `[P, num_layers * 2 * kv_dim]` table of a table, an MLP or plain keys/values."""
    if set(prefix) == {"table"}:
        return jnp.asarray(prefix["table"])
    if has_mlp(prefix):
        mlp = prefix["mlp"]
        hidden = jnp.tanh(prefix["embedding"] @ mlp["wi"]["kernel"] + mlp["wi"]["bias"])
        return hidden @ mlp["wo"]["kernel"] + mlp["wo"]["bias"]
    return kv_table(prefix)


def init_mlp(
    rng: np.random.Generator, length: int, width: int, out_dim: int, projection_dim: int
) -> Prefix:
    """A new MLP prefix `{"embedding": [length, width], "mlp"}` drawn as PEFT's `PrefixEncoder`.

    The embedding from N(0, 1), each linear layer's kernel and bias from
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's default).
    """
    if projection_dim <= 0:
        raise SoftpromptError(f"projection_dim must be positive, got {projection_dim}")

    def linear(fan_in: int, fan_out: int) -> dict[str, jax.Array]:
        bound = 1.0 / np.sqrt(fan_in)
        kernel = rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32)
        bias = rng.uniform(-bound, bound, (fan_out,)).astype(np.float32)
        return {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}

    return {
        "embedding": jnp.asarray(rng.standard_normal((length, width), np.float32)),
        "mlp": {"wi": linear(width, projection_dim), "wo": linear(projection_dim, out_dim)},
    }


def init_prefix(
    cfg: DecoderOnlyConfig, length: int, projection_dim: int | None = None, seed: int = 0
) -> Prefix:
    """A new float32 prefix of `length` positions; with `projection_dim`, through PEFT's MLP.

    Drawn as PEFT initialises its `PrefixEncoder`: the embedding from N(0, 1), each linear
    layer's kernel and bias from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's default).
    `kv_dim = num_kv_heads * head_dim` (PEFT's `token_dim` after its grouped-query fix).
    """
    _check_decoder_only(cfg)
    if length <= 0:
        raise SoftpromptError(f"prefix length must be positive, got {length}")
    rng = np.random.default_rng(seed)
    kv_dim = cfg.num_kv_heads * cfg.head_dim
    out_dim = cfg.num_layers * 2 * kv_dim
    if projection_dim is None:
        table = rng.standard_normal((length, out_dim), np.float32)
        return split_table(jnp.asarray(table), cfg.num_layers, cfg.num_kv_heads)
    return init_mlp(rng, length, kv_dim, out_dim, projection_dim)


def fold_prefix(cfg: DecoderOnlyConfig, prefix: Mapping) -> Prefix:
    """The plain per-layer keys and values a prefix gives (the MLP run once, for export)."""
    check_prefix(cfg, prefix)
    if not has_mlp(prefix):
        return {name: jnp.asarray(prefix[name], jnp.float32) for name in PLAIN_KEYS}
    return split_table(prefix_table(prefix), cfg.num_layers, cfg.num_kv_heads)


def prefix_key_values(cfg: DecoderOnlyConfig, prefix: Mapping) -> tuple[jax.Array, jax.Array]:
    """Every layer's prefix keys and values, `[layers, 1, P, kv_heads, head_dim]` each."""
    plain = fold_prefix(cfg, prefix)
    cast = lambda x: x[:, None].astype(cfg.compute_dtype)
    return cast(plain["key"]), cast(plain["value"])


def prefix_length(prefix: Mapping) -> int:
    """Positions the prefix adds in front of every layer's keys."""
    return prefix["embedding"].shape[0] if has_mlp(prefix) else prefix["key"].shape[1]


def check_prefix(cfg: DecoderOnlyConfig, prefix: Mapping) -> None:
    """Raise SoftpromptError naming the part and both shapes when `prefix` does not fit `cfg`."""
    _check_decoder_only(cfg)
    if set(prefix) not in (PLAIN_KEYS, MLP_KEYS):
        raise SoftpromptError(
            f"a prefix has keys {sorted(PLAIN_KEYS)} or {sorted(MLP_KEYS)}; got {sorted(prefix)}"
        )
    kv_dim = cfg.num_kv_heads * cfg.head_dim
    if has_mlp(prefix):
        wo = jnp.shape(prefix["mlp"]["wo"]["kernel"])
        expected = {
            "embedding": (None, kv_dim),
            "mlp/wo/kernel": (None, 2 * cfg.num_layers * kv_dim),
        }
        found = {"embedding": jnp.shape(prefix["embedding"]), "mlp/wo/kernel": wo}
    else:
        per_layer = (cfg.num_layers, None, cfg.num_kv_heads, cfg.head_dim)
        expected = {"key": per_layer, "value": per_layer}
        found = {name: jnp.shape(prefix[name]) for name in PLAIN_KEYS}
    for name, want in expected.items():
        got = found[name]
        if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got)):
            shown = tuple("P" if w is None else w for w in want)
            raise SoftpromptError(
                f"prefix {name} has shape {tuple(got)}; the model expects {shown}"
            )


def _check_decoder_only(cfg) -> None:
    if not is_decoder_only(cfg):
        raise SoftpromptError(
            f"prefixes are implemented for decoder-only models (GPT-2, Llama family); got "
            f"{type(cfg).__name__}"
        )
