"""`softprompt-jax serve`: answers equal to `infer`'s over real HTTP, dynamic batches mixing
prompts, no compile after warm-up, prompts changed live, every bad request's status and JSON
error, rows failing alone, and a clean stop on SIGTERM under load."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import REPO_ROOT, TINY, started_subprocesses
from softprompt_jax.tasks import demo
from tiny_decoders import save_tiny

import softprompt_jax as sp
from softprompt_jax import cli, commands
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.inference import ids_to_texts, predict_tokens
from softprompt_jax.serving.app import allowed_path
from softprompt_jax.serving.batcher import Batcher
from softprompt_jax.serving.config import ServeConfig
from softprompt_jax.serving.engine import SCORE, Engine, Mode, Shapes, Work
from softprompt_jax.serving.registry import PromptRegistry
from softprompt_jax.serving.requests import RequestError
from softprompt_jax.serving.server import ServerThread, build_service

spec = importlib.util.spec_from_file_location("serve_load", REPO_ROOT / "bench" / "serve_load.py")
sys.modules["serve_load"] = serve_load = importlib.util.module_from_spec(spec)
spec.loader.exec_module(serve_load)

LENGTHS = serve_load.FEATURE_LENGTHS  # inputs 16 (longer ones are cut), targets 4
TASK = serve_load.TASK
PROMPT_LENGTHS = {"a": 3, "b": 4, "c": 5}
MAX_PROMPT_LENGTH = 6
SETTINGS = dict(  # 1 batch size x 2 input lengths x (greedy + 2 scoring encoder rows) = 6
    feature_lengths=LENGTHS,
    task=TASK,
    dtype="float32",
    batch_sizes=(8,),
    input_lengths=(8, 16),
    max_prompts=4,
    max_prompt_length=MAX_PROMPT_LENGTH,
    max_rows=16,
    max_request_bytes=4096,
    max_wait_ms=20.0,
)
PROGRAMS = 6
INPUTS = ["hello", "abc def", "a much longer input than sixteen bytes", ""]
NOT_CUT = {"truncated": False, "truncated_inputs": []}


def prompt_array(seed: int, length: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(length, TINY.emb_dim)).astype(np.float32)


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("prompts")
    return {
        name: str(sp.save_prompt(prompt_array(i, length), folder / f"{name}.npy"))
        for i, (name, length) in enumerate(PROMPT_LENGTHS.items())
    }


def prompt_dir(prompt_files: dict[str, str]) -> Path:
    """SERVE_PROMPT_DIR of the shared server: the prompt files' folder."""
    return Path(prompt_files["a"]).parent


@pytest.fixture(scope="module")
def server(frozen_model, prompt_files):
    config = ServeConfig(
        checkpoint_path=str(frozen_model),
        prompts=prompt_files,
        prompt_dir=str(prompt_dir(prompt_files)),
        **SETTINGS,
    )
    service = build_service(config)
    running = ServerThread(service)
    yield running
    running.stop()


def call(url: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """(status, JSON answer) of one HTTP request; `body` bytes are sent as they are."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def call_all(server: ServerThread, calls: list[tuple[str, str, Any]]) -> list[tuple[int, Any]]:
    """The calls sent at once (so that the server batches them together)."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda c: call(server.url, *c), calls))


def metric(server: ServerThread, name: str) -> float:
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.split(" ")[0] == name)


