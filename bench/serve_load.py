"""Load test of `softprompt-jax serve` on localhost: many clients, several prompts, one model.

    python bench/serve_load.py                            # 16 clients x 200 requests, 4 prompts
    python bench/serve_load.py --clients 4 --requests 20  # a quick check

Writes a random frozen model (the demo's size, byte vocabulary) and `--prompts` prompts of
different lengths, computes every answer offline with `infer` (the `commands.infer` path),
then starts the server twice through the real CLI on a free port: batches mixing all prompts
(the default), and one prompt per batch (`SERVE_MIX_PROMPTS = False`: what a PEFT user serving
one adapter at a time gets). Each client sends its requests one after another (3 in 4
decode, 1 in 4 ranks candidates), each for a random prompt. Per run: throughput, p50/p99
latency, mean batch size, failed requests, answers that differ from the offline ones, and
XLA compiles during the load (0: every shape was compiled at start-up); then the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from softprompt_jax.tasks import demo

import softprompt_jax as sp
from softprompt_jax import commands
from softprompt_jax.demo import DEMO_MODEL

FEATURE_LENGTHS = {"inputs": 16, "targets": 4}
TASK = "taskless_demo_mixture"  # its byte vocabulary tokenizes the requests
CANDIDATES = ["a", "b", "c", "d"]
SCORE_TOLERANCE = 1e-4  # scores are sums of float32 log-likelihoods over other paddings


@dataclasses.dataclass(frozen=True)
class Request:
    """One request of the load: decode `text` with `prompt`, or rank `CANDIDATES` for it."""

    prompt: str
    text: str
    score: bool

    def body(self) -> dict[str, Any]:
        body = {"prompt": self.prompt, "inputs": [self.text]}
        return body | ({"candidates": [CANDIDATES]} if self.score else {})


@dataclasses.dataclass(frozen=True)
class Fixture:
    model: Path
    prompts: dict[str, str]  # name -> .npy file


def write_fixture(workdir: Path, cfg: sp.T5Config, num_prompts: int, seed: int = 0) -> Fixture:
    """A random frozen model and `num_prompts` prompts of lengths 3, 4, 5, ... in `workdir`."""
    model = workdir / "model"
    if not model.exists():
        sp.save_pretrained(model, cfg, sp.init_params(cfg, seed))
    prompts = {}
    for i in range(num_prompts):
        rng = np.random.default_rng(seed + i)
        prompt = rng.normal(size=(3 + i, cfg.emb_dim)).astype(np.float32)
        prompts[f"p{i}"] = str(sp.save_prompt(prompt, workdir / f"p{i}.npy"))
    return Fixture(model, prompts)


def requests(prompts: Sequence[str], count: int, seed: int) -> list[Request]:
    """`count` requests over the prompts: demo-style inputs, some longer than the inputs
    length (cut, "truncated"), 1 in 4 ranking candidates."""
    rng = np.random.default_rng(seed)
    words = demo.random_words(count, seed)
    out = []
    for word in words:
        text = f"{word} " * int(rng.integers(1, 5))  # 4 to 28 bytes, inputs length 16
        out.append(Request(str(rng.choice(prompts)), text.strip(), bool(rng.random() < 0.25)))
    return out


def offline_answers(
    fixture: Fixture, load: Sequence[Request], workdir: Path, batch_size: int = 32
) -> dict[Request, Any]:
    """Each distinct request's answer from `infer` on a JSON-lines file: the prediction, or
    the best candidate and every candidate's score."""
    distinct = list(dict.fromkeys(load))
    lines = [
        {"prompt": r.prompt, "inputs": r.text} | ({"candidates": CANDIDATES} if r.score else {})
        for r in distinct
    ]
    (workdir / "offline_in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = commands.infer(
        checkpoint_path=str(fixture.model),
        output_file=str(workdir / "offline_out.jsonl"),
        feature_lengths=FEATURE_LENGTHS,
        task=TASK,
        prompts=fixture.prompts,
        input_file=str(workdir / "offline_in.jsonl"),
        batch_size=batch_size,
        dtype="float32",
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return {
        r: (row["prediction"], row["scores"]) if r.score else row["prediction"]
        for r, row in zip(distinct, rows, strict=True)
    }


def matches(request: Request, answer: Mapping[str, Any], expected: Any) -> bool:
    """The server's answer equals the offline one (scores to `SCORE_TOLERANCE`)."""
    if not request.score:
        return answer["predictions"] == [expected]
    best, scores = expected
    return answer["predictions"] == [best] and np.allclose(
        answer["scores"][0], scores, rtol=SCORE_TOLERANCE, atol=SCORE_TOLERANCE
    )


def server_metrics(url: str) -> dict[str, float]:
    """The server's /metrics samples by name (labels dropped: summed)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name] = samples.get(sample.name, 0.0) + sample.value
    return samples


async def run_load(
    url: str,
    load: Sequence[Request],
    expected: Mapping[Request, Any],
    clients: int,
) -> dict[str, Any]:
    """`clients` concurrent clients, each sending its share of `load` one after another.

    Returns throughput, latency percentiles, mean batch size, failures, answers that differ
    from `expected`, and the XLA compiles the server made meanwhile."""
    before = await asyncio.to_thread(server_metrics, url)
    latencies: list[float] = []
    failures: list[str] = []
    wrong: list[Request] = []

    async def client(session: aiohttp.ClientSession, mine: Sequence[Request]) -> None:
        for request in mine:
            endpoint = "/v1/score" if request.score else "/v1/predict"
            started = time.perf_counter()
            async with session.post(url + endpoint, json=request.body()) as response:
                answer = await response.json()
                status = response.status
            latencies.append(time.perf_counter() - started)
            if status != 200:
                failures.append(f"{status}: {answer}")
            elif not matches(request, answer, expected[request]):
                wrong.append(request)

    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(session, load[i::clients]) for i in range(clients)))
    seconds = time.perf_counter() - started
    after = await asyncio.to_thread(server_metrics, url)
    batches = after["softprompt_batch_size_count"] - before["softprompt_batch_size_count"]
    rows = after["softprompt_batch_size_sum"] - before["softprompt_batch_size_sum"]
    return {
        "requests": len(load),
        "clients": clients,
        "seconds": round(seconds, 3),
        "requests_per_s": round(len(load) / seconds, 1),
        "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 2),
        "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 2),
        "mean_batch_size": round(rows / max(batches, 1), 2),
        "failed": len(failures),
        "wrong_answers": len(wrong),
        "compiles_during_load": int(
            after["softprompt_xla_compiles"] - before["softprompt_xla_compiles"]
        ),
        "first_failures": failures[:3],
    }


def start_server(
    fixture: Fixture, workdir: Path, mix_prompts: bool, batch_sizes: Sequence[int] | None = None
) -> tuple[subprocess.Popen, str]:
    """`softprompt-jax serve` on a free port (the real CLI); returns it and its URL."""
    macros = {
        "INITIAL_CHECKPOINT_PATH": repr(str(fixture.model)),
        "PROMPTS": repr(fixture.prompts),
        "MIXTURE_OR_TASK_NAME": repr(TASK),
        "TASK_FEATURE_LENGTHS": repr(FEATURE_LENGTHS),
        "SERVE_PORT": "0",
        "SERVE_MIX_PROMPTS": repr(mix_prompts),
    }
    if batch_sizes:
        macros["SERVE_BATCH_SIZES"] = repr(list(batch_sizes))
    argv = ["serve", "--gin_file=models/t5_1_1_tiny.gin", "--gin_file=runs/prompt_serve.gin"]
    argv += [f"--gin.{name}={value}" for name, value in macros.items()]
    log = (workdir / f"server_mix_{mix_prompts}.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "softprompt_jax.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    for line in process.stdout:
        found = re.search(r"on (http://\S+:\d+)", line)
        if found:
            return process, found.group(1)
    raise RuntimeError(f"the server exited ({process.wait()}); see {log.name}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=200, help="per client")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", help="SERVE_BATCH_SIZES (default: the gin file's)"
    )
    parser.add_argument("--workdir", help="default: a temporary folder")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="serve_load-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(workdir / "xla_cache"))
    fixture = write_fixture(workdir, DEMO_MODEL, args.prompts)
    load = requests(sorted(fixture.prompts), args.clients * args.requests, seed=1)
    expected = offline_answers(fixture, load, workdir)
    results = {}
    for mix in (True, False):
        process, url = start_server(fixture, workdir, mix, args.batch_sizes)
        try:
            results[mix] = asyncio.run(run_load(url, load, expected, args.clients))
        finally:
            process.terminate()
            process.wait(timeout=120)
        name = "mixed prompts per batch" if mix else "one prompt per batch"
        print(json.dumps({"run": name, **results[mix]}), flush=True)
    ratio = results[True]["requests_per_s"] / results[False]["requests_per_s"]
    print(f"throughput, mixed / one prompt per batch: {ratio:.2f}x")


if __name__ == "__main__":
    main()
