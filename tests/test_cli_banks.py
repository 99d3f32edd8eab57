"""One frozen model, many prompts, through the command line: banks in eval and infer, the
user's own inputs (JSON lines, candidates), ensembles, beam search, and `inspect`."""

from __future__ import annotations

import functools
import json
import zlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf
from conftest import TEST_DATA, TINY
from softprompt_jax.tasks import demo, metrics
from softprompt_jax.tasks.postprocessors import as_text
from softprompt_jax.tasks.rank_classification import (
    RankClassificationMetric,
    expand_to_candidates,
    rank_classification_postprocessor,
)

import softprompt_jax as sp
from softprompt_jax import cli, commands
from softprompt_jax.inference import ids_to_texts, predict_tokens
from softprompt_jax.prompt_bank import PromptBank
from softprompt_jax.reading import nearest_tokens, prompt_similarity

EVAL_FILES = ["--gin_file=models/t5_1_1_tiny.gin", "--gin_file=runs/prompt_eval.gin"]
INFER_FILES = ["--gin_file=models/t5_1_1_tiny.gin", "--gin_file=runs/prompt_infer.gin"]
WORDS = demo.random_words(6, seed=7)
INPUTS = [f"max: {word}" for word in WORDS]
# Tasks on the demo's words with targets of different lengths (so each decodes its own
# length), listed by name as a seqio mixture lists them; a prompt of each task's name.
TASKS = {
    "banks_a": ("max", [max(word) for word in WORDS]),
    "banks_b": ("rev", [word[::-1] for word in WORDS]),
    "banks_c": ("two", [word[:2] for word in WORDS]),
}
A, B, C = TASKS
MIXTURE = "banks_mixture"
VOTE_TASK = "banks_vote"  # generation on INPUTS; the tests set its targets
RANK_TASK = "banks_vote_rank"  # rank classification on INPUTS; the tests set its candidates
FEATURE_LENGTHS = {"inputs": 16, "targets": 4}
LENGTHS = repr(FEATURE_LENGTHS)
TRUNCATING = "{'inputs': 10, 'targets': 4}"  # "max: abcd" + EOS (10 bytes) fits, longer is cut


def fingerprint(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """A checksum of the predicted texts: equal metrics then mean equal predictions."""
    return {"fingerprint": float(zlib.crc32("\0".join(predictions).encode()))}


@pytest.fixture(scope="module")
def params() -> dict:
    return sp.init_params(TINY, 0)


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory) -> dict[str, Path]:
    """A prompt file per task and per ensemble member, of different lengths."""
    folder = tmp_path_factory.mktemp("prompts")
    files = {}
    for seed, name in enumerate([*TASKS, "m0", "m1", "m2"]):
        prompt = np.random.default_rng(seed).normal(size=(3 + seed % 3, TINY.emb_dim))
        files[name] = sp.save_prompt(prompt.astype(np.float32), folder / f"{name}.npy")
    return files


@pytest.fixture(scope="module")
def bank_file(prompt_files, tmp_path_factory) -> Path:
    """The tasks' prompts and one more, as one safetensors bank file."""
    names = [*TASKS, "m0"]
    bank = PromptBank.from_files({name: prompt_files[name] for name in names})
    return bank.save(tmp_path_factory.mktemp("bank") / "bank.safetensors")


def add_task(
    name: str,
    targets: Sequence[str],
    candidates: Sequence[str] | None = None,
    inputs: Sequence[str] = INPUTS,
) -> str:
    """(Re)register a task with these inputs and targets; with `candidates`, a rank task."""

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices({"inputs": inputs, "targets": list(targets)})

    steps = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]
    kind = {"metric_fns": [metrics.accuracy, fingerprint]}
    if candidates is not None:
        steps.insert(0, functools.partial(expand_to_candidates, candidates=candidates))
        kind = {
            "postprocess_fn": rank_classification_postprocessor(lambda t, **_: as_text(t)),
            "metric_fns": [RankClassificationMetric((metrics.accuracy,))],
        }
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(dataset_fn, splits=("validation",)),
        preprocessors=steps,
        output_features=demo.OUTPUT_FEATURES,
        **kind,
    )
    return name


@pytest.fixture(scope="module", autouse=True)
def test_tasks():
    """The tasks, their mixture, and a task on `INPUTS` (its targets unknown yet)."""
    for name, (prefix, targets) in TASKS.items():
        add_task(name, targets, inputs=[f"{prefix}: {word}" for word in WORDS])
    seqio.MixtureRegistry.add(MIXTURE, list(TASKS), default_rate=1.0)
    add_task(VOTE_TASK, ["?"] * len(INPUTS))
    yield
    seqio.MixtureRegistry.remove(MIXTURE)
    for name in [*TASKS, VOTE_TASK, RANK_TASK]:
        seqio.TaskRegistry.remove(name)


