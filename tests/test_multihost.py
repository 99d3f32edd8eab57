"""Two processes on one machine train like one: `jax.distributed` over localhost, CPU devices.

Each process has 2 forced CPU devices; cross-process CPU collectives use gloo (jax 0.10.2's
default, set explicitly below). On a 2x2 mesh each process feeds its half of the global batch;
on a 1x4 mesh the model axis spans both processes, so both feed the whole batch. Losses and
the prompt must match one process on one device; each process must read only its own slices
of a checkpoint that the main process alone wrote. Evaluation (target scores for rank
classification, cached greedy decoding) on the sharded model must match one device too.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import started_subprocesses

pytestmark = pytest.mark.slow  # end to end; `pytest -m 'not slow'` skips it

PROCESSES, LOCAL_DEVICES, STEPS, BATCH = 2, 2, 3, 8
MESHES = {"2x2": (2, 2), "1x4": (1, 4)}
TIMEOUT_S = 180
# float32 throughout: sharded matmuls and cross-process all-reduces only reorder float sums.
LOSS_RTOL, PROMPT_ATOL = 1e-5, 1e-5
QUERY = "encoder/layers_0/attention/query/kernel"


def _config():
    """`t5_1_1_tiny` with a 256-token vocabulary (fast on CPU); its dims divide 2 and 4."""
    import softprompt_jax as sp

    return sp.get_config("t5_1_1_tiny").replace(vocab_size=256)


def _inputs() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The initial prompt and the global batch, identical in every process."""
    rng = np.random.default_rng(0)
    prompt = rng.uniform(-0.5, 0.5, (4, 8)).astype(np.float32)
    enc = rng.integers(3, 256, (BATCH, 8)).astype(np.int32)
    enc[::2, -3:] = 0  # some padding
    target = rng.integers(3, 256, (BATCH, 4)).astype(np.int32)
    target[1::2, -1] = 0
    decoder_input = np.concatenate([np.zeros((BATCH, 1), np.int32), target[:, :-1]], axis=1)
    return prompt, {
        "encoder_input_tokens": enc,
        "decoder_input_tokens": decoder_input,
        "decoder_target_tokens": target,
        "decoder_loss_weights": (target > 0).astype(np.float32),
    }


def _train(step, state, params, batches, rng, to_host) -> tuple[list[float], list]:
    """Run STEPS steps; the losses and the final prompt as host values."""
    losses = []
    for batch in batches:
        state, metrics = step(state, params, batch, rng)
        losses.append(float(to_host(metrics["loss"])))
    return losses, to_host(state.prompt).tolist()


def _evaluate(cfg, params, prompt, batch) -> dict:
    """What evaluation computes: per-example target scores and greedy decodes (host batch)."""
    from softprompt_jax import inference

    scores = inference.make_score_fn(cfg, params, prompt)(batch)
    tokens = inference.predict_tokens(
        cfg, params, prompt, batch["encoder_input_tokens"], max_length=4
    )
    return {"scores": np.asarray(scores).tolist(), "tokens": np.asarray(tokens).tolist()}


