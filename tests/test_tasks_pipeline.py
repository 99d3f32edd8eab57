"""Every SuperGLUE task through seqio's whole pipeline, from a real TFDS data directory.

The directory is written at test time by TFDS's own `super_glue` builder (`download_and_prepare`)
from real SuperGLUE records in SuperGLUE's download format (`tests/data/super_glue/`); only the
builder's download step is pointed at that folder. The tasks then read it through seqio's
`TfdsDataSource` and tokenize with T5's real SentencePiece model.
"""

from __future__ import annotations

import os
import types
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import seqio
import tensorflow_datasets as tfds
from conftest import TEST_DATA
from softprompt_jax.tasks import (
    SUPER_GLUE_TASK_NAMES,
    evaluate_predictions,
    evaluate_rank_classification,
    get_vocabulary,
    load_examples,
    rank_classification_metrics,
    register_super_glue_tasks,
    show,
    t5x_batches,
)
from softprompt_jax.tasks.super_glue import MIXTURE_RATES

RAW_DATA = Path(__file__).parent / "data" / "super_glue"
TFDS_CONFIGS = ("boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc.fixed", "axb", "axg")
LENGTHS = {"inputs": 512, "targets": 16}
TASKS = [name for name in SUPER_GLUE_TASK_NAMES if name in seqio.TaskRegistry.names()]

# T5 vocabulary ids of the label words (measured on the real model, notes §3.2), plus EOS = 1.
LABEL_IDS = {
    "True": [10998, 1],
    "False": [10747, 7, 15, 1],
    "entailment": [3, 35, 5756, 297, 1],
    "not_entailment": [59, 834, 35, 5756, 297, 1],
    "contradiction": [27252, 1],
    "choice1": [1160, 536, 1],
    "choice2": [1160, 357, 1],
}


def write_super_glue(data_dir: Path) -> None:
    """Runs TFDS's `super_glue` builder on the raw records: TFDS's own on-disk format."""
    tfds.disable_progress_bar()
    offline = types.SimpleNamespace(
        download_and_extract=lambda url: os.fspath(RAW_DATA), downloaded_size=0
    )
    config = tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
    for name in TFDS_CONFIGS:
        builder = tfds.builder(f"super_glue/{name}:1.0.2", data_dir=os.fspath(data_dir))
        with mock.patch.object(builder, "_make_download_manager", return_value=offline):
            builder.download_and_prepare(download_config=config)


@pytest.fixture(scope="module")
def vocab_path() -> str:
    return os.fspath(TEST_DATA / "t5_vocab" / "spiece.model")


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory, vocab_path):
    """The TFDS directory, with every task re-registered on the real T5 vocabulary."""
    data_dir = tmp_path_factory.mktemp("tfds")
    write_super_glue(data_dir)
    register_super_glue_tasks(get_vocabulary(vocab_path))
    seqio.set_tfds_data_dir_override(os.fspath(data_dir))
    yield data_dir
    seqio.set_tfds_data_dir_override(None)


@pytest.fixture(scope="module")
def examples_of(tfds_dir):
    """`examples_of(task)`: the task's examples from validation, else test, else train."""
    cache = {}

    def load(task: str) -> list[dict]:
        if task not in cache:
            splits = seqio.get_mixture_or_task(task).splits
            split = next(s for s in ("validation", "test", "train") if s in splits)
            cache[task] = load_examples(task, split, LENGTHS)
        return cache[task]

    return load


def text(example: dict, feature: str) -> str:
    return example[f"{feature}_pretokenized"].decode()


@pytest.mark.parametrize("task_name", TASKS)
def test_task_reads_tfds_and_tokenizes_with_eos(task_name, examples_of) -> None:
    examples = examples_of(task_name)
    assert examples
    vocabulary = seqio.get_mixture_or_task(task_name).output_features["inputs"].vocabulary
    for example in examples:
        for feature in ("inputs", "targets"):
            ids = example[feature]
            assert ids.dtype == np.int32
            assert ids.tolist() == vocabulary.encode(text(example, feature)) + [1]


