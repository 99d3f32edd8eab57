"""Prompt files: `.npy`, the official numpy sidecars, PEFT adapter dirs (and real PEFT)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TEST_DATA, TINY
from safetensors.numpy import load_file, save_file

import softprompt_jax as sp
from softprompt_jax.checkpoints.prefix_files import LAYOUT_FIELD, save_prefix
from softprompt_jax.checkpoints.prompt_files import OFFICIAL_SIDECAR, PEFT_CONFIG, PEFT_WEIGHTS
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.t5_prefixes import init_t5_prefix


def random_prompt(shape=(5, 16), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_npy_round_trip(tmp_path):
    prompt, bank = random_prompt(), random_prompt((3, 5, 16))
    sp.save_prompt(jnp.asarray(prompt), tmp_path / "p.npy")
    sp.save_prompt(bank, tmp_path / "bank.npy")
    loaded = sp.load_prompt(tmp_path / "p.npy")
    assert loaded.dtype == jnp.float32
    np.testing.assert_array_equal(loaded, prompt)
    np.testing.assert_array_equal(sp.load_prompt(tmp_path / "bank.npy"), bank)
    assert np.load(tmp_path / "p.npy").dtype == np.float32  # the official layout


def test_float64_fixture_loads_as_float32():
    prompt = sp.load_prompt(TEST_DATA / "prompt_5x256.npy")
    assert prompt.shape == (5, 256) and prompt.dtype == jnp.float32
    np.testing.assert_allclose(
        prompt[0, :4], [0.29594052, 0.07733205, 0.97528514, 0.13458858], rtol=1e-7
    )


def test_official_sidecar_file_and_dir(tmp_path):
    step_dir = tmp_path / "numpy_checkpoints" / "checkpoint_1100200"
    step_dir.mkdir(parents=True)
    prompt = random_prompt()
    with open(step_dir / OFFICIAL_SIDECAR, "wb") as f:  # as the official code: no `.npy` suffix
        np.save(f, prompt)
    np.testing.assert_array_equal(sp.load_prompt(step_dir / OFFICIAL_SIDECAR), prompt)
    np.testing.assert_array_equal(sp.load_prompt(step_dir), prompt)


def test_peft_dir_round_trip_and_layout(tmp_path):
    prompt = random_prompt()
    sp.save_prompt(prompt, tmp_path / "adapter")
    table = load_file(tmp_path / "adapter" / PEFT_WEIGHTS)["prompt_embeddings"]
    assert table.shape == (10, 16) and table.dtype == np.float32  # 2 * length rows (seq2seq)
    np.testing.assert_array_equal(table[:5], prompt)
    config = json.loads((tmp_path / "adapter" / PEFT_CONFIG).read_text())
    assert config["num_virtual_tokens"] == 5 and config["task_type"] == "SEQ_2_SEQ_LM"
    np.testing.assert_array_equal(sp.load_prompt(tmp_path / "adapter"), prompt)


def test_shape_and_format_errors_name_the_file(tmp_path):
    sp.save_prompt(random_prompt(), tmp_path / "p.npy")
    with pytest.raises(ValueError, match=r"p\.npy has shape \(5, 16\); model expects \(100, 16\)"):
        sp.load_prompt(tmp_path / "p.npy", expected_shape=(100, 16))
    sp.save_prompt(random_prompt(), tmp_path / "adapter")
    save_file({"prompt_embeddings": random_prompt((7, 16))}, tmp_path / "adapter" / PEFT_WEIGHTS)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors.*\(7, 16\).*\(10, emb_dim\)"):
        sp.load_prompt(tmp_path / "adapter")
    (tmp_path / "adapter" / PEFT_CONFIG).write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="peft_type is 'LORA'"):
        sp.load_prompt(tmp_path / "adapter")
    np.save(tmp_path / "ids.npy", np.arange(6).reshape(2, 3))
    with pytest.raises(ValueError, match=r"ids\.npy has dtype int64"):
        sp.load_prompt(tmp_path / "ids.npy")
    with pytest.raises(SoftpromptError, match="missing_dir"):
        sp.load_prompt(tmp_path / "missing_dir")


@pytest.mark.parametrize("contents", [b"", b"not numpy at all", "half"])
def test_damaged_npy_is_one_error_naming_the_file(tmp_path, contents):
    """An empty (zero-byte), garbled or cut-short `.npy` is a SoftpromptError, not EOFError."""
    path = tmp_path / "broken.npy"
    sp.save_prompt(random_prompt(), path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if contents == "half" else contents)
    with pytest.raises(SoftpromptError, match=r"prompt file .*broken\.npy is not a readable"):
        sp.load_prompt(path)


def test_truncated_peft_safetensors_is_one_error_naming_the_file(tmp_path):
    sp.save_prompt(random_prompt(), tmp_path / "adapter")
    weights = tmp_path / "adapter" / PEFT_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-20])
    with pytest.raises(SoftpromptError, match=r"adapter_model\.safetensors is not a readable"):
        sp.load_prompt(tmp_path / "adapter")
    (tmp_path / "adapter" / PEFT_CONFIG).write_text("{not json")
    with pytest.raises(SoftpromptError, match=r"adapter_config\.json: cannot read JSON"):
        sp.load_prompt(tmp_path / "adapter")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_prompt_is_refused_on_load(tmp_path, bad):
    prompt = random_prompt()
    prompt[1, 2] = prompt[3, 4] = bad
    sp.save_prompt(prompt, tmp_path / "p.npy")
    sp.save_prompt(prompt, tmp_path / "adapter")
    for path in (tmp_path / "p.npy", tmp_path / "adapter"):
        with pytest.raises(SoftpromptError, match=r"has 2 non-finite values \(NaN or infinity\)"):
            sp.load_prompt(path)


@pytest.fixture(scope="module")
def base_model():
    """A factory for a tiny Hugging Face T5 to wrap with PEFT."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    config = transformers.T5Config(
        vocab_size=64,
        d_model=16,
        d_kv=4,
        num_heads=4,
        d_ff=32,
        num_layers=2,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )
    torch.manual_seed(0)
    return lambda: transformers.T5ForConditionalGeneration(config)


