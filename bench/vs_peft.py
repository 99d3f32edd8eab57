"""softprompt-jax and Hugging Face PEFT side by side: one process, same random weights and shapes.

Our random T5 1.1 params are copied into a `T5ForConditionalGeneration` (the inverse of the
Hugging Face reader) and the same prompts into PEFT's `PromptTuningConfig` tables, so both
compute the same numbers; each measurement records a check (first-step loss, greedy tokens,
candidate scores) that says so. Measurements, per size:

- `train`: one prompt-tuning step (ours: `train.train_step.make_train_step`; PEFT: forward,
  backward, optimizer step as in `shared/anchors/peft_anchor.py`), eager and with
  `torch.compile` (`--peft-compile`). Loss: mean cross-entropy over target tokens (both). The
  same optimizer on both sides (`--optimizer`): `adamw` (default; `optax.adamw` on the prompt
  only, `torch.optim.AdamW`, both with torch's defaults and lr 0.3, so the loss after a few
  steps agrees too) or `adafactor` (the paper's, ours; transformers' `Adafactor` with the
  same settings for PEFT, which factors any 2-D prompt and scales weight decay by lr, so
  only close). Peak memory: torch's `max_memory_allocated` for PEFT; ours on GPU the device's
  `peak_bytes_in_use` (the process's peak, both taken after the interleaved rounds), on CPU
  (no allocator statistics) XLA's static plan of the step, labelled so in the table.
- `generate`: greedy decoding of `--targets` new tokens, one prompt (`inference.predict_tokens`).
- `generate_mixed`: the same batch, each quarter with its own of 4 prompts; ours is one batch
  with `prompt_ids`, PEFT four sub-batches with adapter switches (as its users must, see
  `shared/anchors/peft_infer_anchor.py`).
- `score`: rank classification, `--candidates` candidates per input, summed log-likelihood
  (ours: `sp.score_candidates`, one encoder pass per input; PEFT: a forward pass on every
  (input, candidate) row, as its users score).

Timing: a warm-up call per implementation (its time is `compile_s`), then rounds interleaved
(ours, PEFT, PEFT compiled, ours, ...) until `--rounds` or 70% of `--limit-s`; medians reported.
Each measurement runs under a `--limit-s` alarm, so one slow size cannot eat a run's budget.

    python bench/vs_peft.py --mode cpu --sizes small base --out bench.jsonl   # float32, this CPU
    python bench/vs_peft.py --mode gpu --sizes base xl --out bench.jsonl      # bf16, one GPU
    python bench/vs_peft.py --table bench.jsonl                               # markdown table

Only jax, flax, optax, torch, transformers and peft are imported (no seqio, gin or tensorflow).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import optax

from softprompt_jax import score_candidates
from softprompt_jax.batching import shift_right
from softprompt_jax.checkpoints.huggingface import hf_tensors_from_params
from softprompt_jax.inference import predict_tokens
from softprompt_jax.losses import LossConfig
from softprompt_jax.model import T5Config, cast_params, get_config, param_shapes
from softprompt_jax.model.scan import stack_layers
from softprompt_jax.train.optimizer import make_optimizer
from softprompt_jax.train.train_step import init_train_state, make_train_step

IMPLS = OURS, PEFT, PEFT_COMPILE = "softprompt-jax", "peft", "peft-compile"
PEAK_FLOPS = {"gpu": 989e12}  # H100/H200 dense bf16, the anchors' figure; CPU: --peak-tflops
NUM_PROMPTS = 4  # prompts in the mixed batch
OPTIMIZERS = ("adamw", "adafactor")
LEARNING_RATE = 0.3  # the paper's; AdamW otherwise with torch.optim.AdamW's defaults
ADAMW = {"b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.01}
CHECK_STEPS = 3  # AdamW's and Adafactor's first updates are both about lr * sign(g)


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Shapes and numerics of one mode."""

    dtype: str
    batch: int
    inputs: int
    prompt_length: int
    targets: int
    sizes: tuple[str, ...]
    # Ours: settings per size (XL, XXL: scanned layers and remat); PEFT: sizes it checkpoints.
    overrides: dict = dataclasses.field(default_factory=dict)
    peft_remat: tuple[str, ...] = ()


