"""T5 prefix tuning: PEFT's mode equals PEFT on the same weights; the paper's reaches both."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

import softprompt_jax as sp
from softprompt_jax import decoding
from softprompt_jax.checkpoints.huggingface import config_from_hf, params_from_hf_state_dict
from softprompt_jax.inference import predict_tokens
from softprompt_jax.model.network import T5
from softprompt_jax.t5_prefixes import (
    init_t5_prefix,
    t5_key_values,
    t5_prefix_encode,
    t5_prefix_logits,
)

LENGTH = 3
VOCAB = 50


@pytest.fixture(scope="module")
def hf_t5():
    """A random tiny T5 1.1 with 3 layers (PEFT's layer-to-entry map is not the identity)."""
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=16,
        d_kv=4,
        num_heads=4,
        d_ff=24,
        num_layers=3,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 16) * 0.25)
    cfg = config_from_hf(config.to_dict(), dtype="float32")
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return model, cfg, params_from_hf_state_dict(state, cfg)


def make_batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    inputs = rng.integers(2, VOCAB, (2, 7))
    inputs[1, 4:] = 0
    targets = rng.integers(2, VOCAB, (2, 4))
    targets[1, 2:] = 0
    return {
        "encoder_input_tokens": inputs,
        "decoder_input_tokens": np.pad(targets, ((0, 0), (1, 0)))[:, :-1],
        "decoder_target_tokens": targets,
    }


def peft_loss_and_grads(model, part: dict, projection: int | None, batch) -> tuple[float, dict]:
    """PEFT's T5 prefix tuning loss, with `part`'s weights copied in, and its gradients."""
    config = peft.PrefixTuningConfig(
        task_type=peft.TaskType.SEQ_2_SEQ_LM,
        num_virtual_tokens=LENGTH,
        prefix_projection=projection is not None,
        encoder_hidden_size=projection or 16,
    )
    peft_model = peft.get_peft_model(model, config)
    encoder = peft_model.prompt_encoder["default"]
    as_torch = lambda x: torch.tensor(np.asarray(x))
    with torch.no_grad():
        if projection is None:
            encoder.embedding.weight.copy_(as_torch(part["table"]))
            weights = {"table": encoder.embedding.weight}
        else:
            mlp = part["mlp"]
            encoder.embedding.weight.copy_(as_torch(part["embedding"]))
            for layer, name in ((encoder.transform[0], "wi"), (encoder.transform[2], "wo")):
                layer.weight.copy_(as_torch(mlp[name]["kernel"]).T)
                layer.bias.copy_(as_torch(mlp[name]["bias"]))
            weights = {
                "embedding": encoder.embedding.weight,
                "wi": encoder.transform[0].weight,
                "wo": encoder.transform[2].weight,
            }
    inputs, targets = (
        torch.from_numpy(batch[k]) for k in ("encoder_input_tokens", "decoder_target_tokens")
    )
    output = peft_model(
        input_ids=inputs,
        attention_mask=(inputs > 0).long(),
        decoder_input_ids=torch.from_numpy(batch["decoder_input_tokens"]),
        labels=torch.where(targets > 0, targets, -100),
    )
    output.loss.backward()
    return output.loss.item(), {k: w.grad.numpy() for k, w in weights.items()}