def infer_lines(
    frozen_model, prompt_files, lines: list[dict], tmp_path: Path, **settings
) -> list[dict]:
    """The offline path: `commands.infer` on a JSON-lines file of these lines."""
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = commands.infer(
        checkpoint_path=str(frozen_model),
        output_file=str(tmp_path / "out.jsonl"),
        feature_lengths=LENGTHS,
        task=TASK,
        prompts=prompt_files,
        input_file=str(source),
        dtype="float32",
        batch_size=8,
        **settings,
    )
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_predictions_and_scores_equal_infer(server, frozen_model, prompt_files, tmp_path):
    candidates = [["a", "bb"], ["c", "a", "dd"], ["x", "y"], ["z", "e"]]
    calls = [("POST", "/v1/predict", {"prompt": p, "inputs": INPUTS}) for p in PROMPT_LENGTHS]
    calls += [
        ("POST", "/v1/score", {"prompt": p, "inputs": INPUTS, "candidates": candidates})
        for p in PROMPT_LENGTHS
    ]
    answers = call_all(server, calls)
    lines = [{"prompt": p, "inputs": text} for p in PROMPT_LENGTHS for text in INPUTS]
    lines += [
        {"prompt": p, "inputs": text, "candidates": c}
        for p in PROMPT_LENGTHS
        for text, c in zip(INPUTS, candidates)
    ]
    offline = infer_lines(frozen_model, prompt_files, lines, tmp_path)
    assert all(status == 200 for status, _ in answers), answers
    n = len(INPUTS)
    for k, (_, answer) in enumerate(answers):
        expected = offline[k * n : (k + 1) * n]
        assert answer["predictions"] == [line["prediction"] for line in expected]
        assert answer["truncated_inputs"] == [i for i, x in enumerate(expected) if x["truncated"]]
        assert answer["truncated"] is True  # INPUTS[2] is longer than 16 bytes
        if "scores" in answer:
            for got, line in zip(answer["scores"], expected):
                np.testing.assert_allclose(got, line["scores"], rtol=1e-5, atol=1e-5)
    # Different prompts give different answers: the rows did not all read one prompt.
    assert len({json.dumps(a["predictions"]) for _, a in answers[:3]}) > 1


def test_load_mixing_prompts_compiles_nothing_after_warm_up(
    server, frozen_model, prompt_files, tmp_path
):
    status, health = call(server.url, "GET", "/healthz")
    assert status == 200 and health["programs"] == PROGRAMS
    assert metric(server, "softprompt_programs") == PROGRAMS
    load = serve_load.requests(sorted(PROMPT_LENGTHS), 36, seed=3)
    fixture = serve_load.Fixture(frozen_model, prompt_files)
    expected = serve_load.offline_answers(fixture, load, tmp_path, batch_size=8)
    result = asyncio.run(serve_load.run_load(server.url, load, expected, clients=6))
    assert result["failed"] == 0, result["first_failures"]
    assert result["wrong_answers"] == 0
    assert result["compiles_during_load"] == 0
    assert result["mean_batch_size"] > 1  # rows of concurrent requests shared batches


def test_prompts_change_live_without_recompiling(server, frozen_model, prompt_files):
    params = sp.init_params(TINY, 0)
    tokens = np.asarray([list(demo.VOCABULARY.encode("hello")) + [1]], np.int32)
    first, second = prompt_array(10, 2), prompt_array(11, MAX_PROMPT_LENGTH)
    offline = {  # each prompt alone, unpadded
        id(prompt): ids_to_texts(
            demo.VOCABULARY,
            predict_tokens(TINY, params, prompt, tokens, max_length=LENGTHS["targets"]),
        )[0]
        for prompt in (first, second)
    }
    assert offline[id(first)] != offline[id(second)]
    compiles = metric(server, "softprompt_xla_compiles")  # from here on, nothing compiles

    def predict(name: str) -> tuple[int, Any]:
        return call(server.url, "POST", "/v1/predict", {"prompt": name, "inputs": ["hello"]})

    status, added = call(server.url, "POST", "/v1/prompts", {"name": "d", "prompt": first.tolist()})
    assert (status, added) == (201, {"name": "d", "length": 2, "replaced": False})
    assert predict("d") == (200, {"predictions": [offline[id(first)]], **NOT_CUT})
    path = sp.save_prompt(second, prompt_dir(prompt_files) / "second.npy")
    assert call(server.url, "POST", "/v1/prompts", {"name": "d", "path": str(path)})[0] == 200
    assert predict("d") == (200, {"predictions": [offline[id(second)]], **NOT_CUT})
    status, listed = call(server.url, "GET", "/v1/prompts")
    assert listed["prompts"][-1] == {"name": "d", "length": MAX_PROMPT_LENGTH}
    assert (listed["capacity"], listed["max_length"]) == (4, MAX_PROMPT_LENGTH)
    status, full = call(server.url, "POST", "/v1/prompts", {"name": "e", "prompt": first.tolist()})
    assert status == 409 and full["field"] == "name" and "SERVE_MAX_PROMPTS" in full["error"]
    too_long = prompt_array(0, MAX_PROMPT_LENGTH + 1).tolist()
    status, error = call(server.url, "POST", "/v1/prompts", {"name": "d", "prompt": too_long})
    assert (
        status == 400 and error["field"] == "prompt" and "SERVE_MAX_PROMPT_LENGTH" in error["error"]
    )
    status, error = call(server.url, "POST", "/v1/prompts", {"name": "d", "path": "no/such.npy"})
    assert status == 400 and error["field"] == "path"
    assert str(prompt_dir(prompt_files)) not in error["error"]  # names the client's path only
    assert call(server.url, "DELETE", "/v1/prompts/d") == (200, {"deleted": "d"})
    assert predict("d")[0] == 404
    assert call(server.url, "DELETE", "/v1/prompts/d")[0] == 404
    assert predict("a")[0] == 200
    assert metric(server, "softprompt_xla_compiles") == compiles


