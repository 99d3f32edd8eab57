"""GPT-2 and Llama-family networks against Hugging Face `transformers` on the same random weights.

Loaded by `sp.load_pretrained` from `save_pretrained` dirs (the Llama one sharded), per layer,
scanned with remat, and straight into shards; cached greedy generation against uncached
logits and against `transformers`' `generate`.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict
from tiny_decoders import VOCAB, save_tiny

import softprompt_jax as sp
from softprompt_jax.checkpoints.sharded import load_sharded
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.lm_decoding import generation_positions
from softprompt_jax.methods import check_lengths
from softprompt_jax.model import decoder_only
from softprompt_jax.model.scan import stack_layers
from softprompt_jax.partitioning import make_mesh, param_shardings

FAMILIES = ("gpt2", "llama", "qwen2", "mistral")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (HF model, its save dir); Llama saved in several safetensors shards."""
    root = tmp_path_factory.mktemp("decoders")
    return {f: (save_tiny(f, root / f, sharded=f == "llama"), root / f) for f in FAMILIES}


def _batch():
    """Two rows of 7 tokens, the second right-padded after 5."""
    ids = np.random.default_rng(0).integers(1, VOCAB, (2, 7))
    mask = np.ones((2, 7), np.int64)
    mask[1, 5:] = 0
    return ids, mask


def _hf_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def _assert_close_logits(ours, theirs):
    scale = np.abs(theirs).max()
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers(saved, family):
    model, path = saved[family]
    cfg, params = sp.load_pretrained(path, dtype="float32")
    assert sp.is_decoder_only(cfg)
    ids, mask = _batch()
    _assert_close_logits(sp.lm_logits(cfg, params, ids, mask), _hf_logits(model, ids, mask))


def test_llama3_rope_scaling_equals_transformers(tmp_path):
    """Llama 3.x's `rope_type='llama3'`: the scaled frequencies give transformers' logits."""
    model = save_tiny("llama3", tmp_path)
    cfg, params = sp.load_pretrained(tmp_path, dtype="float32")
    assert (cfg.rope_scaling_factor, cfg.rope_original_max_positions) == (8.0, 32)
    ids, mask = _batch()
    logits = sp.lm_logits(cfg, params, jnp.asarray(ids), jnp.asarray(mask))
    _assert_close_logits(logits, _hf_logits(model, ids, mask))


def test_config_fields_read_from_config_json(saved):
    llama, _ = sp.load_pretrained(saved["llama"][1], dtype="float32")
    assert (llama.num_heads, llama.num_kv_heads, llama.head_dim, llama.rope_theta) == (4, 2, 8, 500)
    qwen, _ = sp.load_pretrained(saved["qwen2"][1], dtype="float32")
    assert qwen.qkv_bias and not qwen.out_bias and qwen.tie_word_embeddings
    mistral, _ = sp.load_pretrained(saved["mistral"][1], dtype="float32")
    assert mistral.sliding_window == 3


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_scanned_remat_and_sharded_loads_give_the_same_logits(saved, family):
    _, path = saved[family]
    cfg, params = sp.load_pretrained(path, dtype="float32")
    scanned = cfg.replace(scan_layers=True, remat_policy="full")
    _, stacked = sp.load_pretrained(path, dtype="float32", config=scanned)
    jax.tree_util.tree_map(np.testing.assert_array_equal, stacked, stack_layers(params))
    ids, mask = _batch()
    np.testing.assert_allclose(
        sp.lm_logits(scanned, stacked, ids, mask), sp.lm_logits(cfg, params, ids, mask), atol=1e-5
    )
    mesh = make_mesh(1, 1)
    sharded = load_sharded(path, cfg, param_shardings(cfg, mesh), dtype="float32")
    jax.tree_util.tree_map(np.testing.assert_array_equal, sharded, params)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_every_param_has_logical_axes(saved, family):
    cfg, params = sp.load_pretrained(saved[family][1], dtype="float32")
    for scan in (False, True):
        axes = flatten_dict(decoder_only.logical_axes(cfg.replace(scan_layers=scan)), sep="/")
        shapes = flatten_dict(decoder_only.param_shapes(cfg.replace(scan_layers=scan)), sep="/")
        assert axes.keys() == shapes.keys()
        for key, spec in axes.items():
            assert len(spec) == len(shapes[key].shape) and None not in spec, key
    assert flatten_dict(params).keys() == flatten_dict(decoder_only.param_shapes(cfg)).keys()


