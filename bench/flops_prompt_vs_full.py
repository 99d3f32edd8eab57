"""FLOPs of the prompt-only train step vs a gradient w.r.t. all weights (XLA cost analysis).

Also a user's whole-tree step (`PromptedT5`, `jax.grad` over every param, `prompt_only`
Adafactor): XLA drops the weight gradients nothing reads, so it should cost what ours does.

Lowers and compiles with abstract shapes only (no weights are allocated), so it
runs on a laptop CPU for any model size:

    python bench/flops_prompt_vs_full.py --model t5_1_1_base --batch 32 --inputs 512 --targets 8
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax

from softprompt_jax.losses import LossConfig, loss_weights, prompt_loss, weighted_cross_entropy
from softprompt_jax.model import cast_params, get_config, param_shapes
from softprompt_jax.prompted_t5 import PromptedT5, join_prompt
from softprompt_jax.train.optimizer import make_optimizer
from softprompt_jax.train.train_step import init_train_state, make_train_step


def compiled_flops(fn, *args) -> tuple[float, float]:
    """(FLOPs of the compiled program, seconds to compile)."""
    start = time.perf_counter()
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="t5_1_1_base")
    parser.add_argument("--dtype", default="bfloat16", help="compute and frozen-weight dtype")
    parser.add_argument("--prompt_length", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--inputs", type=int, default=512)
    parser.add_argument("--targets", type=int, default=8)
    args = parser.parse_args()

    cfg = get_config(args.model).replace(dtype=args.dtype)
    params = cast_params(cfg, param_shapes(cfg), args.dtype)  # logits_dense stays float32
    prompt = jax.ShapeDtypeStruct((args.prompt_length, cfg.emb_dim), jnp.float32)
    ints = lambda length: jax.ShapeDtypeStruct((args.batch, length), jnp.int32)
    batch = {
        "encoder_input_tokens": ints(args.inputs),
        "decoder_input_tokens": ints(args.targets),
        "decoder_target_tokens": ints(args.targets),
    }
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    optimizer, loss_config = make_optimizer(), LossConfig()
    state = jax.eval_shape(lambda p: init_train_state(p, optimizer), prompt)

    def forward(prompt, params, batch, rng):
        return prompt_loss(prompt, cfg, params, batch, loss_config, rng)[0]

    def all_weights_grad(prompt, params, batch, rng):
        return jax.grad(lambda trees: forward(*trees, batch, rng))((prompt, params))

    model = PromptedT5(cfg, prompt_length=args.prompt_length)

    def whole_tree_step(tree, opt_state, batch):
        def loss(tree):
            logits = model.apply(
                {"params": tree},
                batch["encoder_input_tokens"],
                batch["decoder_input_tokens"],
                batch["decoder_target_tokens"],
            )
            return weighted_cross_entropy(
                logits,
                batch["decoder_target_tokens"],
                loss_weights(batch),
                z_loss=loss_config.z_loss,
                normalization=loss_config.normalization,
            )[0]

        updates, opt_state = optimizer.update(jax.grad(loss)(tree), opt_state, tree)
        return optax.apply_updates(tree, updates), opt_state

    tree = join_prompt(params, prompt)
    tree_opt_state = jax.eval_shape(optimizer.init, tree)

    print(
        f"{args.model} ({args.dtype}), prompt {args.prompt_length}, batch {args.batch}, "
        f"inputs {args.inputs}, targets {args.targets}; dropout {cfg.dropout_rate}"
    )
    results = {
        "forward (loss only)": compiled_flops(forward, prompt, params, batch, rng),
        "prompt-only train step": compiled_flops(
            make_train_step(cfg, optimizer, loss_config), state, params, batch, rng
        ),
        "gradient w.r.t. all weights": compiled_flops(all_weights_grad, prompt, params, batch, rng),
        "whole-tree step, prompt_only": compiled_flops(
            whole_tree_step, tree, tree_opt_state, batch
        ),
    }
    for name, (flops, seconds) in results.items():
        print(f"  {name:<28} {flops:.3e} FLOPs  (compiled in {seconds:.0f} s)")
    prompt_only = results["prompt-only train step"][0]
    for baseline in (
        "gradient w.r.t. all weights",
        "forward (loss only)",
        "whole-tree step, prompt_only",
    ):
        print(f"  prompt-only train step / {baseline} = {prompt_only / results[baseline][0]:.3f}")


if __name__ == "__main__":
    main()
