"""Prompt banks: prompts of different lengths in one batch, each example as if alone.

Logits, target scores and greedy decodes of a mixed batch equal each example run with its
own prompt; a bank trained jointly equals each prompt trained alone on its own examples
(the paper's Adafactor, continuing T5X's step count, unequal example counts per prompt).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import softprompt_jax as sp
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.inference import predict_tokens
from softprompt_jax.losses import LossConfig
from softprompt_jax.prompt_bank import PromptBank
from softprompt_jax.train.optimizer import AdafactorConfig, make_optimizer
from softprompt_jax.train.train_step import init_train_state, make_train_step

CFG = sp.get_config("t5_1_1_tiny").replace(vocab_size=128, emb_dim=32, num_heads=2, head_dim=16)
LENGTHS = {"boolq": 3, "cb": 5, "copa": 8}
NAMES = ["cb", "boolq", "copa", "cb", "copa"]  # a mixed batch; unequal counts per prompt


@pytest.fixture(scope="module")
def params():
    return sp.init_params(CFG, 0)


@pytest.fixture(scope="module")
def bank(params):
    return PromptBank.from_arrays(
        {
            name: sp.init_prompt("sampled_vocab", length, params=params, seed=i)
            for i, (name, length) in enumerate(LENGTHS.items())
        }
    )


def make_batch(seed: int, batch: int = len(NAMES)) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    inputs = rng.integers(3, CFG.vocab_size, (batch, 7))
    lengths = rng.integers(2, 8, batch)
    inputs = np.where(np.arange(7) < lengths[:, None], inputs, 0)
    inputs[np.arange(batch), lengths - 1] = 1
    targets = rng.integers(3, CFG.vocab_size, (batch, 3))
    targets[:, -1] = 1
    return {
        "encoder_input_tokens": jnp.asarray(inputs, jnp.int32),
        "decoder_input_tokens": jnp.asarray(np.pad(targets, ((0, 0), (1, 0)))[:, :-1], jnp.int32),
        "decoder_target_tokens": jnp.asarray(targets, jnp.int32),
    }


def rows(batch: dict, index: list[int]) -> dict:
    return {name: value[np.asarray(index)] for name, value in batch.items()}


def test_each_example_of_a_mixed_batch_sees_only_its_own_prompt(params, bank):
    batch = make_batch(0)
    ids = bank.ids(NAMES)
    enc, dec = batch["encoder_input_tokens"], batch["decoder_input_tokens"]
    logits = sp.prompted_logits(CFG, params, bank, enc, dec, ids)
    scores = sp.score_batch(CFG, params, bank, batch, ids)
    decoded = predict_tokens(CFG, params, bank, enc, ids, max_length=4)
    for i, name in enumerate(NAMES):
        alone = rows(batch, [i])
        prompt = bank[name]
        np.testing.assert_allclose(
            logits[i],
            sp.prompted_logits(CFG, params, prompt, alone["encoder_input_tokens"], dec[i : i + 1])[
                0
            ],
            atol=1e-5,
        )
        np.testing.assert_allclose(
            scores[i], sp.score_batch(CFG, params, prompt, alone)[0], atol=1e-5
        )
        np.testing.assert_array_equal(
            decoded[i],
            predict_tokens(CFG, params, prompt, alone["encoder_input_tokens"], max_length=4)[0],
        )


@pytest.mark.parametrize("stacked", [False, True])
def test_a_bank_trains_like_each_prompt_alone(params, bank, stacked):
    """Per-prompt Adafactor statistics, clipping and weight decay: a `PromptBank` is a pytree
    of separate arrays, a stacked `[N, P, d]` bank gets a vmapped optimizer; T5X's summed
    loss gives each prompt the gradient of its own examples."""
    if stacked:  # equal lengths: the first 3 rows of each prompt
        prompts = jnp.stack([p[:3] for p in bank.prompts])
        start, own = prompts, lambda tree, k: tree[k]
    else:
        start, own = bank, lambda tree, k: tree.prompts[k]
    optimizer = make_optimizer(AdafactorConfig(step_offset=1_100_000))
    loss = LossConfig(z_loss=1e-4, normalization="sum", enable_dropout=False)
    step = jax.jit(make_train_step(CFG, optimizer, loss))
    rng = jax.random.PRNGKey(0)
    joint = init_train_state(start, optimizer)
    alone = [init_train_state(own(start, k), optimizer) for k in range(len(bank.names))]
    for seed in range(4):
        batch = make_batch(seed)
        joint, _ = step(joint, params, {**batch, "prompt_ids": bank.ids(NAMES)}, rng)
        for k, name in enumerate(bank.names):
            mine = [i for i, n in enumerate(NAMES) if n == name]
            alone[k], _ = step(alone[k], params, rows(batch, mine), rng)
    for k in range(len(bank.names)):
        np.testing.assert_allclose(own(joint.prompt, k), alone[k].prompt, rtol=0, atol=1e-5)
        assert not np.allclose(own(joint.prompt, k), own(start, k), atol=1e-3)


@pytest.mark.parametrize("file_name", ["bank.safetensors", "bank_dir"])
def test_save_and_load_keep_names_order_and_lengths(bank, tmp_path, file_name):
    path = bank.save(tmp_path / file_name)
    loaded = PromptBank.load(path)
    assert loaded.names == (
        bank.names if file_name.endswith("safetensors") else tuple(sorted(bank.names))
    )
    assert loaded.lengths == tuple(LENGTHS[n] for n in loaded.names)
    for name in bank.names:
        np.testing.assert_array_equal(loaded[name], bank[name])


def test_from_files_takes_npy_and_peft_prompts(bank, tmp_path):
    sp.save_prompt(bank["cb"], tmp_path / "cb.npy")
    sp.save_prompt(bank["copa"], tmp_path / "copa_peft")  # a directory: PEFT's format
    loaded = PromptBank.from_files({"cb": tmp_path / "cb.npy", "copa": tmp_path / "copa_peft"})
    assert loaded.names == ("cb", "copa") and loaded.lengths == (5, 8)
    np.testing.assert_array_equal(loaded["copa"], bank["copa"])


def test_bad_banks_are_one_clear_error(params, bank, tmp_path):
    with pytest.raises(SoftpromptError, match="different embedding widths"):
        PromptBank.from_arrays({"a": np.zeros((2, 4)), "b": np.zeros((2, 6))})
    with pytest.raises(SoftpromptError, match="no prompt named 'rte'.*boolq"):
        bank.ids(["cb", "rte"])
    narrow = PromptBank.from_arrays({"a": np.zeros((2, 8), np.float32)})
    batch = make_batch(0, batch=1)
    with pytest.raises(ValueError, match="emb_dim 8; the model's is 32"):
        sp.prompted_logits(
            CFG,
            params,
            narrow,
            batch["encoder_input_tokens"],
            batch["decoder_input_tokens"],
            narrow.ids(["a"]),
        )
    (tmp_path / "damaged.safetensors").write_bytes(b"\x00")
    with pytest.raises(SoftpromptError, match="damaged.safetensors"):
        PromptBank.load(tmp_path / "damaged.safetensors")
    sp.save_prompt(bank["cb"], tmp_path / "cb.npy")
    kv = np.zeros((2, 3, 2, 8), np.float32)
    # A decoder-only prefix is one per run, not a bank member.
    sp.save_prompt({"key": kv, "value": kv}, tmp_path / "prefix.npz")
    with pytest.raises(SoftpromptError, match=r"PROMPTS member 'b' \(.*prefix.npz\) is a prefix"):
        PromptBank.from_files({"a": tmp_path / "cb.npy", "b": tmp_path / "prefix.npz"})
    sp.save_prompt(bank["cb"], tmp_path / "peft_dir")  # a PEFT prompt, not a bank
    with pytest.raises(SoftpromptError, match="not a prompt bank file"):
        PromptBank.load(tmp_path / "peft_dir" / "adapter_model.safetensors")
