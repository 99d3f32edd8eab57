"""Prompt tuning and prefix tuning on decoder-only models against PEFT (`TaskType.CAUSAL_LM`).

Same random weights, prompt or prefix and batch: loss within 1e-5 relative and gradients
within 1e-4 of PEFT's `model(**batch).loss` and its autograd, for GPT-2 and a grouped-query
Llama; prefixes with and without PEFT's MLP; folding the MLP; PEFT adapter dirs both ways.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from tiny_decoders import VOCAB, save_tiny

import softprompt_jax as sp
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.prefixes import prefix_table

FAMILIES = ("gpt2", "llama")
LENGTH = 3


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders")
    paths = {}
    for family in FAMILIES:
        save_tiny(family, root / family, seed=1)
        paths[family] = root / family
    return paths


def _base(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def _batch():
    """Right-padded rows; labels -100 on padding and on the first row's first two tokens."""
    ids = np.random.default_rng(0).integers(1, VOCAB, (2, 6))
    mask = np.ones_like(ids)
    mask[1, 4:] = 0
    labels = np.where(mask > 0, ids, -100)
    labels[0, :2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _peft_loss_and_backward(model, batch):
    out = model(**{k: torch.tensor(v) for k, v in batch.items()})
    out.loss.backward()
    return out.loss.item()


def _close(ours, theirs, atol=1e-4):
    np.testing.assert_allclose(np.asarray(ours), theirs.detach().numpy(), rtol=0, atol=atol)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_tuning_loss_and_gradient_equal_peft(saved, family):
    cfg, params = sp.load_pretrained(saved[family], dtype="float32")
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=LENGTH)
    model = peft.get_peft_model(_base(saved[family]), config).eval()
    table = model.prompt_encoder["default"].embedding.weight
    batch = _batch()
    peft_loss = _peft_loss_and_backward(model, batch)
    loss, grad = sp.prompt_loss_and_grad(cfg, params, jnp.asarray(table.detach().numpy()), batch)
    assert float(loss) == pytest.approx(peft_loss, rel=1e-5)
    _close(grad, table.grad)


def _peft_prefix_model(path, prefix):
    """PEFT prefix tuning on the model at `path`, its prefix encoder holding our `prefix`."""
    projection = "mlp" in prefix
    config = peft.PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=LENGTH,
        prefix_projection=projection,
        encoder_hidden_size=prefix["mlp"]["wi"]["kernel"].shape[1] if projection else None,
    )
    model = peft.get_peft_model(_base(path), config).eval()
    encoder = model.prompt_encoder["default"]
    with torch.no_grad():
        if projection:
            encoder.embedding.weight.copy_(torch.tensor(np.asarray(prefix["embedding"])))
            for layer, name in ((encoder.transform[0], "wi"), (encoder.transform[2], "wo")):
                layer.weight.copy_(torch.tensor(np.asarray(prefix["mlp"][name]["kernel"]).T))
                layer.bias.copy_(torch.tensor(np.asarray(prefix["mlp"][name]["bias"])))
        else:
            encoder.embedding.weight.copy_(torch.tensor(np.asarray(prefix_table(prefix))))
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("projection_dim", [None, 5])
def test_prefix_tuning_loss_and_gradients_equal_peft(saved, family, projection_dim):
    cfg, params = sp.load_pretrained(saved[family], dtype="float32")
    prefix = sp.init_prefix(cfg, LENGTH, projection_dim=projection_dim, seed=2)
    model = _peft_prefix_model(saved[family], prefix)
    batch = _batch()
    peft_loss = _peft_loss_and_backward(model, batch)
    loss, grad = sp.prompt_loss_and_grad(cfg, params, prefix, batch)
    assert float(loss) == pytest.approx(peft_loss, rel=1e-5)
    encoder = model.prompt_encoder["default"]
    if projection_dim is None:
        _close(prefix_table(grad), encoder.embedding.weight.grad)
        return
    assert grad.keys() == prefix.keys()
    _close(grad["embedding"], encoder.embedding.weight.grad)
    for layer, name in ((encoder.transform[0], "wi"), (encoder.transform[2], "wo")):
        _close(grad["mlp"][name]["kernel"], layer.weight.grad.T)
        _close(grad["mlp"][name]["bias"], layer.bias.grad)


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_prefix_gives_peft_logits_of_the_mlp_prefix(saved, family):
    cfg, params = sp.load_pretrained(saved[family], dtype="float32")
    prefix = sp.init_prefix(cfg, LENGTH, projection_dim=5, seed=3)
    folded = sp.fold_prefix(cfg, prefix)
    assert folded.keys() == {"key", "value"}
    assert folded["key"].shape == (cfg.num_layers, LENGTH, cfg.num_kv_heads, cfg.head_dim)
    batch = _batch()
    np.testing.assert_allclose(
        sp.lm_logits(cfg, params, batch["input_ids"], batch["attention_mask"], folded),
        _peft_logits(_peft_prefix_model(saved[family], prefix), batch),
        rtol=0,
        atol=1e-5,
    )


