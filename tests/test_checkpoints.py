"""load_pretrained / save_pretrained against the real T5X fixture, HF dirs and our own format."""

import gzip
import json
import shutil
from pathlib import Path

import flax.serialization
import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest
import tensorstore as ts
from conftest import TEST_DATA
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.numpy import save_file

import softprompt_jax as sp
from softprompt_jax.checkpoints import detect_format, native, open_pretrained, t5x_legacy
from softprompt_jax.checkpoints.sharded import load_sharded
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.model import param_dtype
from softprompt_jax.model.scan import stack_layers
from softprompt_jax.partitioning import make_mesh, param_shardings

T5X_TINY = TEST_DATA / "t5x_tiny" / "checkpoint_3"
QUERY_0 = "encoder/layers_0/attention/query/kernel"
LOGITS = "decoder/logits_dense/kernel"


@pytest.fixture(scope="module")
def fixture_f32():
    return sp.load_pretrained(T5X_TINY, dtype="float32")


@pytest.fixture(scope="module")
def tiny():
    """The tiny config with random float32 params (no model compile needed)."""
    cfg = sp.get_config("t5_1_1_tiny")
    rng = np.random.default_rng(0)
    return cfg, jax.tree_util.tree_map(
        lambda s: rng.standard_normal(s.shape, np.float32), sp.param_shapes(cfg)
    )


def flat(tree) -> dict:
    return flatten_dict(tree, sep="/")


def assert_bit_exact(actual, expected):
    flat_actual, flat_expected = flat(actual), flat(expected)
    assert flat_actual.keys() == flat_expected.keys()
    for key, want in flat_expected.items():
        got, want = np.asarray(flat_actual[key]), np.asarray(want)
        assert (got.dtype, got.shape) == (want.dtype, want.shape), key
        assert got.tobytes() == want.tobytes(), key


def as_stored(cfg, params, dtype) -> dict:
    """`params` cast as the loaders store them: the output projection float32, the rest `dtype`."""
    flat_params = flat(params)
    return unflatten_dict(
        {
            tuple(key.split("/")): np.asarray(value).astype(param_dtype(cfg, key, dtype))
            for key, value in flat_params.items()
        }
    )


