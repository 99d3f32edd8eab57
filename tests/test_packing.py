"""Packing: several examples per row (seqio's packing), each with its prompt, as unpacked.

The references are the same examples unpacked, one per row, with the prompt prepended
(`prepend_prompt`): the packed loss, prompt gradient and per-example scores must equal them.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY
from softprompt_jax.tasks import demo
from softprompt_jax.tasks.evaluation import t5x_batches
from softprompt_jax.tasks.packing import packed_batches

import softprompt_jax as sp
from softprompt_jax import commands, prompt_eval
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.losses import LossConfig, prompt_loss, score_batch, weighted_cross_entropy
from softprompt_jax.prompt_bank import PaddedBank
from softprompt_jax.prompt_eval import evaluate_prompt, packed_example_scores, prompted_batches
from softprompt_jax.prompts import prompt_slot_token
from softprompt_jax.train import data
from softprompt_jax.train.data import mixture_task_names, per_task_batches, train_batches
from softprompt_jax.train.trainer import CheckpointConfig, EvalConfig, LogConfig, PromptSpec, train

LENGTHS = {"inputs": 24, "targets": 6}
NUM_EXAMPLES = 10


@pytest.fixture(scope="module")
def params():
    return sp.init_params(TINY, 0)


@pytest.fixture(scope="module")
def examples():
    """Inputs of 1..8 tokens and targets of 1..2 (random ids, no EOS needed): 2-4 a row."""
    rng = np.random.default_rng(0)
    return [
        {
            "inputs": rng.integers(3, TINY.vocab_size, rng.integers(1, 9)).astype(np.int32),
            "targets": rng.integers(3, TINY.vocab_size, rng.integers(1, 3)).astype(np.int32),
        }
        for _ in range(NUM_EXAMPLES)
    ]


@pytest.fixture(scope="module")
def bank():
    """Two prompts of different lengths: the shorter one is padded in an unpacked batch."""
    return sp.PromptBank.from_arrays(
        {
            "a": sp.init_prompt("random_uniform", 3, emb_dim=TINY.emb_dim, seed=2),
            "b": sp.init_prompt("random_uniform", 5, emb_dim=TINY.emb_dim, seed=3),
        }
    )


def unpacked(examples, prompt_ids=None):
    batch, size = next(t5x_batches(examples, LENGTHS, NUM_EXAMPLES))
    assert size == NUM_EXAMPLES
    if prompt_ids is not None:
        batch["prompt_ids"] = np.asarray(prompt_ids, np.int32)
    return {k: jnp.asarray(v) for k, v in batch.items()}


def packed(examples, slots):
    rows, segments = next(packed_batches(examples, LENGTHS, NUM_EXAMPLES, slots))
    assert segments.sum() == NUM_EXAMPLES and segments.max() >= 3
    used = int((segments > 0).sum())
    return {k: jnp.asarray(v[:used]) for k, v in rows.items()}, segments[:used]


def loss_and_grad(prompt, params, batch, normalization="sum"):
    """`prompt_loss` and its prompt gradient, unjitted so shapes compile once for all settings."""
    config = LossConfig(z_loss=1e-4, normalization=normalization, enable_dropout=False)
    (loss, _), grad = jax.value_and_grad(prompt_loss, has_aux=True)(
        prompt, TINY, params, batch, config
    )
    return loss, grad


def test_packed_loss_and_prompt_grad_equal_unpacked(params, examples):
    prompt = sp.init_prompt("random_uniform", 4, emb_dim=TINY.emb_dim, seed=1)
    rows, _ = packed(examples, [(4, prompt_slot_token(0))] * NUM_EXAMPLES)
    for normalization in ("sum", "mean_tokens", "mean_sequences"):
        loss, grad = loss_and_grad(prompt, params, unpacked(examples), normalization)
        packed_loss, packed_grad = loss_and_grad(prompt, params, rows, normalization)
        np.testing.assert_allclose(packed_loss, loss, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(packed_grad, grad, rtol=1e-5, atol=1e-5)
        assert float(jnp.abs(grad).max()) > 1e-3


def t5x_average_per_sequence(logits, targets, weights, segments, z_loss):
    """T5X's `AVERAGE_PER_SEQUENCE` loss written out in numpy (`t5x/losses.py`).

    Each sequence's (a row's, or a packed segment's) token losses times its weights, divided by
    its weight sum (0/0 -> 0, as T5X's `nan_to_num`), summed, then divided by the sum of those
    normalised weights: the number of sequences with weighted tokens.
    """
    log_z = np.log(np.exp(logits).sum(-1))
    target_logit = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    per_token = log_z - target_logit + z_loss * log_z**2
    total = count = 0.0
    for row in range(len(targets)):
        for segment in np.unique(segments[row]):
            here = segments[row] == segment
            weight = weights[row][here]
            if weight.sum() > 0:
                total += (per_token[row][here] * weight).sum() / weight.sum()
                count += 1
    return total / count


def test_mean_sequences_is_t5x_average_per_sequence():
    """Rows of 5, 1, 0 and 3 weighted tokens (fractional weights too): not the token mean."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4, 6, 11)) * np.array([1, 6, 1, 1])[:, None, None]
    targets = rng.integers(1, 11, (4, 6))
    weights = np.zeros((4, 6))
    weights[0, :5] = 1
    weights[1, :1] = 1
    weights[3, :3] = [1.0, 0.5, 2.0]
    rows = np.zeros((4, 6), np.int32)
    packed = np.array([[1, 1, 2, 2, 2, 0]] * 4, np.int32)  # the same tokens as 8 segments
    got = {}
    for name in ("mean_tokens", "mean_sequences"):
        args = (jnp.asarray(logits, jnp.float32), jnp.asarray(targets), jnp.asarray(weights))
        got[name] = float(weighted_cross_entropy(*args, z_loss=1e-4, normalization=name)[0])
        packed_loss, _ = weighted_cross_entropy(
            *args, z_loss=1e-4, normalization=name, segment_ids=jnp.asarray(packed)
        )
        got[name + "_packed"] = float(packed_loss)
    want = t5x_average_per_sequence(logits, targets, weights, rows, 1e-4)
    assert got["mean_sequences"] == pytest.approx(want, rel=1e-5)
    assert abs(got["mean_tokens"] - want) > 0.1  # the batch tells the two apart
    want_packed = t5x_average_per_sequence(logits, targets, weights, packed, 1e-4)
    assert got["mean_sequences_packed"] == pytest.approx(want_packed, rel=1e-5)
    assert abs(want_packed - want) > 0.1


def test_bank_of_different_lengths_packs_each_segment_with_its_prompt(params, examples, bank):
    ids = [i % 2 for i in range(NUM_EXAMPLES)]
    slots = [(bank.lengths[i], prompt_slot_token(i)) for i in ids]
    rows, _ = packed(examples, slots)
    loss, grad = loss_and_grad(bank, params, unpacked(examples, ids))
    packed_loss, packed_grad = loss_and_grad(bank, params, rows)
    np.testing.assert_allclose(packed_loss, loss, rtol=1e-5, atol=1e-5)
    for got, want in zip(packed_grad.prompts, grad.prompts, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert float(jnp.abs(want).max()) > 1e-3
    # The same bank padded as a server holds it (PaddedBank): the same packed loss.
    config = LossConfig(z_loss=1e-4, normalization="sum", enable_dropout=False)
    served, _ = prompt_loss(PaddedBank(*bank.padded()), TINY, params, rows, config)
    np.testing.assert_allclose(served, loss, rtol=1e-5, atol=1e-5)


def test_plain_array_bank_packs_and_scores_as_unpacked(params, examples):
    """A bank given as a plain `[N, P, d]` array (numpy for the scores): packed as unpacked."""
    stacked = np.stack(
        [sp.init_prompt("random_uniform", 4, emb_dim=TINY.emb_dim, seed=s) for s in (2, 3)]
    )
    ids = [i % 2 for i in range(NUM_EXAMPLES)]
    rows, _ = packed(examples, [(4, prompt_slot_token(i)) for i in ids])
    batch = unpacked(examples, ids)
    loss, grad = loss_and_grad(jnp.asarray(stacked), params, batch)
    packed_loss, packed_grad = loss_and_grad(jnp.asarray(stacked), params, rows)
    np.testing.assert_allclose(packed_loss, loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed_grad, grad, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(grad).max(axis=(1, 2)).min()) > 1e-3  # both prompts are used
    got = packed_example_scores(TINY, params, stacked, examples, ids, LENGTHS, batch_size=4)
    want = score_batch(TINY, params, jnp.asarray(stacked), batch)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_packed_example_scores_are_each_examples_score_with_its_prompt(params, examples, bank):
    ids = [(i // 3) % 2 for i in range(NUM_EXAMPLES)]
    batch, size = next(prompted_batches(examples, ids, LENGTHS, NUM_EXAMPLES))
    want = score_batch(TINY, params, bank, {k: jnp.asarray(v) for k, v in batch.items()})
    got = packed_example_scores(TINY, params, bank, examples, ids, LENGTHS, batch_size=2)
    assert got.shape == (NUM_EXAMPLES,)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def slot_free_segments(row: dict, prompt_length: int) -> list[tuple[list[int], list[int]]]:
    """The (inputs without slots, targets) of a packed row's segments, checking the slots."""
    segments = []
    for segment in range(1, int(row["encoder_segment_ids"].max()) + 1):
        inputs = row["encoder_input_tokens"][row["encoder_segment_ids"] == segment]
        targets = row["decoder_target_tokens"][row["decoder_segment_ids"] == segment]
        assert (inputs[:prompt_length] == inputs[0]).all() and inputs[0] > 0
        segments.append((inputs[0], list(inputs[prompt_length:]), list(targets)))
    return segments


def test_train_batches_pack_seqios_stream_with_prompt_slots():
    demo.register_demo_tasks()
    lengths = {"inputs": 32, "targets": 8}
    plain = train_batches("demo_max", lengths, 8, seed=3)
    rows = next(train_batches("demo_max", lengths, 2, seed=3, pack_prompt_length=5))
    assert rows["encoder_input_tokens"].shape == (2, 37)
    segments = [s for r in range(2) for s in slot_free_segments(_row(rows, r), 5)]
    assert {token for token, _, _ in segments} == {prompt_slot_token(0)}
    stream = [
        (list(ex[ex > 0]), list(t[t > 0]))
        for batch in (next(plain), next(plain))
        for ex, t in zip(batch["encoder_input_tokens"], batch["decoder_target_tokens"])
    ]
    assert len(segments) > 2
    assert [(i, t) for _, i, t in segments] == stream[: len(segments)]


def test_per_task_batches_pack_each_example_with_its_tasks_slots():
    demo.register_demo_tasks()
    lengths = {"inputs": 32, "targets": 8}
    rows = next(per_task_batches("demo_mixture", lengths, 4, seed=0, pack_prompt_lengths=[2, 3, 4]))
    assert rows["encoder_input_tokens"].shape == (4, 36) and "prompt_ids" not in rows
    names = [name.removeprefix("demo_") for name in mixture_task_names("demo_mixture")]
    seen = set()
    for r in range(4):
        row = _row(rows, r)
        for segment in range(1, int(row["encoder_segment_ids"].max()) + 1):
            inputs = row["encoder_input_tokens"][row["encoder_segment_ids"] == segment]
            index = int(inputs[0]) - prompt_slot_token(0)
            length = [2, 3, 4][index]
            assert (inputs[:length] == inputs[0]).all()
            word = bytes(int(t) - 3 for t in inputs[length:-1]).decode()
            assert word.startswith(names[index] + ":")
            seen.add(index)
    assert seen == {0, 1, 2}


def _row(batch: dict, r: int) -> dict:
    return {name: array[r] for name, array in batch.items()}


def test_packed_rows_refuse_a_kept_prompt_without_dropout(params, examples):
    prompt = sp.init_prompt("random_uniform", 4, emb_dim=TINY.emb_dim, seed=1)
    rows, _ = packed(examples, [(4, prompt_slot_token(0))] * NUM_EXAMPLES)
    with pytest.raises(SoftpromptError, match="prompt_dropout"):
        prompt_loss(
            prompt, TINY, params, rows, LossConfig(prompt_dropout=False), jax.random.PRNGKey(0)
        )


def test_packed_training_run_and_eval_score_as_unpacked(tmp_path, monkeypatch):
    demo.register_demo_tasks()
    packed_calls = []
    for module, name in ((data, "_packed_batches"), (prompt_eval, "packed_example_scores")):
        original = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda *a, f=original, n=name, **k: packed_calls.append(n) or f(*a, **k)
        )
    sp.save_pretrained(tmp_path / "model", TINY, sp.init_params(TINY, 0))
    result = train(
        model_dir=str(tmp_path / "run"),
        checkpoint_path=str(tmp_path / "model"),
        task="demo_max",
        feature_lengths={"inputs": 24, "targets": 8},
        train_steps=2,
        batch_size=2,
        prompt=PromptSpec(method="random_uniform", length=3),
        loss=LossConfig(enable_dropout=False),
        dtype="float32",
        evaluation=EvalConfig(max_examples=4, pack=True),
        checkpointing=CheckpointConfig(period=2),
        logging=LogConfig(period=1, tensorboard=False),
        pack=True,
    )
    assert np.isfinite(result.train_loss)
    stream = train_batches(
        "demo_max", {"inputs": 24, "targets": 8}, 2, seed=0, pack_prompt_length=3
    )
    segments = [float(next(stream)["encoder_segment_ids"].max(axis=1).sum()) for _ in range(2)]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    logged = [r["examples_per_step"] for r in records if r["kind"] == "train"]
    assert logged == segments and max(segments) > 2  # examples, not the 2 rows, are counted
    assert set(packed_calls) == {"_packed_batches", "packed_example_scores"}
    unpacked_metrics = evaluate_prompt(
        TINY,
        params=sp.init_params(TINY, 0),
        prompt=result.prompt,
        task="demo_max",
        split="validation",
        feature_lengths=None,
        batch_size=2,
        max_examples=4,
    )
    sp.save_prompt(result.prompt, tmp_path / "prompt.npy")
    evaluated = commands.evaluate(  # the `eval` command with PACK=True
        checkpoint_path=str(tmp_path / "model"),
        task="demo_max",
        output_dir=str(tmp_path / "eval"),
        prompt_file=str(tmp_path / "prompt.npy"),
        batch_size=2,
        max_examples=4,
        dtype="float32",
        pack=True,
    )
    assert packed_calls.count("packed_example_scores") == 2
    for metrics in (result.eval_metrics, evaluated):
        assert metrics.keys() == unpacked_metrics.keys()
        for name, value in unpacked_metrics.items():
            assert metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
