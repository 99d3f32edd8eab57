"""Run-directory files: all-or-nothing local writes, and the same code paths on `gs://`.

A bucket is simulated with `etils.epath.testing.mock_epath`: every epath operation on a
`gs://bucket/...` path is served from a local folder, and recorded. The run's small files
(metrics, best step, numpy prompt) must go through epath, never through `open()`/`os` on a
path string, which would silently create a local folder named `gs:`.
"""

from __future__ import annotations

import json
import os
import stat

import jax
import numpy as np
import pytest
from etils.epath import gpath
from etils.epath import testing as epath_testing

from softprompt_jax import storage
from softprompt_jax.checkpoints import prefix_files
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.train.metrics_writer import METRICS_FILE, MetricsWriter
from softprompt_jax.train.state_checkpoints import (
    NUMPY_DIR,
    PROMPT_SIDECAR,
    best_step,
    update_best,
    write_prompt_sidecar,
)

BUCKET = "gs://bucket"


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """(the folder holding the fake bucket's objects, the list of gs:// paths touched)."""
    root, touched = tmp_path / "bucket", []
    root.mkdir()
    monkeypatch.chdir(tmp_path)  # a stray local "gs:" folder would appear here
    # With TensorFlow installed epath sends gs:// to tf.io.gfile, bypassing mock_epath.
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)

    def served_locally(original, path, *args, **kwargs):
        path = os.fspath(path)
        assert path.startswith(BUCKET + "/"), path
        touched.append(path)
        return original(path.replace(BUCKET, str(root), 1), *args, **kwargs)

    operations = (
        "open",
        "exists",
        "isdir",
        "listdir",
        "glob",
        "makedirs",
        "mkdir",
        "remove",
        "rename",
        "replace",
        "rmtree",
        "stat",
    )
    with epath_testing.mock_epath(**dict.fromkeys(operations, served_locally)):
        yield root, touched
    assert not (tmp_path / "gs:").exists(), "a gs:// path was used as a local path"


def test_local_paths_become_absolute_and_urls_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(storage.as_path("run")) == str(tmp_path / "run")
    assert str(storage.as_path("gs://bucket/run")) == "gs://bucket/run"


def test_local_atomic_write_replaces_whole_file_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "best.json"
    storage.write_text_atomic(path, "old")
    storage.write_text_atomic(path, "new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json"]


def test_failed_local_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "best.json"
    storage.write_text_atomic(path, "old")
    with pytest.raises(TypeError):
        storage.write_bytes_atomic(path, "not bytes")  # fails inside the write
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json"]


@pytest.mark.parametrize(
    "umask,mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)], ids=["022", "002", "077"]
)
def test_atomic_writes_get_the_permissions_open_gives(tmp_path, umask, mode):
    """0o666 less the umask, as open() creates files; not tempfile.mkstemp's 0o600."""
    old = os.umask(umask)
    try:
        storage.write_text_atomic(tmp_path / "best.json", "{}")
        storage.write_npy_atomic(tmp_path / "prompt.npy", np.zeros((2, 3), np.float32))
    finally:
        os.umask(old)
    for name in ("best.json", "prompt.npy"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode


def test_check_writable_probes_and_leaves_nothing_behind(tmp_path):
    storage.check_writable(tmp_path / "new" / "folders")
    assert list(tmp_path.iterdir()) == []  # the folders it made for the probe are gone
    (tmp_path / "a_file").write_text("in the way")
    with pytest.raises(SoftpromptError, match=f"cannot write to {tmp_path / 'a_file' / 'out'}"):
        storage.check_writable(tmp_path / "a_file" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_metrics_jsonl_is_appended_in_the_bucket(bucket):
    root, touched = bucket
    writer = MetricsWriter(f"{BUCKET}/run", tensorboard=False)
    writer.write("train", 10, {"loss": np.float32(1.5)})
    writer.write("eval", 10, {"accuracy": 0.75, "split": "validation"})
    lines = [json.loads(line) for line in (root / "run" / METRICS_FILE).read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in lines] == [("train", 10), ("eval", 10)]
    assert lines[0]["loss"] == 1.5 and lines[1]["accuracy"] == 0.75
    assert f"{BUCKET}/run/{METRICS_FILE}" in touched


def test_numpy_prompt_and_best_step_are_written_in_the_bucket(bucket):
    root, touched = bucket
    prompt = np.arange(12, dtype=np.float32).reshape(3, 4)
    where = write_prompt_sidecar(f"{BUCKET}/run", 7, prompt)
    assert where == f"{BUCKET}/run/{NUMPY_DIR}/checkpoint_7/{PROMPT_SIDECAR}"
    stored = root / "run" / NUMPY_DIR / "checkpoint_7" / PROMPT_SIDECAR
    np.testing.assert_array_equal(np.load(stored), prompt)
    # Written once: a second save of the same step leaves the first file alone.
    write_prompt_sidecar(f"{BUCKET}/run", 7, prompt + 1)
    np.testing.assert_array_equal(np.load(stored), prompt)

    for step, accuracy in ((5, 0.5), (7, 0.75), (9, 0.25)):
        update_best(f"{BUCKET}/run", step, "accuracy", accuracy, "max")
    assert best_step(f"{BUCKET}/run") == 7
    assert json.loads((root / "run" / "best.json").read_text())["value"] == 0.75
    assert any(path.endswith("/best.json") for path in touched)


def test_prefix_files_are_written_and_read_in_the_bucket(bucket):
    root, touched = bucket
    rng = np.random.default_rng(0)
    plain = {name: rng.normal(size=(2, 3, 2, 4)).astype(np.float32) for name in ("key", "value")}
    t5_peft = {"peft": {"table": rng.normal(size=(3, 2 * 2 * 8)).astype(np.float32)}}
    for prefix, name in ((plain, "p.npz"), (t5_peft, "t5.npz"), (t5_peft, "t5_adapter")):
        prefix_files.save_prefix(prefix, f"{BUCKET}/run/{name}", num_heads=2, head_dim=4)
        loaded = prefix_files.load_prefix(f"{BUCKET}/run/{name}")
        jax.tree.map(np.testing.assert_array_equal, loaded, prefix)
        assert (root / "run" / name).exists()
        assert any(t.startswith(f"{BUCKET}/run/{name}") for t in touched)
    config = json.loads((root / "run" / "t5_adapter" / prefix_files.PEFT_CONFIG).read_text())
    assert (config["num_layers"], config["task_type"]) == (2, "SEQ_2_SEQ_LM")