@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if a command gets as far as loading the model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was found")

    monkeypatch.setattr(commands, "load_pretrained", refuse)


def flags(model: Path, **macros) -> list[str]:
    return [f"--gin.INITIAL_CHECKPOINT_PATH='{model}'"] + [
        f"--gin.{name}={value}" for name, value in macros.items()
    ]


def eval_metrics(capsys, model: Path, out: Path, **macros) -> dict:
    """`eval` with these macros (strings, numbers or a PROMPTS dict); its metrics.json."""
    macros = {name: repr(_plain(value)) for name, value in macros.items()}
    assert (
        cli.main(["eval", *EVAL_FILES, *flags(model, EVAL_OUTPUT_DIR=repr(str(out)), **macros)])
        == 0
    )
    capsys.readouterr()
    return json.loads((out / "metrics.json").read_text())


def infer_lines(capsys, model: Path, out: Path, lengths: str = LENGTHS, **macros) -> list[dict]:
    """`infer` with these macros; the lines it wrote."""
    macros = {name: repr(_plain(value)) for name, value in macros.items()}
    argv = flags(model, INFER_OUTPUT_FILE=repr(str(out)), TASK_FEATURE_LENGTHS=lengths, **macros)
    assert cli.main(["infer", *INFER_FILES, *argv]) == 0
    capsys.readouterr()
    return read_jsonl(out)