def relative_error(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


@pytest.mark.parametrize("projection", [None, 8], ids=["p_tuning_v2", "mlp"])
def test_peft_mode_equals_peft_prefix_tuning_on_t5(hf_t5, projection):
    model, cfg, params = hf_t5
    prefix = init_t5_prefix(cfg, LENGTH, projection, seed=1, mode="peft")
    batch = make_batch()
    peft_loss, peft_grads = peft_loss_and_grads(model, prefix["peft"], projection, batch)
    loss, grad = sp.prompt_loss_and_grad(
        cfg, params, prefix, {k: jnp.asarray(v) for k, v in batch.items()}
    )
    assert relative_error(loss, peft_loss) < 1e-5
    ours = grad["peft"]
    if projection is None:
        assert relative_error(ours["table"], peft_grads["table"]) < 1e-4
    else:
        assert relative_error(ours["embedding"], peft_grads["embedding"]) < 1e-4
        for name in ("wi", "wo"):  # torch keeps Linear weights as [out, in]
            assert relative_error(ours["mlp"][name]["kernel"].T, peft_grads[name]) < 1e-4


def test_paper_mode_prefixes_reach_encoder_and_decoder(hf_t5):
    _, cfg, params = hf_t5
    prefix = init_t5_prefix(cfg, LENGTH, seed=2, mode="paper")
    batch = {k: jnp.asarray(v) for k, v in make_batch().items()}
    _, grad = sp.prompt_loss_and_grad(cfg, params, prefix, batch)
    for part in ("encoder", "decoder"):  # every layer of both stacks moves the loss
        for name in ("key", "value"):
            per_layer = np.abs(np.asarray(grad[part][name])).sum(axis=(1, 2, 3))
            assert per_layer.shape == (3,) and (per_layer > 0).all(), (part, name, per_layer)
    # The decoder part alone is PEFT's kind of prefix: the encoder part changes the loss.
    kv = t5_key_values(cfg, prefix)
    assert kv["encoder"][0].shape == (3, LENGTH, 4, 4)


def test_encoder_prefix_is_a_prompts_first_layer_keys_and_values():
    """One encoder layer: a prefix of a prompt's layer keys/values = prompt tuning with it."""
    cfg = sp.T5Config(
        vocab_size=VOCAB,
        emb_dim=16,
        num_heads=4,
        head_dim=4,
        mlp_dim=24,
        num_encoder_layers=1,
        num_decoder_layers=1,
        dtype="float32",
    )
    params = sp.init_params(cfg, 0)
    prompt = jax.random.normal(jax.random.PRNGKey(1), (LENGTH, 16))
    tokens = jnp.asarray(make_batch()["encoder_input_tokens"])
    model = T5(cfg)

    @jax.jit
    def encodings(params, prompt):
        layer = params["encoder"]["layers_0"]
        scale = layer["pre_attention_layer_norm"]["scale"]
        normed = prompt * jax.lax.rsqrt(jnp.mean(prompt**2, -1, keepdims=True) + 1e-6) * scale
        kv = tuple(
            (normed @ layer["attention"][name]["kernel"]).reshape(1, LENGTH, 4, 4)
            for name in ("key", "value")
        )
        variables = {"params": params}
        with_prefix = model.apply(
            variables, tokens, enable_dropout=False, prefix=kv, method=model.encode
        )
        embeddings = model.apply(variables, tokens, method=model.embed)
        prompted = model.apply(
            variables,
            encoder_input_embeddings=jnp.concatenate(
                [jnp.broadcast_to(prompt, (2, LENGTH, 16)), embeddings], 1
            ),
            encoder_mask=jnp.concatenate([jnp.ones((2, LENGTH), bool), tokens > 0], 1),
            enable_dropout=False,
            method=model.encode,
        )
        return with_prefix, prompted[:, LENGTH:]

    with_prefix, prompted = encodings(params, prompt)
    real = np.asarray(tokens > 0)
    np.testing.assert_allclose(np.asarray(with_prefix)[real], np.asarray(prompted)[real], atol=1e-5)


def test_peft_mode_saves_what_peft_loads(hf_t5, tmp_path):
    model, cfg, params = hf_t5
    prefix = init_t5_prefix(cfg, LENGTH, seed=3, mode="peft")
    path = sp.save_prompt(
        prefix, tmp_path / "adapter", num_heads=cfg.num_heads, head_dim=cfg.head_dim
    )
    loaded = peft.PeftModel.from_pretrained(model, path).eval()
    batch = make_batch()
    inputs, targets = (
        torch.from_numpy(batch[k]) for k in ("encoder_input_tokens", "decoder_target_tokens")
    )
    with torch.no_grad():
        theirs = loaded(
            input_ids=inputs,
            attention_mask=(inputs > 0).long(),
            decoder_input_ids=torch.from_numpy(batch["decoder_input_tokens"]),
            labels=torch.where(targets > 0, targets, -100),
        ).loss.item()
    ours, _ = sp.prompt_loss_and_grad(
        cfg, params, prefix, {k: jnp.asarray(v) for k, v in batch.items()}
    )
    assert relative_error(ours, theirs) < 1e-5


@functools.partial(jax.jit, static_argnames="cfg")
def cached_step_logits(cfg, params, prefix, tokens, decoder_inputs):
    """Logits of stepping the decode cache through `decoder_inputs`, the encoder run once."""
    encoded, mask, decoder_prefix = t5_prefix_encode(cfg, params, prefix, tokens)
    length = decoder_inputs.shape[1]

    def step(cache, token):
        logits, cache = decoding._decode_step(
            cfg, params, cache, mask, token[:, None], length, decoder_prefix
        )
        return cache, logits

    _, logits = jax.lax.scan(
        step, decoding.init_cache(cfg, params, encoded, length), decoder_inputs.T
    )
    return jnp.transpose(logits, (1, 0, 2))


@pytest.mark.parametrize("mode", ["paper", "peft"])
def test_cached_prefix_decoding_equals_teacher_forcing(hf_t5, mode):
    """The decode cache with the prefix beside it gives the teacher-forced logits, step by step;
    greedy decoding (eval, infer) picks each step's teacher-forced argmax."""
    _, cfg, params = hf_t5
    prefix = init_t5_prefix(cfg, LENGTH, seed=5, mode=mode)
    batch = {k: jnp.asarray(v) for k, v in make_batch().items()}
    tokens, inputs = batch["encoder_input_tokens"], batch["decoder_input_tokens"]
    expected = t5_prefix_logits(cfg, params, prefix, tokens, inputs)
    cached = cached_step_logits(cfg, params, prefix, tokens, inputs)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(expected), atol=1e-4, rtol=1e-4)

    ids = np.asarray(predict_tokens(cfg, params, prefix, tokens, max_length=4))
    shifted = jnp.pad(jnp.asarray(ids), ((0, 0), (1, 0)))[:, :-1]
    forced = np.argmax(t5_prefix_logits(cfg, params, prefix, tokens, shifted), -1)
    ended = np.cumsum(ids == decoding.EOS_ID, 1) - (ids == decoding.EOS_ID) > 0
    np.testing.assert_array_equal(ids, np.where(ended, 0, forced))


