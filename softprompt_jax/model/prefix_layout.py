"""How key/value prefixes (prefix tuning, P-tuning v2) are laid out, with and without the MLP.

A plain prefix is `{"key": k, "value": v}`, each float32 `[num_layers, P, num_kv_heads,
head_dim]`: layer `i` attends to `k[i]`, `v[i]` before its own keys and values (no RoPE).

A reparameterised prefix (Li & Liang's MLP, PEFT's `prefix_projection`) is
`{"embedding": [P, kv_dim], "mlp": {"wi": {"kernel": [kv_dim, projection_dim], "bias"},
"wo": {"kernel": [projection_dim, num_layers * 2 * kv_dim], "bias"}}}` with
`kv_dim = num_kv_heads * head_dim`; `tanh(embedding @ wi + b) @ wo + b` gives PEFT's table.

PEFT's table (`prompt_embeddings` in its adapter files) is `[P, num_layers * 2 * kv_dim]`:
each row viewed as `[num_layers, 2 (key, value), num_kv_heads, head_dim]`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

PLAIN_KEYS = frozenset({"key", "value"})
MLP_KEYS = frozenset({"embedding", "mlp"})


def is_prefix(prompt: Any) -> bool:
    """Whether `prompt` is a prefix (a mapping of arrays) rather than a prompt array."""
    return isinstance(prompt, Mapping)


def has_mlp(prefix: Mapping[str, Any]) -> bool:
    return set(prefix) == MLP_KEYS


def prefix_table(prefix: Mapping[str, Any]) -> jax.Array:
    """PEFT's `[P, num_layers * 2 * kv_dim]` table of a plain or reparameterised prefix."""
    if has_mlp(prefix):
        mlp = prefix["mlp"]
        hidden = jnp.tanh(prefix["embedding"] @ mlp["wi"]["kernel"] + mlp["wi"]["bias"])
        return hidden @ mlp["wo"]["kernel"] + mlp["wo"]["bias"]
    key, value = jnp.asarray(prefix["key"]), jnp.asarray(prefix["value"])
    layers, length = key.shape[:2]
    stacked = jnp.stack([key, value], axis=1)  # [layers, 2, P, heads, head_dim]
    return jnp.transpose(stacked, (2, 0, 1, 3, 4)).reshape(length, -1)


def split_table(table: jax.Array, num_layers: int, num_kv_heads: int) -> dict[str, jax.Array]:
    """The plain prefix `{"key", "value"}` of PEFT's table `[P, num_layers * 2 * kv_dim]`."""
    length = table.shape[0]
    rows = jnp.asarray(table).reshape(length, num_layers, 2, num_kv_heads, -1)
    rows = jnp.transpose(rows, (1, 2, 0, 3, 4))  # [layers, 2, P, heads, head_dim]
    return {"key": rows[:, 0], "value": rows[:, 1]}