def _plain(value):
    """Paths as strings, also inside a PROMPTS dict, so `repr` writes a gin literal."""
    if isinstance(value, dict):
        return {name: _plain(item) for name, item in value.items()}
    return str(value) if isinstance(value, Path) else value


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path: Path, lines: Sequence[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def percent_equal(predicted: Sequence, expected: Sequence) -> float:
    """What the tasks' accuracy metric gives: the percentage of equal pairs."""
    return 100.0 * float(np.mean([p == e for p, e in zip(predicted, expected, strict=True)]))


def majority(answers: Sequence) -> object:
    """The most frequent answer; ties go to the earliest member's."""
    counts = Counter(answers)
    return next(answer for answer in answers if counts[answer] == max(counts.values()))


# --- eval with a bank -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def alone(frozen_model, prompt_files, tmp_path_factory) -> dict[str, dict]:
    """Each demo task's metrics with its own prompt file (PROMPT_FILE), one eval each."""
    results = {}
    for task in TASKS:
        out = tmp_path_factory.mktemp(f"alone_{task}")
        macros = {
            "MIXTURE_OR_TASK_NAME": task,
            "PROMPT_FILE": prompt_files[task],
            "EVAL_EXAMPLES": 6,
            "BATCH_SIZE": 4,
        }
        argv = flags(frozen_model, EVAL_OUTPUT_DIR=repr(str(out)))
        argv += [f"--gin.{name}={_plain(value)!r}" for name, value in macros.items()]
        assert cli.main(["eval", *EVAL_FILES, *argv]) == 0
        results[task] = json.loads((out / "metrics.json").read_text())["metrics"]
    return results


def assert_same_metrics(got: dict, expected: dict) -> None:
    assert set(got) == {"accuracy", "fingerprint", "loss_per_token"} == set(expected)
    assert got["fingerprint"] == expected["fingerprint"]  # the same predictions
    assert got["accuracy"] == expected["accuracy"]
    assert got["loss_per_token"] == pytest.approx(expected["loss_per_token"], rel=1e-5)


@pytest.mark.parametrize("as_file", [False, True], ids=["dict", "bank_file"])
def test_eval_of_a_mixture_scores_each_task_with_its_prompt(
    frozen_model, prompt_files, bank_file, alone, tmp_path, capsys, as_file
):
    prompts = bank_file if as_file else {task: prompt_files[task] for task in TASKS}
    out = tmp_path / "eval"
    record = eval_metrics(
        capsys,
        frozen_model,
        out,
        MIXTURE_OR_TASK_NAME=MIXTURE,
        PROMPTS=prompts,
        EVAL_EXAMPLES=6,
        BATCH_SIZE=4,  # 18 examples interleaved: every batch mixes the tasks
    )
    assert record["task"] == MIXTURE and set(record["metrics"]) == set(TASKS)
    for task in TASKS:
        assert_same_metrics(record["metrics"][task], alone[task])
    lines = read_jsonl(out / "metrics.jsonl")
    assert [line["task"] for line in lines] == list(TASKS)
    for line in lines:
        assert line["accuracy"] == alone[line["task"]]["accuracy"]
    # Different losses show that each task really ran with its own prompt.
    assert len({alone[task]["loss_per_token"] for task in TASKS}) == len(TASKS)


def test_eval_of_one_task_uses_the_prompt_of_its_name(
    frozen_model, bank_file, alone, tmp_path, capsys
):
    record = eval_metrics(
        capsys,
        frozen_model,
        tmp_path / "eval",
        MIXTURE_OR_TASK_NAME=B,
        PROMPTS=bank_file,
        EVAL_EXAMPLES=6,
        BATCH_SIZE=4,
    )
    assert list(record["metrics"]) == [B]
    assert_same_metrics(record["metrics"][B], alone[B])


def test_eval_decodes_each_task_to_its_own_targets_length(
    frozen_model, prompt_files, alone, tmp_path, capsys
):
    """Full-length eval decodes as many tokens as the task's longest target: its predictions
    (seen through their fingerprint) are those of infer at that length."""
    for task, (_, targets) in TASKS.items():
        longest = max(len(target) for target in targets) + 1  # bytes and EOS
        lines = infer_lines(
            capsys,
            frozen_model,
            tmp_path / f"{task}.jsonl",
            f"{{'inputs': 16, 'targets': {longest}}}",
            PROMPT_FILE=prompt_files[task],
            MIXTURE_OR_TASK_NAME=task,
        )
        predictions = [line["prediction"] for line in lines]
        assert alone[task]["fingerprint"] == fingerprint(targets, predictions)["fingerprint"]


# --- infer on the user's own inputs ---------------------------------------------------------


def mixed_lines() -> list[dict]:
    """Inputs of the three tasks in turn (so every batch mixes prompts); some long ones."""
    words = demo.random_words(9, seed=3) + ["abcdefgh" * 2]
    return [
        {"prompt": task, "inputs": f"{TASKS[task][0]}: {word}"}
        for task, word in zip([A, B, C] * 4, words)
    ]


def test_infer_mixing_prompts_equals_one_infer_per_prompt(
    frozen_model, prompt_files, bank_file, tmp_path, capsys
):
    lines = mixed_lines()
    inputs = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    argv = flags(
        frozen_model,
        PROMPTS=repr(str(bank_file)),
        INFER_INPUT_FILE=repr(str(inputs)),
        MIXTURE_OR_TASK_NAME="'demo_max'",  # its vocabulary tokenizes the text
        INFER_OUTPUT_FILE=repr(str(out)),
        TASK_FEATURE_LENGTHS=TRUNCATING,
        BATCH_SIZE=4,
    )
    assert cli.main(["infer", *INFER_FILES, *argv]) == 0
    mixed = read_jsonl(out)
    assert [(line["prompt"], line["inputs"]) for line in mixed] == [
        (line["prompt"], line["inputs"]) for line in lines
    ]
    cut = [len(line["inputs"].encode()) + 1 > 10 for line in lines]
    assert [line["truncated"] for line in mixed] == cut and 0 < sum(cut) < len(cut)
    assert (
        f"{sum(cut)} of {len(lines)} examples had inputs longer than 10" in capsys.readouterr().out
    )

    for task in TASKS:
        own = [line for line in lines if line["prompt"] == task]
        alone = infer_lines(
            capsys,
            frozen_model,
            tmp_path / f"{task}.jsonl",
            TRUNCATING,
            PROMPTS={task: prompt_files[task]},
            INFER_INPUT_FILE=write_jsonl(tmp_path / f"{task}_in.jsonl", own),
            MIXTURE_OR_TASK_NAME="demo_max",
        )
        assert alone == [line for line in mixed if line["prompt"] == task]
    assert len({line["prediction"] for line in mixed}) > 1


def score_alone(params, prompt, text: str, candidate: str, inputs_length: int) -> float:
    """`score_batch` of one (input, candidate) pair with one prompt, built by hand."""
    ids = list(demo.VOCABULARY.encode(text))[: inputs_length - 1] + [1]
    target = list(demo.VOCABULARY.encode(candidate)) + [1]
    batch = {
        "encoder_input_tokens": jnp.asarray([ids + [0] * (inputs_length - len(ids))]),
        "decoder_input_tokens": jnp.asarray([[0] + target[:-1]]),
        "decoder_target_tokens": jnp.asarray([target]),
        "decoder_loss_weights": jnp.ones((1, len(target)), jnp.int32),
    }
    return float(sp.score_batch(TINY, params, jnp.asarray(prompt), batch)[0])


def test_candidates_are_ranked_by_their_scores_alone(
    frozen_model, params, prompt_files, bank_file, tmp_path, capsys
):
    lines = mixed_lines()
    for i, line in enumerate(lines):
        if i % 2:
            line["candidates"] = (
                list(demo.ALPHABET[i % 3 :]) if i % 4 == 1 else ["3", "long answer"]
            )
    out = infer_lines(
        capsys,
        frozen_model,
        tmp_path / "out.jsonl",
        TRUNCATING,
        PROMPTS=bank_file,
        INFER_INPUT_FILE=write_jsonl(tmp_path / "in.jsonl", lines),
        MIXTURE_OR_TASK_NAME="demo_max",
        BATCH_SIZE=4,
    )
    for line, result in zip(lines, out, strict=True):
        if "candidates" not in line:
            assert "scores" not in result
            continue
        prompt = sp.load_prompt(prompt_files[line["prompt"]])
        expected = [score_alone(params, prompt, line["inputs"], c, 10) for c in line["candidates"]]
        np.testing.assert_allclose(result["scores"], expected, rtol=1e-5)
        assert result["prediction"] == line["candidates"][int(np.argmax(expected))]


def test_infer_of_a_mixture_runs_each_task_with_its_prompt(
    frozen_model, prompt_files, bank_file, tmp_path, capsys
):
    mixed = infer_lines(
        capsys,
        frozen_model,
        tmp_path / "out.jsonl",
        PROMPTS=bank_file,
        MIXTURE_OR_TASK_NAME=MIXTURE,
        INFER_EXAMPLES=3,
        BATCH_SIZE=4,
    )
    assert [line["prompt"] for line in mixed] == [task for task in TASKS for _ in range(3)]
    for task in TASKS:
        alone = infer_lines(
            capsys,
            frozen_model,
            tmp_path / f"{task}.jsonl",
            PROMPT_FILE=prompt_files[task],
            MIXTURE_OR_TASK_NAME=task,
            INFER_EXAMPLES=3,
        )
        own = [line for line in mixed if line["prompt"] == task]
        assert [{**line, "prompt": task} for line in alone] == own


T5_VOCAB_TINY = TINY.replace(vocab_size=32128)  # an embedding table for T5's vocabulary


@pytest.fixture(scope="module")
def t5_vocab_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("t5_vocab_model") / "model"
    sp.save_pretrained(path, T5_VOCAB_TINY, sp.init_params(T5_VOCAB_TINY, 1))
    return path


def test_infer_tokenizes_with_a_sentencepiece_model(t5_vocab_model, prompt_files, tmp_path, capsys):
    vocabulary = seqio.SentencePieceVocabulary(str(TEST_DATA / "t5_vocab" / "spiece.model"), 100)
    exact = "Is the sky blue today?"  # as many tokens as the inputs length: only EOS is cut
    length = len(vocabulary.encode(exact))
    texts = ["Hi", exact, "A rather long question about the colour of the sky at noon"]
    lines = [{"prompt": name, "inputs": text} for name in (A, "m0") for text in texts]
    lengths = f"{{'inputs': {length}, 'targets': 3}}"
    common = {"VOCABULARY_PATH": TEST_DATA / "t5_vocab" / "spiece.model", "BATCH_SIZE": 4}
    mixed = infer_lines(
        capsys,
        t5_vocab_model,
        tmp_path / "out.jsonl",
        lengths,
        PROMPTS={name: prompt_files[name] for name in (A, "m0")},
        INFER_INPUT_FILE=write_jsonl(tmp_path / "in.jsonl", lines),
        **common,
    )
    assert [line["truncated"] for line in mixed] == [False, True, True] * 2
    ids = [vocabulary.encode(text)[: length - 1] + [1] for text in texts]
    tokens = jnp.asarray([row + [0] * (length - len(row)) for row in ids])
    params = sp.init_params(T5_VOCAB_TINY, 1)
    decoded = predict_tokens(
        T5_VOCAB_TINY, params, sp.load_prompt(prompt_files[A]), tokens, max_length=3
    )
    assert [line["prediction"] for line in mixed[:3]] == ids_to_texts(vocabulary, decoded)
    alone = infer_lines(
        capsys,
        t5_vocab_model,
        tmp_path / "alone.jsonl",
        lengths,
        PROMPTS={"m0": prompt_files["m0"]},
        INFER_INPUT_FILE=write_jsonl(tmp_path / "m0.jsonl", lines[3:]),
        **common,
    )
    assert alone == mixed[3:]


# --- ensembles ------------------------------------------------------------------------------


def member_files(prompt_files: dict[str, Path], names: Sequence[str]) -> dict[str, Path]:
    """Ensemble members by name; `<name>_again` is the prompt of `<name>` once more."""
    return {name: prompt_files[name.removesuffix("_again")] for name in names}


def assert_sensitive(answers: Sequence[Sequence], votes: Sequence) -> None:
    """The members' answers test the vote: it differs from the first and the last member's
    answers, and from the vote that would break ties toward later members."""
    assert list(votes) != list(answers[0]) and list(votes) != list(answers[-1])
    later = [majority(list(column)[::-1]) for column in zip(*answers, strict=True)]
    assert list(votes) != later


def test_ensemble_vote_is_the_majority_of_the_members_answers(
    frozen_model, prompt_files, tmp_path, capsys
):
    members = member_files(prompt_files, ("m2", "m0", "m1"))
    answers = {
        name: [
            line["prediction"]
            for line in infer_lines(
                capsys,
                frozen_model,
                tmp_path / f"{name}.jsonl",
                PROMPT_FILE=path,
                MIXTURE_OR_TASK_NAME=VOTE_TASK,
            )
        ]
        for name, path in members.items()
    }
    votes = [majority(each) for each in zip(*answers.values(), strict=True)]
    assert_sensitive(list(answers.values()), votes)
    # Targets: the vote on even examples, an answer nobody gives on odd ones.
    targets = [vote if i % 2 == 0 else "none of these" for i, vote in enumerate(votes)]
    add_task(VOTE_TASK, targets)
    common = {"MIXTURE_OR_TASK_NAME": VOTE_TASK, "EVAL_FEATURE_LENGTHS": FEATURE_LENGTHS}
    record = eval_metrics(
        capsys, frozen_model, tmp_path / "eval", PROMPTS=members, ENSEMBLE=True, **common
    )
    got = record["metrics"]
    assert got["ensemble_vote/accuracy"] == percent_equal(votes, targets)
    for name in members:
        assert got[f"member/{name}/accuracy"] == percent_equal(answers[name], targets)
    alone = eval_metrics(
        capsys, frozen_model, tmp_path / "m0", PROMPT_FILE=members["m0"], **common
    )["metrics"]
    assert got["member/m0/loss_per_token"] == pytest.approx(alone["loss_per_token"], rel=1e-5)
    assert not any(key.startswith("ensemble_mean_score") for key in got)


def test_rank_ensemble_votes_and_averages_the_members_scores(
    frozen_model, prompt_files, tmp_path, capsys
):
    members = member_files(prompt_files, ("m1", "m0", "m2", "m0_again"))
    candidates = list("sxbl")  # letters this model scores alike: the members disagree
    lines = [{"prompt": "member", "inputs": text, "candidates": candidates} for text in INPUTS]
    scores = np.array(
        [
            [
                line["scores"]
                for line in infer_lines(
                    capsys,
                    frozen_model,
                    tmp_path / f"{name}.jsonl",
                    PROMPTS={"member": path},
                    INFER_INPUT_FILE=write_jsonl(tmp_path / "in.jsonl", lines),
                    MIXTURE_OR_TASK_NAME=VOTE_TASK,
                )
            ]
            for name, path in members.items()
        ]
    )  # [members, examples, candidates]
    choices = scores.argmax(axis=2)
    mean_choice = scores.mean(axis=0).argmax(axis=1)
    vote_choice = [majority(list(column)) for column in choices.T]
    assert_sensitive(choices, vote_choice)
    assert list(mean_choice) != vote_choice and list(mean_choice) != list(choices[0])
    for golds in (list(mean_choice), vote_choice):  # each ensemble then scores 100
        add_task(RANK_TASK, [candidates[g] for g in golds], candidates)
        record = eval_metrics(
            capsys,
            frozen_model,
            tmp_path / "eval",
            MIXTURE_OR_TASK_NAME=RANK_TASK,
            PROMPTS=members,
            ENSEMBLE=True,
            BATCH_SIZE=4,
        )
        got = record["metrics"]
        assert got["ensemble_mean_score/accuracy"] == percent_equal(mean_choice, golds)
        assert got["ensemble_vote/accuracy"] == percent_equal(vote_choice, golds)
        for name, chosen in zip(members, choices, strict=True):
            assert got[f"member/{name}/accuracy"] == percent_equal(chosen, golds)


# --- beam search ----------------------------------------------------------------------------


def test_beam_search_in_infer_and_eval(frozen_model, params, prompt_files, tmp_path, capsys):
    beams = 3
    lines = [{"prompt": task, "inputs": text} for text in INPUTS for task in (A, B)]
    mixed = infer_lines(
        capsys,
        frozen_model,
        tmp_path / "out.jsonl",
        PROMPTS={task: prompt_files[task] for task in (A, B)},
        INFER_INPUT_FILE=write_jsonl(tmp_path / "in.jsonl", lines),
        MIXTURE_OR_TASK_NAME="demo_max",
        INFER_NUM_BEAMS=beams,
        BATCH_SIZE=4,
    )
    tokens = [list(demo.VOCABULARY.encode(text)) + [1] for text in INPUTS]
    tokens = jnp.asarray([ids + [0] * (16 - len(ids)) for ids in tokens])
    found = {}
    for task in (A, B):
        prompt = sp.load_prompt(prompt_files[task])
        ids = predict_tokens(TINY, params, prompt, tokens, max_length=4, num_beams=beams)
        found[task] = ids_to_texts(demo.VOCABULARY, ids)
        assert [line["prediction"] for line in mixed if line["prompt"] == task] == found[task]
    greedy = infer_lines(
        capsys,
        frozen_model,
        tmp_path / "greedy.jsonl",
        PROMPT_FILE=prompt_files[A],
        MIXTURE_OR_TASK_NAME=VOTE_TASK,
    )
    # Targets: the beam search's answers on 3 examples, answers never given on the others.
    targets = found[A][:3] + [line["prediction"] + "?" for line in greedy[3:]]
    add_task(VOTE_TASK, targets)
    record = eval_metrics(
        capsys,
        frozen_model,
        tmp_path / "eval",
        MIXTURE_OR_TASK_NAME=VOTE_TASK,
        PROMPT_FILE=prompt_files[A],
        EVAL_FEATURE_LENGTHS=FEATURE_LENGTHS,
        EVAL_NUM_BEAMS=beams,
    )
    expected = np.mean([a == b for a, b in zip(found[A], targets, strict=True)])
    assert record["metrics"]["accuracy"] == pytest.approx(100 * expected)


# --- inspect --------------------------------------------------------------------------------


def test_inspect_prints_nearest_pieces_and_the_similarity_matrix(
    frozen_model, params, bank_file, tmp_path, capsys
):
    bank = PromptBank.load(bank_file)
    expected = {
        name: nearest_tokens(prompt, params, demo.VOCABULARY, k=3)
        for name, prompt in zip(bank.names, bank.prompts)
    }
    label = next(piece for piece, _ in expected[B][0] if piece.isprintable() and piece)
    out = tmp_path / "report.json"
    argv = ["inspect", f"--checkpoint={frozen_model}", f"--prompts={bank_file}", "--task=demo_max"]
    assert cli.main([*argv, "--k=3", f"--labels={label},zz", f"--json={out}"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["labels"] == [label, "zz"]
    for name in bank.names:
        got = report["prompts"][name]["nearest"]
        assert [[n["piece"] for n in row] for row in got] == [
            [piece for piece, _ in row] for row in expected[name]
        ]
        np.testing.assert_allclose(
            [[n["cosine"] for n in row] for row in got],
            [[cosine for _, cosine in row] for row in expected[name]],
            atol=1e-6,
        )
        assert all(n["label"] == (n["piece"] == label) for row in got for n in row)
    piece, cosine = expected[B][0][0]
    assert f"{piece}{'*' if piece == label else ''} {cosine:.3f}" in printed
    assert f"{label}* " in printed
    np.testing.assert_allclose(report["similarity"]["matrix"], prompt_similarity(bank), atol=1e-6)
    assert report["similarity"]["names"] == list(bank.names)
    matrix_row = f"{A:<8}" + "".join(
        f"  {value:>8.3f}" for value in prompt_similarity(bank)[0].tolist()
    )
    assert matrix_row in printed

    # One prompt file; label words from the task: the demo's answers to "max:" words.
    single = tmp_path / "single.json"
    single_prompt = tmp_path / f"{B}.npy"
    sp.save_prompt(bank[B], single_prompt)
    argv = ["inspect", f"--checkpoint={frozen_model}", f"--prompt={single_prompt}"]
    assert cli.main([*argv, "--task=demo_max", "--k=3", f"--json={single}"]) == 0
    report = json.loads(single.read_text())
    answers = demo.make_examples(("max",), "validation")[1][:1000]
    assert report["labels"] == sorted(set(answers)) and "similarity" not in report
    assert list(report["prompts"]) == [f"{B}.npy"]


# --- user mistakes: one line, before any compute, nothing written ------------------------------


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"softprompt-jax {command}: error: "), err
    return err


@pytest.mark.parametrize(
    "bad_line,message",
    [
        (
            b'{"prompt": "banks_aa", "inputs": "max: abc"}',
            "line 2: no prompt named 'banks_aa'; the bank holds banks_a, banks_b, banks_c, m0; "
            "did you mean banks_a",
        ),
        (b'{"prompt": "banks_a", "inputs": "max: abc"', "line 2: not valid JSON"),
        (b'{"prompt": "banks_a", "inputs": 5}', "line 2: field 'inputs' must be a string, got 5"),
        (b'{"inputs": "max: abc"}', "line 2: field 'prompt' must be a string, got nothing"),
        (
            b'{"prompt": "banks_a", "inputs": "x", "candidates": "ab"}',
            "line 2: field 'candidates' must be a non-empty list of strings",
        ),
        (b'{"prompt": "banks_a", "input": "x"}', "line 2: unknown field 'input'"),
        (b'["banks_a", "max: abc"]', "line 2: expected an object"),
        (b'{"prompt": "banks_a", "inputs": "\xff"}', "line 2: not valid UTF-8"),
    ],
)
def test_a_bad_input_line_is_named(
    frozen_model, bank_file, tmp_path, capsys, no_compute, bad_line, message
):
    inputs = tmp_path / "in.jsonl"
    good = b'{"prompt": "banks_b", "inputs": "rev: abc"}'
    inputs.write_bytes(b"\n".join([good, bad_line, good]) + b"\n")
    out = tmp_path / "out.jsonl"
    argv = flags(
        frozen_model,
        PROMPTS=repr(str(bank_file)),
        INFER_INPUT_FILE=repr(str(inputs)),
        MIXTURE_OR_TASK_NAME="'demo_max'",
        INFER_OUTPUT_FILE=repr(str(out)),
        TASK_FEATURE_LENGTHS=LENGTHS,
    )
    assert cli.main(["infer", *INFER_FILES, *argv]) == 2
    assert f"{inputs} {message}" in one_error_line(capsys, "infer")
    assert not out.exists()


def test_prompts_of_another_width_are_named(frozen_model, tmp_path, capsys, no_compute):
    wide = sp.save_prompt(np.ones((3, 7), np.float32), tmp_path / "wide.npy")
    out = tmp_path / "eval"
    argv = flags(
        frozen_model,
        PROMPTS=repr({task: str(wide) for task in TASKS}),
        MIXTURE_OR_TASK_NAME=repr(MIXTURE),
        EVAL_OUTPUT_DIR=repr(str(out)),
    )
    assert cli.main(["eval", *EVAL_FILES, *argv]) == 2
    err = one_error_line(capsys, "eval")
    assert f"prompt '{A}' ({wide}) has embedding width 7" in err
    assert f"the model at {frozen_model} has {TINY.emb_dim}" in err
    assert not out.exists()

    bank = PromptBank.from_files({"wide": wide}).save(tmp_path / "wide.safetensors")
    out = tmp_path / "out.jsonl"
    argv = flags(
        frozen_model,
        PROMPTS=repr(str(bank)),
        INFER_INPUT_FILE=repr(
            str(write_jsonl(tmp_path / "in.jsonl", [{"prompt": "wide", "inputs": "x"}]))
        ),
        MIXTURE_OR_TASK_NAME="'demo_max'",
        INFER_OUTPUT_FILE=repr(str(out)),
        TASK_FEATURE_LENGTHS=LENGTHS,
    )
    assert cli.main(["infer", *INFER_FILES, *argv]) == 2
    err = one_error_line(capsys, "infer")
    assert f"prompt 'wide' of {bank} has embedding width 7" in err
    assert f"the model at {frozen_model} has {TINY.emb_dim}" in err
    assert not out.exists()

    report = tmp_path / "report.json"
    argv = ["inspect", f"--checkpoint={frozen_model}", f"--prompt={wide}", "--task=demo_max"]
    assert cli.main([*argv, f"--json={report}"]) == 2
    assert "prompt 'wide.npy' (" in one_error_line(capsys, "inspect")
    assert not report.exists()


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--k=0", "--k must be a positive integer, got 0"),
        ("--task=demo_mx", "no seqio task or mixture named 'demo_mx'; did you mean demo_max"),
        ("--vocabulary=no.model", "--vocabulary no.model: not a readable SentencePiece model"),
    ],
)
def test_a_bad_inspect_flag_is_one_line(
    frozen_model, bank_file, tmp_path, capsys, no_compute, flag, message
):
    argv = ["inspect", f"--checkpoint={frozen_model}", f"--prompts={bank_file}", flag]
    assert cli.main(argv) == 2
    assert message in one_error_line(capsys, "inspect")


