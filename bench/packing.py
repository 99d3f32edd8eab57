"""Packed vs padded prompt-tuning steps on a BoolQ-like length distribution.

SuperGLUE inputs are far shorter than the 512 tokens a padded row holds (BoolQ: 30-512
tokens, median about 130), so most of a padded row is padding. Packing puts several examples
in a row, each a segment with its own copy of the prompt (`prompts.fill_prompt_slots`), so a
step of the same shape trains on more examples. This script measures both on the same
examples and the same random T5 1.1 weights:

- `padded`: one example per row, inputs padded to `--inputs` tokens, the prompt prepended
  (`--prompt-length` + `--inputs` encoder positions), targets padded to `--targets`;
- `packed`: rows of the same encoder length, filled in order as seqio's packing fills them
  (`_pack_with_tf_ops`: an example goes into the current row if both its inputs, prompt
  slots included, and its targets still fit, else the row is closed), targets
  `--packed-targets` long (several examples' targets share a row).

Both run the train step (`train.train_step.make_train_step`, the paper's Adafactor, T5X's
summed loss with z-loss); rounds are interleaved and the medians reported: examples/s, rows/s,
examples per packed row, padding fractions. `loss_check`: on the examples of the first packed
batch, the packed summed loss and prompt gradient minus the padded ones (0 up to float error),
so both train on the same loss.

    python bench/packing.py --size small --batch 8 --steps 5 --rounds 3 --out packing.jsonl
    python bench/packing.py --size base --dtype bfloat16 --batch 32 --prompt-length 100   # GPU
    python bench/packing.py --size tiny --steps 2 --rounds 1                             # smoke

Only jax, flax, optax and numpy are imported (no seqio, gin or tensorflow), so it runs on a
machine without them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from softprompt_jax.losses import LossConfig, prompt_loss
from softprompt_jax.model import T5Config, cast_params, get_config, init_params
from softprompt_jax.prompts import init_prompt, prompt_slot_token
from softprompt_jax.train.optimizer import AdafactorConfig, make_optimizer
from softprompt_jax.train.train_step import init_train_state, make_train_step

Example = tuple[np.ndarray, np.ndarray]  # (inputs, targets), EOS included, no padding
Batch = dict[str, np.ndarray]


def boolq_like(count: int, max_inputs: int, vocab_size: int, seed: int) -> list[Example]:
    """Inputs of 30..max_inputs tokens, log-normal with median 130; targets of 1-2 tokens + EOS."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.exp(rng.normal(np.log(130), 0.6, count)), 30, max_inputs).astype(int)
    examples = []
    for length in lengths:
        inputs = np.append(rng.integers(3, vocab_size, length - 1), 1).astype(np.int32)
        targets = np.append(rng.integers(3, vocab_size, rng.integers(1, 3)), 1).astype(np.int32)
        examples.append((inputs, targets))
    return examples


def padded_batch(examples: Sequence[Example], inputs: int, targets: int) -> Batch:
    """T5X features, one example per row (seqio's `EncDecFeatureConverter(pack=False)`)."""
    batch = {
        name: np.zeros([len(examples), length], np.int32)
        for name, length in (
            ("encoder_input_tokens", inputs),
            ("decoder_input_tokens", targets),
            ("decoder_target_tokens", targets),
            ("decoder_loss_weights", targets),
        )
    }
    for row, (x, y) in enumerate(examples):
        x, y = x[:inputs], y[:targets]
        batch["encoder_input_tokens"][row, : len(x)] = x
        batch["decoder_target_tokens"][row, : len(y)] = y
        batch["decoder_input_tokens"][row, 1 : len(y)] = y[:-1]
        batch["decoder_loss_weights"][row, : len(y)] = 1
    return batch