MODES = {
    # The CPU protocol: T5 1.1 small shapes, float32, batch 8, 128 + 20 tokens, 8 targets.
    "cpu": Protocol("float32", 8, 128, 20, 8, ("small",)),
    # The anchors' protocol (shared/anchors): bf16, batch 32, 412 + 100 tokens, 8 targets.
    "gpu": Protocol(
        "bfloat16",
        32,
        412,
        100,
        8,
        ("base", "large", "xl", "xxl"),
        overrides={
            "xl": {"scan_layers": True, "remat_policy": "save_dots"},
            "xxl": {"scan_layers": True, "remat_policy": "full"},
        },
        peft_remat=("xxl",),
    ),
}


def forward_flops(cfg: T5Config, enc_len: int, dec_len: int) -> float:
    """Matmul FLOPs of one example's forward pass, counted as `peft_anchor.py` counts them.

    Per layer and token: 2 * (4 d*inner + 3 d*f) in the encoder (q, k, v, o and the gated MLP),
    2 * (8 d*inner + 3 d*f) in the decoder (self and cross attention), plus the attention
    products 4 * len * inner; then the logits, 2 * d * vocab per target token. A prompt-tuning
    train step is counted as twice this (forward + input-gradient backward, no weight grads).
    Like the anchor, it counts the cross-attention key/value projections per decoder token, not
    per encoder token, so it undercounts (XLA's cost analysis of our step at the CPU protocol's
    base shapes: 1.16x this), and MFU is a lower bound comparable with the anchors'.
    """
    d, f, inner = cfg.emb_dim, cfg.mlp_dim, cfg.num_heads * cfg.head_dim
    enc = cfg.num_encoder_layers * enc_len * (2 * (4 * d * inner + 3 * d * f) + 4 * enc_len * inner)
    dec = (
        cfg.num_decoder_layers
        * dec_len
        * (2 * (8 * d * inner + 3 * d * f) + 4 * dec_len * inner + 4 * enc_len * inner)
    )
    return enc + dec + 2 * dec_len * d * cfg.vocab_size


class MeasurementTimeout(Exception):
    """A measurement ran past its `--limit-s`."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise `MeasurementTimeout` in the main thread after `seconds` (checked between bytecodes)."""

    def alarm(signum, frame):
        raise MeasurementTimeout(f"over the {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def interleaved(
    calls: dict[str, Callable[[], Any]], rounds: int, budget_s: float
) -> dict[str, dict[str, Any]]:
    """Warm up each call once (`compile_s`), then time rounds in turn; each call syncs itself."""
    results: dict[str, dict[str, Any]] = {}
    for name, call in calls.items():
        start = time.perf_counter()
        first = call()
        results[name] = {"compile_s": time.perf_counter() - start, "first": first, "times": []}
    deadline = time.perf_counter() + budget_s
    for i in range(rounds):
        if i >= 1 and time.perf_counter() > deadline:
            break
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            results[name]["times"].append(time.perf_counter() - start)
    return results