def test_prompt_paths_are_read_only_inside_serve_prompt_dir(server, prompt_files, tmp_path):
    folder = prompt_dir(prompt_files)
    outside = sp.save_prompt(prompt_array(5, 2), tmp_path / "outside.npy")
    (folder / "link.npy").symlink_to(outside)
    escapes = [str(outside), "../" + outside.name, f"{folder}/../{outside.name}", "link.npy"]
    escapes += ["/etc/passwd", "gs://bucket/p.npy"]
    for path in escapes:
        status, error = call(server.url, "POST", "/v1/prompts", {"name": "x", "path": path})
        assert status == 403 and error["field"] == "path", (path, error)
    sp.save_prompt({"key": np.ones([1, 2, 2, 4]), "value": np.ones([1, 2, 2, 4])}, folder / "p.npz")
    status, error = call(server.url, "POST", "/v1/prompts", {"name": "x", "path": "p.npz"})
    assert status == 400 and error["field"] == "path" and "prefix" in error["error"]
    assert call(server.url, "POST", "/v1/prompts", {"name": "x", "path": "a.npy"})[0] == 201
    assert call(server.url, "DELETE", "/v1/prompts/x")[0] == 200
    with pytest.raises(RequestError) as refused:  # SERVE_PROMPT_DIR unset: no path at all
        allowed_path("a.npy", None)
    assert refused.value.status == 403 and refused.value.field == "path"


