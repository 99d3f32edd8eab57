"""The official prompt-tuning code's T5X checkpoints: the whole tree with the prompt inside."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TEST_DATA

import softprompt_jax as sp
from softprompt_jax import cli
from softprompt_jax.checkpoints import official, t5x_legacy
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.train.state_checkpoints import NUMPY_DIR, PROMPT_SIDECAR

T5X_TINY = TEST_DATA / "t5x_tiny" / "checkpoint_3"


@pytest.fixture(scope="module")
def official_run(tmp_path_factory):
    """A model dir as the official code leaves it: the real T5X fixture's weights plus a
    prompt at encoder/prompt/prompt/prompt, written with our T5X writer, two steps."""
    frozen, _ = t5x_legacy.load_t5x_checkpoint(T5X_TINY)
    model_dir = tmp_path_factory.mktemp("official")
    rng = np.random.default_rng(0)
    prompts = {step: rng.normal(size=(5, 4)).astype(np.float32) for step in (1100010, 1100020)}
    for step, prompt in prompts.items():
        official.write_prompt(prompt, model_dir, step, frozen_params=frozen)
    return model_dir, prompts, frozen


def test_the_prompt_sits_at_the_official_path(official_run):
    model_dir, prompts, _ = official_run
    checkpoint = t5x_legacy.open_checkpoint(model_dir / "checkpoint_1100010")
    assert checkpoint.shapes()["encoder/prompt/prompt/prompt"] == (5, 4)
    assert "target.token_embedder.embedding" in {  # the large leaves go to zarr, as T5X writes
        p.name for p in (model_dir / "checkpoint_1100010").iterdir()
    }


def test_load_prompt_reads_a_step_dir_or_the_latest_step(official_run):
    model_dir, prompts, _ = official_run
    np.testing.assert_array_equal(
        sp.load_prompt(model_dir / "checkpoint_1100010"), prompts[1100010]
    )
    np.testing.assert_array_equal(sp.load_prompt(model_dir), prompts[1100020])


def test_the_frozen_model_loads_from_an_official_checkpoint_without_the_prompt(official_run):
    model_dir, _, _ = official_run
    cfg, params = sp.load_pretrained(model_dir / "checkpoint_1100020", dtype="float32")
    _, reference = sp.load_pretrained(T5X_TINY, dtype="float32")
    assert "prompt" not in params["encoder"]
    np.testing.assert_array_equal(
        params["decoder"]["logits_dense"]["kernel"], reference["decoder"]["logits_dense"]["kernel"]
    )


def test_a_prompt_written_alone_in_that_layout_reads_back_equal(tmp_path):
    prompt = np.random.default_rng(1).normal(size=(7, 16)).astype(np.float32)
    official.write_prompt(prompt, tmp_path / "export", 3)
    np.testing.assert_array_equal(sp.load_prompt(tmp_path / "export"), prompt)


def test_a_t5x_checkpoint_without_a_prompt_is_named(tmp_path):
    with pytest.raises(SoftpromptError, match="holds no prompt at 'encoder/prompt/prompt/prompt'"):
        sp.load_prompt(T5X_TINY)


def test_export_writes_the_official_layout_and_it_reads_back(tmp_path):
    """`softprompt-jax export --t5x`: a run's prompt as an official checkpoint, with the frozen
    weights when asked; our loaders read both parts back."""
    run = tmp_path / "run"
    sidecar = run / NUMPY_DIR / "checkpoint_40" / PROMPT_SIDECAR
    sidecar.parent.mkdir(parents=True)
    prompt = np.random.default_rng(2).normal(size=(5, 4)).astype(np.float32)
    with open(sidecar, "wb") as file:  # the official sidecar: .npy content, no suffix
        np.save(file, prompt)
    out = tmp_path / "exported"
    argv = ["export", f"--model_dir={run}", f"--output={out}", "--t5x"]
    assert cli.main([*argv, f"--frozen_checkpoint={T5X_TINY}"]) == 0
    np.testing.assert_array_equal(sp.load_prompt(out), prompt)
    _, params = sp.load_pretrained(out / "checkpoint_40", dtype="float32")
    _, reference = sp.load_pretrained(T5X_TINY, dtype="float32")
    np.testing.assert_array_equal(
        params["token_embedder"]["embedding"], reference["token_embedder"]["embedding"]
    )
    assert (
        cli.main(
            [
                "export",
                f"--model_dir={run}",
                f"--output={tmp_path / 'x'}",
                f"--frozen_checkpoint={T5X_TINY}",
            ]
        )
        == 2
    )
