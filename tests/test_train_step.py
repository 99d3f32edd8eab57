"""Training math: T5X's loss and Adafactor, prompt-only updates, FLOPs, and real learning."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import softprompt_jax as sp
from softprompt_jax.losses import LossConfig, loss_weights, prompt_loss, weighted_cross_entropy
from softprompt_jax.model import get_config, init_params, param_shapes
from softprompt_jax.prompts import init_prompt, prompted_logits
from softprompt_jax.train.optimizer import AdafactorConfig, make_optimizer
from softprompt_jax.train.train_step import init_train_state, make_eval_step, make_train_step

# Small vocabulary, wide enough to learn, one layer per stack (fast to compile);
# float32 compute unless a test says otherwise.
CFG = get_config("t5_1_1_tiny").replace(
    vocab_size=128,
    emb_dim=64,
    num_heads=2,
    head_dim=32,
    mlp_dim=128,
    num_encoder_layers=1,
    num_decoder_layers=1,
)
TARGET = [7, 42, 19, 1]  # a fixed answer the frozen random model cannot know
STEPS = 150


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, 0)


def make_batch(seed: int, batch: int = 4, length: int = 8) -> dict[str, jax.Array]:
    """Random EOS-terminated inputs with padding; targets `TARGET`, one of them padded."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(3, CFG.vocab_size, (batch, length))
    lengths = rng.integers(2, length + 1, batch)
    inputs = np.where(np.arange(length) < lengths[:, None], inputs, 0)
    inputs[np.arange(batch), lengths - 1] = 1
    targets = np.tile(TARGET, (batch, 1))
    targets[0, 2:] = [1, 0]
    return {
        "encoder_input_tokens": jnp.asarray(inputs, jnp.int32),
        "decoder_input_tokens": jnp.asarray(np.pad(targets, ((0, 0), (1, 0)))[:, :-1], jnp.int32),
        "decoder_target_tokens": jnp.asarray(targets, jnp.int32),
    }


def t5x_adafactor(param, grads, start_step, lr=0.3, decay=0.8, wd=1e-5, clip=1.0):
    """T5X's Adafactor (`t5x/adafactor.py`) by hand, float64: global step = start_step + k."""
    param = param.astype(np.float64)
    factored = min(param.shape) >= 128
    v = v_row = v_col = 0.0
    for k, grad in enumerate(grads):
        beta2 = 1.0 - (start_step + k + 1.0) ** -decay
        g2 = grad.astype(np.float64) ** 2 + 1e-30
        if factored:
            v_row = beta2 * v_row + (1 - beta2) * g2.mean(axis=1)
            v_col = beta2 * v_col + (1 - beta2) * g2.mean(axis=0)
            v_hat = v_row[:, None] * v_col[None, :] / v_row.mean()
        else:
            v = v_hat = beta2 * v + (1 - beta2) * g2
        update = grad / np.sqrt(v_hat)
        update /= max(1.0, np.sqrt(np.mean(update**2)) / clip)
        param = (1 - wd) * param - lr * update
    return param


def test_adafactor_defaults_are_the_papers():
    config = AdafactorConfig()
    assert (config.learning_rate, config.decay_rate, config.weight_decay_rate) == (0.3, 0.8, 1e-5)
    assert config.clipping_threshold == 1.0 and not config.multiply_by_parameter_scale


@pytest.mark.parametrize("weight_decay", [1e-5, 0.05])  # 0.05 would expose lr-scaled decay
@pytest.mark.parametrize("step_offset", [0, 1_100_000])
@pytest.mark.parametrize("shape", [(4, 8), (128, 130)], ids=["full_v", "factored_v"])
def test_adafactor_matches_t5x_formula(step_offset, shape, weight_decay):
    rng = np.random.default_rng(0)
    prompt = rng.uniform(-0.5, 0.5, shape).astype(np.float32)
    grads = [rng.normal(size=shape).astype(np.float32) * s for s in (1.0, 0.1, 3.0)]
    config = AdafactorConfig(step_offset=step_offset, weight_decay_rate=weight_decay)
    optimizer = make_optimizer(config)
    state, current = optimizer.init(jnp.asarray(prompt)), jnp.asarray(prompt)
    for grad in grads:
        updates, state = optimizer.update(jnp.asarray(grad), state, current)
        current = optax.apply_updates(current, updates)
    expected = t5x_adafactor(prompt, grads, start_step=step_offset, wd=weight_decay)
    np.testing.assert_allclose(current - prompt, expected - prompt, rtol=1e-4, atol=1e-6)