def copy_fixture(tmp_path) -> Path:
    """A writable copy of the (read-only) fixture step dir."""
    step_dir = Path(shutil.copytree(T5X_TINY, tmp_path / "checkpoint_3"))
    for path in [step_dir, *step_dir.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return step_dir


def edit_msgpack(step_dir: Path, edit) -> None:
    """Apply `edit` to the raw msgpack state (ext types untouched) and write it back."""
    file = step_dir / "checkpoint"
    state = msgpack.unpackb(file.read_bytes(), strict_map_key=False)
    edit(state)
    file.write_bytes(msgpack.packb(state, use_bin_type=True))


def read_zarr_with_numpy(directory: Path) -> np.ndarray:
    """An independent zarr v2 reader (gzip, C order, 2-D): no tensorstore involved."""
    meta = json.loads((directory / ".zarray").read_text())
    assert meta["compressor"]["id"] == "gzip" and meta["order"] == "C"
    rows, cols = meta["shape"]
    chunk_rows, chunk_cols = meta["chunks"]
    out = np.empty((rows, cols), np.dtype(meta["dtype"]))
    for i in range(-(-rows // chunk_rows)):
        for j in range(-(-cols // chunk_cols)):
            chunk = np.frombuffer(
                gzip.decompress((directory / f"{i}.{j}").read_bytes()), meta["dtype"]
            ).reshape(chunk_rows, chunk_cols)
            part = out[i * chunk_rows : (i + 1) * chunk_rows, j * chunk_cols : (j + 1) * chunk_cols]
            part[...] = chunk[: part.shape[0], : part.shape[1]]
    return out


# --- (a) the real T5X checkpoint ------------------------------------------------------------


def test_t5x_fixture_config_is_inferred(fixture_f32):
    cfg, _ = fixture_f32
    assert (cfg.vocab_size, cfg.emb_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim) == (
        32128,
        4,
        2,
        2,
        8,
    )
    assert (cfg.num_encoder_layers, cfg.num_decoder_layers) == (2, 2)
    assert cfg.mlp_activations == ("gelu", "linear") and not cfg.logits_via_embedding
    assert cfg.relative_attention_num_buckets == 4
    assert cfg.dtype == "float32"


def test_t5x_fixture_has_every_param_in_place(fixture_f32):
    cfg, params = fixture_f32
    expected = {k: s.shape for k, s in flat(sp.param_shapes(cfg)).items()}
    assert {k: v.shape for k, v in flat(params).items()} == expected
    assert len(expected) == 52
    assert all(v.dtype == jnp.float32 for v in flat(params).values())
    # Anchor values measured on this checkpoint (notes: official_prompt_tuning.md §3.1).
    embedding = np.asarray(params["token_embedder"]["embedding"])
    np.testing.assert_allclose(
        embedding[0], [0.07208829, 0.20919628, 1.646182, 1.7147633], rtol=1e-6
    )
    assert embedding.astype(np.float64).sum() == pytest.approx(-258.082182567852, abs=1e-9)
    np.testing.assert_allclose(
        params["encoder"]["encoder_norm"]["scale"],
        [0.93264055, 1.02932, 0.98174715, 0.98736763],
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        params["encoder"]["relpos_bias"]["rel_embedding"][0],
        [0.03067291, -0.78316545, -0.41009307, -0.10208409],
        rtol=1e-6,
    )


def test_t5x_fixture_matches_independent_decoders(fixture_f32):
    _, params = fixture_f32
    restored = flax.serialization.msgpack_restore((T5X_TINY / "checkpoint").read_bytes())
    stored = flatten_dict(
        restored["optimizer"]["target"],
        sep="/",
        is_leaf=lambda _, node: isinstance(node, dict) and "driver" in node,
    )
    zarr_keys = [k for k, v in stored.items() if isinstance(v, dict)]
    assert len(zarr_keys) == 38
    for key, value in flat(params).items():
        if key in zarr_keys:
            expected = read_zarr_with_numpy(T5X_TINY / stored[key]["kvstore"]["path"])
        else:
            expected = stored[key]  # inline: flax's own decoder, as T5X uses
        np.testing.assert_array_equal(np.asarray(value), expected, err_msg=key)


def test_bfloat16_keeps_the_output_projection_float32_as_t5x(tmp_path, fixture_f32):
    cfg_f32, params_f32 = fixture_f32
    cfg, params = sp.load_pretrained(T5X_TINY)  # default dtype
    assert cfg.dtype == "bfloat16"
    assert params["decoder"]["logits_dense"]["kernel"].dtype == jnp.float32
    assert params["decoder"]["layers_0"]["mlp"]["wo"]["kernel"].dtype == jnp.bfloat16
    assert_bit_exact(params, as_stored(cfg, params_f32, "bfloat16"))
    # T5X's rule: float32 params, activations in the compute dtype, logits in float32.
    enc = jnp.array([[37, 5, 12, 1, 0], [8, 9, 1, 0, 0]])
    dec = jnp.array([[0, 5, 6], [0, 7, 0]])
    logits = sp.T5(cfg).apply({"params": params}, enc, dec, enable_dropout=False)
    t5x = sp.T5(cfg_f32.replace(dtype="bfloat16")).apply(
        {"params": params_f32}, enc, dec, enable_dropout=False
    )
    np.testing.assert_array_equal(logits, t5x)
    # The sharded loader and our own format's round trip follow the same rule.
    assert_bit_exact(load_sharded(T5X_TINY, cfg, param_shardings(cfg, make_mesh(1, 1))), params)
    sp.save_pretrained(tmp_path / "model", cfg, params)
    assert_bit_exact(sp.load_pretrained(tmp_path / "model")[1], params)


def test_tied_embedding_stays_float32(tmp_path):
    cfg = sp.get_config("t5_1_0_tiny")  # original T5: ReLU, logits through the embedding
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(
        lambda s: rng.standard_normal(s.shape, np.float32), sp.param_shapes(cfg)
    )
    write_hf_dir(tmp_path, cfg, params)
    loaded_cfg, loaded = sp.load_pretrained(tmp_path, dtype="bfloat16")
    assert loaded_cfg == cfg.replace(dtype="bfloat16")
    assert loaded["token_embedder"]["embedding"].dtype == jnp.float32
    assert loaded["encoder"]["layers_0"]["mlp"]["wi"]["kernel"].dtype == jnp.bfloat16
    assert_bit_exact(loaded, as_stored(cfg, params, "bfloat16"))
    shardings = param_shardings(loaded_cfg, make_mesh(1, 1))
    assert_bit_exact(load_sharded(tmp_path, loaded_cfg, shardings), loaded)


def test_model_runs_on_the_t5x_fixture(fixture_f32):
    cfg, params = fixture_f32
    enc = jnp.array([[37, 5, 12, 1, 0], [8, 9, 1, 0, 0]])
    dec = jnp.array([[0, 5, 6], [0, 7, 0]])
    logits = sp.T5(cfg).apply({"params": params}, enc, dec, enable_dropout=False)
    assert logits.shape == (2, 3, 32128)
    assert bool(jnp.isfinite(logits).all())


def test_t5x_load_never_touches_optimizer_state(tmp_path, fixture_f32, monkeypatch):
    step_dir = copy_fixture(tmp_path)
    slot_dir = step_dir / "state.param_states.encoder.layers_0.attention.query.kernel.v"
    slot_dir.mkdir()
    (slot_dir / ".zarray").write_text("not zarr metadata")
    slot_spec = {
        "driver": "zarr",
        "kvstore": {"driver": "gfile", "path": slot_dir.name},
        "metadata": {"shape": [4, 4]},
    }

    def corrupt_slots(state):
        slots = state["optimizer"]["state"]["param_states"]
        slots["encoder"]["layers_0"]["attention"]["query"]["kernel"]["v"] = slot_spec
        slots["decoder"]["decoder_norm"]["scale"]["v"] = msgpack.ExtType(1, b"\xc1 garbage")

    edit_msgpack(step_dir, corrupt_slots)
    with pytest.raises(ValueError):  # the planted slot really is unreadable
        t5x_legacy.read_array(str(step_dir), slot_spec)

    opened = []
    real_open = ts.open
    monkeypatch.setattr(ts, "open", lambda spec, **kw: opened.append(spec) or real_open(spec, **kw))
    _, params = sp.load_pretrained(step_dir, dtype="float32")
    assert_bit_exact(params, fixture_f32[1])
    paths = [spec["kvstore"]["path"] for spec in opened]
    assert len(paths) == 38 and all("/target." in p for p in paths)


def test_t5x_accepts_checkpoint_file_and_model_dir(tmp_path, fixture_f32):
    _, params = sp.load_pretrained(T5X_TINY / "checkpoint", dtype="float32")
    assert_bit_exact(params, fixture_f32[1])

    (tmp_path / "checkpoint_10").symlink_to(T5X_TINY)
    for stale in ("checkpoint_9", "checkpoint_11.tmp-1700000000"):  # older / unfinished
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "checkpoint").write_bytes(b"\xc1")
    assert detect_format(tmp_path) == ("t5x", str(tmp_path / "checkpoint_10"))
    _, params = sp.load_pretrained(tmp_path, dtype="float32")
    assert_bit_exact(params, fixture_f32[1])
    assert t5x_legacy.open_checkpoint(tmp_path / "checkpoint_10").step == 3


def test_t5x_spec_variants_seen_in_the_wild(tmp_path, fixture_f32):
    step_dir = copy_fixture(tmp_path)

    def rewrite(state):
        layer = state["optimizer"]["target"]["encoder"]["layers_0"]
        for name, spec in layer["attention"].items():
            spec = spec["kernel"]
            path = spec["kvstore"]["path"]
            if name == "query":  # file driver, trailing slash
                spec["kvstore"] = {"driver": "file", "path": path + "/"}
            elif name == "key":  # dtype at the top level (current T5X writer)
                spec["dtype"] = "float32"
                del spec["metadata"]["dtype"]
            elif name == "value":  # tensorstore < 0.1.14: path at the top level
                spec["kvstore"] = {"driver": "file"}
                spec["path"] = path
            else:  # written on GCS, read from a local copy
                spec["kvstore"] = {"driver": "gcs", "bucket": "t5x-dummy-bucket", "path": path}

    edit_msgpack(step_dir, rewrite)
    _, params = sp.load_pretrained(step_dir, dtype="float32")
    assert_bit_exact(params, fixture_f32[1])


def test_gcs_specs_are_built_from_the_step_dir():
    spec = {
        "driver": "zarr",
        "kvstore": {"driver": "gfile", "path": "target.a.kernel/"},
        "metadata": {"chunks": [4, 4], "compressor": {"id": "gzip"}, "shape": [4, 4]},
    }
    assert t5x_legacy.tensorstore_spec("gs://bucket/models/run/checkpoint_3/", spec) == {
        "driver": "zarr",
        "kvstore": {
            "driver": "gcs",
            "bucket": "bucket",
            "path": "models/run/checkpoint_3/target.a.kernel/",
        },
        "metadata": {"shape": [4, 4]},
        "fill_missing_data_reads": False,
    }
    assert detect_format("gs://bucket/models/run/checkpoint_3/checkpoint") == (
        "t5x",
        "gs://bucket/models/run/checkpoint_3",
    )


def test_read_array_reads_only_the_requested_slice(tmp_path, fixture_f32):
    step_dir = copy_fixture(tmp_path)
    checkpoint = t5x_legacy.open_checkpoint(step_dir)
    chunk = step_dir / "target.token_embedder.embedding" / "7.0"  # rows 28672..32127
    chunk.write_bytes(b"corrupt")
    expected = np.asarray(fixture_f32[1]["token_embedder"]["embedding"])

    rows = checkpoint.read("token_embedder/embedding", index=(slice(100, 4200), slice(None)))
    np.testing.assert_array_equal(rows, expected[100:4200])
    with pytest.raises(ValueError, match="target.token_embedder.embedding"):
        checkpoint.read("token_embedder/embedding")


@pytest.mark.parametrize("loader", ["whole", "sharded"])
def test_missing_zarr_chunk_is_an_error_not_zeros(tmp_path, fixture_f32, loader):
    step_dir = copy_fixture(tmp_path)
    missing = step_dir / "target.decoder.logits_dense.kernel" / "0.5"  # columns 20480..24575
    missing.unlink()
    cfg = fixture_f32[0]
    load = {
        "whole": lambda: sp.load_pretrained(step_dir, dtype="float32"),
        "sharded": lambda: load_sharded(step_dir, cfg, param_shardings(cfg, make_mesh(1, 1))),
    }[loader]
    with pytest.raises(ValueError) as error:
        load()
    message = str(error.value)
    assert "'decoder/logits_dense/kernel'" in message and f'{missing}" is missing' in message
    assert "\n" not in message
    # Only the chunks a read touches must exist.
    kernel = fixture_f32[1]["decoder"]["logits_dense"]["kernel"]
    part = open_pretrained(step_dir).read(LOGITS, (slice(None), slice(0, 20480)))
    np.testing.assert_array_equal(part, np.asarray(kernel)[:, :20480])


def test_scanned_config_stacks_t5x_layers(fixture_f32):
    cfg, params = fixture_f32
    scanned_cfg, scanned = sp.load_pretrained(
        T5X_TINY, dtype="float32", config=cfg.replace(scan_layers=True)
    )
    assert scanned_cfg.scan_layers
    np.testing.assert_array_equal(
        scanned["encoder"]["layers"]["attention"]["query"]["kernel"],
        np.stack(
            [params["encoder"][f"layers_{i}"]["attention"]["query"]["kernel"] for i in range(2)]
        ),
    )


# --- (b) our own format ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_pretrained_round_trips_bit_exactly(tmp_path, tiny, dtype):
    cfg, params = tiny
    params = as_stored(cfg, params, dtype)
    sp.save_pretrained(tmp_path / "model", cfg, params)
    assert native.is_native_dir(tmp_path / "model")

    loaded_cfg, loaded = sp.load_pretrained(tmp_path / "model", dtype=dtype)
    assert loaded_cfg == cfg.replace(dtype=dtype)
    assert_bit_exact(loaded, params)


def test_relative_paths_save_and_load(tmp_path, tiny, monkeypatch):
    """Orbax refuses relative paths; ours are made absolute (`softprompt-jax demo` in a cwd)."""
    cfg, params = tiny
    monkeypatch.chdir(tmp_path)
    sp.save_pretrained("models/tiny", cfg, params)
    _, loaded = sp.load_pretrained("models/tiny", dtype="float32")
    assert_bit_exact(loaded, params)
    sharded = load_sharded("models/tiny", cfg, param_shardings(cfg, make_mesh(1, 1)))
    assert_bit_exact(sharded, params)


def test_native_load_casts_and_unstacks(tmp_path, tiny):
    cfg, params = tiny
    sp.save_pretrained(tmp_path / "model", cfg, params)
    _, loaded = sp.load_pretrained(tmp_path / "model", dtype="bfloat16")
    assert_bit_exact(loaded, as_stored(cfg, params, "bfloat16"))

    scanned_cfg = cfg.replace(scan_layers=True)
    _, scanned = sp.load_pretrained(tmp_path / "model", dtype="float32", config=scanned_cfg)
    sp.save_pretrained(tmp_path / "scanned", scanned_cfg, scanned)
    _, unscanned = sp.load_pretrained(tmp_path / "scanned", dtype="float32", config=cfg)
    assert_bit_exact(unscanned, params)


def test_save_pretrained_is_atomic_and_checks_params(tmp_path, tiny, monkeypatch):
    cfg, params = tiny
    with pytest.raises(ValueError, match="mlp/wo/kernel"):
        sp.save_pretrained(tmp_path / "model", cfg.replace(mlp_dim=32), params)

    def fail(*args, **kwargs):
        raise RuntimeError("killed half-way")

    monkeypatch.setattr(type(cfg), "to_dict", fail)  # after orbax wrote the params
    with pytest.raises(RuntimeError, match="killed half-way"):
        sp.save_pretrained(tmp_path / "model", cfg, params)
    assert list(tmp_path.iterdir()) == []

    monkeypatch.undo()
    sp.save_pretrained(tmp_path / "model", cfg, params)
    with pytest.raises(SoftpromptError, match="model"):
        sp.save_pretrained(tmp_path / "model", cfg, params)
    bf16 = as_stored(cfg, params, "bfloat16")
    sp.save_pretrained(tmp_path / "model", cfg, bf16, overwrite=True)
    assert_bit_exact(sp.load_pretrained(tmp_path / "model")[1], bf16)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


# --- Hugging Face dirs ----------------------------------------------------------------------


# Per HF block: (our norm, HF attention module or None for the MLP, our sub-module).
HF_SUBLAYERS = {
    "encoder": [
        ("pre_attention_layer_norm", "SelfAttention", "attention"),
        ("pre_mlp_layer_norm", None, "mlp"),
    ],
    "decoder": [
        ("pre_self_attention_layer_norm", "SelfAttention", "self_attention"),
        ("pre_cross_attention_layer_norm", "EncDecAttention", "encoder_decoder_attention"),
        ("pre_mlp_layer_norm", None, "mlp"),
    ],
}


def hf_tensors(params) -> dict[str, np.ndarray]:
    """Our params under HF T5 names ([out, in] linears, relpos [buckets, heads] in block 0)."""
    p = jax.tree_util.tree_map(np.asarray, params)
    out = {"shared.weight": p["token_embedder"]["embedding"]}
    if "logits_dense" in p["decoder"]:
        out["lm_head.weight"] = p["decoder"]["logits_dense"]["kernel"].T
    for stack, sublayers in HF_SUBLAYERS.items():
        out[f"{stack}.final_layer_norm.weight"] = p[stack][f"{stack}_norm"]["scale"]
        out[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = p[stack][
            "relpos_bias"
        ]["rel_embedding"].T
        for i in range(2):
            layer = p[stack][f"layers_{i}"]
            for j, (norm, attention, ours) in enumerate(sublayers):
                prefix = f"{stack}.block.{i}.layer.{j}"
                out[f"{prefix}.layer_norm.weight"] = layer[norm]["scale"]
                if attention:
                    for name, hf_name in zip(("query", "key", "value", "out"), "qkvo", strict=True):
                        kernel = layer[ours][name]["kernel"]
                        out[f"{prefix}.{attention}.{hf_name}.weight"] = kernel.T
                else:
                    for name, dense in layer["mlp"].items():
                        out[f"{prefix}.DenseReluDense.{name}.weight"] = dense["kernel"].T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def write_hf_dir(directory: Path, cfg, params) -> None:
    """`params` as a two-shard Hugging Face T5 dir (original T5 when `cfg` is tied and ReLU)."""
    tensors = hf_tensors(params)
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(directory / file))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: file for file, keys in shards.items() for k in keys}})
    )
    (directory / "config.json").write_text(
        json.dumps(
            {
                "model_type": "t5",
                "vocab_size": cfg.vocab_size,
                "d_model": cfg.emb_dim,
                "d_kv": cfg.head_dim,
                "num_heads": cfg.num_heads,
                "d_ff": cfg.mlp_dim,
                "num_layers": 2,
                "num_decoder_layers": 2,
                "feed_forward_proj": "relu" if cfg.mlp_activations == ("relu",) else "gated-gelu",
                "tie_word_embeddings": cfg.logits_via_embedding,
                "relative_attention_num_buckets": 32,
                "relative_attention_max_distance": 128,
            }
        )
    )