@pytest.mark.parametrize(
    "macros,message",
    [
        ({"PROMPT_FILE": "p.npy", "PROMPTS": "bank.safetensors"}, "both are set"),
        ({}, "set one of PROMPT_FILE (a prompt file) and PROMPTS"),
        (
            {"PROMPTS": {A: "p.npy"}},
            f"PROMPTS has no prompt for task {B}, {C}",
        ),
        ({"PROMPTS": {A: "p.npy"}, "ENSEMBLE": True}, f"{MIXTURE} is a mixture"),
        ({"PROMPT_FILE": "p.npy", "ENSEMBLE": True}, "ENSEMBLE = True needs PROMPTS"),
        ({"PROMPTS": 5}, "PROMPTS must be a bank file or folder"),
        ({"PROMPT_FILE": "p.npy", "EVAL_NUM_BEAMS": 0}, "EVAL_NUM_BEAMS must be a positive"),
        ({"PROMPT_FILE": "p.npy", "EVAL_LENGTH_BUCKETS": 0}, "EVAL_LENGTH_BUCKETS must be a"),
    ],
)
def test_a_bad_prompt_setting_is_one_line(
    frozen_model, prompt_files, tmp_path, capsys, no_compute, monkeypatch, macros, message
):
    monkeypatch.chdir(prompt_files[A].parent)
    (prompt_files[A].parent / "p.npy").write_bytes(prompt_files[A].read_bytes())
    out = tmp_path / "eval"
    argv = flags(
        frozen_model,
        MIXTURE_OR_TASK_NAME=repr(MIXTURE),
        EVAL_OUTPUT_DIR=repr(str(out)),
        **{name: repr(value) for name, value in macros.items()},
    )
    assert cli.main(["eval", *EVAL_FILES, *argv]) == 2
    assert message in one_error_line(capsys, "eval")
    assert not out.exists()


