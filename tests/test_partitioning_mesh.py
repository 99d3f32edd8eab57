"""Partitioned training on 8 forced CPU devices: same numbers as one device, real shardings.

Everything multi-device runs in one subprocess (this file, run as a script with
`--xla_force_host_platform_device_count=8`), which writes its measurements to JSON; the tests
below assert on them. The in-process JAX of the rest of the suite keeps its single device.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import started_subprocesses

pytestmark = pytest.mark.slow  # end to end; `pytest -m 'not slow'` skips it

DEVICES = 8
TIMEOUT_S = 300
STEPS = 3
# float32 everywhere; sharded matmuls and all-reduces only reorder float sums.
LOSS_RTOL = 1e-5
PROMPT_ATOL = 1e-5
MESHES = {  # name -> (data, model, rules (activation dims, parameter dims), model changes)
    "8x1": (8, 1, (1, 1), {}),
    # parameter_partitioning_dims=2: embed also over data (FSDP-like).
    "2x4_fsdp_scan_remat_full": (2, 4, (1, 2), {"scan_layers": True, "remat_policy": "full"}),
    "1x8_remat_save_dots": (1, 8, (1, 1), {"remat_policy": "save_dots"}),
}
EVAL_MESH = "2x4_fsdp_scan_remat_full"
MEMORY_MESH = (2, 4)


def _tiny_config():
    from softprompt_jax.model import T5Config

    # Every sharded dim divides 8: heads 8, joined_kv 16, mlp 32, vocab 256. One layer per
    # stack and no dropout: XLA:CPU compile time dominates this file (scan over many layers
    # is checked against per-layer logits in test_model.py).
    return T5Config(
        vocab_size=256,
        emb_dim=16,
        num_heads=8,
        head_dim=2,
        mlp_dim=32,
        num_encoder_layers=1,
        num_decoder_layers=1,
        dtype="float32",
    )


@functools.cache
def _params() -> dict:
    import jax

    from softprompt_jax.model import init_params

    return jax.tree_util.tree_map(np.asarray, init_params(_tiny_config(), 0))


def _prompt() -> np.ndarray:
    return np.random.default_rng(1).uniform(-0.5, 0.5, (4, 16)).astype(np.float32)


def _batch(batch_size: int = 8, inputs: int = 8, targets: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    enc = rng.integers(3, 256, (batch_size, inputs)).astype(np.int32)
    enc[::2, -3:] = 0  # some padding
    dec_target = rng.integers(3, 256, (batch_size, targets)).astype(np.int32)
    dec_target[1::2, -1] = 0
    dec_input = np.concatenate([np.zeros_like(dec_target[:, :1]), dec_target[:, :-1]], axis=1)
    return {
        "encoder_input_tokens": enc,
        "decoder_input_tokens": dec_input,
        "decoder_target_tokens": dec_target,
    }


def _train(step, state, params, batch, rng, steps: int = STEPS):
    losses = []
    for _ in range(steps):
        state, metrics = step(state, params, batch, rng)
        losses.append(float(metrics["loss"]))
    return state, losses


def _check_training(results: dict) -> None:
    """One device (plain jit) vs every mesh in MESHES: losses, prompt, shardings, donation."""
    import jax

    from softprompt_jax.model.scan import stack_layers
    from softprompt_jax.partitioning import (
        global_batch,
        make_mesh,
        param_shardings,
        partitioned_eval_step,
        partitioned_train_step,
        place,
        replicated,
        standard_logical_axis_rules,
    )
    from softprompt_jax.train.optimizer import make_optimizer
    from softprompt_jax.train.train_step import init_train_state, make_eval_step, make_train_step

    cfg = _tiny_config()
    params = _params()
    prompt = _prompt()
    optimizer = make_optimizer()
    batch, rng = _batch(), jax.random.PRNGKey(2)

    one = jax.devices()[0]
    params, batch, rng = jax.device_put((params, batch, rng), one)
    state, losses = _train(
        jax.jit(make_train_step(cfg, optimizer)),
        jax.device_put(init_train_state(prompt, optimizer), one),
        params,
        batch,
        rng,
    )
    eval_loss = float(jax.jit(make_eval_step(cfg))(state, params, batch)["loss"])
    results["one_device"] = {
        "losses": losses,
        "prompt": np.asarray(state.prompt).tolist(),
        "eval_loss": eval_loss,
    }

    for name, (data, model, dims, changes) in MESHES.items():
        mesh_cfg = cfg.replace(**changes)
        mesh = make_mesh(data, model)
        rules = standard_logical_axis_rules(*dims)
        shardings = param_shardings(mesh_cfg, mesh, rules)
        sharded = place(stack_layers(params) if mesh_cfg.scan_layers else params, shardings)
        step = partitioned_train_step(
            make_train_step(mesh_cfg, optimizer), mesh, shardings, rules=rules
        )
        # Placed like the step's outputs, so the second call reuses the first compilation.
        first = place(init_train_state(prompt, optimizer), replicated(mesh))
        gbatch = global_batch(batch, mesh, rules)
        state, metrics = step(first, sharded, gbatch, rng)
        donated = bool(first.prompt.is_deleted())
        state, more = _train(step, state, sharded, gbatch, rng, STEPS - 1)
        flat = {
            "/".join(k.key for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(sharded)[0]
        }
        if name == EVAL_MESH:
            evaluate = partitioned_eval_step(make_eval_step(mesh_cfg), mesh, shardings, rules=rules)
            results["eval_loss"] = float(evaluate(state, sharded, gbatch)["loss"])
        results[name] = {
            "losses": [float(metrics["loss"]), *more],
            "prompt": np.asarray(state.prompt).tolist(),
            "donated": donated,
            "prompt_replicated": bool(state.prompt.sharding.is_fully_replicated),
            "batch_spec": list(gbatch["encoder_input_tokens"].sharding.spec),
            "batch_shard_shape": list(
                gbatch["encoder_input_tokens"].addressable_shards[0].data.shape
            ),
            "params": {
                key: {
                    "spec": [None if e is None else str(e) for e in leaf.sharding.spec],
                    "shard_shape": list(leaf.addressable_shards[0].data.shape),
                    "num_devices": len(leaf.sharding.device_set),
                }
                for key, leaf in flat.items()
            },
            "params_equal": all(
                np.array_equal(np.asarray(leaf), np.asarray(ref))
                for leaf, ref in zip(
                    jax.tree_util.tree_leaves(sharded),
                    jax.tree_util.tree_leaves(
                        stack_layers(params) if mesh_cfg.scan_layers else params
                    ),
                )
            ),
        }


def _check_errors(results: dict) -> None:
    """Messages of the errors a user can hit: mesh too big or partial, batch not divisible."""
    from softprompt_jax.partitioning import global_batch, local_batch_size, make_mesh

    def message(fn, *args, **kwargs) -> str:
        try:
            fn(*args, **kwargs)
        except ValueError as error:
            return str(error)
        return "no error"

    results["errors"] = {
        "mesh_too_big": message(make_mesh, 4, 4),
        "mesh_partial": message(make_mesh, 2, 2),
        "model_not_dividing": message(make_mesh, -1, 3),
        "batch_not_divisible": message(local_batch_size, 12, make_mesh(8, 1)),
        "global_batch_not_divisible": message(global_batch, _batch(6), make_mesh(4, 2)),
    }
    results["local_batch_size"] = local_batch_size(32, make_mesh(8, 1))


def _check_sharded_load(results: dict, workdir: Path) -> None:
    """T5X checkpoint -> shards: values, layouts, and that each read is one device's slice."""
    import jax
    from flax.traverse_util import flatten_dict

    from softprompt_jax.checkpoints import save_pretrained, save_t5x_checkpoint
    from softprompt_jax.checkpoints.sharded import load_sharded, read_config
    from softprompt_jax.checkpoints.t5x_legacy import T5XCheckpoint
    from softprompt_jax.model import param_dtype
    from softprompt_jax.model.scan import stack_layers
    from softprompt_jax.partitioning import make_mesh, memory_plan, param_shardings
    from softprompt_jax.train.optimizer import make_optimizer

    cfg = _tiny_config()
    params = _params()
    step_dir = save_t5x_checkpoint(workdir / "t5x", params, 7, inline_max_bytes=0)
    native_dir = save_pretrained(workdir / "native", cfg, params)

    reads: list[tuple[str, list]] = []
    original_read = T5XCheckpoint.read

    def recording_read(self, key, index=None, dtype=None):
        reads.append((key, [list(s.indices(n)) for s, n in zip(index, self.shapes()[key])]))
        return original_read(self, key, index, dtype)

    T5XCheckpoint.read = recording_read
    mesh = make_mesh(2, 4)
    out: dict = {"config": read_config(step_dir, "float32") == cfg}
    for layout, model_cfg in (("unscanned", cfg), ("scanned", cfg.replace(scan_layers=True))):
        reads.clear()
        shardings = param_shardings(model_cfg, mesh)
        loaded = load_sharded(step_dir, model_cfg, shardings)
        expected = stack_layers(params) if model_cfg.scan_layers else params
        out[layout] = {
            "equal": all(
                np.array_equal(np.asarray(a), b)
                for a, b in zip(
                    jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(expected)
                )
            ),
            "shardings_match": all(
                a.sharding == s
                for a, s in zip(
                    jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(shardings)
                )
            ),
            "reads": list(reads),
        }
    T5XCheckpoint.read = original_read
    out["shapes"] = {key: list(leaf.shape) for key, leaf in flatten_dict(params, sep="/").items()}

    bf16_cfg = cfg.replace(dtype="bfloat16")
    bf16 = flatten_dict(load_sharded(step_dir, bf16_cfg, param_shardings(cfg, mesh)), sep="/")
    stored = {key: param_dtype(bf16_cfg, key, "bfloat16") for key in bf16}  # logits stay f32
    out["bf16"] = all(
        bf16[key].dtype == stored[key]
        and np.array_equal(np.asarray(bf16[key]), np.asarray(value).astype(stored[key]))
        for key, value in flatten_dict(params, sep="/").items()
    )
    device = jax.devices()[5]  # what one device holds is what the memory plan counts
    held = sum(
        s.data.nbytes for a in bf16.values() for s in a.addressable_shards if s.device == device
    )
    plan = memory_plan(
        bf16_cfg, (2, 4), batch_size=2, input_length=1, target_length=1, optimizer=make_optimizer()
    )
    out["bf16_bytes"] = [held, plan.frozen_weights]
    scanned = cfg.replace(scan_layers=True)
    native = load_sharded(native_dir, scanned, param_shardings(scanned, mesh))
    out["native_scanned_equal"] = all(
        np.array_equal(np.asarray(a), b) and a.sharding.spec == s.spec
        for a, b, s in zip(
            jax.tree_util.tree_leaves(native),
            jax.tree_util.tree_leaves(stack_layers(params)),
            jax.tree_util.tree_leaves(param_shardings(scanned, mesh)),
        )
    )
    try:
        load_sharded(step_dir, cfg.replace(mlp_dim=64), param_shardings(cfg, mesh))
    except ValueError as error:
        out["mismatch_error"] = str(error)
    results["load"] = out