def pack_rows(
    examples: Sequence[Example], prompt_length: int, inputs: int, targets: int
) -> list[list[Example]]:
    """Examples (prompt slots reserved) grouped into rows in order, as seqio's packing does."""
    rows: list[list[Example]] = [[]]
    used = [0, 0]
    for x, y in examples:
        x = np.concatenate([np.full([prompt_length], prompt_slot_token(0), np.int32), x[:inputs]])
        y = y[:targets]
        if rows[-1] and (used[0] + len(x) > inputs + prompt_length or used[1] + len(y) > targets):
            rows.append([])
            used = [0, 0]
        rows[-1].append((x, y))
        used = [used[0] + len(x), used[1] + len(y)]
    return rows


def packed_batch(rows: Sequence[Sequence[Example]], inputs: int, targets: int) -> Batch:
    """T5X's packed features (`encoder_segment_ids`, `encoder_positions`, ...) of the rows."""
    names = ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions")
    decoder = (
        "decoder_input_tokens",
        "decoder_target_tokens",
        "decoder_segment_ids",
        "decoder_positions",
        "decoder_loss_weights",
    )
    batch = {name: np.zeros([len(rows), inputs], np.int32) for name in names}
    batch |= {name: np.zeros([len(rows), targets], np.int32) for name in decoder}
    for r, row in enumerate(rows):
        start_x = start_y = 0
        for segment, (x, y) in enumerate(row, start=1):
            ex, ey = start_x + len(x), start_y + len(y)
            batch["encoder_input_tokens"][r, start_x:ex] = x
            batch["encoder_segment_ids"][r, start_x:ex] = segment
            batch["encoder_positions"][r, start_x:ex] = np.arange(len(x))
            batch["decoder_target_tokens"][r, start_y:ey] = y
            batch["decoder_input_tokens"][r, start_y + 1 : ey] = y[:-1]
            batch["decoder_segment_ids"][r, start_y:ey] = segment
            batch["decoder_positions"][r, start_y:ey] = np.arange(len(y))
            batch["decoder_loss_weights"][r, start_y:ey] = 1
            start_x, start_y = ex, ey
    return batch


def batches(
    examples: Sequence[Example], args: argparse.Namespace, packed: bool
) -> Iterator[tuple[Batch, int]]:
    """Endless `(batch, examples in it)` of `args.batch` rows, padded or packed."""
    if not packed:
        while True:
            for start in range(0, len(examples) - args.batch + 1, args.batch):
                chosen = examples[start : start + args.batch]
                yield padded_batch(chosen, args.inputs, args.targets), args.batch
    length = args.inputs + args.prompt_length
    rows = pack_rows(examples, args.prompt_length, args.inputs, args.packed_targets)
    while True:
        for start in range(0, len(rows) - args.batch + 1, args.batch):
            chosen = rows[start : start + args.batch]
            yield packed_batch(chosen, length, args.packed_targets), sum(map(len, chosen))


def loss_check(
    cfg: T5Config, params: dict, prompt: jax.Array, examples: Sequence[Example], args
) -> dict[str, float]:
    """Packed minus padded summed loss and prompt gradient on the first packed batch's examples."""
    loss_config = LossConfig(z_loss=1e-4, normalization="sum", enable_dropout=False)
    grad_fn = jax.jit(
        jax.value_and_grad(lambda p, b: prompt_loss(p, cfg, params, b, loss_config)[0])
    )
    packed, count = next(batches(examples, args, packed=True))
    packed_loss, packed_grad = grad_fn(prompt, packed)
    padded_loss, padded_grad = 0.0, jnp.zeros_like(prompt)
    for start in range(0, count, args.batch):  # the summed loss adds up over batches
        chosen = examples[start : min(start + args.batch, count)]
        loss, grad = grad_fn(prompt, padded_batch(chosen, args.inputs, args.targets))
        padded_loss, padded_grad = padded_loss + loss, padded_grad + grad
    return {
        "examples": count,
        "padded_loss": float(padded_loss),
        "packed_minus_padded_loss": float(packed_loss - padded_loss),
        "max_abs_grad_difference": float(jnp.abs(packed_grad - padded_grad).max()),
        "max_abs_grad": float(jnp.abs(padded_grad).max()),
    }


