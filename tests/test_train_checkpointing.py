"""Training checkpoints: what is kept, what is restored, and the numpy sidecars."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from softprompt_jax.train.optimizer import make_optimizer
from softprompt_jax.train.state_checkpoints import (
    NUMPY_DIR,
    PROMPT_SIDECAR,
    TrainCheckpointer,
    best_step,
)
from softprompt_jax.train.train_step import init_train_state


def state_at(step: int):
    state = init_train_state(jnp.full((3, 4), float(step)), make_optimizer())
    return state.replace(step=jnp.asarray(step, jnp.int32))


def test_keeps_the_last_n_and_the_best(tmp_path):
    checkpointer = TrainCheckpointer(tmp_path, keep=2, best_metric="accuracy")
    accuracy = {1: 50.0, 2: 90.0, 3: 60.0, 4: 70.0, 5: 65.0}
    for step, value in accuracy.items():  # each step is saved, then evaluated
        checkpointer.save(step, state_at(step), {"task": "t"})
        checkpointer.record_eval(step, {"accuracy": value})
    assert checkpointer.all_steps() == [2, 4, 5]  # best (2) and the last two
    assert best_step(tmp_path) == 2
    assert json.loads((tmp_path / "best.json").read_text())["value"] == 90.0

    restored, info = checkpointer.restore(state_at(0))
    assert int(restored.step) == 5 and info == {"task": "t"}
    np.testing.assert_array_equal(restored.prompt, np.full((3, 4), 5.0))
    best, _ = checkpointer.restore(state_at(0), step=2)
    np.testing.assert_array_equal(best.prompt, np.full((3, 4), 2.0))
    # The official numpy export exists for every saved step, as float32 [length, emb_dim].
    sidecar = np.load(tmp_path / NUMPY_DIR / "checkpoint_3" / PROMPT_SIDECAR)
    assert sidecar.dtype == np.float32 and sidecar.shape == (3, 4) and (sidecar == 3).all()
    checkpointer.close()


def test_min_mode_and_missing_checkpoint(tmp_path):
    checkpointer = TrainCheckpointer(tmp_path, keep=1, best_metric="loss", best_mode="min")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        checkpointer.restore(state_at(0))
    for step, loss in {1: 3.0, 2: 1.0, 3: 2.0}.items():
        checkpointer.save(step, state_at(step), {})
        checkpointer.record_eval(step, {"loss": loss})
    assert checkpointer.all_steps() == [2, 3] and best_step(tmp_path) == 2
    checkpointer.close()
    # A rerun knows the best step from best.json and keeps protecting it.
    reopened = TrainCheckpointer(tmp_path, keep=1, best_metric="loss", best_mode="min")
    reopened.save(4, state_at(4), {})
    assert reopened.all_steps() == [2, 4] and reopened.best_step() == 2
    with pytest.raises(ValueError, match="best_mode"):
        TrainCheckpointer(tmp_path / "other", best_mode="largest")


def test_unfinished_save_is_ignored(tmp_path):
    checkpointer = TrainCheckpointer(tmp_path, keep=3)
    checkpointer.save(1, state_at(1), {})
    checkpointer.close()
    # What a kill mid-save leaves behind: an orbax temporary directory for step 2.
    (tmp_path / "checkpoints" / "checkpoint_2.orbax-checkpoint-tmp-123").mkdir()
    reopened = TrainCheckpointer(tmp_path, keep=3)
    assert reopened.latest_step() == 1
    restored, _ = reopened.restore(state_at(0))
    assert int(restored.step) == 1
