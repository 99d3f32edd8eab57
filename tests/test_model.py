"""The T5 module itself: T5X's tree and axes, published sizes, dtypes, dropout, scan, remat."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import softprompt_jax as sp
from softprompt_jax.model import cast_params, logical_axes
from softprompt_jax.model.scan import stack_layers, unstack_layers

TINY = sp.get_config("t5_1_1_tiny")
ENCODER = jnp.array([[37, 6, 7, 1, 0, 0], [8, 9, 10, 11, 12, 1]], jnp.int32)
DECODER = jnp.array([[0, 3, 4, 1], [0, 5, 6, 7]], jnp.int32)


@pytest.fixture(scope="module")
def params():
    return sp.init_params(TINY, 1)


def flat(tree) -> dict:
    return flatten_dict(tree, sep="/")


def t5x_paths(num_layers: int, gated: bool, separate_logits: bool) -> set[str]:
    """T5X's parameter names, spelled out independently of the module code."""
    mlp = ["wi_0", "wi_1", "wo"] if gated else ["wi", "wo"]
    attention = lambda prefix: {f"{prefix}/{p}/kernel" for p in ("query", "key", "value", "out")}
    names = {
        "token_embedder/embedding",
        "encoder/relpos_bias/rel_embedding",
        "encoder/encoder_norm/scale",
        "decoder/relpos_bias/rel_embedding",
        "decoder/decoder_norm/scale",
    }
    for i in range(num_layers):
        e, d = f"encoder/layers_{i}", f"decoder/layers_{i}"
        names |= {f"{e}/pre_attention_layer_norm/scale", f"{e}/pre_mlp_layer_norm/scale"}
        names |= attention(f"{e}/attention") | {f"{e}/mlp/{m}/kernel" for m in mlp}
        names |= {
            f"{d}/pre_self_attention_layer_norm/scale",
            f"{d}/pre_cross_attention_layer_norm/scale",
            f"{d}/pre_mlp_layer_norm/scale",
        }
        names |= attention(f"{d}/self_attention") | attention(f"{d}/encoder_decoder_attention")
        names |= {f"{d}/mlp/{m}/kernel" for m in mlp}
    if separate_logits:
        names.add("decoder/logits_dense/kernel")
    return names


@pytest.mark.parametrize("name,gated", [("t5_1_1_tiny", True), ("t5_1_0_tiny", False)])
def test_parameter_paths_are_t5x(name, gated):
    cfg = sp.get_config(name)
    assert set(flat(sp.param_shapes(cfg))) == t5x_paths(2, gated, separate_logits=gated)


def test_every_parameter_has_t5x_logical_axes():
    allowed = {"vocab", "embed", "mlp", "heads", "joined_kv", "relpos_buckets"}
    shapes, axes = flat(sp.param_shapes(TINY)), flat(logical_axes(TINY))
    assert set(axes) == set(shapes)
    for path, spec in axes.items():
        assert len(spec) == len(shapes[path].shape), path
        assert set(spec) <= allowed, (path, spec)
    assert tuple(axes["encoder/layers_0/attention/query/kernel"]) == ("embed", "joined_kv")
    assert tuple(axes["decoder/layers_1/mlp/wo/kernel"]) == ("mlp", "embed")
    assert tuple(axes["token_embedder/embedding"]) == ("vocab", "embed")
    assert tuple(axes["decoder/logits_dense/kernel"]) == ("embed", "vocab")
    assert tuple(axes["encoder/relpos_bias/rel_embedding"]) == ("heads", "relpos_buckets")


# Parameter counts of the published T5 1.1 checkpoints (vocab 32128).
@pytest.mark.parametrize(
    "name,millions",
    [
        ("t5_1_1_small", 77.0),
        ("t5_1_1_base", 247.6),
        ("t5_1_1_large", 783.2),
        ("t5_1_1_xl", 2849.8),
        ("t5_1_1_xxl", 11135.3),
    ],
)
def test_named_sizes_have_published_parameter_counts(name, millions):
    count = sum(
        np.prod(x.shape) for x in jax.tree_util.tree_leaves(sp.param_shapes(sp.get_config(name)))
    )
    assert round(count / 1e6, 1) == millions


def test_small_has_fewer_attention_dims_than_embedding():
    shapes = flat(sp.param_shapes(sp.get_config("t5_1_1_small")))
    assert shapes["encoder/layers_0/attention/query/kernel"].shape == (512, 384)


def test_embeddings_with_mask_equal_token_ids(params):
    model = sp.T5(TINY)
    from_tokens = model.apply({"params": params}, ENCODER, DECODER, enable_dropout=False)
    embedded = model.apply({"params": params}, ENCODER, method=sp.T5.embed)
    from_embeddings = model.apply(
        {"params": params},
        None,
        DECODER,
        encoder_input_embeddings=embedded,
        encoder_mask=ENCODER > 0,
        enable_dropout=False,
    )
    np.testing.assert_array_equal(from_tokens, from_embeddings)