def run_worker(process_id: int, port: int, workdir: Path) -> None:
    """One of the two processes: train on each mesh, load a checkpoint, write a JSON report."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import softprompt_jax as sp
    from softprompt_jax.checkpoints import save_t5x_checkpoint
    from softprompt_jax.checkpoints.sharded import load_sharded
    from softprompt_jax.checkpoints.t5x_legacy import T5XCheckpoint
    from softprompt_jax.partitioning import (
        data_shard_info,
        global_batch,
        initialize_distributed,
        is_main_process,
        local_batch_size,
        make_mesh,
        param_shardings,
        partitioned_train_step,
        place,
        replicated,
        sync,
        to_host,
    )
    from softprompt_jax.train.optimizer import make_optimizer
    from softprompt_jax.train.train_step import init_train_state, make_train_step

    start = time.perf_counter()
    assert initialize_distributed(f"localhost:{port}", PROCESSES, process_id, timeout_s=60)
    assert (jax.process_count(), jax.local_device_count()) == (PROCESSES, LOCAL_DEVICES)
    cfg, optimizer = _config(), make_optimizer()
    params = jax.tree_util.tree_map(np.asarray, sp.init_params(cfg, 0))
    prompt, full = _inputs()
    report: dict = {"main": is_main_process()}
    for name, shape in MESHES.items():
        mesh = make_mesh(*shape)
        index, count = data_shard_info(mesh)
        size = local_batch_size(BATCH, mesh)
        local = {key: value[index * size : (index + 1) * size] for key, value in full.items()}
        shardings = param_shardings(cfg, mesh)
        step = partitioned_train_step(make_train_step(cfg, optimizer), mesh, shardings)
        state = place(init_train_state(prompt, optimizer), replicated(mesh))
        batches = [global_batch(local, mesh)] * STEPS
        rng = place(jax.random.PRNGKey(2), replicated(mesh))
        sharded_params = place(params, shardings)
        losses, final = _train(step, state, sharded_params, batches, rng, to_host)
        report[name] = {
            "shard": [index, count],
            "local_batch": size,
            "losses": losses,
            "prompt": final,
            "eval": _evaluate(cfg, sharded_params, np.asarray(final, np.float32), full),
        }

    # Only the main process writes; after the barrier every process reads just its slices.
    if is_main_process():
        save_t5x_checkpoint(workdir / "t5x", params, 1, inline_max_bytes=0)
    sync("checkpoint written")
    reads: list[tuple[str, list]] = []
    original = T5XCheckpoint.read

    def recording_read(self, key, index=None, dtype=None):
        reads.append((key, [list(s.indices(n)) for s, n in zip(index, self.shapes()[key])]))
        return original(self, key, index, dtype)

    T5XCheckpoint.read = recording_read
    loaded = load_sharded(
        workdir / "t5x" / "checkpoint_1", cfg, param_shardings(cfg, make_mesh(1, 4))
    )
    T5XCheckpoint.read = original
    report["load_equal"] = all(
        np.array_equal(np.asarray(shard.data), np.asarray(ref)[shard.index])
        for leaf, ref in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params))
        for shard in leaf.addressable_shards
    )
    report["query_reads"] = [index for key, index in reads if key == QUERY]
    report["seconds"] = round(time.perf_counter() - start, 1)
    (workdir / f"process_{process_id}.json").write_text(json.dumps(report))
    sync("reports written")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _one_device() -> dict:
    """The same training in this pytest process on one device, with plain `jax.jit`."""
    import jax

    import softprompt_jax as sp
    from softprompt_jax.train.optimizer import make_optimizer
    from softprompt_jax.train.train_step import init_train_state, make_train_step

    cfg, optimizer = _config(), make_optimizer()
    prompt, batch = _inputs()
    params = sp.init_params(cfg, 0)
    losses, final = _train(
        jax.jit(make_train_step(cfg, optimizer)),
        init_train_state(prompt, optimizer),
        params,
        [batch] * STEPS,
        jax.random.PRNGKey(2),
        np.asarray,
    )
    return {
        "losses": losses,
        "prompt": final,
        "eval": _evaluate(cfg, params, np.asarray(final, np.float32), batch),
    }


def _wait(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    """Wait for every process; stop them all as soon as one fails or time runs out."""
    deadline = time.monotonic() + TIMEOUT_S
    while any(proc.poll() is None for proc in procs):
        failed = [i for i, proc in enumerate(procs) if proc.poll() not in (None, 0)]
        if failed or time.monotonic() > deadline:
            for proc in procs:
                proc.kill()
                proc.wait()
            which = failed[0] if failed else 0
            reason = f"process {which} failed" if failed else f"no result in {TIMEOUT_S}s"
            pytest.fail(f"two-process run: {reason}:\n{logs[which].read_text()[-6000:]}")
        time.sleep(0.2)
    for i, proc in enumerate(procs):
        assert proc.returncode == 0, f"process {i} failed:\n{logs[i].read_text()[-6000:]}"


def start_subprocesses(workdir: Path) -> list[subprocess.Popen]:
    """The two processes (conftest starts them right after collection)."""
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
    }
    port, procs = _free_port(), []
    for i in range(PROCESSES):
        with (workdir / f"process_{i}.log").open("w") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, str(i), str(port), str(workdir)],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    return procs


@pytest.fixture(scope="module")
def runs() -> tuple[list[dict], dict]:
    """(the two processes' reports, the one-device reference)."""
    workdir, procs = started_subprocesses(__name__)
    try:
        reference = _one_device()
    finally:
        _wait(procs, [workdir / f"process_{i}.log" for i in range(PROCESSES)])
    reports = [json.loads((workdir / f"process_{i}.json").read_text()) for i in range(PROCESSES)]
    return reports, reference


@pytest.mark.parametrize("mesh", list(MESHES))
def test_two_processes_train_like_one_device(runs, mesh):
    reports, reference = runs
    for report in reports:
        np.testing.assert_allclose(report[mesh]["losses"], reference["losses"], rtol=LOSS_RTOL)
        np.testing.assert_allclose(report[mesh]["prompt"], reference["prompt"], atol=PROMPT_ATOL)
    # The prompt moved: the comparison is not between two untouched initial prompts.
    assert np.abs(np.asarray(reference["prompt"]) - _inputs()[0]).max() > 1e-3


@pytest.mark.parametrize("mesh", list(MESHES))
def test_two_processes_evaluate_like_one_device(runs, mesh):
    reports, reference = runs
    for report in reports:
        np.testing.assert_allclose(
            report[mesh]["eval"]["scores"], reference["eval"]["scores"], rtol=LOSS_RTOL
        )
        assert report[mesh]["eval"]["tokens"] == reference["eval"]["tokens"]


def test_each_process_feeds_its_data_shard(runs):
    reports, _ = runs
    assert [r["main"] for r in reports] == [True, False]
    # 2x2: process i holds data row i -> shard i of 2, half the batch each.
    assert [r["2x2"]["shard"] for r in reports] == [[0, 2], [1, 2]]
    assert [r["2x2"]["local_batch"] for r in reports] == [BATCH // 2] * 2
    # 1x4: both processes hold the one data row -> the same shard, the whole batch.
    assert [r["1x4"]["shard"] for r in reports] == [[0, 1], [0, 1]]
    assert [r["1x4"]["local_batch"] for r in reports] == [BATCH] * 2


def test_each_process_loads_only_its_slices(runs):
    reports, _ = runs
    assert all(r["load_equal"] for r in reports)
    # The (8, 12) query kernel over model=4: 3 columns per device, 2 devices per process.
    starts = [sorted(columns[0] for _, columns in r["query_reads"]) for r in reports]
    assert starts == [[0, 3], [6, 9]]


if __name__ == "__main__":
    run_worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