def test_huggingface_dir_is_detected_and_loaded(tmp_path, tiny):
    cfg, params = tiny
    write_hf_dir(tmp_path, cfg, params)
    assert detect_format(tmp_path) == ("huggingface", str(tmp_path))
    loaded_cfg, loaded = sp.load_pretrained(tmp_path, dtype="float32")
    assert loaded_cfg == cfg
    assert_bit_exact(loaded, params)

    # A slice of a transposed tensor, and every layer stacked straight into (one-device) shards.
    query = params["encoder"]["layers_0"]["attention"]["query"]["kernel"]
    rows = open_pretrained(tmp_path).read(QUERY_0, (slice(1, 3), slice(2, 7)))
    np.testing.assert_array_equal(rows, query[1:3, 2:7])
    scanned = cfg.replace(scan_layers=True)
    sharded = load_sharded(tmp_path, scanned, param_shardings(scanned, make_mesh(1, 1)))
    assert_bit_exact(sharded, stack_layers(params))


# --- (d) bad input --------------------------------------------------------------------------


def test_missing_path_and_unknown_formats(tmp_path):
    with pytest.raises(SoftpromptError, match="nowhere"):
        sp.load_pretrained(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=f"{tmp_path}: unknown checkpoint format.*safetensors"):
        sp.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="config.json found but no \\*.safetensors"):
        sp.load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pytorch_model.bin: unknown checkpoint format"):
        sp.load_pretrained(tmp_path / "pytorch_model.bin")