def _peft_logits(model, batch):
    with torch.no_grad():
        logits = model(
            input_ids=torch.tensor(batch["input_ids"]),
            attention_mask=torch.tensor(batch["attention_mask"]),
        ).logits
    return logits[:, -batch["input_ids"].shape[1] :].numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_and_prefix_files_round_trip_with_peft(saved, family, tmp_path):
    cfg, params = sp.load_pretrained(saved[family], dtype="float32")
    batch = _batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rng = np.random.default_rng(4)
    prompt = jnp.asarray(rng.normal(size=(LENGTH, cfg.emb_dim)), jnp.float32)
    prefix = sp.fold_prefix(cfg, sp.init_prefix(cfg, LENGTH, projection_dim=5, seed=4))

    # Ours -> PEFT: the adapter dirs load into PEFT and give our logits.
    sp.save_prompt(prompt, tmp_path / "prompt", task_type="CAUSAL_LM")
    sp.save_prompt(prefix, tmp_path / "prefix")
    for name, ours in (("prompt", prompt), ("prefix", prefix)):
        model = peft.PeftModel.from_pretrained(_base(saved[family]), tmp_path / name).eval()
        theirs = _peft_logits(model, batch)
        np.testing.assert_allclose(
            sp.lm_logits(cfg, params, ids, mask, ours), theirs, rtol=0, atol=1e-5
        )

    # PEFT -> ours: PEFT's saved prompt and its prefix trained through the MLP.
    configs = {
        "peft_prompt": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=LENGTH),
        "peft_prefix": peft.PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=LENGTH,
            prefix_projection=True,
            encoder_hidden_size=5,
        ),
    }
    for name, config in configs.items():
        model = peft.get_peft_model(_base(saved[family]), config).eval()
        model.save_pretrained(tmp_path / name)
        loaded = sp.load_prompt(tmp_path / name)
        np.testing.assert_allclose(
            sp.lm_logits(cfg, params, ids, mask, loaded),
            _peft_logits(model, batch),
            rtol=0,
            atol=1e-5,
        )

    # Our numpy export of a prefix reads back as it was.
    sp.save_prompt(prefix, tmp_path / "prefix.npz")
    loaded = sp.load_prompt(tmp_path / "prefix.npz")
    for name in ("key", "value"):
        np.testing.assert_array_equal(loaded[name], prefix[name])


def test_a_prefix_of_another_shape_is_named(saved):
    cfg, params = sp.load_pretrained(saved["llama"], dtype="float32")
    batch = _batch()
    other = sp.init_prefix(cfg.replace(num_kv_heads=4), LENGTH)
    with pytest.raises(SoftpromptError, match=r"prefix key has shape \(2, 3, 4, 8\); the model"):
        sp.lm_logits(cfg, params, batch["input_ids"], batch["attention_mask"], other)
    with pytest.raises(SoftpromptError, match="fold an MLP prefix first"):
        sp.save_prompt(sp.init_prefix(cfg, LENGTH, projection_dim=5), Path("unused"))
