"""bench/packing.py packs its rows (no seqio on the GPU machine) as training's seqio packer does."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
from conftest import REPO_ROOT
from softprompt_jax.tasks.packing import packed_batches

from softprompt_jax.prompts import prompt_slot_token

SCRIPT = REPO_ROOT / "bench" / "packing.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_packing", SCRIPT)
    module = sys.modules["bench_packing"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pack_rows_gives_seqios_packed_rows():
    """Tokens, segment ids, positions and weights equal `EncDecFeatureConverter(pack=True)`'s."""
    bench = load_bench()
    inputs, targets, prompt = 64, 10, 3
    rng = np.random.default_rng(0)  # inputs of 2..40 tokens, targets of 1..4: 1-4 a row
    examples = [
        (rng.integers(3, 100, rng.integers(2, 41)), rng.integers(3, 100, rng.integers(1, 5)))
        for _ in range(40)
    ]
    examples = [(x.astype(np.int32), y.astype(np.int32)) for x, y in examples]
    rows = bench.pack_rows(examples, prompt, inputs, targets)
    ours = bench.packed_batch(rows, inputs + prompt, targets)
    slots = [(prompt, prompt_slot_token(0))] * len(examples)
    as_dicts = [{"inputs": x, "targets": y} for x, y in examples]
    seqio_rows, segments = next(
        packed_batches(as_dicts, {"inputs": inputs, "targets": targets}, len(rows), slots)
    )
    assert sorted(ours) == sorted(seqio_rows)
    assert (segments > 0).all() and segments.sum() == len(examples)
    assert 1 < len(rows) < len(examples) and {len(row) for row in rows} >= {1, 2, 3}
    for name, array in seqio_rows.items():
        np.testing.assert_array_equal(ours[name], array, err_msg=name)