def test_wrong_config_names_file_key_and_shapes(fixture_f32, monkeypatch):
    cfg, _ = fixture_f32
    monkeypatch.setattr(t5x_legacy, "read_array", None)  # shapes are checked before any read
    with pytest.raises(ValueError) as error:
        sp.load_pretrained(T5X_TINY, config=cfg.replace(mlp_dim=16))
    message = str(error.value)
    assert str(T5X_TINY / "checkpoint") in message
    assert (
        "'encoder/layers_0/mlp/wi_0/kernel' has shape (4, 8); the model config expects "
        "(4, 16)" in message
    )
    with pytest.raises(
        ValueError,
        match="'encoder/layers_2/attention/key/kernel' \\(expected shape \\(4, 4\\)\\) is missing",
    ):
        sp.load_pretrained(T5X_TINY, config=cfg.replace(num_encoder_layers=3))
    with pytest.raises(
        ValueError,
        match="unexpected parameter 'decoder/logits_dense/kernel' with shape \\(4, 32128\\)",
    ):
        sp.load_pretrained(T5X_TINY, config=cfg.replace(logits_via_embedding=True))


def test_corrupt_msgpack_names_the_file_and_key(tmp_path):
    step_dir = copy_fixture(tmp_path)
    file = step_dir / "checkpoint"
    raw = file.read_bytes()
    file.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=f"{file}: not a valid T5X msgpack checkpoint"):
        sp.load_pretrained(step_dir)

    file.write_bytes(raw)

    def corrupt_norm(state):
        target = state["optimizer"]["target"]
        target["encoder"]["encoder_norm"]["scale"] = msgpack.ExtType(
            1, msgpack.packb([[4], "float32", b"\0" * 15])
        )

    edit_msgpack(step_dir, corrupt_norm)
    with pytest.raises(ValueError, match="encoder/encoder_norm/scale.*corrupt inline array"):
        sp.load_pretrained(step_dir)

    file.write_bytes(msgpack.packb({"version": 3, "optimizer": {"state": {}}}))
    with pytest.raises(ValueError, match="no 'optimizer/target' params"):
        sp.load_pretrained(step_dir)


