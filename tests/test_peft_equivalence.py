"""Same random T5 weights and prompt as Hugging Face PEFT: same loss, same prompt gradient.

PEFT's `PromptTuningConfig(task_type=SEQ_2_SEQ_LM)` keeps a `[2 * P, d]` table and
prepends only its first P rows to the encoder input (peft 0.21.2
`PeftModelForSeq2SeqLM.forward`: `prompts[:, :num_virtual_tokens]`), with ones in
front of the attention mask; its loss is the mean cross-entropy over labels != -100.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import jax.numpy as jnp  # noqa: E402

import softprompt_jax as sp  # noqa: E402
from softprompt_jax.checkpoints.huggingface import (  # noqa: E402
    config_from_hf,
    params_from_hf_state_dict,
)

PROMPT_LENGTH = 5
VOCAB_SIZE = 100


def make_hf_model(feed_forward_proj: str, tied: bool):
    """A random tiny HF T5: T5 1.1 (gated GELU, separate lm_head) or original T5 (ReLU, tied)."""
    config = transformers.T5Config(
        vocab_size=VOCAB_SIZE,
        d_model=16,
        d_kv=4,
        num_heads=4,
        d_ff=24,
        num_layers=2,
        feed_forward_proj=feed_forward_proj,
        tie_word_embeddings=tied,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    if not tied:  # transformers 5 always shares lm_head with the embedding; give it its own.
        model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB_SIZE, 16) * 0.25)
    return config, model


def make_batch() -> dict[str, np.ndarray]:
    """Encoder and target padding in the same batch, as seqio's feature converter lays it out."""
    rng = np.random.default_rng(0)
    inputs = rng.integers(2, VOCAB_SIZE, (3, 9))
    inputs[0, 6:], inputs[2, 3:] = 0, 0
    targets = rng.integers(2, VOCAB_SIZE, (3, 4))
    targets[1, 2:], targets[2, 1:] = 0, 0
    return {
        "encoder_input_tokens": inputs,
        "decoder_input_tokens": np.pad(targets, ((0, 0), (1, 0)))[:, :-1],
        "decoder_target_tokens": targets,
    }


def peft_loss_and_grad(model, prompt: np.ndarray, batch) -> tuple[float, np.ndarray]:
    config = peft.PromptTuningConfig(
        task_type=peft.TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=PROMPT_LENGTH
    )
    peft_model = peft.get_peft_model(model, config)
    table = peft_model.prompt_encoder["default"].embedding.weight
    assert table.shape == (2 * PROMPT_LENGTH, 16)  # the seq2seq decoder half, unused
    with torch.no_grad():
        table[:PROMPT_LENGTH] = torch.tensor(prompt)
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
    grad = table.grad.numpy()
    np.testing.assert_array_equal(grad[PROMPT_LENGTH:], 0.0)
    return output.loss.item(), grad[:PROMPT_LENGTH]


def relative_error(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


@pytest.mark.parametrize(
    "feed_forward_proj, tied", [("gated-gelu", False), ("relu", True)], ids=["t5_1_1", "t5"]
)
def test_loss_and_prompt_gradient_match_peft(feed_forward_proj, tied):
    hf_config, hf_model = make_hf_model(feed_forward_proj, tied)
    cfg = config_from_hf(hf_config.to_dict(), dtype="float32")
    assert cfg.logits_via_embedding == tied
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    params = params_from_hf_state_dict(state, cfg)
    prompt = np.asarray(sp.init_prompt("random_uniform", PROMPT_LENGTH, emb_dim=16, seed=0))
    batch = make_batch()

    peft_loss, peft_grad = peft_loss_and_grad(hf_model, prompt, batch)
    loss, grad = sp.prompt_loss_and_grad(
        cfg, params, jnp.asarray(prompt), {k: jnp.asarray(v) for k, v in batch.items()}
    )
    errors = relative_error(loss, peft_loss), relative_error(grad, peft_grad)
    print(f"relative error vs PEFT: loss {errors[0]:.1e}, prompt gradient {errors[1]:.1e}")
    assert errors[0] < 1e-5 and errors[1] < 1e-4
