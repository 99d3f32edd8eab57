"""Partitioning without extra devices: T5X's rules, spec resolution, the memory plan, scan size.

Multi-device behaviour (8 forced CPU devices) is in test_partitioning_mesh.py; two processes
in test_multihost.py.
"""

from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax.traverse_util import flatten_dict
from jax.sharding import PartitionSpec as P

from softprompt_jax.model import T5, T5Config, get_config, param_shapes
from softprompt_jax.partitioning import (
    make_mesh,
    memory_plan,
    memory_table,
    param_specs,
    resolve_spec,
    standard_logical_axis_rules,
)
from softprompt_jax.train.optimizer import make_optimizer

SIZES = {"data": 2, "model": 4}


@pytest.mark.parametrize(
    ("dims", "expected"),
    [
        # (activation dims, parameter dims) -> mesh axes of T5X's names (notes 2.2)
        (
            (1, 1),
            {
                "batch": "data",
                "vocab": "model",
                "embed": None,
                "mlp": "model",
                "heads": "model",
                "kv": None,
                "joined_kv": "model",
            },
        ),
        ((2, 1), {"batch": "data", "vocab": "model", "embed": "model", "mlp": "model"}),
        ((1, 2), {"batch": "data", "vocab": "model", "embed": "data", "mlp": "model"}),
        ((2, 2), {"batch": "data", "embed": "model", "heads": "model"}),
    ],
)
def test_standard_rules_map_t5x_names(dims, expected):
    rules = standard_logical_axis_rules(*dims)
    for name, axis in expected.items():
        assert nn.logical_to_mesh_axes((name,), rules) == P(axis), name
    for name in ("relpos_buckets", "length", "layers", "prompt_length", "prompts"):
        assert nn.logical_to_mesh_axes((name,), rules) == P(None), name


def test_rule_order_resolves_like_t5x():
    # (2,2): rules apply in order and a mesh axis is used once per array, so a kernel
    # `(embed, mlp)` gives model to mlp (earlier rule) and embed falls back to data.
    rules = standard_logical_axis_rules(2, 2)
    assert nn.logical_to_mesh_axes(("embed", "mlp"), rules) == P("data", "model")
    assert nn.logical_to_mesh_axes(("batch", "length", "embed"), rules) == P("data", None, "model")
    fsdp = standard_logical_axis_rules(1, 2)
    assert nn.logical_to_mesh_axes(("embed", "mlp"), fsdp) == P("data", "model")
    assert nn.logical_to_mesh_axes(("batch", "length", "embed"), fsdp) == P("data", None, None)
    extra = standard_logical_axis_rules(additional_rules=[("prompt_length", "model")])
    assert nn.logical_to_mesh_axes(("prompt_length",), extra) == P(None)  # built-in rule wins


def test_unknown_partitioning_dims_are_rejected():
    with pytest.raises(ValueError, match="activation_partitioning_dims=3"):
        standard_logical_axis_rules(3, 1)


def test_non_dividing_axis_is_replicated_with_a_warning(caplog):
    rules = standard_logical_axis_rules()
    with caplog.at_level(logging.WARNING):
        spec = resolve_spec(("heads", "relpos_buckets"), (6, 32), SIZES, rules, name="relpos")
    assert spec == P(None, None)
    assert "relpos" in caplog.text and "size 6" in caplog.text and "size 4" in caplog.text
    assert resolve_spec(("heads", "relpos_buckets"), (8, 32), SIZES, rules) == P("model", None)
    with pytest.raises(ValueError, match=r"do not fit shape \(8,\)"):
        resolve_spec(("embed", "mlp"), (8,), SIZES, rules)


def test_param_specs_cover_every_param_of_small():
    cfg = get_config("t5_1_1_small").replace(scan_layers=True)
    specs = flatten_dict(param_specs(cfg, SIZES))
    shapes = flatten_dict(param_shapes(cfg))
    assert specs.keys() == shapes.keys()
    assert specs[("encoder", "layers", "attention", "query", "kernel")] == P(None, None, "model")
    assert specs[("decoder", "layers", "mlp", "wo", "kernel")] == P(None, "model", None)
    assert specs[("decoder", "logits_dense", "kernel")] == P(None, "model")
    # small has 6 heads: its relpos tables cannot be split 4 ways and stay whole.
    assert specs[("encoder", "relpos_bias", "rel_embedding")] == P(None, None)