def _check_memory(results: dict) -> None:
    """memory_plan vs real shard sizes (weights, prompt state) and XLA's buffers (activations)."""
    import jax
    import jax.numpy as jnp

    from softprompt_jax.losses import LossConfig, prompt_loss
    from softprompt_jax.model import T5Config, param_shapes
    from softprompt_jax.partitioning import (
        batch_sharding,
        make_mesh,
        memory_plan,
        param_shardings,
        partition,
        place,
        replicated,
        standard_logical_axis_rules,
    )
    from softprompt_jax.train.optimizer import make_optimizer
    from softprompt_jax.train.train_step import init_train_state

    cfg, params = _tiny_config(), _params()
    weights = {}
    for name, (data, model, dims, _) in MESHES.items():
        mesh, rules = make_mesh(data, model), standard_logical_axis_rules(*dims)
        sharded = place(params, param_shardings(cfg, mesh, rules))
        device = jax.devices()[5]
        held = sum(
            shard.data.nbytes
            for leaf in jax.tree_util.tree_leaves(sharded)
            for shard in leaf.addressable_shards
            if shard.device == device
        )
        plan = memory_plan(
            cfg,
            (data, model),
            batch_size=8,
            input_length=8,
            target_length=4,
            prompt_length=4,
            optimizer=make_optimizer(),
            rules=rules,
        )
        weights[name] = [held, plan.frozen_weights]
    state = init_train_state(np.zeros((4, cfg.emb_dim), np.float32), make_optimizer())
    # The prompt, its gradient (same size) and the optimizer slots; not the step counter.
    state_bytes = 2 * state.prompt.nbytes + sum(
        x.nbytes for x in jax.tree_util.tree_leaves(state.opt_state)
    )
    results["memory_weights"] = weights
    results["memory_prompt_state"] = [state_bytes, plan.prompt_state]

    # Activations: the prompt gradient of a wider scanned model (scan is where remat pays off
    # on XLA:CPU too); the optimizer update adds nothing that scales with the batch.
    batch, inputs, targets, prompt_length = 8, 48, 16, 8
    mesh = make_mesh(*MEMORY_MESH)
    abstract_batch = {
        key: jax.ShapeDtypeStruct((batch, length), jnp.int32)
        for key, length in (
            ("encoder_input_tokens", inputs),
            ("decoder_input_tokens", targets),
            ("decoder_target_tokens", targets),
        )
    }
    activations = {}
    for policy in ("none", "full"):
        deep = T5Config(
            vocab_size=1024,
            emb_dim=64,
            num_heads=8,
            head_dim=16,
            mlp_dim=256,
            num_encoder_layers=3,
            num_decoder_layers=3,
            dtype="float32",
            scan_layers=True,
            remat_policy=policy,
        )
        shardings = param_shardings(deep, mesh)
        abstract_params = jax.tree_util.tree_map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            param_shapes(deep),
            shardings,
        )

        def grad(prompt, params, batch, deep=deep):
            loss = lambda p: prompt_loss(p, deep, params, batch, LossConfig(enable_dropout=False))
            return jax.grad(lambda p: loss(p)[0])(prompt)

        compiled = (
            partition(
                grad, mesh, (replicated(mesh), shardings, batch_sharding(mesh)), replicated(mesh)
            )
            .lower(
                jax.ShapeDtypeStruct((prompt_length, 64), jnp.float32),
                abstract_params,
                abstract_batch,
            )
            .compile()
        )
        plan = memory_plan(
            deep,
            MEMORY_MESH,
            batch_size=batch,
            input_length=inputs,
            target_length=targets,
            prompt_length=prompt_length,
            optimizer=make_optimizer(),
        )
        activations[policy] = [compiled.memory_analysis().temp_size_in_bytes, plan.activations]
    results["memory_activations"] = activations


