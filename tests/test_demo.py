"""README's first command, `softprompt-jax demo`, end to end at a tiny scale.

The full demo (400 pre-training steps, 200 prompt-tuning steps) is what shows the method
working (0% -> 100% measured, see README); here it runs with a few steps from a fresh working
directory and a relative workdir, as a newcomer would start it, and must print its table.
"""

from __future__ import annotations

import pytest

from softprompt_jax import demo

pytestmark = pytest.mark.slow  # end to end; `pytest -m 'not slow'` skips it


def test_demo_runs_end_to_end_from_a_fresh_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    results = demo.run_demo(
        "softprompt_demo", pretrain_steps=3, tune_steps=2, batch_size=8, eval_examples=10
    )
    out = capsys.readouterr().out
    tasks = {f"taskless_demo_{name}" for name in ("len", "max", "min")}
    assert set(results) == {"with_prefix", "before", "after"} | tasks
    assert all(0.0 <= value <= 100.0 for value in results.values())
    for line in (
        "[1/4]",
        "[2/4]",
        "[3/4]",
        "[4/4]",
        "frozen model, no prefix",
        "frozen model + tuned 8-token prompt",
        "One mixed batch of 10 validation examples per task",
    ):
        assert line in out
    assert (tmp_path / "softprompt_demo" / "prompt_min" / "metrics.jsonl").is_file()
    records = (tmp_path / "softprompt_demo" / "prompt_per_task" / "metrics.jsonl").read_text()
    assert all(f'"task": "{task}"' in records for task in tasks)