def test_t5x_batches_of_every_task(examples_of) -> None:
    examples = [example for name in TASKS for example in examples_of(name)]
    rows = 0
    for batch, size in t5x_batches(examples, LENGTHS, batch_size=32):
        assert {name: array.shape[0] for name, array in batch.items()} == {
            "encoder_input_tokens": 32,
            "decoder_input_tokens": 32,
            "decoder_target_tokens": 32,
            "decoder_loss_weights": 32,
        }
        for row in range(32):
            if row >= size:
                assert all(not array[row].any() for array in batch.values())
                continue
            example = examples[rows + row]
            inputs, targets = example["inputs"], example["targets"]
            assert batch["encoder_input_tokens"][row, : len(inputs)].tolist() == inputs.tolist()
            assert not batch["encoder_input_tokens"][row, len(inputs) :].any()
            assert batch["decoder_target_tokens"][row, : len(targets)].tolist() == targets.tolist()
            shifted = [0, *targets[:-1].tolist()]
            assert batch["decoder_input_tokens"][row, : len(targets)].tolist() == shifted
            assert batch["decoder_loss_weights"][row].sum() == len(targets)
        rows += size
    assert rows == len(examples)


MULTIRC_PARAGRAPH = (
    "Sent 1: What causes a change in motion? Sent 2: The application of a force. Sent 3: Any "
    "time an object changes motion, a force has been applied. Sent 4: In what ways can this "
    "happen? Sent 5: Force can cause an object at rest to start moving."
)
ASHANINKA_INPUTS = (
    "record query: Innocence of youth: Many of the @placeholder's younger generations have "
    "turned their backs on tribal life and moved to the cities where living conditions are "
    "better entities: Amazon, Ashaninka, Inca, Incas, Peru, Peruvian, South America passage: "
    "A Peruvian tribe once revered by the Inca's for their fierce hunting skills and formidable "
    "warriors are clinging on to their traditional existence in the coca growing valleys of "
    "South America, sharing their land with drug traffickers, rebels and illegal loggers. "
    "Ashaninka Indians are the largest group of indigenous people in the mountainous nation's "
    "Amazon region, but their settlements are so sparse that they now make up less than one "
    "per cent of Peru's 30 million population. Ever since they battled rival tribes for "
    "territory and food during native rule in the rainforests of South America, the Ashaninka "
    "have rarely known peace. The Ashaninka tribe once shared the Amazon with the like of the "
    "Incas hundreds of years ago. They have been forced to share their land after years of "
    "conflict forced rebels and drug dealers into the forest. . Despite settling in valleys "
    "rich with valuable coca, they live a poor pre-industrial existence"
)

# (task, id feature, id, T5's inputs or None, T5's targets), for records read through TFDS
# from the split each task is checked on (validation, else test, else train).
END_TO_END = [
    (
        "super_glue_boolq_v102",
        "idx",
        1,
        "boolq passage: American entry into Canada by land -- Persons driving into Canada must "
        "have their vehicle's registration document and proof of insurance. question: can u "
        "drive in canada with us license",
        "True",
    ),
    ("super_glue_boolq_v102", "idx", 0, None, "False"),
    ("super_glue_cb_v102", "idx", 0, None, "contradiction"),
    ("super_glue_cb_v102", "idx", 77, None, "entailment"),
    (
        "super_glue_copa_v102",
        "idx",
        0,
        "copa choice1: The toilet filled with water. choice2: Water flowed from the spout. "
        "premise: The man turned on the faucet. question: effect",
        "choice2",  # TFDS turns COPA's label 1 into "choice2"
    ),
    ("super_glue_rte_v102", "idx", 0, None, "not_entailment"),
    ("super_glue_wic_v102", "idx", 3, None, "True"),
    (
        "super_glue_multirc_v102",
        "idx/answer",
        5,
        "multirc question: What do you apply to an object to make it move or stop? answer: A "
        f"force paragraph: {MULTIRC_PARAGRAPH}",
        "True",
    ),
    ("super_glue_record_v102", "idx/query", 9, ASHANINKA_INPUTS, "Ashaninka"),
    (
        "super_glue_axb_v102",
        "idx",
        0,
        "rte hypothesis: The cat did not sit on the mat. premise: The cat sat on the mat.",
        "not_entailment",
    ),
    (
        "super_glue_axg_v102",
        "idx",
        1,
        "rte hypothesis: The accountant sought help filing taxes. premise: The taxpayer met with "
        "the accountant to get help filing her taxes.",
        "not_entailment",
    ),
    (
        "super_glue_wsc_v102_simple_eval",
        "idx",
        5,
        "wsc: The large ball crashed right through the table because *it* was made of styrofoam.",
        "the table",  # TFDS's wsc.fixed lower-cases the download's "The table"
    ),
]