def test_native_dir_with_wrong_params_is_reported(tmp_path, tiny):
    cfg, params = tiny
    sp.save_pretrained(tmp_path / "model", cfg, params)
    config_file = tmp_path / "model" / "config.json"
    config_file.write_text(json.dumps(cfg.replace(mlp_dim=32).to_dict()))
    with pytest.raises(SoftpromptError) as error:
        sp.load_pretrained(tmp_path / "model")
    first, *rest = str(error.value).splitlines()
    # The first line (all the command line prints) names the file, a key and both shapes.
    assert "params: checkpoint does not match the model config: parameter" in first
    assert "mlp/wi_0/kernel' has shape (8, 16); the model config expects (8, 32)" in first
    assert "more):" in first and rest


@pytest.mark.parametrize(
    "damage",
    ["empty manifest", "cut manifest", "garbled metadata", "no params"],
)
def test_damaged_native_dir_is_one_error_naming_it(tmp_path, tiny, damage, capfd):
    """A damaged orbax store fails in one line naming it, with no "Event loop is closed" flood."""
    cfg, params = tiny
    sp.save_pretrained(tmp_path / "model", cfg, params)
    params_dir = tmp_path / "model" / native.PARAMS_DIR
    manifest, metadata = params_dir / "manifest.ocdbt", params_dir / "_METADATA"
    if damage == "empty manifest":
        manifest.write_bytes(b"")
    elif damage == "cut manifest":
        manifest.write_bytes(manifest.read_bytes()[:40])
    elif damage == "garbled metadata":
        metadata.write_text("{garbled")
    else:
        shutil.rmtree(params_dir)
    capfd.readouterr()
    with pytest.raises(SoftpromptError, match=f"{params_dir}: damaged model params") as error:
        sp.load_pretrained(tmp_path / "model")
    assert "\n" not in str(error.value)
    assert "Event loop is closed" not in "".join(capfd.readouterr())


def test_truncated_huggingface_safetensors_names_the_file(tmp_path, tiny):
    cfg, params = tiny
    write_hf_dir(tmp_path, cfg, params)
    weights = sorted(tmp_path.glob("*.safetensors"))[-1]
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(SoftpromptError, match=f"{weights} is not a readable safetensors file"):
        sp.load_pretrained(tmp_path)
