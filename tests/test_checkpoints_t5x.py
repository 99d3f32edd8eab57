"""T5X legacy writer/reader: bit-exact round trips and the real fixture's on-disk conventions."""

import json
from pathlib import Path

import flax.serialization
import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest
from conftest import TEST_DATA
from flax.traverse_util import flatten_dict

import softprompt_jax as sp
from softprompt_jax.checkpoints import t5x_legacy
from softprompt_jax.errors import SoftpromptError

T5X_TINY = TEST_DATA / "t5x_tiny" / "checkpoint_3"
# Norm scales (8 x f32 = 32 bytes, 16 as bf16) go inline; kernels, relpos, embedding go to zarr.
INLINE_MAX_BYTES = 64


@pytest.fixture(scope="module")
def tiny_params():
    """Tiny T5 params with the decoder in bf16, so bf16 appears both inline and in zarr."""
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: rng.standard_normal(s.shape, np.float32),
        sp.param_shapes(sp.get_config("t5_1_1_tiny")),
    )
    params["decoder"] = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params["decoder"])
    return params


def assert_bit_exact(actual, expected):
    flat_actual, flat_expected = (flatten_dict(t, sep="/") for t in (actual, expected))
    assert flat_actual.keys() == flat_expected.keys()
    for key, want in flat_expected.items():
        got = np.asarray(flat_actual[key])
        assert (got.dtype, got.shape) == (want.dtype, want.shape), key
        assert got.tobytes() == np.asarray(want).tobytes(), key


def raw_state(step_dir) -> dict:
    return msgpack.unpackb((Path(step_dir) / "checkpoint").read_bytes(), strict_map_key=False)


def test_round_trip_is_bit_exact_with_inline_zarr_and_bf16_leaves(
    tmp_path, tiny_params, monkeypatch
):
    # A small chunk budget makes the embedding a multi-chunk zarr array: [128, 8] chunks.
    monkeypatch.setattr(t5x_legacy, "_CHUNK_BUDGET_BYTES", 128 * 8 * 4)
    step_dir = t5x_legacy.save_t5x_checkpoint(
        tmp_path, tiny_params, step=1100, inline_max_bytes=INLINE_MAX_BYTES
    )
    assert Path(step_dir) == tmp_path / "checkpoint_1100"

    params, step = t5x_legacy.load_t5x_checkpoint(step_dir)
    assert step == 1100
    assert_bit_exact(params, tiny_params)

    leaves = t5x_legacy.open_checkpoint(step_dir).leaves
    assert isinstance(leaves["encoder/encoder_norm/scale"], np.ndarray)
    assert isinstance(leaves["decoder/decoder_norm/scale"], np.ndarray)  # bf16 inline
    assert leaves["decoder/decoder_norm/scale"].dtype == jnp.bfloat16
    assert isinstance(leaves["decoder/layers_0/mlp/wo/kernel"], dict)  # bf16 zarr
    bf16_zarray = json.loads(
        (Path(step_dir) / "target.decoder.layers_0.mlp.wo.kernel" / ".zarray").read_text()
    )
    assert bf16_zarray["dtype"] == "bfloat16"
    embedding = json.loads(
        (Path(step_dir) / "target.token_embedder.embedding" / ".zarray").read_text()
    )
    assert embedding["chunks"] == [128, 8]
    assert len(list((Path(step_dir) / "target.token_embedder.embedding").glob("*.0"))) == 251


def test_written_checkpoint_loads_as_a_pretrained_model(tmp_path, tiny_params):
    step_dir = t5x_legacy.save_t5x_checkpoint(
        tmp_path, tiny_params, step=3, dtype="float32", inline_max_bytes=INLINE_MAX_BYTES
    )
    cfg, params = sp.load_pretrained(step_dir, dtype="float32")
    assert cfg == sp.get_config("t5_1_1_tiny")
    expected = jax.tree_util.tree_map(lambda x: x.astype(np.float32), tiny_params)
    assert_bit_exact(params, expected)