def run_checks(out_file: str, workdir: str) -> None:
    """Entry point of the 8-device subprocess."""
    import jax

    assert jax.device_count() == DEVICES, jax.devices()
    results: dict = {}
    _check_training(results)
    _check_errors(results)
    _check_sharded_load(results, Path(workdir))
    _check_memory(results)
    Path(out_file).write_text(json.dumps(results))


def start_subprocesses(workdir: Path) -> list[subprocess.Popen]:
    """The 8-device run (conftest starts it right after collection)."""
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}",
    }
    with (workdir / "log.txt").open("w") as log:
        return [
            subprocess.Popen(
                [sys.executable, __file__, str(workdir / "results.json"), str(workdir)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        ]


@pytest.fixture(scope="module")
def results() -> dict:
    workdir, (proc,) = started_subprocesses(__name__)
    try:
        proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"8-device subprocess gave no result in {TIMEOUT_S}s")
    log = (workdir / "log.txt").read_text()
    assert proc.returncode == 0, f"8-device subprocess failed:\n{log[-6000:]}"
    return json.loads((workdir / "results.json").read_text())


@pytest.mark.parametrize("mesh", list(MESHES))
def test_meshes_train_like_one_device(results, mesh):
    ref, got = results["one_device"], results[mesh]
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=LOSS_RTOL)
    np.testing.assert_allclose(got["prompt"], ref["prompt"], rtol=0, atol=PROMPT_ATOL)
    assert ref["losses"][0] != ref["losses"][-1]  # the prompt really moved
    assert got["params_equal"]