def opt_state_shapes(state) -> set[tuple[int, ...]]:
    return {tuple(x.shape) for x in jax.tree.leaves(state)}


def test_optimizer_given_the_whole_tree_moves_only_the_prompt():
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    tree = {
        "prompt": normal(6, 16),
        "params": {
            "token_embedder": {"embedding": normal(128, 16)},
            "decoder": {"logits_dense": {"kernel": normal(16, 128)}},
        },
    }
    grads = jax.tree.map(lambda x: normal(*x.shape), tree)  # frozen leaves get gradients too
    optimizer = make_optimizer()
    state = optimizer.init(tree)
    assert opt_state_shapes(state) <= {(), (1,), (6, 16)}  # no slots for frozen weights
    new = tree
    for _ in range(3):
        updates, state = optimizer.update(grads, state, new)
        new = optax.apply_updates(new, updates)
    jax.tree.map(np.testing.assert_array_equal, new["params"], tree["params"])
    assert not np.allclose(new["prompt"], tree["prompt"])


def test_loss_definitions():
    """T5X's weighted cross-entropy against direct formulas on random logits."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 5, 11)) * 3, jnp.float32)
    targets = jnp.asarray(rng.integers(1, 11, (3, 5)) * (np.arange(5) < [[5], [3], [1]]))
    weights = np.asarray(targets > 0, np.float64)
    token_ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
    log_z = np.asarray(jax.nn.logsumexp(logits, axis=-1))

    def loss(**kwargs):
        return float(weighted_cross_entropy(logits, targets, jnp.asarray(weights), **kwargs)[0])

    mean_ce = (token_ce * weights).sum() / weights.sum()  # Hugging Face's definition
    np.testing.assert_allclose(loss(normalization="mean_tokens"), mean_ce, rtol=1e-6)
    np.testing.assert_allclose(
        loss(z_loss=1e-4),  # T5X: token sum plus z-loss
        ((token_ce + 1e-4 * log_z**2) * weights).sum(),
        rtol=1e-6,
    )
    # Label smoothing: T5X's soft one-hot targets, minus their entropy.
    vocab, smooth = logits.shape[-1], 0.1
    soft = np.full(logits.shape, smooth / (vocab - 1))
    np.put_along_axis(soft, np.asarray(targets)[..., None], 1 - smooth, axis=-1)
    entropy = -(1 - smooth) * np.log(1 - smooth) - smooth * np.log(smooth / (vocab - 1))
    smoothed_ce = -(soft * jax.nn.log_softmax(logits)).sum(-1) - entropy
    np.testing.assert_allclose(
        loss(label_smoothing=smooth), (smoothed_ce * weights).sum(), rtol=1e-5
    )
    with pytest.raises(ValueError, match="loss normalization 'mean'"):
        loss(normalization="mean")


def test_loss_weights_default_to_non_padding_and_can_be_given():
    targets = jnp.array([[5, 1, 0], [1, 0, 0]])
    np.testing.assert_array_equal(
        loss_weights({"decoder_target_tokens": targets}), [[1, 1, 0], [1, 0, 0]]
    )
    given = jnp.array([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    batch = {"decoder_target_tokens": targets, "decoder_loss_weights": given}
    np.testing.assert_array_equal(loss_weights(batch), given)


def test_score_batch_and_default_loss_on_a_prompt_bank(params):
    """Scores are summed target log-likelihoods; the default loss is HF's mean CE (a bank here)."""
    bank = jnp.stack([init_prompt("random_uniform", 3, emb_dim=64, seed=s) for s in (0, 1)])
    batch = {**make_batch(1), "prompt_ids": jnp.array([1, 0, 0, 1])}
    targets = batch["decoder_target_tokens"]
    scores = sp.score_batch(CFG, params, bank, batch)
    logits = prompted_logits(
        CFG,
        params,
        bank,
        batch["encoder_input_tokens"],
        batch["decoder_input_tokens"],
        batch["prompt_ids"],
        decoder_target_tokens=targets,
    )
    token_ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    np.testing.assert_allclose(scores, -jnp.sum(token_ce * (targets > 0), axis=-1), rtol=1e-5)

    loss, grad = sp.prompt_loss_and_grad(CFG, params, bank, batch)
    np.testing.assert_allclose(loss, -scores.sum() / jnp.sum(targets > 0), rtol=1e-5)
    assert grad.shape == bank.shape and grad.dtype == jnp.float32
    assert (jnp.abs(grad).sum(axis=(1, 2)) > 0).all()  # both prompts of the bank learn