def _uncached_greedy(cfg, params, ids, mask, steps, prompt):
    """Greedy tokens by re-running the whole sequence each step (no cache).

    The sequence has its final length from the start: causal attention keeps the slots not yet
    filled from reaching the logits read, and one compiled shape serves every step.
    """
    length = ids.shape[1]
    ids = jnp.pad(ids, ((0, 0), (0, steps)))
    mask = jnp.pad(mask, ((0, 0), (0, steps)), constant_values=1)
    positions = generation_positions(mask)
    for step in range(steps):
        logits = sp.lm_logits(cfg, params, ids, mask, prompt, position_ids=positions)
        token = jnp.argmax(logits[:, length + step - 1], axis=-1).astype(ids.dtype)
        ids = ids.at[:, length + step].set(token)
    return np.asarray(ids[:, length:])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cached_generation_equals_uncached_and_transformers(saved, family):
    model, path = saved[family]
    cfg, params = sp.load_pretrained(path, dtype="float32")
    ids, mask = _batch()
    mask = np.flip(mask, axis=1).copy()  # the second row left-padded, as HF generates
    ids = np.where(mask > 0, ids, 0)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    steps = 4
    cached = np.asarray(sp.lm_generate(cfg, params, ids, mask, steps))
    with torch.no_grad():
        hf = model.generate(
            input_ids=torch.tensor(np.asarray(ids)),
            attention_mask=torch.tensor(np.asarray(mask)),
            max_new_tokens=steps,
            do_sample=False,
        )
    np.testing.assert_array_equal(cached, hf[:, ids.shape[1] :].numpy())
    # A soft prompt on GPT-2 (learned positions), a prefix through its MLP on Llama (RoPE, GQA).
    if family == "gpt2":
        virtual = jnp.asarray(np.random.default_rng(1).normal(size=(3, cfg.emb_dim)), jnp.float32)
    else:
        virtual = sp.init_prefix(cfg, 3, projection_dim=4)
    np.testing.assert_array_equal(
        np.asarray(sp.lm_generate(cfg, params, ids, mask, steps, virtual)),
        _uncached_greedy(cfg, params, ids, mask, steps, virtual),
    )


def test_unsupported_settings_are_named(saved, tmp_path):
    _, path = saved["llama"]
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 500.0, "factor": 8.0}
    for file in path.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SoftpromptError, match=r"config\.json: rope_type='yarn' is not supported"):
        sp.load_pretrained(tmp_path, dtype="float32")


def test_each_bank_row_equals_its_prompt_alone_on_gpt2(saved):
    """Prompts of lengths 2 and 4 in one bank: learned positions count each prompt's own rows."""
    _, path = saved["gpt2"]
    cfg, params = sp.load_pretrained(path, dtype="float32")
    rng = np.random.default_rng(2)
    prompts = {n: jnp.asarray(rng.normal(size=(n, cfg.emb_dim)), jnp.float32) for n in (2, 4)}
    bank = sp.PromptBank.from_arrays({str(n): p for n, p in prompts.items()})
    ids, mask = _batch()
    for row, n in enumerate((2, 4)):
        ids_row, mask_row = jnp.asarray(ids[row : row + 1]), jnp.asarray(mask[row : row + 1])
        prompt_ids = bank.ids([str(n)])
        _assert_close_logits(
            sp.lm_logits(cfg, params, ids_row, mask_row, bank, prompt_ids),
            np.asarray(sp.lm_logits(cfg, params, ids_row, mask_row, prompts[n])),
        )
    left_mask = jnp.asarray(np.flip(mask, axis=1).copy())
    left_ids = jnp.where(left_mask > 0, jnp.asarray(ids), 0)
    both = sp.lm_generate(cfg, params, left_ids, left_mask, 3, bank, bank.ids(["2", "4"]))
    for row, n in enumerate((2, 4)):
        alone = sp.lm_generate(cfg, params, left_ids, left_mask, 3, prompts[n])
        np.testing.assert_array_equal(np.asarray(both[row]), np.asarray(alone[row]))


def test_gpt2_sequences_past_its_positions_are_refused(saved):
    """GPT-2 (32 positions) would read NaN past its table: one line names the lengths."""
    _, path = saved["gpt2"]
    cfg, params = sp.load_pretrained(path, dtype="float32")
    prompt = jnp.zeros((3, cfg.emb_dim), jnp.float32)
    ids = jnp.ones((1, 30), jnp.int32)
    limit = r"GPT-2 has 32 positions \(max_position_embeddings\); 3 prompt/prefix"
    with pytest.raises(SoftpromptError, match=limit + r".* \+ 30 tokens .* = 33"):
        sp.lm_logits(cfg, params, ids, jnp.ones_like(ids), prompt)
    with pytest.raises(SoftpromptError, match=r"\+ 25 tokens .* \+ 5 new tokens .* = 33"):
        sp.lm_generate(cfg, params, ids[:, :25], jnp.ones_like(ids[:, :25]), 5, prompt)
    with pytest.raises(SoftpromptError, match=r"\+ 30 tokens \(TASK_FEATURE_LENGTHS\)"):
        check_lengths(cfg, 3, {"inputs": 20, "targets": 10})
    check_lengths(cfg, prompt, {"inputs": 20, "targets": 9})  # 32 fit
    check_lengths(cfg, 3, {"inputs": 20, "targets": 9}, new_tokens=9)