def test_a_full_queue_answers_503_with_retry_after(server):
    body = json.dumps({"prompt": "a", "inputs": ["x", "y"]}).encode()
    counter = 'softprompt_queue_full_total{endpoint="/v1/predict"}'
    full = metric(server, counter)
    server.service.batcher.max_queued = 1
    try:
        request = urllib.request.Request(server.url + "/v1/predict", data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
    finally:
        server.service.batcher.max_queued = SETTINGS["max_rows"]
    assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "1"
    assert "SERVE_MAX_QUEUED_ROWS" in json.loads(refused.value.read())["error"]
    assert metric(server, counter) == full + 1
    assert call(server.url, "POST", "/v1/predict", json.loads(body))[0] == 200


def test_a_bug_finishing_a_batch_fails_that_batch_only(server):
    batcher = server.service.batcher
    observe, failures = batcher.on_batch, []

    def fail_once(stats) -> None:
        if not failures:
            failures.append(stats)
            raise RuntimeError("injected")
        observe(stats)

    batcher.on_batch = fail_once
    try:
        body = {"prompt": "a", "inputs": ["hello"]}
        status, error = call(server.url, "POST", "/v1/predict", body)
        assert status == 500 and "error" in error and failures
        assert call(server.url, "POST", "/v1/predict", body)[0] == 200  # still batching
    finally:
        batcher.on_batch = observe


def test_scoring_encodes_each_input_once_in_warmed_up_shapes():
    registry = PromptRegistry.of(None, capacity=2, max_length=2, emb_dim=TINY.emb_dim)
    registry.put("p", prompt_array(0, 2))
    registry.put("q", prompt_array(1, 2))
    engine = Engine(TINY, {}, demo.VOCABULARY, Shapes((8,), (8,), 4))
    seen = []

    def score(params, bank, features):
        seen.append(features)
        return np.arange(len(features["decoder_target_tokens"]), dtype=np.float32)

    engine._score, engine.compiled = score, lambda: 0
    engine._predict = lambda *args, **kwargs: np.zeros([8, 4], np.int32)
    engine.warm_up(registry.snapshot().bank)
    warmed = {tuple(v.shape for v in f.values()) for f in seen}
    assert len(warmed) == 2  # encoder rows: half the batch, or all of it
    inputs = [np.asarray([5, 6, 1]), np.asarray([7, 1]), np.asarray([5, 6, 1])]
    works = [  # input 0's two candidates, input 1's two, input 0 again under another prompt
        Work(SCORE, prompt, inputs[i], np.asarray([c, 1]))
        for i, prompt, c in [(0, "p", 3), (0, "p", 4), (1, "p", 3), (1, "p", 4), (2, "q", 3)]
    ]
    seen.clear()
    assert engine.run(SCORE, works, registry.snapshot()) == [0.0, 1.0, 2.0, 3.0, 4.0]
    (features,) = seen
    assert tuple(v.shape for v in features.values()) in warmed
    encoder = features["encoder_input_tokens"]
    assert encoder.shape == (4, 8)  # 3 distinct (input, prompt) rows, padded to half of 8
    index = features["encoder_index"][:5]
    for work, row in zip(works, index):
        assert list(encoder[row, : len(work.tokens)]) == list(work.tokens)
        assert features["prompt_ids"][row] == registry.snapshot().rows[work.prompt]
    assert len(set(index.tolist())) == 3


def test_serve_refuses_decoder_only_models_and_prefix_prompts(frozen_model, tmp_path):
    save_tiny("gpt2", tmp_path / "gpt2")
    settings = dict(SETTINGS, prompts=None)
    with pytest.raises(SoftpromptError, match="INITIAL_CHECKPOINT_PATH .*decoder-only") as error:
        build_service(ServeConfig(checkpoint_path=str(tmp_path / "gpt2"), **settings))
    assert "\n" not in str(error.value)
    prefix = {"key": np.ones([1, 2, 2, 4]), "value": np.ones([1, 2, 2, 4])}
    settings["prompts"] = {"pre": str(sp.save_prompt(prefix, tmp_path / "pre.npz"))}
    with pytest.raises(SoftpromptError, match=r"PROMPTS\['pre'\] .*prefix") as error:
        build_service(ServeConfig(checkpoint_path=str(frozen_model), **settings))
    assert "\n" not in str(error.value)


BAD_REQUESTS = [  # (path, body, status, field)
    ("/v1/predict", b"{not json", 400, None),
    ("/v1/predict", b"[1, 2]", 400, None),
    ("/v1/predict", {"prompt": "a", "input": ["x"]}, 400, "input"),
    ("/v1/predict", {"prompt": "a", "inputs": "x"}, 400, "inputs"),
    ("/v1/predict", {"prompt": "a", "inputs": ["x", 5]}, 400, "inputs[1]"),
    ("/v1/predict", {"prompt": 3, "inputs": ["x"]}, 400, "prompt"),
    ("/v1/predict", {"prompt": "nope", "inputs": ["x"]}, 404, "prompt"),
    ("/v1/predict", {"prompt": "a", "inputs": ["x"] * 17}, 413, "inputs"),
    ("/v1/predict", {"prompt": "a", "inputs": ["x" * 5000]}, 413, None),
    (
        "/v1/predict",
        {"prompt": "a", "inputs": ["x"], "max_decode_length": 0},
        400,
        "max_decode_length",
    ),
    ("/v1/predict", {"prompt": "a", "inputs": ["x"], "temperature": 0.7}, 400, "temperature"),
    ("/v1/predict", {"prompt": "a", "inputs": ["x"], "num_beams": 2}, 400, "num_beams"),
    (
        "/v1/score",
        {"prompt": "a", "inputs": ["x"], "candidates": [["abcd"]]},
        400,
        "candidates[0][0]",
    ),
    (
        "/v1/score",
        {"prompt": "a", "inputs": ["x"], "candidates": [["a"], ["b"]]},
        400,
        "candidates",
    ),
    ("/v1/score", {"prompt": "a", "inputs": ["x"], "candidates": [[]]}, 400, "candidates[0]"),
    ("/v1/nothing", {}, 404, None),
]


def test_each_bad_request_gets_its_status_and_a_json_error(server):
    good = ("POST", "/v1/predict", {"prompt": "b", "inputs": ["hello", "abc def"]})
    expected = call(server.url, *good)
    assert expected[0] == 200
    for path, body, status, field in BAD_REQUESTS:
        # Sent together with good requests, so they share a batch window with it.
        bad, *goods = call_all(server, [("POST", path, body), good, good])
        assert bad[0] == status, (path, body, bad)
        assert isinstance(bad[1]["error"], str) and bad[1].get("field") == field, bad
        assert goods == [expected, expected]
    assert call(server.url, "GET", "/v1/predict")[0] == 405
    assert call(server.url, *good) == expected


def test_max_decode_length_is_infers_decode_length(server, frozen_model, prompt_files, tmp_path):
    body = {"prompt": "c", "inputs": INPUTS, "max_decode_length": 1}
    status, answer = call(server.url, "POST", "/v1/predict", body)
    lines = [{"prompt": "c", "inputs": text} for text in INPUTS]
    offline = infer_lines(frozen_model, prompt_files, lines, tmp_path, decode_length=1)
    assert answer["predictions"] == [line["prediction"] for line in offline]
    whole = call(server.url, "POST", "/v1/predict", body | {"max_decode_length": 4})[1]
    assert answer["predictions"] != whole["predictions"]


# --- batching, without a model ---------------------------------------------------------------


def run_batcher(works: list[list[Work]], fail: str | None = None, **settings) -> tuple[list, list]:
    """Submit each list of works at once; the batches formed, and each submission's results.

    The fake `run` answers each row with its prompt's name, or fails the rows of `fail`."""
    batches = []

    def run(mode: Mode, rows: list[Work]) -> list:
        batches.append([row.prompt for row in rows])
        return [ValueError(row.prompt) if row.prompt == fail else row.prompt for row in rows]

    async def main() -> list:
        batcher = Batcher(run, **settings)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(each) for each in works))
        await batcher.close()
        return results

    return batches, asyncio.run(main())


