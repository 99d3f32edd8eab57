"""Rank-classification scoring with one encoder pass per input, and length-bucketed batches.

The reference for every score is the teacher-forced model on one (input, candidate) row
(`prompted_logits`, the path training uses), so sharing the encoder pass or padding to
another length must not change a number.
"""

from __future__ import annotations

import contextlib
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf
from conftest import TINY
from softprompt_jax.tasks import demo, evaluation, metrics
from softprompt_jax.tasks.postprocessors import as_text
from softprompt_jax.tasks.rank_classification import (
    RankClassificationMetric,
    expand_to_candidates,
    rank_classification_postprocessor,
)

import softprompt_jax as sp
from softprompt_jax import batching, infer_rows, inference, losses, prompt_eval, t5_prefixes
from softprompt_jax.prompts import prompted_logits

BANK_LENGTHS = {"a": 3, "b": 5, "c": 2}  # a bank of prompts of different lengths


@pytest.fixture(scope="module")
def params() -> dict:
    return sp.init_params(TINY, 0)


@pytest.fixture(scope="module")
def bank() -> sp.PromptBank:
    rng = np.random.default_rng(1)
    return sp.PromptBank.from_arrays(
        {
            name: rng.normal(size=(n, TINY.emb_dim)).astype(np.float32)
            for name, n in BANK_LENGTHS.items()
        }
    )


LENGTH = 64  # inputs length (buckets of 32 and 64)
TARGETS = 4  # candidates length


def random_ids(rng: np.random.Generator, length: int) -> np.ndarray:
    """Token ids (no padding), EOS last."""
    return np.append(rng.integers(2, TINY.vocab_size, size=length - 1), 1).astype(np.int32)


def padded(rows, length: int) -> np.ndarray:
    return np.stack([np.pad(row, (0, length - len(row))) for row in rows]).astype(np.int32)


@contextlib.contextmanager
def lowerings():
    """The programs JAX lowers meanwhile: one per call that misses every in-memory cache."""
    events = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def reference_scores(params, bank, pairs, ids) -> np.ndarray:
    """Each (input, candidate) of `pairs` in its own row of the plain prompted model, the
    path training takes: summed target log-likelihood per row (12 rows: one compiled shape)."""
    encoder = padded([x for x, _ in pairs], LENGTH)
    targets = padded([t for _, t in pairs], TARGETS)
    logits = prompted_logits(
        TINY,
        params,
        bank,
        jnp.asarray(encoder),
        jnp.asarray(np.pad(targets[:, :-1], ((0, 0), (1, 0)))),
        jnp.asarray(ids, jnp.int32),
        decoder_target_tokens=jnp.asarray(targets),
    )
    token_loss, _ = losses.token_cross_entropy(logits, jnp.asarray(targets))
    return -np.sum(np.asarray(token_loss) * (targets > 0), axis=-1)


def test_score_candidates_equals_each_candidate_scored_alone(params, bank):
    rng = np.random.default_rng(0)
    inputs = [random_ids(rng, n) for n in (7, 3, 60, 5)]
    candidates = [[random_ids(rng, n) for n in (2, 4, 3)] for _ in inputs]
    ids = [2, 0, 1, 2]  # a mixed batch of a ragged bank
    scores = sp.score_candidates(
        TINY,
        params,
        bank,
        jnp.asarray(padded(inputs, LENGTH)),
        jnp.asarray(np.stack([padded(each, TARGETS) for each in candidates])),
        jnp.asarray(ids),
    )
    pairs = [(x, c) for x, each in zip(inputs, candidates) for c in each]
    expected = reference_scores(params, bank, pairs, np.repeat(ids, 3))
    np.testing.assert_allclose(np.asarray(scores).ravel(), expected, rtol=0, atol=1e-5)


def test_score_candidates_of_a_t5_prefix_equal_its_rows_scored_one_by_one(params):
    prefix = t5_prefixes.init_t5_prefix(TINY, 3, mode="peft")
    rng = np.random.default_rng(7)
    inputs = padded([random_ids(rng, n) for n in (7, 3)], LENGTH)
    candidates = np.stack([padded([random_ids(rng, n) for n in (2, 4)], TARGETS)] * 2)
    scores = sp.score_candidates(TINY, params, prefix, inputs, candidates)
    targets = candidates.reshape(4, TARGETS)
    rows = batching.t5x_features(
        np.repeat(inputs, 2, axis=0),
        targets,
        None,
        inputs_length=LENGTH,
        targets_length=TARGETS,
        batch_size=4,
    )
    expected = losses.score_batch(TINY, params, prefix, rows)
    np.testing.assert_allclose(np.asarray(scores).ravel(), expected, rtol=0, atol=1e-5)
    with pytest.raises(sp.errors.SoftpromptError, match=r"candidates \(4, 4\)$"):
        sp.score_candidates(TINY, params, prefix, inputs, targets)