def padding(batch: Batch) -> float:
    """The fraction of encoder positions that hold no token (the prompt counts as tokens)."""
    return float(np.mean(batch["encoder_input_tokens"] == 0))


def run(args: argparse.Namespace) -> dict:
    cfg = get_config(f"t5_1_1_{args.size}").replace(dtype=args.dtype)
    params = jax.jit(lambda: cast_params(cfg, init_params(cfg, 0), args.dtype))()
    prompt = init_prompt("random_uniform", args.prompt_length, emb_dim=cfg.emb_dim, seed=0)
    examples = boolq_like(args.examples, args.inputs, cfg.vocab_size, args.seed)
    tx = make_optimizer(AdafactorConfig())
    step = jax.jit(make_train_step(cfg, tx, LossConfig()), donate_argnums=(0,))
    rng = jax.random.PRNGKey(0)
    streams = {"padded": batches(examples, args, False), "packed": batches(examples, args, True)}
    states = {name: init_train_state(jnp.array(prompt), tx) for name in streams}  # donated
    first = {name: next(stream)[0] for name, stream in streams.items()}
    # Padded rows: the prompt prepended, so the encoder holds prompt_length more positions.
    pad_fraction = {
        "padded": padding(first["padded"]) * args.inputs / (args.inputs + args.prompt_length),
        "packed": padding(first["packed"]),
    }
    compile_s = {}
    for name in streams:  # compile and warm up, out of the timing
        start = time.perf_counter()
        states[name], metrics = step(states[name], params, first[name], rng)
        jax.block_until_ready(metrics["loss"])
        compile_s[name] = time.perf_counter() - start
    rates: dict[str, list[float]] = {name: [] for name in streams}
    row_rates: dict[str, list[float]] = {name: [] for name in streams}
    for _ in range(args.rounds):
        for name, stream in streams.items():
            chosen = [next(stream) for _ in range(args.steps)]
            start = time.perf_counter()
            for batch, _ in chosen:
                states[name], metrics = step(states[name], params, batch, rng)
            jax.block_until_ready(metrics["loss"])
            seconds = time.perf_counter() - start
            rates[name].append(sum(count for _, count in chosen) / seconds)
            row_rates[name].append(args.batch * args.steps / seconds)
    rows = pack_rows(examples, args.prompt_length, args.inputs, args.packed_targets)
    result = {
        "bench": "packing",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {jax.devices()[0].device_kind}",
        "size": args.size,
        "dtype": args.dtype,
        "batch_rows": args.batch,
        "inputs": args.inputs,
        "prompt_length": args.prompt_length,
        "targets": args.targets,
        "packed_targets": args.packed_targets,
        "median_input_tokens": float(np.median([len(x) for x, _ in examples])),
        "examples_per_packed_row": len(examples) / len(rows),
        "padding_fraction": pad_fraction,
        "compile_s": compile_s,
        "examples_per_s": {name: statistics.median(r) for name, r in rates.items()},
        "rows_per_s": {name: statistics.median(r) for name, r in row_rates.items()},
        "loss_check": loss_check(cfg, params, prompt, examples, args),
    }
    result["speedup"] = result["examples_per_s"]["packed"] / result["examples_per_s"]["padded"]
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", help="t5_1_1_<size>: tiny, small, base, ...")
    parser.add_argument("--dtype", default="float32", help="float32 (CPU) or bfloat16 (GPU)")
    parser.add_argument("--batch", type=int, default=8, help="rows per step, padded and packed")
    parser.add_argument("--inputs", type=int, default=512, help="input tokens per example")
    parser.add_argument("--prompt-length", type=int, default=20)
    parser.add_argument("--targets", type=int, default=4, help="padded rows' target tokens")
    parser.add_argument("--packed-targets", type=int, default=16, help="packed rows' targets")
    parser.add_argument("--examples", type=int, default=2000, help="examples in the data set")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="append the JSON line to this file too")
    args = parser.parse_args(argv)
    line = json.dumps(run(args))
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as out:
            out.write(line + "\n")


if __name__ == "__main__":
    main()