class TestRealPeft:
    """Interop with `peft` itself: its saves load here, and ours load there."""

    def test_peft_save_loads_here(self, base_model, tmp_path):
        from peft import PromptTuningConfig, TaskType, get_peft_model

        model = get_peft_model(
            base_model(), PromptTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=5)
        )
        model.save_pretrained(tmp_path)
        weight = model.prompt_encoder["default"].embedding.weight.detach().numpy()
        assert weight.shape == (10, 16)
        np.testing.assert_array_equal(sp.load_prompt(tmp_path), weight[:5])

    def test_our_save_loads_in_peft(self, base_model, tmp_path):
        from peft import PeftModel

        prompt = random_prompt()
        sp.save_prompt(prompt, tmp_path)
        model = PeftModel.from_pretrained(base_model(), tmp_path)
        weight = model.prompt_encoder["default"].embedding.weight.detach().numpy()
        np.testing.assert_array_equal(weight[:5], prompt)


def _t5_prefixes() -> dict:
    paper = init_t5_prefix(TINY, 3, seed=1)
    return {"t5_paper": paper, "t5_peft": init_t5_prefix(TINY, 3, seed=2, mode="peft")}


def test_every_prefix_layout_round_trips_through_one_loader(tmp_path):
    """T5 paper-mode, T5 PEFT-mode and decoder-only `.npz` files name their layout; PEFT dirs
    of either task type read back; a file whose arrays contradict its layout is refused."""
    prefixes = _t5_prefixes()
    prefixes["decoder_only"] = prefixes["t5_paper"]["decoder"]
    for layout, prefix in prefixes.items():
        path = sp.save_prompt(prefix, tmp_path / f"{layout}.npz")
        with np.load(path) as archive:
            assert str(archive[LAYOUT_FIELD]) == layout
        loaded = sp.load_prompt(path)
        assert jax.tree.structure(loaded) == jax.tree.structure(prefix)
        jax.tree.map(np.testing.assert_array_equal, loaded, prefix)
    peft_mode = prefixes["t5_peft"]
    adapter = sp.save_prompt(peft_mode, tmp_path / "t5_adapter", num_heads=2, head_dim=8)
    assert json.loads((adapter / PEFT_CONFIG).read_text())["task_type"] == "SEQ_2_SEQ_LM"
    jax.tree.map(np.testing.assert_array_equal, sp.load_prompt(adapter), peft_mode)

    wrong = tmp_path / "wrong.npz"
    save_prefix(prefixes["decoder_only"], wrong)
    with np.load(wrong) as archive:
        arrays = dict(archive)
    np.savez(wrong, **arrays | {LAYOUT_FIELD: np.array("t5_paper")})
    with pytest.raises(SoftpromptError, match="wrong.npz: says layout 't5_paper' but holds"):
        sp.load_prompt(wrong)
    with pytest.raises(SoftpromptError, match="PEFT has no format for a 't5_paper' prefix"):
        sp.save_prompt(prefixes["t5_paper"], tmp_path / "paper_adapter")