def test_partitioned_eval_matches_one_device(results):
    np.testing.assert_allclose(
        results["eval_loss"], results["one_device"]["eval_loss"], rtol=LOSS_RTOL
    )


@pytest.mark.parametrize("mesh", list(MESHES))
def test_state_is_replicated_and_donated_batch_split(results, mesh):
    data = MESHES[mesh][0]
    got = results[mesh]
    assert got["donated"] and got["prompt_replicated"]
    assert got["batch_spec"] == ["data"]
    assert got["batch_shard_shape"] == [8 // data, 8]


def test_standard_rules_shard_params_over_model(results):
    params = results["1x8_remat_save_dots"]["params"]
    expected = {  # T5X 1-D specs (notes 2.2) and the slice each device holds (model = 8)
        "token_embedder/embedding": (["model", None], [32, 16]),
        "encoder/relpos_bias/rel_embedding": (["model", None], [1, 32]),
        "encoder/layers_0/attention/query/kernel": ([None, "model"], [16, 2]),
        "encoder/layers_0/attention/out/kernel": (["model", None], [2, 16]),
        "encoder/layers_0/mlp/wi_0/kernel": ([None, "model"], [16, 4]),
        "decoder/layers_0/mlp/wo/kernel": (["model", None], [4, 16]),
        "decoder/layers_0/encoder_decoder_attention/value/kernel": ([None, "model"], [16, 2]),
        "decoder/logits_dense/kernel": ([None, "model"], [16, 32]),
        "encoder/encoder_norm/scale": ([None], [16]),
        "decoder/layers_0/pre_mlp_layer_norm/scale": ([None], [16]),
    }
    for key, (spec, shard) in expected.items():
        assert (params[key]["spec"], params[key]["shard_shape"]) == (spec, shard), key
        assert params[key]["num_devices"] == DEVICES


def test_data_only_mesh_replicates_params(results):
    shapes = results["load"]["shapes"]
    for key, leaf in results["8x1"]["params"].items():
        assert leaf["shard_shape"] == shapes[key], key


def test_scanned_fsdp_specs(results):
    params = results["2x4_fsdp_scan_remat_full"]["params"]  # embed over data, leading layers
    assert params["encoder/layers/attention/query/kernel"] == {
        "spec": [None, "data", "model"],
        "shard_shape": [1, 8, 4],
        "num_devices": DEVICES,
    }
    assert params["decoder/layers/mlp/wo/kernel"]["spec"] == [None, "model", "data"]
    assert params["token_embedder/embedding"]["spec"] == ["model", "data"]
    assert params["token_embedder/embedding"]["shard_shape"] == [64, 8]
    assert params["encoder/encoder_norm/scale"]["shard_shape"] == [8]
    assert params["encoder/layers/pre_mlp_layer_norm/scale"]["shard_shape"] == [1, 8]


def test_error_messages_name_both_numbers(results):
    errors = results["errors"]
    assert "needs 16 devices" in errors["mesh_too_big"] and "only 8" in errors["mesh_too_big"]
    assert "uses 4 of the 8 devices" in errors["mesh_partial"]
    assert "model=3" in errors["model_not_dividing"]
    assert "batch size 12" in errors["batch_not_divisible"]
    assert "data axis size 8" in errors["batch_not_divisible"]
    assert "global batch size 6" in errors["global_batch_not_divisible"]
    assert "data axis size 4" in errors["global_batch_not_divisible"]
    assert results["local_batch_size"] == 32


@pytest.mark.parametrize("layout", ["unscanned", "scanned"])
def test_sharded_load_matches_and_reads_only_slices(results, layout):
    load = results["load"]
    assert load["config"]
    assert load[layout]["equal"] and load[layout]["shardings_match"]
    reads = load[layout]["reads"]
    query = "encoder/layers_0/attention/query/kernel"  # (16, 16), P(None, 'model') on 2x4
    slices = sorted(index for key, index in reads if key == query)
    assert slices == [[[0, 16, 1], [c, c + 4, 1]] for c in (0, 4, 8, 12)]  # each once
    embedding = [index for key, index in reads if key == "token_embedder/embedding"]
    assert len(embedding) == 4 and all(rows[1] - rows[0] == 64 for rows, _ in embedding)
    # No sharded leaf is ever read whole; replicated ones (norms) are read once.
    for key, index in reads:
        shape = load["shapes"][key]
        read = np.prod([stop - start for start, stop, _ in index])
        if key.endswith("kernel") or key.endswith("embedding"):
            assert read * 4 == np.prod(shape), (key, index)


def test_sharded_load_casts_converts_and_checks(results):
    load = results["load"]
    assert load["bf16"] and load["native_scanned_equal"]
    assert load["bf16_bytes"][0] == load["bf16_bytes"][1]
    assert re.search(r"(en|de)coder/layers_0/mlp/wi_0/kernel", load["mismatch_error"])
    assert "(16, 32)" in load["mismatch_error"] and "(16, 64)" in load["mismatch_error"]


def test_memory_plan_weights_and_prompt_state_are_exact(results):
    for mesh, (held, planned) in results["memory_weights"].items():
        assert held == planned, mesh
    held, planned = results["memory_prompt_state"]
    assert held == planned


def test_memory_plan_activations_track_xla(results):
    measured = {policy: values[0] for policy, values in results["memory_activations"].items()}
    planned = {policy: values[1] for policy, values in results["memory_activations"].items()}
    for policy in measured:
        assert 0.5 <= measured[policy] / planned[policy] <= 2.0, (policy, measured, planned)
    assert measured["full"] < measured["none"] and planned["full"] < planned["none"]


if __name__ == "__main__":
    run_checks(*sys.argv[1:])