def test_make_mesh_on_one_device():
    mesh = make_mesh()
    assert dict(mesh.shape) == {"data": 1, "model": 1}
    with pytest.raises(ValueError, match="needs 2 devices; only 1"):
        make_mesh(1, 2)
    with pytest.raises(ValueError, match="must be positive"):
        make_mesh(0, 1)


def test_memory_plan_of_xxl_on_a_pod_slice():
    xxl = get_config("t5_1_1_xxl").replace(scan_layers=True)
    plan = memory_plan(
        xxl,
        (1, 32),
        batch_size=32,
        input_length=512,
        target_length=8,
        prompt_length=100,
        optimizer=make_optimizer(),
    )
    total_params = sum(s.size for s in jax.tree_util.tree_leaves(param_shapes(xxl)))
    assert 11.1e9 < total_params < 11.2e9
    # bf16 weights over 32 model shards, 2 more bytes per weight of the float32 output
    # projection, plus the few replicated norms and (64-head) relpos.
    sharded = (total_params + xxl.emb_dim * xxl.vocab_size) * 2 / 32
    assert sharded < plan.frozen_weights < sharded * 1.01
    # Prompt (100 x 4096 f32), its gradient and Adafactor's full `v` (100 < 128 rows: not
    # factored), plus its (1,)-shaped row/column placeholders and step count.
    assert plan.prompt_state == 3 * 100 * 4096 * 4 + 3 * 4
    fsdp = memory_plan(
        xxl,
        (4, 8),
        batch_size=32,
        input_length=512,
        target_length=8,
        prompt_length=100,
        optimizer=make_optimizer(),
        rules=standard_logical_axis_rules(1, 2),
    )
    assert fsdp.frozen_weights < plan.frozen_weights * 1.01  # 8 model x 4 data = 32 ways too


def test_memory_plan_activations_follow_batch_and_remat():
    cfg = get_config("t5_1_1_base").replace(scan_layers=True)  # scanned: quick to trace
    kwargs = dict(input_length=256, target_length=16, prompt_length=20, optimizer=make_optimizer())
    small, large = (memory_plan(cfg, (2, 1), batch_size=b, **kwargs).activations for b in (8, 16))
    assert large == 2 * small  # activations are per example
    none, dots, full = (
        memory_plan(cfg.replace(remat_policy=p), (2, 1), batch_size=8, **kwargs).activations
        for p in ("none", "save_dots", "full")
    )
    assert full < dots < none
    with pytest.raises(ValueError, match="batch size 6 is not divisible by the data axis size 4"):
        memory_plan(cfg, (4, 1), batch_size=6, **kwargs)


def test_memory_table_lists_every_config():
    table = memory_table(
        {"base": get_config("t5_1_1_base").replace(scan_layers=True)},
        (1, 8),
        batch_size=8,
        input_length=128,
        target_length=8,
        optimizer=make_optimizer(),
    )
    lines = table.splitlines()
    assert lines[0].startswith("| model |") and len(lines) == 3
    assert lines[2].startswith("| base | 1 x 8 |") and lines[2].count("GiB") == 4


def test_scanning_shrinks_the_program_of_a_deep_model():
    """The compile-time win of scan (bench/compile_time_scan.py times it): a 24-layer stack
    lowers to one layer body instead of 24 copies."""

    def lines(scan: bool) -> int:
        cfg = T5Config(
            vocab_size=128,
            emb_dim=8,
            num_heads=2,
            head_dim=4,
            mlp_dim=16,
            num_encoder_layers=24,
            num_decoder_layers=24,
            dtype="float32",
            scan_layers=scan,
        )
        tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)
        forward = jax.jit(lambda p, a, b: T5(cfg).apply({"params": p}, a, b, enable_dropout=False))
        return forward.lower(param_shapes(cfg), tokens, tokens).as_text().count("\n")

    unscanned, scanned = lines(False), lines(True)
    assert scanned * 5 < unscanned, (scanned, unscanned)
