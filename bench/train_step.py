"""Train-step throughput of prompt tuning, on the protocol of the PEFT anchor.

Mirrors `shared/anchors/peft_anchor.py`: T5 1.1 with random weights in
bfloat16, batch 32, 412 input + 100 prompt tokens, 8 target tokens, one JSON
line per configuration (step time, examples/s, approximate MFU, peak memory).
Run on the GPU machine:

    python bench/train_step.py --sizes base large xl xxl > train_step.jsonl

`--sizes tiny --steps 3` runs anywhere as a smoke check of the script itself.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import softprompt_jax as sp
from softprompt_jax.losses import LossConfig
from softprompt_jax.model import cast_params
from softprompt_jax.train.optimizer import make_optimizer
from softprompt_jax.train.train_step import init_train_state, make_train_step

PEAK_FLOPS = {"gpu": 989e12, "tpu": 197e12}  # H100 SXM dense bf16; TPU v4 per chip
OVERRIDES = {
    "xl": {"remat_policy": "save_dots", "scan_layers": True},
    "xxl": {"remat_policy": "full", "scan_layers": True},
}


def forward_flops(cfg: sp.T5Config, enc_len: int, dec_len: int) -> float:
    """Matmul FLOPs of one example's forward pass, counted as in the PEFT anchor."""
    d, f, inner = cfg.emb_dim, cfg.mlp_dim, cfg.num_heads * cfg.head_dim
    enc = cfg.num_encoder_layers * enc_len * (2 * (4 * d * inner + 3 * d * f) + 4 * enc_len * inner)
    dec = (
        cfg.num_decoder_layers
        * dec_len
        * (2 * (8 * d * inner + 3 * d * f) + 4 * dec_len * inner + 4 * enc_len * inner)
    )
    return enc + dec + 2 * dec_len * d * cfg.vocab_size


def bench(size: str, batch: int, inputs: int, targets: int, prompt_length: int, steps: int) -> dict:
    name = "t5_1_1_tiny" if size == "tiny" else f"t5_1_1_{size}"
    cfg = sp.get_config(name).replace(dtype="bfloat16", **OVERRIDES.get(size, {}))
    unscanned = cfg.replace(scan_layers=False)
    init = jax.jit(lambda: cast_params(unscanned, sp.init_params(unscanned, 0), "bfloat16"))
    params = init()
    if cfg.scan_layers:
        from softprompt_jax.model.scan import stack_layers

        params = stack_layers(params)
    tx = make_optimizer()
    state = init_train_state(jnp.zeros((prompt_length, cfg.emb_dim)), tx)
    step = jax.jit(make_train_step(cfg, tx, LossConfig(enable_dropout=False)), donate_argnums=(0,))
    rng = np.random.default_rng(0)
    target = rng.integers(2, 32000, (batch, targets), dtype=np.int32)
    batch_features = {
        "encoder_input_tokens": jnp.asarray(
            rng.integers(2, 32000, (batch, inputs), dtype=np.int32)
        ),
        "decoder_target_tokens": jnp.asarray(target),
        "decoder_input_tokens": jnp.asarray(np.pad(target[:, :-1], [(0, 0), (1, 0)])),
        "decoder_loss_weights": jnp.ones((batch, targets), jnp.float32),
    }
    key = jax.random.PRNGKey(0)
    compile_start = time.perf_counter()
    state, metrics = step(state, params, batch_features, key)
    jax.block_until_ready(metrics["loss"])
    compile_s = time.perf_counter() - compile_start
    for _ in range(2):
        state, metrics = step(state, params, batch_features, key)
    jax.block_until_ready(metrics["loss"])
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, params, batch_features, key)
    jax.block_until_ready(metrics["loss"])
    seconds = (time.perf_counter() - start) / steps
    device = jax.devices()[0]
    flops = 2 * forward_flops(cfg, inputs + prompt_length, targets) * batch
    stats = device.memory_stats() or {}
    return dict(
        impl="softprompt-jax",
        size=size,
        device=device.device_kind,
        batch=batch,
        inputs=inputs,
        prompt=prompt_length,
        targets=targets,
        step_s=round(seconds, 4),
        ex_per_s=round(batch / seconds, 1),
        enc_tok_per_s=round(batch * (inputs + prompt_length) / seconds),
        mfu_approx=round(flops / seconds / PEAK_FLOPS.get(device.platform, float("inf")), 3),
        peak_gib=round(stats.get("peak_bytes_in_use", 0) / 2**30, 2),
        compile_s=round(compile_s, 1),
        loss=float(metrics["loss"]),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", nargs="+", default=["base", "large", "xl", "xxl"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--inputs", type=int, default=412)
    parser.add_argument("--targets", type=int, default=8)
    parser.add_argument("--prompt_length", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    for size in args.sizes:
        try:
            result = bench(
                size, args.batch, args.inputs, args.targets, args.prompt_length, args.steps
            )
        except Exception as error:  # out of memory or a compile failure: record it
            result = dict(
                impl="softprompt-jax",
                size=size,
                error=f"{type(error).__name__}: {str(error)[:200]}",
            )
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