def test_prompt_only_step_needs_fewer_flops():
    """XLA's cost analysis: the prompt-only train step vs a gradient w.r.t. all weights.

    The HLO is analysed as lowered, before XLA's optimisations: the prompt-only
    step never emits the weight-gradient matmuls, so its saving does not rely on
    dead-code elimination (`bench/flops_prompt_vs_full.py` reports compiled costs).
    """
    abstract = param_shapes(CFG)
    prompt = jax.ShapeDtypeStruct((8, CFG.emb_dim), jnp.float32)
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    batch = {
        "encoder_input_tokens": ints(8, 32),
        "decoder_input_tokens": ints(8, 8),
        "decoder_target_tokens": ints(8, 8),
    }
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    optimizer, loss_config = make_optimizer(), LossConfig()
    state = jax.eval_shape(lambda p: init_train_state(p, optimizer), prompt)

    def all_weights_grad(prompt, params, batch, rng):
        loss = lambda trees: prompt_loss(trees[0], CFG, trees[1], batch, loss_config, rng)[0]
        return jax.grad(loss)((prompt, params))

    def flops(fn, *args) -> float:
        return jax.jit(fn).lower(*args).cost_analysis()["flops"]

    prompt_only = flops(make_train_step(CFG, optimizer, loss_config), state, abstract, batch, key)
    everything = flops(all_weights_grad, prompt, abstract, batch, key)
    ratio = prompt_only / everything
    print(f"prompt-only train step / all-weights gradient FLOPs = {ratio:.3f}")
    assert ratio < 0.8


def test_prompt_tuning_learns_and_moves_only_the_prompt(params):
    """150 steps teach the prompt an answer the frozen random model cannot know.

    The frozen weights are bf16 (the compute dtype) and bit-identical afterwards;
    the prompt and its optimizer slots are float32, and the train state holds
    nothing model-sized.
    """
    cfg = CFG.replace(dtype="bfloat16", dropout_rate=0.1)  # T5X fine-tuning dropout
    frozen = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    before = jax.tree.map(np.array, frozen)
    optimizer = make_optimizer()
    state = init_train_state(init_prompt("sampled_vocab", 16, params=frozen), optimizer)
    prompt0 = np.array(state.prompt)
    loss_config = LossConfig(normalization="mean_tokens")
    train_step = jax.jit(make_train_step(cfg, optimizer, loss_config), donate_argnums=(0,))
    eval_step = jax.jit(make_eval_step(cfg, loss_config))
    held_out = make_batch(10_000, batch=16)
    start = float(eval_step(state, frozen, held_out)["loss"])
    for step in range(STEPS):
        state, _ = train_step(state, frozen, make_batch(step, batch=16), jax.random.PRNGKey(0))
    metrics = eval_step(state, frozen, held_out)
    print(f"held-out loss {start:.3f} -> {float(metrics['loss']):.3f}")
    assert float(metrics["loss"]) < 0.3 * start
    assert float(metrics["accuracy"]) > 0.9

    assert int(state.step) == STEPS and state.prompt.dtype == jnp.float32
    assert not np.allclose(state.prompt, prompt0)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, frozen), before)
    assert all(
        x.dtype == jnp.float32
        for x in jax.tree.leaves(state.opt_state)
        if jnp.issubdtype(x.dtype, jnp.floating)
    )
    assert opt_state_shapes(state.opt_state) <= {(), (1,), (16, 64)}
