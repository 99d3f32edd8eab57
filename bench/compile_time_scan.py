"""Compile time of the prompt-only train step for a deep T5, layers unrolled vs scanned.

Nothing is allocated: the frozen params, prompt state and batch are `jax.ShapeDtypeStruct`s
(`param_shapes`), and the step is timed through `.lower()` (trace + StableHLO) and
`.compile()` (XLA). One JSON line per (scan_layers, remat_policy):

    python bench/compile_time_scan.py                       # 24+24 layers, small dims
    python bench/compile_time_scan.py --mesh 2x4            # SPMD-partitioned, 8 CPU devices
    python bench/compile_time_scan.py --size xxl --layers 24 --remat full   # on the TPU/GPU

`--mesh DxM` compiles `partitioned_train_step` for a (data, model) mesh; on CPU it forces
D*M host devices (set before JAX starts).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="small", help="dims of t5_1_1_<size>")
    parser.add_argument("--layers", type=int, default=24, help="encoder and decoder layers each")
    parser.add_argument("--remat", nargs="+", default=["none", "full"])
    parser.add_argument("--dropout_rate", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--inputs", type=int, default=128)
    parser.add_argument("--targets", type=int, default=8)
    parser.add_argument("--prompt_length", type=int, default=100)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--mesh", default=None, help="DATAxMODEL, e.g. 2x4 (default: one device)")
    return parser.parse_args()


def _abstract_inputs(cfg: Any, tx: Any, args: argparse.Namespace) -> tuple:
    """Shape-only (state, frozen params, batch, rng) for the train step."""
    import jax
    import jax.numpy as jnp

    from softprompt_jax.model import cast_params, param_shapes
    from softprompt_jax.train.train_step import init_train_state

    params = cast_params(cfg, param_shapes(cfg), args.dtype)  # logits_dense stays float32
    state = jax.eval_shape(
        lambda: init_train_state(jnp.zeros((args.prompt_length, cfg.emb_dim)), tx)
    )
    tokens = {
        name: jax.ShapeDtypeStruct((args.batch, length), jnp.int32)
        for name, length in (
            ("encoder_input_tokens", args.inputs),
            ("decoder_input_tokens", args.targets),
            ("decoder_target_tokens", args.targets),
        )
    }
    weights = jax.ShapeDtypeStruct((args.batch, args.targets), jnp.float32)
    rng = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    return state, params, {**tokens, "decoder_loss_weights": weights}, rng


def measure(scan_layers: bool, remat: str, args: argparse.Namespace) -> dict:
    """Lower and compile the train step once; seconds for each and the HLO size."""
    import jax

    import softprompt_jax as sp
    from softprompt_jax.train.optimizer import make_optimizer
    from softprompt_jax.train.train_step import make_train_step

    cfg = sp.get_config(f"t5_1_1_{args.size}").replace(
        num_encoder_layers=args.layers,
        num_decoder_layers=args.layers,
        dtype=args.dtype,
        dropout_rate=args.dropout_rate,
        scan_layers=scan_layers,
        remat_policy=remat,
    )
    tx = make_optimizer()
    step = make_train_step(cfg, tx)
    if args.mesh:
        from softprompt_jax.partitioning import make_mesh, param_shardings, partitioned_train_step

        mesh = make_mesh(*(int(n) for n in args.mesh.split("x")))
        jitted = partitioned_train_step(step, mesh, param_shardings(cfg, mesh))
    else:
        jitted = jax.jit(step, donate_argnums=(0,))
    inputs = _abstract_inputs(cfg, tx, args)
    start = time.perf_counter()
    lowered = jitted.lower(*inputs)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    lowered.compile()
    compile_s = time.perf_counter() - start
    return dict(
        size=args.size,
        layers=f"{args.layers}+{args.layers}",
        emb_dim=cfg.emb_dim,
        scan_layers=scan_layers,
        remat_policy=remat,
        dropout_rate=args.dropout_rate,
        mesh=args.mesh or "1",
        backend=jax.default_backend(),
        batch=args.batch,
        inputs=args.inputs + args.prompt_length,
        targets=args.targets,
        lower_s=round(lower_s, 2),
        compile_s=round(compile_s, 2),
        total_s=round(lower_s + compile_s, 2),
        stablehlo_lines=lowered.as_text().count("\n"),
    )


def main() -> None:
    args = _parse()
    if args.mesh and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
        devices = 1
        for n in args.mesh.split("x"):
            devices *= int(n)
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
        )
    for remat in args.remat:
        for scan_layers in (False, True):
            print(json.dumps(measure(scan_layers, remat, args)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