def rows(prompt: str, n: int = 1, mode: Mode = Mode()) -> list[Work]:
    return [Work(mode, prompt, np.ones([3], np.int32), decode_length=1)] * n


def test_rows_of_different_prompts_share_a_batch_and_fail_alone():
    works = [rows("a", 2), rows("b"), rows("c"), rows("d", 1, SCORE)]
    batches, results = run_batcher(works, fail="b", max_batch=8, max_wait=0.05)
    assert batches == [["a", "a", "b", "c"], ["d"]]  # a mode per batch, prompts mixed
    assert results[0] == ["a", "a"] and results[2] == ["c"] and results[3] == ["d"]
    assert isinstance(results[1][0], ValueError)
    batches, _ = run_batcher(works, max_batch=8, max_wait=0.05, mix_prompts=False)
    assert batches == [["a", "a"], ["b"], ["c"], ["d"]]
    started = time.perf_counter()
    batches, _ = run_batcher([rows("a", 4)], max_batch=2, max_wait=30.0)
    assert batches == [["a", "a"], ["a", "a"]]
    assert time.perf_counter() - started < 10  # a full batch does not wait


def test_a_row_failing_in_the_engine_fails_alone():
    registry = PromptRegistry.of(None, capacity=3, max_length=2, emb_dim=TINY.emb_dim)
    for name in ("ok", "bad", "gone"):
        registry.put(name, prompt_array(0, 2))
    snapshot = registry.snapshot()
    registry.delete("gone")
    engine = Engine(TINY, {}, demo.VOCABULARY, Shapes((4,), (8,), 2))

    def compute(mode, works, bank, rows):  # the model fails on any batch holding "bad"
        if any(work.prompt == "bad" for work in works):
            raise FloatingPointError("bad row")
        return [f"{work.prompt}@{row}" for work, row in zip(works, rows)]

    engine._compute = compute
    works = rows("ok") + rows("bad") + rows("gone") + rows("ok")
    results = engine.run(Mode(), works, registry.snapshot())
    assert results[0] == results[3] == f"ok@{snapshot.rows['ok']}"
    assert isinstance(results[1], FloatingPointError)
    assert isinstance(results[2], LookupError) and "deleted" in str(results[2])