class Bench:
    """Both implementations of one size, built on the same weights, and their measurements."""

    def __init__(self, size: str, protocol: Protocol, args: argparse.Namespace):
        import torch

        self.size, self.protocol, self.args = size, protocol, args
        name = f"t5_1_1_{size}"
        base_cfg = get_config(name).replace(dtype=protocol.dtype)
        overrides = protocol.overrides.get(size, {})
        self.cfg = base_cfg.replace(**overrides, attention_impl=args.attention_impl)
        if args.one_core:
            torch.set_num_threads(1)
        self.on_gpu = jax.default_backend() == "gpu"
        self.torch_device = torch.device("cuda" if self.on_gpu else "cpu")
        self.torch_dtype = getattr(torch, protocol.dtype)
        params = random_params(base_cfg, protocol.dtype)
        self.hf = hf_model(base_cfg, params, self.torch_device, self.torch_dtype)
        self.params = stack_layers(params) if self.cfg.scan_layers else params
        del params
        rng = np.random.default_rng(0)
        length, width = protocol.prompt_length, base_cfg.emb_dim
        self.prompts = rng.uniform(-0.5, 0.5, (NUM_PROMPTS, length, width)).astype(np.float32)
        self.peft = peft_model(self.hf, self.prompts, self.torch_dtype)
        if size in protocol.peft_remat:
            self.hf.gradient_checkpointing_enable()
        b, n, t = protocol.batch, protocol.inputs, protocol.targets
        self.inputs = rng.integers(2, 32000, (b, n), dtype=np.int32)
        self.targets = rng.integers(2, 32000, (b, t), dtype=np.int32)

    def torch_sync(self) -> None:
        import torch

        if self.on_gpu:
            torch.cuda.synchronize()

    def torch_ints(self, array: np.ndarray):
        import torch

        return torch.from_numpy(array.astype(np.int64)).to(self.torch_device)

    # --- measurements: each returns {impl: record} ---------------------------------------

    def train(self) -> dict[str, dict]:
        import torch

        cfg, p = self.cfg, self.protocol
        batch = {
            "encoder_input_tokens": jnp.asarray(self.inputs),
            "decoder_input_tokens": jnp.asarray(shift_right(self.targets)),
            "decoder_target_tokens": jnp.asarray(self.targets),
            "decoder_loss_weights": jnp.ones(self.targets.shape, jnp.float32),
        }
        tx = our_optimizer(self.args.optimizer)
        loss_config = LossConfig(z_loss=0.0, normalization="mean_tokens", enable_dropout=False)
        state = init_train_state(jnp.asarray(self.prompts[0]), tx)
        key = jax.random.PRNGKey(0)
        jitted = jax.jit(make_train_step(cfg, tx, loss_config), donate_argnums=(0,))
        start = time.perf_counter()
        step = jitted.lower(state, self.params, batch, key).compile()
        ours_compile_s = time.perf_counter() - start
        holder = [state]

        def ours() -> float:
            holder[0], metrics = step(holder[0], self.params, batch, key)
            return float(metrics["loss"])

        self.peft.set_adapter("t0")
        self.peft.train()
        trainable = [q for q in self.peft.parameters() if q.requires_grad]
        optimizer = peft_optimizer(self.args.optimizer, trainable)
        ids, labels = self.torch_ints(self.inputs), self.torch_ints(self.targets)
        mask = torch.ones_like(ids)

        def peft_step(model) -> Callable[[], float]:
            def call() -> float:
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                self.torch_sync()
                return float(loss.detach())

            return call

        calls = {OURS: ours, PEFT: peft_step(self.peft)}
        self.torch_peak_gib(reset=True)
        # The check: CHECK_STEPS steps each from the same prompt (later losses: the same updates).
        start = time.perf_counter()
        ours_losses = [ours()]
        ours_compile_s += time.perf_counter() - start
        ours_losses += [ours() for _ in range(CHECK_STEPS - 1)]
        peft_losses = [calls[PEFT]() for _ in range(CHECK_STEPS)]
        if self.args.peft_compile:
            calls[PEFT_COMPILE] = peft_step(torch.compile(self.peft))
        results = interleaved(calls, self.args.rounds, 0.7 * self.args.limit_s)
        peak = self.torch_peak_gib()  # PEFT eager and compiled together
        results[OURS]["compile_s"] = ours_compile_s
        flops = 2 * forward_flops(cfg, p.inputs + p.prompt_length, p.targets) * p.batch
        records = self.records("train", results, p.batch, flops)
        records[OURS]["peak_gib"], records[OURS]["peak_source"] = our_peak_gib(step)
        for name in calls:
            records[name]["optimizer"] = self.args.optimizer
            if name != OURS:
                records[name]["peak_gib"] = peak
        records[OURS]["check"] = {
            "first_loss": ours_losses[0],
            "peft_first_loss": peft_losses[0],
            "rel_diff": abs(ours_losses[0] - peft_losses[0]) / abs(peft_losses[0]),
            "losses": ours_losses,
            "peft_losses": peft_losses,
            "steps_rel_diff": max(
                abs(a - b) / abs(b) for a, b in zip(ours_losses, peft_losses, strict=True)
            ),
        }
        self.peft.eval()
        return records

    def generate(self, mixed: bool) -> dict[str, dict]:
        import torch

        p = self.protocol
        new = p.targets
        tokens = jnp.asarray(self.inputs)
        chunk = p.batch // NUM_PROMPTS
        if mixed:
            prompt = jnp.asarray(self.prompts)
            prompt_ids = jnp.asarray(np.arange(p.batch) // chunk, jnp.int32)
        else:
            prompt, prompt_ids = jnp.asarray(self.prompts[0]), None

        def ours() -> np.ndarray:
            out = predict_tokens(self.cfg, self.params, prompt, tokens, prompt_ids, max_length=new)
            return np.asarray(out)

        ids = self.torch_ints(self.inputs)
        mask = torch.ones_like(ids)
        options = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, num_beams=1)
        parts = range(NUM_PROMPTS) if mixed else range(1)
        rows = chunk if mixed else p.batch

        @torch.no_grad()
        def peft() -> np.ndarray:
            outs = []
            for i in parts:  # PEFT cannot mix prompts in a batch: one sub-batch per adapter
                self.peft.set_adapter(f"t{i}")
                part = slice(i * rows, (i + 1) * rows)
                outs.append(
                    self.peft.generate(input_ids=ids[part], attention_mask=mask[part], **options)
                )
            self.torch_sync()
            return torch.cat(outs).cpu().numpy()[:, 1:]  # drop the decoder start token

        results = interleaved({OURS: ours, PEFT: peft}, self.args.rounds, 0.7 * self.args.limit_s)
        records = self.records("generate_mixed" if mixed else "generate", results, p.batch)
        ours_ids, peft_ids = results[OURS]["first"], results[PEFT]["first"]
        records[OURS]["check"] = {
            "tokens_equal_peft": float(np.mean(ours_ids == peft_ids)),
            "rows_without_eos": float(np.mean(~np.any(ours_ids == 1, axis=1))),
        }
        return records

    def score(self) -> dict[str, dict]:
        import torch

        p, count = self.protocol, self.args.candidates
        rng = np.random.default_rng(1)
        candidates = rng.integers(2, 32000, (p.batch * count, p.targets), dtype=np.int32)
        lengths = rng.integers(1, p.targets, p.batch * count)  # label words, then EOS
        candidates[np.arange(len(lengths)), lengths] = 1
        candidates[np.arange(p.targets)[None, :] > lengths[:, None]] = 0
        prompt, tokens = jnp.asarray(self.prompts[0]), jnp.asarray(self.inputs)
        per_input = jnp.asarray(candidates.reshape(p.batch, count, p.targets))

        def ours() -> np.ndarray:
            scores = score_candidates(self.cfg, self.params, prompt, tokens, per_input)
            return np.asarray(scores).reshape(-1)

        inputs = np.repeat(self.inputs, count, axis=0)

        ids = self.torch_ints(inputs)
        decoder_ids = self.torch_ints(shift_right(candidates))
        targets = self.torch_ints(candidates)
        self.peft.set_adapter("t0")

        @torch.no_grad()
        def peft() -> np.ndarray:
            logits = self.peft(
                input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=decoder_ids
            ).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            picked = torch.gather(logp, -1, targets[..., None])[..., 0]
            scores = (picked * (targets > 0)).sum(-1)
            self.torch_sync()
            return scores.cpu().numpy()

        results = interleaved({OURS: ours, PEFT: peft}, self.args.rounds, 0.7 * self.args.limit_s)
        records = self.records("score", results, p.batch)
        ours_scores, peft_scores = results[OURS]["first"], results[PEFT]["first"]
        records[OURS]["check"] = {
            "max_abs_diff_peft": float(np.max(np.abs(ours_scores - peft_scores))),
            "same_choice_as_peft": float(
                np.mean(
                    ours_scores.reshape(-1, count).argmax(1)
                    == peft_scores.reshape(-1, count).argmax(1)
                )
            ),
        }
        return records

    # --- helpers ------------------------------------------------------------------------

    def torch_peak_gib(self, reset: bool = False) -> float | None:
        import torch

        if not self.on_gpu:
            return None
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return round(torch.cuda.max_memory_allocated() / 2**30, 2)

    def records(
        self, measure: str, results: dict, examples: int, flops: float | None = None
    ) -> dict[str, dict]:
        """One JSON record per implementation: medians, examples/s, ratio to PEFT eager."""
        p = self.protocol
        peak = PEAK_FLOPS.get(jax.default_backend())
        if self.args.peak_tflops:
            peak = self.args.peak_tflops * 1e12
        records = {}
        for name, result in results.items():
            seconds = statistics.median(result["times"])
            records[name] = {
                "size": self.size,
                "measure": measure,
                "impl": name,
                "dtype": p.dtype,
                "batch": examples,
                "inputs": p.inputs,
                "prompt": p.prompt_length,
                "targets": p.targets,
                "s_median": round(seconds, 5),
                "s_rounds": [round(s, 5) for s in result["times"]],
                "ex_per_s": round(examples / seconds, 2),
                "compile_s": round(result["compile_s"], 2),
                "mfu": round(flops / seconds / peak, 4) if flops and peak else None,
                "peak_gib": None,
            }
        records[OURS]["config"] = {
            "scan_layers": self.cfg.scan_layers,
            "remat_policy": self.cfg.remat_policy,
            "attention_impl": self.cfg.attention_impl,
            "one_core": self.args.one_core,
        }
        records[OURS]["vs_peft"] = round(records[OURS]["ex_per_s"] / records[PEFT]["ex_per_s"], 3)
        if PEFT_COMPILE in records:
            ratio = records[OURS]["ex_per_s"] / records[PEFT_COMPILE]["ex_per_s"]
            records[OURS]["vs_peft_compile"] = round(ratio, 3)
        return records