def test_written_checkpoint_follows_the_real_t5x_conventions(tmp_path, tiny_params):
    step_dir = Path(
        t5x_legacy.save_t5x_checkpoint(
            tmp_path, tiny_params, step=3, inline_max_bytes=INLINE_MAX_BYTES
        )
    )
    ours, theirs = raw_state(step_dir), raw_state(T5X_TINY)
    assert ours.keys() == theirs.keys() == {"version", "optimizer"}
    assert ours["version"] == theirs["version"] == 3
    assert {"target", "state"} <= ours["optimizer"].keys()
    # The step is a 0-d int32 flax ndarray (ext type 1), as T5X wrote it.
    our_step, their_step = ours["optimizer"]["state"]["step"], theirs["optimizer"]["state"]["step"]
    assert our_step.code == their_step.code == 1
    assert (
        msgpack.unpackb(our_step.data)[:2] == msgpack.unpackb(their_step.data)[:2] == [[], "int32"]
    )

    key = "encoder/layers_0/attention/query/kernel"
    our_spec = flatten_dict(ours["optimizer"]["target"], sep="/", is_leaf=_is_spec)[key]
    their_spec = flatten_dict(theirs["optimizer"]["target"], sep="/", is_leaf=_is_spec)[key]
    assert our_spec["driver"] == their_spec["driver"] == "zarr"
    dir_name = "target.encoder.layers_0.attention.query.kernel"
    assert our_spec["kvstore"]["path"] == their_spec["kvstore"]["path"] == dir_name  # relative
    assert our_spec["metadata"]["compressor"] == their_spec["metadata"]["compressor"]
    assert our_spec["metadata"]["shape"] == [8, 12]

    our_zarray = json.loads((step_dir / dir_name / ".zarray").read_text())
    their_zarray = json.loads((T5X_TINY / dir_name / ".zarray").read_text())
    # Newer TensorStore also records the zarr v2 default separator; chunk keys are the same.
    assert our_zarray.keys() - their_zarray.keys() == {"dimension_separator"}
    assert our_zarray["dimension_separator"] == "."
    assert their_zarray.keys() <= our_zarray.keys()
    for field in ("compressor", "dtype", "fill_value", "filters", "order", "zarr_format"):
        assert our_zarray[field] == their_zarray[field], field
    assert sorted(p.name for p in (step_dir / dir_name).iterdir()) == [".zarray", "0.0"]

    # T5X decodes the msgpack with flax.serialization; it must read our inline leaves back.
    restored = flax.serialization.msgpack_restore((step_dir / "checkpoint").read_bytes())
    target = restored["optimizer"]["target"]
    np.testing.assert_array_equal(
        target["encoder"]["encoder_norm"]["scale"], tiny_params["encoder"]["encoder_norm"]["scale"]
    )
    assert int(restored["optimizer"]["state"]["step"]) == 3


def test_big_inline_arrays_are_chunked_as_flax_does(tmp_path, tiny_params, monkeypatch):
    monkeypatch.setattr(flax.serialization, "MAX_CHUNK_SIZE", 4096)
    step_dir = t5x_legacy.save_t5x_checkpoint(tmp_path, tiny_params, step=0, inline_max_bytes=10**9)
    embedding = raw_state(step_dir)["optimizer"]["target"]["token_embedder"]["embedding"]
    assert embedding["__msgpack_chunked_array__"] is True
    assert len(embedding["chunks"]) == 32128 * 8 * 4 // 4096
    assert not any(p.is_dir() for p in Path(step_dir).iterdir())  # everything inline

    params, _ = t5x_legacy.load_t5x_checkpoint(step_dir)
    assert_bit_exact(params, tiny_params)


def test_failed_write_leaves_nothing_behind(tmp_path, tiny_params, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("killed half-way")

    # Zarr arrays are already written when the msgpack is serialised.
    monkeypatch.setattr(flax.serialization, "msgpack_serialize", fail)
    with pytest.raises(RuntimeError, match="killed half-way"):
        t5x_legacy.save_t5x_checkpoint(
            tmp_path, tiny_params, step=5, inline_max_bytes=INLINE_MAX_BYTES
        )
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_to_overwrite_a_step(tmp_path, tiny_params):
    (tmp_path / "checkpoint_5").mkdir()
    with pytest.raises(SoftpromptError, match="checkpoint_5"):
        t5x_legacy.save_t5x_checkpoint(tmp_path, tiny_params, step=5)


def _is_spec(_, node) -> bool:
    return isinstance(node, dict) and "driver" in node


def test_non_float_leaves_are_refused_not_cast(tmp_path, tiny_params):
    params = dict(tiny_params)
    # T5X version 2 stored bf16 as uint16 bit patterns; a numeric cast would be silently wrong.
    params["token_embedder"] = {"embedding": np.zeros((32128, 8), np.uint16)}
    step_dir = t5x_legacy.save_t5x_checkpoint(tmp_path, params, step=1)
    with pytest.raises(ValueError, match="'token_embedder/embedding' is stored as uint16"):
        sp.load_pretrained(step_dir)
