"""T5X's logical-axis-to-mesh rules (`t5x.partitioning.standard_logical_axis_rules`), plus prompts.

A rule list is an ordered tuple of `(logical name, mesh axis or None)`; flax resolves it in
priority order and uses each mesh axis at most once per array, so the order of the rules below
is part of their meaning (it is T5X's order).
"""

from __future__ import annotations

from collections.abc import Sequence

from softprompt_jax.errors import SoftpromptError

DATA, MODEL = "data", "model"

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Axes never sharded, appended by T5X to every rule set.
_REPLICATED = ("relpos_buckets", "abspos_buckets", "length", "layers", "stack", "mlp_activations")
# The prompt (`[prompt_length, embed]`, or a bank `[prompts, prompt_length, embed]`) is tiny and
# always replicated; its sharding is set explicitly, these rules only cover logical constraints.
PROMPT_RULES: Rules = (("prompts", None), ("prompt_length", None))

_BASE: dict[tuple[int, int], Rules] = {
    (1, 1): (
        ("batch", DATA),
        ("vocab", MODEL),
        ("embed", None),
        ("mlp", MODEL),
        ("heads", MODEL),
        ("kv", None),
        ("joined_kv", MODEL),
    ),
    (2, 1): (
        ("batch", DATA),
        ("vocab", MODEL),
        ("mlp", MODEL),
        ("heads", MODEL),
        ("kv", None),
        ("joined_kv", MODEL),
        ("embed", MODEL),
    ),
    (1, 2): (
        ("batch", DATA),
        ("vocab", MODEL),
        ("embed", DATA),
        ("mlp", MODEL),
        ("heads", MODEL),
        ("kv", None),
        ("joined_kv", MODEL),
    ),
    (2, 2): (
        ("batch", DATA),
        ("vocab", MODEL),
        ("mlp", MODEL),
        ("heads", MODEL),
        ("kv", None),
        ("joined_kv", MODEL),
        ("embed", MODEL),
        ("embed", DATA),
    ),
}


def standard_logical_axis_rules(
    activation_partitioning_dims: int = 1,
    parameter_partitioning_dims: int = 1,
    additional_rules: Sequence[tuple[str, str | None]] = (),
) -> Rules:
    """T5X's standard rules; `(1, 2)` also shards params' `embed` over `data` (FSDP-like).

    `(1, 1)`: batch->data; vocab, mlp, heads, joined_kv->model; embed, kv->replicated.
    `(2, 1)` also shards activations' `embed` over `model`. Prompt axes are always replicated.
    """
    key = (activation_partitioning_dims, parameter_partitioning_dims)
    if key not in _BASE:
        raise SoftpromptError(
            f"activation_partitioning_dims={key[0]}, parameter_partitioning_dims={key[1]}: "
            "each must be 1 or 2"
        )
    replicated = tuple((name, None) for name in _REPLICATED)
    return (
        _BASE[key]
        + replicated
        + PROMPT_RULES
        + tuple((name, axis) for name, axis in additional_rules)
    )