def our_optimizer(name: str) -> optax.GradientTransformation:
    """Ours: AdamW (torch's defaults, lr 0.3) or the paper's Adafactor, on the prompt only."""
    if name == "adamw":
        return make_optimizer(prompt_optimizer=optax.adamw(LEARNING_RATE, **ADAMW))
    return make_optimizer()


def peft_optimizer(name: str, params: list):
    """PEFT's: `torch.optim.AdamW` as `our_optimizer`'s, or transformers' Adafactor (paper's)."""
    import torch

    if name == "adamw":
        betas, eps, decay = (ADAMW["b1"], ADAMW["b2"]), ADAMW["eps"], ADAMW["weight_decay"]
        return torch.optim.AdamW(params, lr=LEARNING_RATE, betas=betas, eps=eps, weight_decay=decay)
    from transformers.optimization import Adafactor

    return Adafactor(
        params,
        lr=LEARNING_RATE,
        scale_parameter=False,
        relative_step=False,
        warmup_init=False,
        decay_rate=-0.8,
        clip_threshold=1.0,
        weight_decay=1e-5,
    )


def our_peak_gib(step: Any) -> tuple[float, str]:
    """Our peak GiB and its source: the device's `peak_bytes_in_use`, else XLA's static plan.

    The device's figure (GPU) is the process's peak so far, as torch's is; CPU devices keep no
    allocator statistics, so there it is the compiled `step`'s arguments, outputs and temps.
    """
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return round(stats["peak_bytes_in_use"] / 2**30, 2), "device"
    memory = step.memory_analysis()
    planned = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    return round(planned / 2**30, 2), "xla_plan"


