"""Prompt ensembles (votes and mean scores) and reading a prompt back as vocabulary pieces."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
from conftest import TEST_DATA

import softprompt_jax as sp
from softprompt_jax.ensembles import ensemble_predict, ensemble_scores, majority
from softprompt_jax.inference import predict_tokens
from softprompt_jax.prompt_bank import PromptBank
from softprompt_jax.reading import nearest_tokens, prompt_similarity

CFG = sp.get_config("t5_1_1_tiny").replace(vocab_size=64, emb_dim=32, num_heads=2, head_dim=16)
TOKENS = jnp.array([[5, 9, 1, 0], [7, 3, 8, 1], [4, 1, 0, 0], [6, 6, 2, 1]], jnp.int32)


@pytest.fixture(scope="module")
def params():
    return sp.init_params(CFG, 0)


def prompt(params, seed: int, length: int = 4):
    return sp.init_prompt("random_uniform", length, params=params, seed=seed, scale=3.0)


def test_majority_takes_the_most_frequent_answer_and_the_earliest_on_ties():
    a, b, c = [1, 2], [3, 4], [5, 6]
    assert majority(np.array([a, b, b])).tolist() == b
    assert majority(np.array([a, b])).tolist() == a  # a tie: the earliest member
    assert majority(np.array([c, a, b, a, b])).tolist() == a  # a, b tie; a came first
    assert majority(np.array([c, a, b])).tolist() == c


@pytest.mark.parametrize("members", [(0, 1), (0, 1, 0), (2, 1, 1), (0, 1, 2)])
def test_votes_equal_the_majority_of_members_decoded_one_by_one(params, members):
    # The same seed gives the same prompt, so repeated seeds make a real majority.
    prompts = {f"m{k}": prompt(params, seed, length=3 + seed) for k, seed in enumerate(members)}
    bank = PromptBank.from_arrays(prompts)
    per_member, vote = ensemble_predict(CFG, params, bank, TOKENS, max_length=5)
    alone = np.stack(
        [np.asarray(predict_tokens(CFG, params, p, TOKENS, max_length=5)) for p in prompts.values()]
    )
    np.testing.assert_array_equal(per_member, alone)
    for i in range(len(TOKENS)):
        rows = [tuple(r) for r in alone[:, i].tolist()]
        best = max(rows.count(r) for r in rows)
        expected = next(r for r in rows if rows.count(r) == best)
        assert tuple(vote[i].tolist()) == expected


def test_mean_score_ensemble_equals_the_hand_computed_mean(params):
    bank = PromptBank.from_arrays({f"m{k}": prompt(params, k, length=2 + k) for k in range(3)})
    targets = jnp.array([[3, 1], [4, 1], [5, 1], [3, 1]], jnp.int32)
    batch = {
        "encoder_input_tokens": TOKENS,
        "decoder_input_tokens": jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1],
        "decoder_target_tokens": targets,
    }
    members, mean = ensemble_scores(CFG, params, bank, batch)
    by_hand = np.stack([np.asarray(sp.score_batch(CFG, params, p, batch)) for p in bank.prompts])
    np.testing.assert_allclose(members, by_hand, atol=1e-5)
    np.testing.assert_allclose(mean, by_hand.mean(axis=0), atol=1e-5)


def test_nearest_tokens_equal_a_brute_force_cosine_over_the_embedding_table():
    vocab = spm.SentencePieceProcessor(model_file=str(TEST_DATA / "t5_vocab" / "spiece.model"))
    rng = np.random.default_rng(0)
    table = rng.normal(size=(32128, 16)).astype(np.float32)  # padded past the 32,000 pieces
    table[32050] = table[1234] * 5  # a padding row that must never be a candidate
    params = {"token_embedder": {"embedding": jnp.asarray(table)}}
    query = np.stack([table[1234] * 2 + 0.01, table[77], rng.normal(size=16)]).astype(np.float32)
    found = nearest_tokens(query, params, vocab, k=4)

    known = table[:32000].astype(np.float64)
    cosine = (query @ known.T) / np.outer(
        np.linalg.norm(query, axis=1), np.linalg.norm(known, axis=1)
    )
    for row, expected in zip(found, cosine, strict=True):
        best = np.argsort(-expected)[:4]
        assert [piece for piece, _ in row] == [vocab.id_to_piece(int(i)) for i in best]
        np.testing.assert_allclose([value for _, value in row], expected[best], atol=1e-5)
    assert found[0][0][0] == vocab.id_to_piece(1234) and found[1][0][0] == vocab.id_to_piece(77)


def test_prompt_similarity_is_the_mean_best_match_over_positions():
    a = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    b = np.array([[1.0, 1.0], [1.0, 0.0], [-1.0, 0.0]], np.float32)
    matrix = prompt_similarity(PromptBank.from_arrays({"a": a, "b": b}))
    # a's rows: best cosine with b's rows is 1 (row [1,0]) and 1/sqrt(2) (row [1,1]).
    assert matrix[0, 1] == pytest.approx((1 + 2**-0.5) / 2)
    # b's rows: [1,1] -> 1/sqrt(2), [1,0] -> 1, [-1,0] -> 0 (with [0,1]).
    assert matrix[1, 0] == pytest.approx((2**-0.5 + 1 + 0) / 3)
    np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-6)