def test_peft_mode_greedy_ids_equal_peft_forward_greedy(hf_t5, tmp_path):
    """Cached greedy decoding picks what PEFT's own forward pass picks step by step (PEFT's
    `generate` is no reference: it gives other tokens than its forward pass here)."""
    model, cfg, params = hf_t5
    prefix = init_t5_prefix(cfg, LENGTH, seed=3, mode="peft")
    path = sp.save_prompt(prefix, tmp_path / "a", num_heads=cfg.num_heads, head_dim=cfg.head_dim)
    loaded = peft.PeftModel.from_pretrained(model, path).eval()
    inputs = torch.from_numpy(make_batch()["encoder_input_tokens"])
    theirs = torch.zeros((2, 1), dtype=torch.long)
    with torch.no_grad():
        for _ in range(4):
            logits = loaded(
                input_ids=inputs, attention_mask=(inputs > 0).long(), decoder_input_ids=theirs
            ).logits
            theirs = torch.cat([theirs, logits[:, -1:].argmax(-1)], 1)
    ours = predict_tokens(cfg, params, prefix, jnp.asarray(inputs.numpy()), max_length=4)
    assert not (theirs == decoding.EOS_ID).any()  # no row stops early: all 4 ids compare
    np.testing.assert_array_equal(np.asarray(ours), theirs[:, 1:].numpy())
