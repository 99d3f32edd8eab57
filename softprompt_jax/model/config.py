"""T5 architecture settings as a plain dataclass, plus the published sizes.

The same dataclass describes T5 1.1 (gated-GELU MLP, separate `logits_dense`)
and the original T5 (ReLU MLP, logits through the tied embedding).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from softprompt_jax.errors import SoftpromptError

REMAT_POLICIES = ("none", "full", "save_dots")
# T5X's einsums, `jax.nn.dot_product_attention` as jax chooses, or forced cuDNN flash attention.
ATTENTION_IMPLS = ("einsum", "fused", "cudnn")
# How a run computes, not what the network is: the same weights serve any of these.
RUN_TIME_FIELDS = frozenset(
    {
        "dropout_rate",
        "broadcast_encoder_output_dropout",
        "dtype",
        "float32_attention_logits",
        "scan_layers",
        "remat_policy",
        "attention_impl",
    }
)


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture and numerics of a T5 encoder-decoder.

    `dtype` is the compute (activation) dtype; the stored parameter dtype is a
    property of the parameter arrays themselves (loaders follow `param_dtype`).
    """

    vocab_size: int = 32128
    emb_dim: int = 768
    num_heads: int = 12
    head_dim: int = 64
    mlp_dim: int = 2048
    num_encoder_layers: int = 12
    num_decoder_layers: int = 12
    mlp_activations: tuple[str, ...] = ("gelu", "linear")
    logits_via_embedding: bool = False
    dropout_rate: float = 0.0
    # The dropout after `encoder_norm`: one mask per feature, shared over the length axis, as
    # in flaxformer's T5 1.1 (the official prompt-tuning code's network); False drops each
    # element on its own, as T5X's example network does. All other dropouts are broadcast.
    broadcast_encoder_output_dropout: bool = True
    dtype: str = "bfloat16"
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    float32_attention_logits: bool = False
    layer_norm_epsilon: float = 1e-6
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_impl: str = "einsum"

    def __post_init__(self) -> None:
        # gin and JSON hand us lists; the dataclass must stay hashable for jit.
        object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))
        if self.remat_policy not in REMAT_POLICIES:
            raise SoftpromptError(
                f"remat_policy={self.remat_policy!r}; expected one of {REMAT_POLICIES}"
            )
        if self.attention_impl not in ATTENTION_IMPLS:
            raise SoftpromptError(
                f"attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}"
            )
        for act in self.mlp_activations:
            if act not in ("gelu", "relu", "linear"):
                raise SoftpromptError(f"unknown MLP activation {act!r} in mlp_activations")

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    def replace(self, **changes) -> T5Config:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def architecture(self) -> dict:
        """The fields that define the network and its weights (no run-time settings)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUN_TIME_FIELDS}

    @classmethod
    def from_dict(cls, values: dict) -> T5Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SoftpromptError(
                f"unknown T5Config keys {unknown}; known keys are {sorted(known)}"
            )
        return cls(**values)


def param_dtype(cfg: T5Config, key: str, dtype: str | jnp.dtype) -> jnp.dtype:
    """Stored dtype of param `key` ('/'-path) when `dtype` is asked for, by T5X's rule.

    The output projection (`decoder/logits_dense/kernel`, or the tied `token_embedder/embedding`)
    stays float32, since logits are computed in float32; every other param is stored in `dtype`.
    """
    output = (
        "token_embedder/embedding" if cfg.logits_via_embedding else "decoder/logits_dense/kernel"
    )
    return jnp.dtype(jnp.float32 if key == output else dtype)


def cast_params(cfg: T5Config, params: dict, dtype: str | jnp.dtype) -> dict:
    """A param tree (arrays or `ShapeDtypeStruct`s) in the dtypes `param_dtype` gives."""

    def cast(path: tuple, leaf: jax.Array | jax.ShapeDtypeStruct) -> jax.Array:
        stored = param_dtype(cfg, "/".join(str(k.key) for k in path), dtype)
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(leaf.shape, stored)
        return leaf.astype(stored)

    return jax.tree_util.tree_map_with_path(cast, params)


def _t5_1_1(emb_dim: int, num_heads: int, num_layers: int, mlp_dim: int) -> T5Config:
    return T5Config(
        emb_dim=emb_dim,
        num_heads=num_heads,
        head_dim=64,
        mlp_dim=mlp_dim,
        num_encoder_layers=num_layers,
        num_decoder_layers=num_layers,
    )


# Published T5 1.1 sizes (t5x/examples/t5/t5_1_1/*.gin). The LM-adapted and
# Flan-T5 checkpoints share these shapes.
NAMED_CONFIGS: dict[str, T5Config] = {
    "t5_1_1_small": _t5_1_1(512, 6, 8, 1024),
    "t5_1_1_base": _t5_1_1(768, 12, 12, 2048),
    "t5_1_1_large": _t5_1_1(1024, 16, 24, 2816),
    "t5_1_1_xl": _t5_1_1(2048, 32, 24, 5120),
    "t5_1_1_xxl": _t5_1_1(4096, 64, 24, 10240),
    # Tiny models for tests and the offline demo.
    "t5_1_1_tiny": T5Config(
        vocab_size=32128,
        emb_dim=8,
        num_heads=4,
        head_dim=3,
        mlp_dim=16,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dtype="float32",
    ),
    "t5_1_0_tiny": T5Config(
        vocab_size=32128,
        emb_dim=8,
        num_heads=4,
        head_dim=3,
        mlp_dim=16,
        num_encoder_layers=2,
        num_decoder_layers=2,
        mlp_activations=("relu",),
        logits_via_embedding=True,
        dtype="float32",
    ),
}


def get_config(name: str) -> T5Config:
    """Look up a named config such as `t5_1_1_base`."""
    try:
        return NAMED_CONFIGS[name]
    except KeyError:
        raise SoftpromptError(
            f"unknown model config {name!r}; known: {sorted(NAMED_CONFIGS)}"
        ) from None


def infer_config_from_shapes(
    shapes: dict[str, Sequence[int]], *, num_heads: int | None = None, **overrides
) -> T5Config:
    """Guess a T5Config from a flat `{'encoder/layers_0/...': shape}` map.

    The head count is not visible in 2-D attention kernels; it is read from the
    relative-position table (`[heads, buckets]`).
    """

    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise SoftpromptError(f"cannot infer the T5 config: parameter {key!r} is missing")
        return tuple(shapes[key])

    vocab_size, emb_dim = shape("token_embedder/embedding")
    relpos_heads, num_buckets = shape("encoder/relpos_bias/rel_embedding")
    heads = num_heads or relpos_heads
    joined_kv = shape("encoder/layers_0/attention/query/kernel")[1]
    gated = "encoder/layers_0/mlp/wi_0/kernel" in shapes
    wi_key = "encoder/layers_0/mlp/wi_0/kernel" if gated else "encoder/layers_0/mlp/wi/kernel"
    mlp_dim = shape(wi_key)[1]

    def count_layers(stack: str) -> int:
        prefixes = {k.split("/")[1] for k in shapes if k.startswith(f"{stack}/layers_")}
        return len(prefixes)

    values = dict(
        vocab_size=vocab_size,
        emb_dim=emb_dim,
        num_heads=heads,
        head_dim=joined_kv // heads,
        mlp_dim=mlp_dim,
        num_encoder_layers=count_layers("encoder"),
        num_decoder_layers=count_layers("decoder"),
        mlp_activations=("gelu", "linear") if gated else ("relu",),
        logits_via_embedding="decoder/logits_dense/kernel" not in shapes,
        relative_attention_num_buckets=num_buckets,
    )
    values.update(overrides)
    return T5Config(**values)
