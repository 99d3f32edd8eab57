"""bench/vs_peft.py: runs without seqio, gin or tensorflow (the GPU machine has none of them),
puts our exact weights into the Hugging Face model it races, and its checks agree with PEFT."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO_ROOT, TINY, started_subprocesses

import softprompt_jax as sp

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

SCRIPT = REPO_ROOT / "bench" / "vs_peft.py"
# Not installed where bench/device.sh runs; importing any of them must fail the benchmark here.
ABSENT = ("seqio", "gin", "tensorflow", "tensorflow_datasets", "tensorflow_text", "sentencepiece")
BLOCK = f"import sys\nfor name in {ABSENT!r}:\n    sys.modules[name] = None\n"
TINY_RUN = ["--sizes", "tiny", "--rounds", "1", "--batch", "4", "--inputs", "12"]
TINY_RUN += ["--prompt-length", "3", "--targets", "4"]
TIMEOUT_S = 300


def start_subprocesses(workdir: Path) -> list[subprocess.Popen]:
    """The tiny end-to-end run, with the absent packages blocked (conftest starts it early)."""
    argv = [str(SCRIPT), *TINY_RUN, "--out", str(workdir / "results.jsonl")]
    run = "import runpy\nrunpy.run_path(sys.argv[0], run_name='__main__')"
    code = BLOCK + f"sys.argv = {argv!r}\n{run}"
    with (workdir / "log.txt").open("w") as log:
        return [
            subprocess.Popen(
                [sys.executable, "-c", code],
                cwd=REPO_ROOT,
                env={**os.environ, "JAX_PLATFORMS": "cpu"},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        ]


def test_bench_imports_without_seqio_gin_or_tensorflow():
    code = BLOCK + (
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('vs_peft', {str(SCRIPT)!r})\n"
        "sys.modules['vs_peft'] = module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "import softprompt_jax\n"
        f"print(sorted(n for n in sys.modules if n.split('.')[0] in {ABSENT!r} and sys.modules[n]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


def load_bench():
    spec = importlib.util.spec_from_file_location("vs_peft", SCRIPT)
    module = sys.modules["vs_peft"] = importlib.util.module_from_spec(spec)  # for dataclasses
    spec.loader.exec_module(module)
    return module


def test_hf_model_holds_our_weights():
    """The Hugging Face model the benchmark races gives our logits: the weights went across."""
    bench = load_bench()
    params = sp.init_params(TINY, 0)
    model = bench.hf_model(TINY, params, torch.device("cpu"), torch.float32)
    rng = np.random.default_rng(0)
    inputs = rng.integers(2, TINY.vocab_size, (2, 7))
    decoder = rng.integers(2, TINY.vocab_size, (2, 5))
    decoder[:, 0] = 0
    apply = jax.jit(lambda p, x, y: sp.T5(TINY).apply({"params": p}, x, y))
    expected = apply(params, jnp.asarray(inputs), jnp.asarray(decoder))
    with torch.no_grad():
        got = model(
            input_ids=torch.from_numpy(inputs), decoder_input_ids=torch.from_numpy(decoder)
        ).logits
    np.testing.assert_allclose(got.numpy(), np.asarray(expected), rtol=1e-4, atol=1e-4)
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()


@pytest.mark.slow
def test_tiny_run_agrees_with_peft_and_writes_its_table():
    workdir, (process,) = started_subprocesses(__name__)
    try:
        process.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"the tiny benchmark gave no result in {TIMEOUT_S}s")
    log = (workdir / "log.txt").read_text()
    assert process.returncode == 0, log[-3000:]
    records = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    assert not [r for r in records if "error" in r]
    ours = {r["measure"]: r for r in records if r.get("impl") == "softprompt-jax"}
    impls = {(r["measure"], r["impl"]) for r in records if "impl" in r}
    assert (
        {m for m, i in impls if i == "peft"}
        == set(ours)
        == {
            "train",
            "generate",
            "generate_mixed",
            "score",
        }
    )
    # Same weights, same prompts: the same loss, greedy tokens and candidate scores.
    assert ours["train"]["check"]["rel_diff"] < 1e-5
    # The same optimizer (AdamW) on both sides: the losses after its updates agree too.
    assert {r["optimizer"] for r in records if r.get("measure") == "train"} == {"adamw"}
    assert ours["train"]["check"]["steps_rel_diff"] < 1e-4
    # No allocator statistics on CPU: our peak is XLA's plan, and the table says so.
    assert ours["train"]["peak_source"] == "xla_plan" and ours["train"]["peak_gib"] is not None
    assert ours["generate"]["check"]["tokens_equal_peft"] == 1.0
    assert ours["generate_mixed"]["check"]["tokens_equal_peft"] == 1.0
    assert ours["score"]["check"]["max_abs_diff_peft"] < 1e-4
    assert "| tiny | generate, 4 prompts mixed |" in log
    table = subprocess.run(
        [sys.executable, str(SCRIPT), "--table", str(workdir / "results.jsonl")],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert table.splitlines()[2].startswith("| tiny | train step, adamw |")
    assert "(ours: XLA plan)" in table.splitlines()[2]


def test_forward_flops_counts_what_xla_counts():
    """The MFU formula's matmul FLOPs against XLA's cost analysis of our forward pass."""
    bench = load_bench()
    cfg = TINY.replace(vocab_size=64)
    tokens = jax.ShapeDtypeStruct((1, 10), jnp.int32)
    decoder = jax.ShapeDtypeStruct((1, 4), jnp.int32)
    apply = lambda p, x, y: sp.T5(cfg).apply({"params": p}, x, y)
    cost = jax.jit(apply).lower(sp.param_shapes(cfg), tokens, decoder).cost_analysis()
    formula = bench.forward_flops(cfg, 10, 4)
    # XLA also counts the softmax, norms and activations: a little over the matmuls.
    assert formula <= cost["flops"] < 1.3 * formula
