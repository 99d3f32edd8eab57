"""Per-device memory of a prompt-tuning step: frozen weights, prompt state, activations.

Weights and prompt state are exact (shapes, dtypes and the shardings the rules give).
Activations are an estimate of what backprop keeps alive, counted tensor by tensor per layer
(checked against XLA's buffer assignment in tests/test_partitioning_memory.py): with
`remat_policy="none"` every layer keeps its residual-stream copies, q/k/v/attention outputs,
attention probabilities and MLP hiddens; `"save_dots"` keeps only the weight-matmul outputs;
`"full"` keeps each layer's input, and one layer's full set is live again during its backward.
Logits and their softmax are float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.traverse_util import flatten_dict

from softprompt_jax.errors import SoftpromptError
from softprompt_jax.model import T5Config, param_shapes
from softprompt_jax.model.config import param_dtype as stored_dtype
from softprompt_jax.partitioning.rules import DATA, MODEL, Rules, standard_logical_axis_rules
from softprompt_jax.partitioning.shardings import param_specs

_RESID = ("batch", "length", "embed")
_HEADS = ("batch", "length", "heads", "kv")
_PROBS = ("batch", "heads", "length", None)
_MLP = ("batch", "length", "mlp")
_LOGITS = ("batch", "length", "vocab")


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device for one training step (weights and prompt state exact)."""

    frozen_weights: int
    prompt_state: int
    activations: int

    @property
    def total(self) -> int:
        return self.frozen_weights + self.prompt_state + self.activations


def memory_plan(
    cfg: T5Config,
    mesh_shape: tuple[int, int],
    *,
    batch_size: int,
    input_length: int,
    target_length: int,
    optimizer: optax.GradientTransformation,
    prompt_length: int = 100,
    param_dtype: str | None = None,
    rules: Rules | None = None,
) -> MemoryPlan:
    """Per-device bytes for `cfg` on a `(data, model)` mesh with this global batch and lengths.

    `optimizer` is the prompt's (its slots count as prompt state); `param_dtype` is the stored
    frozen-weight dtype (default: the compute dtype `cfg.dtype`; the output projection stays
    float32, as the loaders store it).
    """
    rules = standard_logical_axis_rules() if rules is None else rules
    data, model = mesh_shape
    if batch_size % data:
        raise SoftpromptError(
            f"batch size {batch_size} is not divisible by the data axis size {data}"
        )
    sizes = {DATA: data, MODEL: model}
    return MemoryPlan(
        frozen_weights=_weight_bytes(
            cfg.replace(remat_policy="none"),
            tuple(sizes.items()),
            tuple(rules),
            jnp.dtype(param_dtype or cfg.dtype).name,
        ),
        prompt_state=_prompt_state_bytes(cfg, prompt_length, optimizer),
        activations=_activation_bytes(
            cfg, sizes, rules, batch_size, prompt_length + input_length, target_length
        ),
    )


def memory_table(configs: dict[str, T5Config], mesh_shape: tuple[int, int], **plan_kwargs) -> str:
    """A Markdown table of `memory_plan` (GiB per device) for named configs; for the docs."""
    data, model = mesh_shape
    lines = [
        "| model | mesh data x model | frozen weights | prompt state | activations | total |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, cfg in configs.items():
        plan = memory_plan(cfg, mesh_shape, **plan_kwargs)
        cells = [plan.frozen_weights, plan.prompt_state, plan.activations, plan.total]
        lines.append(
            f"| {name} | {data} x {model} | "
            + " | ".join(f"{c / 2**30:.3f} GiB" for c in cells)
            + " |"
        )
    return "\n".join(lines)


@functools.lru_cache(maxsize=64)
def _weight_bytes(
    cfg: T5Config, sizes: tuple[tuple[str, int], ...], rules: Rules, dtype: str
) -> int:
    """Cached: tracing a deep model's init for its shapes and axes takes seconds."""
    shapes = flatten_dict(param_shapes(cfg), sep="/")
    specs = flatten_dict(param_specs(cfg, dict(sizes), rules), sep="/")
    return sum(
        math.prod(shapes[key].shape)
        // _ways(specs[key], dict(sizes))
        * stored_dtype(cfg, key, dtype).itemsize
        for key in shapes
    )


def _prompt_state_bytes(
    cfg: T5Config, prompt_length: int, optimizer: optax.GradientTransformation
) -> int:
    """Prompt, its gradient and optimizer slots, all float32 and replicated."""
    prompt = jax.ShapeDtypeStruct((prompt_length, cfg.emb_dim), jnp.float32)
    slots = jax.eval_shape(optimizer.init, prompt)
    leaves = [prompt, prompt, *jax.tree_util.tree_leaves(slots)]
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves)


def _activation_bytes(
    cfg: T5Config, sizes: dict[str, int], rules: Rules, batch: int, enc_len: int, dec_len: int
) -> int:
    c = jnp.dtype(cfg.dtype).itemsize
    h, k, d, m = cfg.num_heads, cfg.head_dim, cfg.emb_dim, cfg.mlp_dim

    def size(names: Sequence[str | None], shape: tuple[int, ...], itemsize: int = c) -> int:
        # XLA pads activation shards, so a non-dividing axis costs the rounded-up slice.
        spec = nn.logical_to_mesh_axes(tuple(names), rules)
        return (
            math.prod(-(-dim // _ways((entry,), sizes)) for dim, entry in zip(shape, spec))
            * itemsize
        )

    def resid(n: int) -> int:
        return size(_RESID, (batch, n, d))

    def heads(n: int) -> int:
        return size(_HEADS, (batch, n, h, k))

    def mlp(n: int) -> int:
        return size(_MLP, (batch, n, m))

    def probs(q: int, kv: int) -> int:
        return size(_PROBS, (batch, h, q, kv))

    e, t = enc_len, dec_len
    full_enc = 4 * resid(e) + 4 * heads(e) + probs(e, e) + 3 * mlp(e)
    full_dec = 6 * resid(t) + 6 * heads(t) + 2 * heads(e) + probs(t, t) + probs(t, e) + 3 * mlp(t)
    kept_enc, kept_dec = {
        "none": (full_enc, full_dec),
        "save_dots": (
            3 * resid(e) + 3 * heads(e) + 2 * mlp(e),
            5 * resid(t) + 5 * heads(t) + 2 * heads(e) + 2 * mlp(t),
        ),
        "full": (resid(e), resid(t)),
    }[cfg.remat_policy]
    # One layer's activations are live again while a rematerialised layer runs backward.
    transient = 0 if cfg.remat_policy == "none" else max(full_enc, full_dec)
    edges = 2 * resid(e) + 2 * size(_LOGITS, (batch, t, cfg.vocab_size), 4)
    return cfg.num_encoder_layers * kept_enc + cfg.num_decoder_layers * kept_dec + transient + edges


def _ways(spec: Sequence, sizes: dict[str, int]) -> int:
    """How many shards a `PartitionSpec` cuts an array into."""
    ways = 1
    for entry in spec:
        for axis in () if entry is None else (entry,) if isinstance(entry, str) else entry:
            ways *= sizes[axis]
    return ways