@pytest.mark.parametrize("task_name,key,value,inputs,targets", END_TO_END)
def test_real_records_give_t5s_strings_and_label_ids(
    task_name, key, value, inputs, targets, examples_of
) -> None:
    (example,) = [ex for ex in examples_of(task_name) if ex[key] == value]
    if inputs is not None:
        assert text(example, "inputs") == inputs
    assert text(example, "targets") == targets
    if targets in LABEL_IDS:
        assert example["targets"].tolist() == LABEL_IDS[targets]


def test_test_split_without_labels_targets_unk(tfds_dir) -> None:
    (example,) = load_examples("super_glue_rte_v102", "test", LENGTHS)
    assert text(example, "targets") == "<unk>"


def test_record_keeps_every_gold_answer_once(examples_of) -> None:
    # Three answer spans with one surface form: TFDS keeps one answer, so one example.
    (example,) = examples_of("super_glue_record_v102")
    assert example["answers"].tolist() == [b"Ashaninka"]


def test_wsc_training_keeps_only_positive_referents(examples_of) -> None:
    (example,) = examples_of("super_glue_wsc_v102_simple_train")  # "Mark" (negative) is dropped
    assert text(example, "inputs") == (
        "wsc: I poured water from the bottle into the cup until *it* was full."
    )
    assert text(example, "targets") == "the cup"


@pytest.mark.parametrize("task_name", [n for n in TASKS if not n.startswith("taskless_")])
def test_taskless_drops_exactly_the_task_word(task_name, examples_of) -> None:
    with_word, without = examples_of(task_name), examples_of(f"taskless_{task_name}")
    assert [text(ex, "inputs").split(" ", 1)[1] for ex in with_word] == [
        text(ex, "inputs") for ex in without
    ]
    assert [text(ex, "targets") for ex in with_word] == [text(ex, "targets") for ex in without]


def test_mixture_of_the_eight_tasks_uses_t5s_rates() -> None:
    mixture = seqio.get_mixture_or_task("taskless_super_glue_v102_proportional")
    rates = {task.name: mixture.get_rate(task) for task in mixture.tasks}
    assert rates == {f"taskless_super_glue_{key}": rate for key, rate in MIXTURE_RATES.items()}


def scorer_preferring(first_token: int, calls: list | None = None):
    """A stand-in model: log-likelihood 0 for targets starting with `first_token`, else -1."""

    def score(batch):
        if calls is not None:
            calls.append(batch["decoder_target_tokens"].shape)
        return np.where(batch["decoder_target_tokens"][:, 0] == first_token, 0.0, -1.0)

    return score


def rank(task_name: str, examples: list[dict], score_fn, batch_size: int = 8, **kwargs) -> dict:
    return rank_classification_metrics(
        task_name, examples, score_fn, LENGTHS, batch_size=batch_size, **kwargs
    )


def test_rank_classification_cb_always_entailment(examples_of) -> None:
    # Validation: contradiction and entailment. Accuracy 1/2; F1 per class: entailment
    # (TP 1, FP 1) 2/3, contradiction 0, neutral 0 -> mean 2/9.
    candidates = examples_of("taskless_super_glue_cb_v102_rank")
    calls = []
    result = rank(
        "taskless_super_glue_cb_v102_rank",
        candidates,
        scorer_preferring(LABEL_IDS["entailment"][0], calls),
        batch_size=4,
    )
    assert result == {"mean_3class_f1": pytest.approx(200 / 9), "accuracy": 50.0}
    assert calls == [(4, 16), (4, 16)]  # 6 candidates, the last batch padded


def test_rank_classification_multirc_always_true(examples_of) -> None:
    # Answers F T T F | F T, all predicted True: TP 3, FP 3 -> F1a 2/3; no question fully right.
    candidates = examples_of("super_glue_multirc_v102_rank")
    result = rank("super_glue_multirc_v102_rank", candidates, scorer_preferring(10998))
    assert result == {"f1": pytest.approx(200 / 3), "exact_match": 0.0}


def test_rank_classification_axg_reports_parity_and_accuracy(examples_of) -> None:
    candidates = examples_of("super_glue_axg_v102_rank")  # one pair, both not_entailment
    result = rank("super_glue_axg_v102_rank", candidates, scorer_preferring(59))
    assert result == {"gender_parity": 100.0, "accuracy": 100.0}