def test_t5x_features_are_seqios_unpacked_features():
    examples = [
        {"inputs": np.asarray([5, 6, 7, 1]), "targets": np.asarray([8, 9, 1])},
        {"inputs": np.asarray([10, 11, 12, 13, 14, 15, 1]), "targets": np.asarray([3, 1])},
    ]
    lengths = {"inputs": 8, "targets": 4}
    expected, _ = next(evaluation.t5x_batches(examples, lengths, batch_size=3))
    features = batching.t5x_features(
        [ex["inputs"] for ex in examples],
        [ex["targets"] for ex in examples],
        None,
        inputs_length=8,
        targets_length=4,
        batch_size=3,
    )
    assert features.keys() == expected.keys()
    for name, array in expected.items():
        np.testing.assert_array_equal(features[name], array, err_msg=name)


def test_a_batch_sharing_its_inputs_scores_as_before_with_fewer_encoder_rows(params, bank):
    rng = np.random.default_rng(2)
    inputs = [random_ids(rng, n) for n in (6, 40, 3)]
    # Candidates of 3 inputs; input 1 also under another prompt; one all-padding row.
    rows = [(0, 0), (0, 0), (1, 1), (1, 1), (1, 2), (1, 2), (2, 0), (2, 0), (2, 0), (0, 0)]
    pairs = [(inputs[x], random_ids(rng, 3)) for x, _ in rows] + [(np.zeros(0), np.zeros(0))]
    ids = [i for _, i in rows] + [0]
    encoder, targets = padded([x for x, _ in pairs], LENGTH), padded([t for _, t in pairs], TARGETS)
    batch = {
        "encoder_input_tokens": np.pad(encoder, ((0, 1), (0, 0))),  # 12 rows, 2 of padding
        "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 1), (1, 0))),
        "decoder_target_tokens": np.pad(targets, ((0, 1), (0, 0))),
        "decoder_loss_weights": np.pad(targets > 0, ((0, 1), (0, 0))).astype(np.int32),
        "prompt_ids": np.asarray(ids + [0], np.int32),
    }
    shared = batching.share_encoder_rows(batch)
    assert shared["encoder_input_tokens"].shape == (4, LENGTH)  # 4 distinct (input, prompt)
    np.testing.assert_array_equal(shared["prompt_ids"], [0, 1, 2, 0])
    np.testing.assert_array_equal(shared["encoder_index"], [0, 0, 1, 1, 2, 2, 3, 3, 3, 0, 0, 0])
    as_arrays = lambda b: {k: jnp.asarray(v) for k, v in b.items()}
    plain = np.asarray(sp.score_batch(TINY, params, bank, as_arrays(batch)))
    once = np.asarray(sp.score_batch(TINY, params, bank, as_arrays(shared)))
    expected = reference_scores(params, bank, pairs + pairs[-1:], ids + [0])
    np.testing.assert_allclose(plain[:10], expected[:10], rtol=0, atol=1e-5)
    np.testing.assert_allclose(once[:10], expected[:10], rtol=0, atol=1e-5)
    distinct = {**batch, "prompt_ids": np.arange(12, dtype=np.int32) % 3}
    distinct["encoder_input_tokens"] = padded([random_ids(rng, 4) for _ in range(12)], LENGTH)
    assert batching.share_encoder_rows(distinct).keys() == distinct.keys()  # nothing shared


def test_bucket_lengths_halve_down_to_the_minimum():
    assert batching.bucket_lengths(512, 4) == (64, 128, 256, 512)
    assert batching.bucket_lengths(100, 4) == (32, 56, 100)
    assert batching.bucket_lengths(512, 1) == (512,)
    assert batching.bucket_lengths(20, 4) == (20,)
    with pytest.raises(sp.errors.SoftpromptError, match="got 0"):
        batching.bucket_lengths(512, 0)


def test_candidate_scores_in_buckets_equal_each_scored_alone_in_order(params, bank):
    rng = np.random.default_rng(3)
    inputs = [random_ids(rng, n) for n in (50, 9, 64, 20, 33)]
    candidates = [[random_ids(rng, 4 - k % 2) for k in range(2 + i % 2)] for i in range(5)]
    ids = [1, 0, 2, 2, 1]
    shapes = []
    score_candidates = inference.score_candidates

    def recording(cfg, params, prompt, inputs, candidates, prompt_ids=None):
        shapes.append((inputs.shape, candidates.shape))
        return score_candidates(cfg, params, prompt, inputs, candidates, prompt_ids)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inference, "score_candidates", recording)  # records each batch's shape
        scores = inference.candidate_scores(
            TINY, params, bank, inputs, candidates, ids, batch_size=8, length_buckets=4
        )
    pairs = [(x, c) for x, each in zip(inputs, candidates) for c in each]
    expected = reference_scores(
        params, bank, pairs, [i for i, each in zip(ids, candidates) for _ in each]
    )
    assert [len(each) for each in scores] == [len(each) for each in candidates]
    np.testing.assert_allclose(np.concatenate(scores), expected, rtol=0, atol=1e-5)
    # Batches of 8 // 3 = 2 inputs with all their (up to 3) candidates, in buckets 32 and 64.
    assert sorted(shapes) == [((2, 32), (2, 3, 4))] + [((2, LENGTH), (2, 3, 4))] * 2
    with lowerings() as lowered:  # the same call again reuses every compiled program
        again = inference.candidate_scores(
            TINY, params, bank, inputs, candidates, ids, batch_size=8, length_buckets=4
        )
    assert lowered == []
    np.testing.assert_array_equal(np.concatenate(again), np.concatenate(scores))