def random_params(cfg: T5Config, dtype: str) -> dict:
    """Random weights of T5's scale (std 1/sqrt(fan in), embedding std 1, norms 1), in `dtype`.

    One small program per distinct shape: compiling `init_params` whole takes over a minute
    for XL and XXL, and the race needs only the same weights on both sides.
    """
    shapes = cast_params(cfg, param_shapes(cfg), dtype)  # logits_dense stays float32
    count = len(jax.tree_util.tree_leaves(shapes))
    keys = iter(jax.random.split(jax.random.PRNGKey(0), count))

    def leaf(path: tuple, shape: jax.ShapeDtypeStruct) -> jax.Array:
        if len(shape.shape) == 1:
            return jnp.ones(shape.shape, shape.dtype)
        embedding = path[-1].key == "embedding"
        std = 1.0 if embedding else shape.shape[0] ** -0.5
        return _normal(next(keys), shape.shape, shape.dtype, std)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _normal(key: jax.Array, shape: tuple, dtype: Any, std: float) -> jax.Array:
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)


def hf_model(cfg: T5Config, params: dict, device, dtype):
    """A `T5ForConditionalGeneration` holding a copy of our (unscanned) params, no random init."""
    import torch
    import transformers

    if cfg.mlp_activations != ("gelu", "linear") or cfg.logits_via_embedding:
        raise ValueError("the benchmark covers T5 1.1 (gated GELU, separate logits) configs")
    config = transformers.T5Config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.emb_dim,
        d_kv=cfg.head_dim,
        d_ff=cfg.mlp_dim,
        num_layers=cfg.num_encoder_layers,
        num_decoder_layers=cfg.num_decoder_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        layer_norm_epsilon=cfg.layer_norm_epsilon,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    with torch.device("meta"):
        model = transformers.T5ForConditionalGeneration(config)
        # transformers 5 shares lm_head with the embedding; T5 1.1 has its own.
        model.lm_head.weight = torch.nn.Parameter(torch.empty(cfg.vocab_size, cfg.emb_dim))
    state = {}
    for name, array in hf_tensors_from_params(params, cfg):
        state[name] = torch.from_dlpack(array).to(device=device, dtype=dtype, copy=True)
    for stack in ("encoder", "decoder"):  # tied to `shared` in HF, stored once by us
        state[f"{stack}.embed_tokens.weight"] = state["shared.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    left = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if left:
        raise RuntimeError(f"tensors not copied from our params: {left}")
    return model.eval()


def peft_model(model, prompts: np.ndarray, dtype):
    """PEFT prompt tuning with adapters `t0..t3` holding our prompts (PEFT's own layout)."""
    import peft

    config = lambda: peft.PromptTuningConfig(
        task_type=peft.TaskType.SEQ_2_SEQ_LM,
        num_virtual_tokens=prompts.shape[1],
        num_transformer_submodules=1,
    )
    wrapped = peft.get_peft_model(model, config(), adapter_name="t0")
    for i in range(1, len(prompts)):
        wrapped.add_adapter(f"t{i}", config())
    wrapped.to(dtype)
    set_peft_prompts(wrapped, prompts)
    return wrapped


def set_peft_prompts(wrapped, prompts: np.ndarray) -> None:
    """Copy our prompts into PEFT's tables (again after its train step has moved `t0`)."""
    import torch

    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            table = wrapped.prompt_encoder[f"t{i}"].embedding.weight
            table.copy_(torch.from_numpy(prompt))


def machine() -> dict:
    """Where and with what the numbers were measured."""
    import peft
    import torch
    import transformers

    device = jax.devices()[0]
    return {
        "kind": "machine",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "backend": jax.default_backend(),
        "device": device.device_kind,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "versions": {
            "jax": jax.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
    }


def _cpu_model() -> str:
    """The CPU's model name (Linux), else the architecture."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def emit(record: dict, out: TextIO | None) -> None:
    """One JSON line to stdout and to `out`, flushed at once."""
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        out.write(line + "\n")
        out.flush()


MEASURES = ("train", "generate", "generate_mixed", "score")
MEASURE_NAMES = {
    "train": "train step",
    "generate": "generate, 1 prompt",
    "generate_mixed": "generate, 4 prompts mixed",
    "score": "rank scoring",
}


def table(records: list[dict]) -> str:
    """The markdown table of a run's JSON lines (the latest record per size, measure, impl)."""
    machines = [r for r in records if r.get("kind") == "machine"]
    latest = {(r["size"], r["measure"], r["impl"]): r for r in records if "impl" in r}
    errors = {(r["size"], r["measure"]): r["error"] for r in records if "error" in r}
    sizes = list(dict.fromkeys(r["size"] for r in records if "size" in r))
    header = (
        "| size | measurement | softprompt-jax ex/s | PEFT ex/s | PEFT compiled ex/s "
        "| ours / PEFT | ours compile s | peak GiB ours / PEFT | MFU ours | check |"
    )
    lines = [header, "|" + " --- |" * 10]
    for size in sizes:
        for measure, error in errors.items():
            if measure[0] == size and measure[1] not in MEASURES:  # a failed build, a killed run
                lines.append(f"| {size} | {measure[1]} | {error} |")
        for measure in MEASURES:
            ours, peft, compiled = (latest.get((size, measure, i)) for i in IMPLS)
            if ours is None or peft is None:
                if (size, measure) in errors:
                    lines.append(f"| {size} | {MEASURE_NAMES[measure]} | {errors[size, measure]} |")
                continue
            ratio = f"{ours['vs_peft']:.2f}x"
            if "vs_peft_compile" in ours:
                ratio += f" ({ours['vs_peft_compile']:.2f}x compiled)"
            if measure == "generate_mixed":
                single = latest.get((size, "generate", OURS))
                if single:
                    ratio += f"; {ours['ex_per_s'] / single['ex_per_s']:.2f}x our 1-prompt"
            peaks = " / ".join(_num(r.get("peak_gib")) for r in (ours, peft))
            if ours.get("peak_source") == "xla_plan":
                peaks += " (ours: XLA plan)"
            name = MEASURE_NAMES[measure]
            if "optimizer" in ours:
                name += f", {ours['optimizer']}"
            cells = [
                size,
                name,
                _num(ours["ex_per_s"]),
                _num(peft["ex_per_s"]),
                _num(compiled["ex_per_s"]) if compiled else "-",
                ratio,
                _num(ours["compile_s"]),
                peaks,
                f"{ours['mfu']:.1%}" if ours.get("mfu") is not None else "-",
                _check(ours.get("check", {})),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    if machines:
        m = machines[-1]
        lines.append("")
        lines.append(
            f"Measured {m['date']} on {m['device']} ({m['backend']}; {m['cpu']}, "
            f"{m['cpu_count']} cores{', pinned to one' if m.get('one_core') else ''}), "
            + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
            + "."
        )
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _check(check: dict) -> str:
    """What shows both computed the same thing, in a few characters."""
    if "steps_rel_diff" in check:
        first, steps = check["rel_diff"], check["steps_rel_diff"]
        return f"loss rel. diff {first:.1e}, over {CHECK_STEPS} steps {steps:.1e}"
    if "rel_diff" in check:
        return f"loss rel. diff {check['rel_diff']:.1e}"
    if "tokens_equal_peft" in check:
        return f"{check['tokens_equal_peft']:.0%} tokens = PEFT"
    if "max_abs_diff_peft" in check:
        return f"scores max diff {check['max_abs_diff_peft']:.1e}"
    return "-"


def run(args: argparse.Namespace) -> int:
    """Every measurement of every size; errors and timeouts are recorded, not raised."""
    protocol = MODES[args.mode]
    changes = {k: getattr(args, k) for k in ("batch", "inputs", "prompt_length", "targets")}
    protocol = dataclasses.replace(protocol, **{k: v for k, v in changes.items() if v})
    out = open(args.out, "a") if args.out else None  # noqa: SIM115
    records = []

    def record(entry: dict) -> None:
        records.append(entry)
        emit(entry, out)

    settings = {
        "mode": args.mode,
        "one_core": args.one_core,
        "attention_impl": args.attention_impl,
        "optimizer": args.optimizer,
    }
    record({**machine(), **settings, **dataclasses.asdict(protocol), "sizes": args.sizes})
    for size in args.sizes or protocol.sizes:
        try:
            with time_limit(args.limit_s):
                bench = Bench(size, protocol, args)
        except Exception as error:  # out of memory, or a timeout: record it, go on
            record({"size": size, "measure": "build", "error": _error(error)})
            continue
        for measure in args.measures:
            try:
                with time_limit(args.limit_s):
                    if measure.startswith("generate"):
                        results = bench.generate(mixed=measure == "generate_mixed")
                    else:
                        results = getattr(bench, measure)()
            except Exception as error:
                record({"size": size, "measure": measure, "error": _error(error)})
                continue
            set_peft_prompts(bench.peft, bench.prompts)  # the train step moved PEFT's t0
            for entry in results.values():
                record(entry)
        del bench
    if out is not None:
        out.close()
    print(table(records))
    return 0


def _error(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error)[:300]}".replace("\n", " ").replace("|", "/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=sorted(MODES), default="cpu")
    parser.add_argument("--sizes", nargs="+", default=None, help="tiny small base large xl xxl")
    parser.add_argument("--measures", nargs="+", default=list(MEASURES), choices=MEASURES)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per implementation")
    parser.add_argument("--limit-s", type=float, default=300, help="seconds per measurement")
    parser.add_argument("--peft-compile", action="store_true", help="also time torch.compile")
    parser.add_argument(
        "--optimizer", choices=OPTIMIZERS, default="adamw", help="train step, both sides"
    )
    parser.add_argument("--candidates", type=int, default=3, help="per input, for scoring")
    parser.add_argument(
        "--attention-impl", default="einsum", help="ours: einsum, fused or cudnn (T5Config)"
    )
    parser.add_argument(
        "--one-core", action="store_true", help="pin to one CPU core: kernels, not scaling"
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="for MFU off GPU")
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    parser.add_argument("--table", default=None, help="print the table of a JSON lines file")
    for name in ("batch", "inputs", "prompt-length", "targets"):
        parser.add_argument(f"--{name}", type=int, default=None, help="override the mode's")
    args = parser.parse_args(argv)
    if args.table:
        with open(args.table) as lines:
            print(table([json.loads(line) for line in lines if line.strip()]))
        return 0
    # Before JAX starts its GPU client: allocate on demand, so torch can share the GPU.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if args.one_core:  # before XLA and torch start their threads, which inherit it
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    args.sizes = args.sizes or list(MODES[args.mode].sizes)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