def shorter_is_likelier(batch):
    """Every target token, EOS included, costs 1 nat, plus 1 for the sequence: -(n + 1)."""
    return -(batch["decoder_loss_weights"].sum(axis=1) + 1.0)


def test_rank_classification_length_normalisation(examples_of) -> None:
    # The RTE validation record is not_entailment (6 tokens) vs entailment (5 tokens):
    # summed -7 < -6 picks entailment; per token -7/6 > -6/5 picks not_entailment.
    candidates = examples_of("super_glue_rte_v102_rank")
    assert rank("super_glue_rte_v102_rank", candidates, shorter_is_likelier) == {"accuracy": 0.0}
    normalized = rank(
        "super_glue_rte_v102_rank",
        candidates,
        shorter_is_likelier,
        normalize_by_target_length=True,
    )
    assert normalized == {"accuracy": 100.0}


def test_max_examples_keeps_whole_examples_of_a_rank_task(examples_of) -> None:
    first = load_examples("super_glue_cb_v102_rank", "validation", LENGTHS, max_examples=1)
    assert [ex["candidate_index"] for ex in first] == [0, 1, 2]
    assert [ex["inputs"].tolist() for ex in first] == [
        ex["inputs"].tolist() for ex in examples_of("super_glue_cb_v102_rank")[:3]
    ]


def test_evaluate_rank_classification_reads_the_split_itself(examples_of) -> None:
    calls = []
    result = evaluate_rank_classification(
        "super_glue_cb_v102_rank",
        "validation",
        scorer_preferring(LABEL_IDS["entailment"][0], calls),
        LENGTHS,
        batch_size=8,
        max_examples=1,
    )
    assert calls == [(8, 16)]  # one example: its three candidates, padded to one batch
    first_gold = examples_of("super_glue_cb_v102_rank")[0]["gold_target"]
    assert result["accuracy"] == (100.0 if first_gold == b"entailment" else 0.0)


def test_generation_metrics_boolq_illegal_output_is_wrong(examples_of) -> None:
    examples = examples_of("taskless_super_glue_boolq_v102")
    predictions = ["yes" if text(ex, "targets") == "True" else "False" for ex in examples]
    result = evaluate_predictions("taskless_super_glue_boolq_v102", examples, predictions)
    assert result == {"accuracy": 50.0}  # "yes" is not a label


def test_generation_metrics_multirc(examples_of) -> None:
    examples = examples_of("super_glue_multirc_v102")
    # All right but "A force" (True) answered illegally: F1a TP 2, FN 1 -> 4/5; EM 1 of 2.
    predictions = ["Truee" if ex["idx/answer"] == 5 else text(ex, "targets") for ex in examples]
    result = evaluate_predictions("super_glue_multirc_v102", examples, predictions)
    assert result == {"f1": pytest.approx(80.0), "exact_match": 50.0}


def test_generation_metrics_record_and_wsc(examples_of) -> None:
    record = examples_of("super_glue_record_v102")
    assert evaluate_predictions("super_glue_record_v102", record, ["the Ashaninka"]) == {
        "em": 100.0,
        "f1": 100.0,
    }
    wsc = examples_of("super_glue_wsc_v102_simple_eval")  # referent "the table", label 1
    assert evaluate_predictions("super_glue_wsc_v102_simple_eval", wsc, ["The table"]) == {
        "accuracy": 100.0
    }
    assert evaluate_predictions("super_glue_wsc_v102_simple_eval", wsc, ["the ball"]) == {
        "accuracy": 0.0
    }


def test_show_prints_what_the_model_reads(tfds_dir, vocab_path, capsys) -> None:
    show.main(
        [
            "super_glue_copa_v102",
            "--split",
            "validation",
            "-n",
            "1",
            "--tfds_data_dir",
            os.fspath(tfds_dir),
            "--vocab",
            vocab_path,
        ]
    )
    printed = capsys.readouterr().out
    assert printed.startswith("super_glue_copa_v102 [validation] example 1\n")
    assert "  inputs_pretokenized: copa choice1: The toilet filled with water." in printed
    assert "  targets_pretokenized: choice2\n" in printed
    assert "  targets: [1160, 357, 1] (3 ids)\n" in printed