def test_encoder_padding_does_not_leak(params):
    """Extra padding after EOS leaves the logits of real positions unchanged."""
    model = sp.T5(TINY)
    short = model.apply({"params": params}, ENCODER[:1, :4], DECODER[:1], enable_dropout=False)
    padded = model.apply({"params": params}, ENCODER[:1], DECODER[:1], enable_dropout=False)
    np.testing.assert_allclose(short, padded, atol=1e-6)


def test_dropout_only_when_enabled(params):
    cfg = TINY.replace(dropout_rate=0.3)
    model = sp.T5(cfg)
    rngs = {"dropout": jax.random.PRNGKey(3)}
    off = model.apply({"params": params}, ENCODER, DECODER, enable_dropout=False, rngs=rngs)
    reference = sp.T5(TINY).apply({"params": params}, ENCODER, DECODER, enable_dropout=False)
    np.testing.assert_array_equal(off, reference)
    on = model.apply({"params": params}, ENCODER, DECODER, enable_dropout=True, rngs=rngs)
    assert np.abs(np.asarray(on) - np.asarray(off)).max() > 1e-3


@pytest.mark.parametrize("broadcast", [True, False])
def test_encoder_output_dropout_is_broadcast_over_length_like_flaxformer(params, broadcast):
    """flaxformer (the official prompt-tuning network) drops the same features at every
    position after `encoder_norm`; T5X's example network drops elements independently."""
    cfg = TINY.replace(dropout_rate=0.5, broadcast_encoder_output_dropout=broadcast)
    encoded = sp.T5(cfg).apply(
        {"params": params},
        ENCODER,
        enable_dropout=True,
        method=sp.T5.encode,
        rngs={"dropout": jax.random.PRNGKey(0)},
    )
    dropped = np.asarray(encoded) == 0  # [batch, length, embed]
    assert dropped.any()
    same_at_every_position = (dropped == dropped[:, :1, :]).all()
    assert same_at_every_position == broadcast


def test_bfloat16_compute_tracks_float32(params):
    reference = sp.T5(TINY).apply({"params": params}, ENCODER, DECODER, enable_dropout=False)
    bf16_params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    logits = sp.T5(TINY.replace(dtype="bfloat16")).apply(
        {"params": bf16_params}, ENCODER, DECODER, enable_dropout=False
    )
    assert logits.dtype == jnp.float32  # logits stay float32, as in T5X
    scale = np.abs(np.asarray(reference)).max()
    assert np.abs(np.asarray(logits) - np.asarray(reference)).max() < 0.05 * scale


@pytest.mark.parametrize(
    "changes",
    [
        {"scan_layers": True},
        {"remat_policy": "full"},
        {"scan_layers": True, "remat_policy": "save_dots"},
    ],
)
def test_scan_and_remat_give_the_same_logits(params, changes):
    cfg = TINY.replace(**changes)
    reference = sp.T5(TINY).apply({"params": params}, ENCODER, DECODER, enable_dropout=False)
    layout = stack_layers(params) if cfg.scan_layers else params
    assert {k: v.shape for k, v in flat(layout).items()} == {
        k: v.shape for k, v in flat(sp.param_shapes(cfg)).items()
    }
    logits = sp.T5(cfg).apply({"params": layout}, ENCODER, DECODER, enable_dropout=False)
    np.testing.assert_allclose(logits, reference, atol=1e-5, rtol=1e-5)


def test_scanned_axes_add_a_layers_axis():
    axes = flat(logical_axes(TINY.replace(scan_layers=True)))
    assert tuple(axes["encoder/layers/attention/query/kernel"]) == ("layers", "embed", "joined_kv")


def test_stack_and_unstack_round_trip(params):
    restored = flat(unstack_layers(stack_layers(params)))
    original = flat(params)
    assert set(restored) == set(original)
    for key, value in original.items():
        np.testing.assert_array_equal(restored[key], value)


def test_bad_inputs_get_clear_errors(params):
    model = sp.T5(TINY)
    with pytest.raises(ValueError, match="exactly one"):
        model.apply({"params": params}, None, DECODER, enable_dropout=False)
    embedded = jnp.zeros((2, 6, TINY.emb_dim))
    with pytest.raises(ValueError, match=r"encoder_mask has shape \(2, 5\)"):
        model.apply(
            {"params": params},
            None,
            DECODER,
            encoder_input_embeddings=embedded,
            encoder_mask=jnp.ones((2, 5)),
            enable_dropout=False,
        )
    with pytest.raises(ValueError, match="remat_policy"):
        TINY.replace(remat_policy="sometimes")


def test_cast_params_keeps_the_output_projection_float32(params):
    """T5X's rule for bf16 models, on arrays and on shapes alike (what the benchmarks build)."""
    for tree in (params, sp.param_shapes(TINY)):
        cast = flatten_dict(cast_params(TINY, tree, "bfloat16"), sep="/")
        assert cast.pop("decoder/logits_dense/kernel").dtype == jnp.float32
        assert {leaf.dtype for leaf in cast.values()} == {jnp.dtype(jnp.bfloat16)}
    tied = TINY.replace(logits_via_embedding=True)
    cast = cast_params(tied, sp.param_shapes(tied), "bfloat16")
    assert cast["token_embedder"]["embedding"].dtype == jnp.float32
