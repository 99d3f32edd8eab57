"""`PromptedT5` (the prompt as a parameter at the official path) and `prompt_only` training.

A user's own Flax loop: `jax.grad` over the whole tree, `prompt_only(adafactor)`, a
`TrainState`. It must move exactly what our trainer's step moves, keep every frozen leaf
bit-identical, hold optimizer slots for the prompt alone, and cost no weight gradients.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state
from flax.traverse_util import flatten_dict

import softprompt_jax as sp
from softprompt_jax.losses import LossConfig, loss_weights, weighted_cross_entropy
from softprompt_jax.prompted_t5 import PROMPT_PATH
from softprompt_jax.train.optimizer import AdafactorConfig, adafactor, make_optimizer
from softprompt_jax.train.train_step import init_train_state, make_train_step

CFG = sp.get_config("t5_1_1_tiny").replace(vocab_size=128, emb_dim=32, num_heads=2, head_dim=16)
PROMPT_LENGTH = 4
# T5X's training loss without dropout; the paper's Adafactor as the official runs set it.
LOSS = LossConfig(z_loss=1e-4, normalization="sum", enable_dropout=False)
ADAFACTOR = AdafactorConfig(step_offset=1_100_000)


def make_batch(seed: int, batch: int = 3) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    inputs = rng.integers(3, CFG.vocab_size, (batch, 6))
    inputs[:, -1] = 1
    inputs[0, 3:] = [1, 0, 0]
    targets = rng.integers(3, CFG.vocab_size, (batch, 3))
    targets[:, -1] = 1
    return {
        "encoder_input_tokens": jnp.asarray(inputs, jnp.int32),
        "decoder_input_tokens": jnp.asarray(np.pad(targets, ((0, 0), (1, 0)))[:, :-1], jnp.int32),
        "decoder_target_tokens": jnp.asarray(targets, jnp.int32),
    }


@pytest.fixture(scope="module")
def frozen():
    params = sp.init_params(CFG, 0)
    # A -0.0 weight: `+ 0.0` would flip its sign bit, `prompt_only` must not.
    params["decoder"]["decoder_norm"]["scale"] = (
        params["decoder"]["decoder_norm"]["scale"].at[0].set(-0.0)
    )
    return params


@pytest.fixture(scope="module")
def prompt(frozen):
    return sp.init_prompt("sampled_vocab", PROMPT_LENGTH, params=frozen, seed=1)


def test_tree_has_t5x_names_and_the_official_prompt_path(frozen, prompt):
    batch = make_batch(0)
    model = sp.PromptedT5(CFG, prompt_length=PROMPT_LENGTH, prompt_init=prompt)
    variables = model.init(
        jax.random.PRNGKey(0), batch["encoder_input_tokens"], batch["decoder_input_tokens"]
    )
    keys = set(flatten_dict(nn.meta.unbox(variables["params"]), sep="/"))
    assert keys == set(flatten_dict(frozen, sep="/")) | {"/".join(PROMPT_PATH)}
    assert variables["params"]["encoder"]["prompt"]["prompt"]["prompt"].names == sp.PROMPT_AXES
    _, initial = sp.split_prompt(nn.meta.unbox(variables["params"]))
    np.testing.assert_array_equal(initial, prompt)


@pytest.mark.parametrize("bank", [False, True])
def test_logits_equal_prompted_logits_exactly(frozen, prompt, bank):
    batch = make_batch(1)
    enc, dec = batch["encoder_input_tokens"], batch["decoder_input_tokens"]
    if bank:
        prompt = jnp.stack([prompt, prompt[::-1], -prompt])
        ids = jnp.array([2, 0, 1])
    else:
        ids = None
    model = sp.PromptedT5(
        CFG, prompt_length=PROMPT_LENGTH, num_prompts=3 if bank else None, prompt_init=prompt
    )
    ours = jax.jit(model.apply)({"params": sp.join_prompt(frozen, prompt)}, enc, dec, None, ids)
    reference = sp.prompted_logits(CFG, frozen, prompt, enc, dec, ids)
    np.testing.assert_array_equal(ours, reference)


def bits(tree):
    """Float32 leaves as their bit patterns, so -0.0 and +0.0 differ."""
    return jax.tree.map(lambda x: np.asarray(x).view(np.uint32), tree)


def whole_tree_step(model: sp.PromptedT5):
    """A user's step: loss of the module's logits, `jax.grad` w.r.t. the whole tree."""

    def loss_fn(params, batch):
        logits = model.apply(
            {"params": params},
            batch["encoder_input_tokens"],
            batch["decoder_input_tokens"],
            batch["decoder_target_tokens"],
        )
        return weighted_cross_entropy(
            logits,
            batch["decoder_target_tokens"],
            loss_weights(batch),
            z_loss=LOSS.z_loss,
            normalization=LOSS.normalization,
        )[0]

    def step(state: train_state.TrainState, batch):
        return state.apply_gradients(grads=jax.grad(loss_fn)(state.params, batch))

    return step


def test_a_users_loop_moves_the_prompt_like_our_trainer_and_nothing_else(frozen, prompt):
    model = sp.PromptedT5(CFG, prompt_length=PROMPT_LENGTH)
    tx = sp.prompt_only(adafactor(ADAFACTOR))
    state = train_state.TrainState.create(
        apply_fn=model.apply, params=sp.join_prompt(frozen, prompt), tx=tx
    )
    step = jax.jit(whole_tree_step(model))
    ours = init_train_state(prompt, make_optimizer(ADAFACTOR))
    our_step = jax.jit(make_train_step(CFG, make_optimizer(ADAFACTOR), LOSS))
    for i in range(4):
        state = step(state, make_batch(10 + i))
        ours, _ = our_step(ours, frozen, make_batch(10 + i), jax.random.PRNGKey(0))

    after, trained = sp.split_prompt(state.params)
    np.testing.assert_allclose(trained, ours.prompt, rtol=0, atol=1e-6)
    assert not np.allclose(trained, prompt)
    jax.tree.map(np.testing.assert_array_equal, bits(after), bits(frozen))
    slots = [x for x in jax.tree.leaves(state.opt_state) if np.size(x) > 1]
    assert sum(np.size(x) for x in slots) == PROMPT_LENGTH * CFG.emb_dim  # Adafactor's v only


def test_optax_masked_alone_would_move_frozen_leaves(frozen, prompt):
    """Why `prompt_only` is not `optax.masked`: masked leaves get their raw gradients."""
    params = sp.join_prompt(frozen, prompt)
    masked = optax.masked(optax.sgd(0.1), lambda tree: jax.tree.map(lambda _: False, tree))
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = masked.update(grads, masked.init(params), params)
    assert not np.array_equal(
        optax.apply_updates(params, updates)["decoder"]["decoder_norm"]["scale"],
        frozen["decoder"]["decoder_norm"]["scale"],
    )
    updates, _ = sp.prompt_only(optax.sgd(0.1)).update(
        grads, sp.prompt_only(optax.sgd(0.1)).init(params), params
    )
    kept, moved = sp.split_prompt(optax.apply_updates(params, updates))  # eager: no folding
    jax.tree.map(np.testing.assert_array_equal, bits(kept), bits(frozen))  # -0.0 stays -0.0
    assert not np.array_equal(moved, prompt)


def test_whole_tree_step_does_no_weight_gradient_work():
    """Compiled FLOPs (XLA cost analysis, after dead-code elimination) of a user's whole-tree
    step vs our prompt-only step: the unused weight gradients are dropped."""
    abstract = sp.param_shapes(CFG)
    prompt = jax.ShapeDtypeStruct((PROMPT_LENGTH, CFG.emb_dim), jnp.float32)
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    batch = {
        "encoder_input_tokens": ints(8, 64),
        "decoder_input_tokens": ints(8, 8),
        "decoder_target_tokens": ints(8, 8),
    }
    model = sp.PromptedT5(CFG, prompt_length=PROMPT_LENGTH)
    tx = sp.prompt_only(adafactor(ADAFACTOR))
    state = jax.eval_shape(
        lambda p: train_state.TrainState.create(apply_fn=model.apply, params=p, tx=tx),
        sp.join_prompt(abstract, prompt),
    )
    ours = jax.eval_shape(lambda p: init_train_state(p, make_optimizer(ADAFACTOR)), prompt)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)

    def compiled_flops(fn, *args) -> float:
        return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]

    whole_tree = compiled_flops(whole_tree_step(model), state, batch)
    prompt_step = compiled_flops(
        make_train_step(CFG, make_optimizer(ADAFACTOR), LOSS), ours, abstract, batch, key
    )
    print(f"compiled FLOPs: whole-tree step {whole_tree:.4g}, prompt-only step {prompt_step:.4g}")
    assert abs(whole_tree / prompt_step - 1) < 0.05