def test_serve_settings_are_checked_before_loading(tmp_path, capsys):
    base = [
        "serve",
        "--gin_file=models/t5_1_1_tiny.gin",
        "--gin_file=runs/prompt_serve.gin",
        f"--gin.INITIAL_CHECKPOINT_PATH='{tmp_path / 'absent'}'",
        f"--gin.TASK_FEATURE_LENGTHS={LENGTHS!r}",
        "--gin.SERVE_PORT=0",
    ]
    task = f"--gin.MIXTURE_OR_TASK_NAME='{TASK}'"
    cases = [
        ([], "set VOCABULARY_PATH"),
        ([task, "--gin.SERVE_INPUT_LENGTHS=[4, 8]"], "must end at"),
        ([task, "--gin.SERVE_BATCH_SIZES=[0]"], "SERVE_BATCH_SIZES"),
        ([task, f"--gin.PROMPTS='{tmp_path}/none'"], "no such"),
    ]
    for flags, message in cases:
        assert cli.main([*base, *flags]) == 2
        assert message in capsys.readouterr().err
    with socket.create_server(("127.0.0.1", 0)) as taken:  # named before the model is read
        port = taken.getsockname()[1]
        assert cli.main([*base, task, f"--gin.SERVE_PORT={port}"]) == 2
        assert (
            f"cannot serve on 127.0.0.1:{port} (SERVE_HOST, SERVE_PORT)" in capsys.readouterr().err
        )


# --- SIGTERM under load (a real `softprompt-jax serve` process) -----------------------------

SIGTERM_WAIT_MS = 1500  # requests sit in the queue this long: in flight when SIGTERM comes


def start_subprocesses(workdir: Path) -> list[subprocess.Popen]:
    """`softprompt-jax serve` on a free port with its own tiny model (started early)."""
    model = workdir / "model"
    sp.save_pretrained(model, TINY, sp.init_params(TINY, 0))
    prompts = {
        name: str(sp.save_prompt(prompt_array(i, length), workdir / f"{name}.npy"))
        for i, (name, length) in enumerate(PROMPT_LENGTHS.items())
    }
    macros = {
        "INITIAL_CHECKPOINT_PATH": repr(str(model)),
        "PROMPTS": repr(prompts),
        "MIXTURE_OR_TASK_NAME": repr(TASK),
        "TASK_FEATURE_LENGTHS": repr(LENGTHS),
        "SERVE_PORT": "0",
        "SERVE_BATCH_SIZES": "[8]",
        "SERVE_INPUT_LENGTHS": "[16]",
        "SERVE_MAX_WAIT_MS": str(SIGTERM_WAIT_MS),
    }
    argv = ["serve", "--gin_file=models/t5_1_1_tiny.gin", "--gin_file=runs/prompt_serve.gin"]
    argv += [f"--gin.{name}={value}" for name, value in macros.items()]
    process = subprocess.Popen(
        [sys.executable, "-m", "softprompt_jax.cli", *argv],
        cwd=REPO_ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return [process]


@pytest.mark.slow
def test_sigterm_answers_requests_in_flight_then_exits_0(tmp_path):
    workdir, (process,) = started_subprocesses(__name__)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if " on http://" in line:
            break
    else:
        pytest.fail("the server ended before serving:\n" + "".join(lines))
    url = line.split(" on ")[1].split()[0]
    calls = [("POST", "/v1/predict", {"prompt": p, "inputs": INPUTS}) for p in PROMPT_LENGTHS]
    with ThreadPoolExecutor(len(calls)) as pool:
        pending = [pool.submit(call, url, *c) for c in calls]
        time.sleep(SIGTERM_WAIT_MS / 3000)  # the requests wait in the queue
        process.send_signal(signal.SIGTERM)
        answers = [each.result(timeout=120) for each in pending]
    assert process.wait(timeout=120) == 0
    rest = process.stdout.read()
    assert "stopped: every request received was answered" in rest
    assert [status for status, _ in answers] == [200] * len(calls)
    prompts = {name: str(workdir / f"{name}.npy") for name in PROMPT_LENGTHS}
    lines = [{"prompt": p, "inputs": text} for p in PROMPT_LENGTHS for text in INPUTS]
    offline = infer_lines(workdir / "model", prompts, lines, tmp_path)
    predicted = [text for _, answer in answers for text in answer["predictions"]]
    assert predicted == [line["prediction"] for line in offline]
    with pytest.raises(urllib.error.URLError):
        call(url, "GET", "/healthz")