def test_bucketed_infer_keeps_the_input_order_and_the_predictions(params, bank):
    rng = np.random.default_rng(4)
    feature = seqio.Feature(demo.VOCABULARY, add_eos=True)
    rows = []
    for k in range(14):
        text = "".join(rng.choice(list(demo.ALPHABET), size=int(rng.integers(1, 90))))
        tokens, truncated = infer_rows.tokenize(text, feature, LENGTH)
        candidates = ("ab", "c", "abc") if k == 7 else None
        rows.append(
            infer_rows.InferRow(list(BANK_LENGTHS)[k % 3], text, tokens, truncated, candidates)
        )
    shapes = []
    predict_tokens = inference.predict_tokens

    def recording(cfg, params, prompt, tokens, prompt_ids=None, **kwargs):
        shapes.append(tokens.shape)
        return predict_tokens(cfg, params, prompt, tokens, prompt_ids, **kwargs)

    def run(rows, buckets):
        return infer_rows.predict(
            TINY,
            params,
            bank,
            rows,
            feature,
            inputs_length=LENGTH,
            batch_size=4,
            max_length=2,
            length_buckets=buckets,
        )

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inference, "predict_tokens", recording)
        bucketed = run(rows, 4)
    assert set(shapes) == {(4, 32), (4, LENGTH)}  # two buckets: two shapes compile
    assert [p.text for p in bucketed] == [p.text for p in run(rows, 1)]
    assert len({p.text for p in bucketed}) > 3
    for row, got in zip(rows, bucketed, strict=True):  # each row's own answer, alone
        alone = run([row], 1)[0]
        assert got.text == alone.text
        if row.candidates is not None:
            np.testing.assert_allclose(got.scores, alone.scores, rtol=0, atol=1e-5)


def order_fingerprint(targets, predictions) -> dict[str, float]:
    """A metric that changes when any prediction moves to another example."""
    return {"fingerprint": float(zlib.crc32(repr(list(predictions)).encode()))}


@pytest.fixture
def eval_tasks():
    """A rank task and a generation task on inputs of 2 to 90 bytes."""
    rng = np.random.default_rng(5)
    inputs = ["".join(rng.choice(list(demo.ALPHABET), size=n)) for n in rng.integers(2, 90, 8)]
    steps = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]
    rank_steps = [functools.partial(expand_to_candidates, candidates=["a", "bc", "d"]), *steps]
    kinds = {
        "scoring_rank": {
            "preprocessors": rank_steps,
            "postprocess_fn": rank_classification_postprocessor(lambda t, **_: as_text(t)),
            "metric_fns": [RankClassificationMetric((metrics.accuracy, order_fingerprint))],
        },
        "scoring_generate": {"preprocessors": steps, "metric_fns": [order_fingerprint]},
    }
    for name, kind in kinds.items():
        targets = [str(rng.choice(["a", "bc", "d"])) for _ in inputs]
        source = {"inputs": inputs, "targets": targets}
        seqio.TaskRegistry.add(
            name,
            source=seqio.FunctionDataSource(
                lambda split, shuffle_files, seed=None, source=source: (
                    tf.data.Dataset.from_tensor_slices(source)
                ),
                splits=("validation",),
            ),
            output_features=demo.OUTPUT_FEATURES,
            **kind,
        )
    yield list(kinds)
    for name in kinds:
        seqio.TaskRegistry.remove(name)


def test_bucketed_eval_of_mixed_tasks_gives_the_same_metrics(params, bank, eval_tasks):
    evaluate = lambda buckets: prompt_eval.evaluate_tasks(
        TINY,
        params,
        bank,
        {"scoring_rank": 0, "scoring_generate": 2},
        split="validation",
        feature_lengths={"inputs": LENGTH, "targets": TARGETS},
        batch_size=4,
        decode_length=2,  # the infer test's decoding shapes: compiled once
        length_buckets=buckets,
    )
    bucketed, whole = evaluate(4), evaluate(1)
    with lowerings() as lowered:  # the next in-training eval reuses every compiled program
        assert evaluate(4) == bucketed
    assert lowered == []
    assert bucketed.keys() == whole.keys() == set(eval_tasks)
    for task in eval_tasks:
        assert bucketed[task].keys() == whole[task].keys()
        for name, value in whole[task].items():  # fingerprints exact, the loss up to rounding
            tolerance = 1e-5 if name == "loss_per_token" else 0
            assert bucketed[task][name] == pytest.approx(value, rel=tolerance), (task, name)