@pytest.mark.parametrize(
    "macros,message",
    [
        ({"PROMPT_FILE": "p.npy"}, "INFER_INPUT_FILE's lines name their prompt: set PROMPTS"),
        ({"PROMPTS": {"a": "p.npy"}, "MIXTURE_OR_TASK_NAME": None}, "set VOCABULARY_PATH"),
        (
            {"PROMPTS": {"a": "p.npy"}, "VOCABULARY_PATH": "no.model"},
            "VOCABULARY_PATH no.model: not a readable SentencePiece model",
        ),
        (
            {"PROMPTS": {"a": "p.npy"}, "INFER_NUM_BEAMS": 2, "INFER_TEMPERATURE": 0.5},
            "INFER_NUM_BEAMS = 2 searches beams and INFER_TEMPERATURE = 0.5 samples",
        ),
        ({"PROMPTS": {"a": "p.npy"}, "INFER_LENGTH_BUCKETS": 0}, "INFER_LENGTH_BUCKETS must be a"),
    ],
)
def test_a_bad_infer_setting_is_one_line(
    frozen_model, prompt_files, tmp_path, capsys, no_compute, monkeypatch, macros, message
):
    monkeypatch.chdir(prompt_files[A].parent)
    (prompt_files[A].parent / "p.npy").write_bytes(prompt_files[A].read_bytes())
    inputs = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a", "inputs": "max: abc"}])
    out = tmp_path / "out.jsonl"
    macros = {"MIXTURE_OR_TASK_NAME": "demo_max", **macros}
    argv = flags(
        frozen_model,
        INFER_INPUT_FILE=repr(str(inputs)),
        INFER_OUTPUT_FILE=repr(str(out)),
        TASK_FEATURE_LENGTHS=LENGTHS,
        **{name: repr(value) for name, value in macros.items()},
    )
    assert cli.main(["infer", *INFER_FILES, *argv]) == 2
    assert message in one_error_line(capsys, "infer")
    assert not out.exists()
