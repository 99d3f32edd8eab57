"""Tiny offline text-to-text tasks for the demo and the tests: no download, byte vocabulary.

Each task reads a short word over the letters a-h (3 to 6 letters) and is named by a text
prefix: `"max: cafe"` -> `"f"` (the latest letter), `"min: cafe"` -> `"a"`, `"len: cafe"` ->
`"4"`. The same word has different answers under different tasks, so without the prefix a
model cannot know what is asked. The tasks are simple enough that a tiny T5 learns all three
from scratch in a few hundred CPU steps. Registered tasks:

- `demo_multitask`: all tasks interleaved, with prefixes (to pre-train a tiny T5 from scratch);
- `demo_<name>`: one task with its prefix;
- `taskless_demo_<name>`: one task without the prefix, so a prompt must learn which task it is;
- `demo_mixture`: a seqio Mixture of `demo_len`, `demo_max` and `demo_min` at equal rates (to
  train one prompt per task in one run); `taskless_demo_mixture` the same without prefixes,
  so each task's prompt must learn which task it is.

Splits `train` (20,000 examples per task) and `validation` (500) come from different seeds.
The metric is exact-match accuracy of the output string.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import seqio
import tensorflow as tf
from softprompt_jax.tasks import metrics, preprocessors

ALPHABET = "abcdefgh"
DEMO_TASKS: dict[str, Callable[[str], str]] = {
    "max": max,
    "min": min,
    "len": lambda word: str(len(word)),
}
SPLIT_SEEDS = {"train": 0, "validation": 1}
SPLIT_SIZES = {"train": 20_000, "validation": 500}  # examples per task
MIN_LETTERS, MAX_LETTERS = 3, 6
DEMO_MIXTURE = "demo_mixture"
TASKLESS_DEMO_MIXTURE = "taskless_demo_mixture"

VOCABULARY = seqio.ByteVocabulary()
OUTPUT_FEATURES = {
    "inputs": seqio.Feature(vocabulary=VOCABULARY, add_eos=True),
    "targets": seqio.Feature(vocabulary=VOCABULARY, add_eos=True),
}


def random_words(count: int, seed: int) -> list[str]:
    """`count` random words over `ALPHABET` of 3 to 6 letters, the same for the same seed."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(MIN_LETTERS, MAX_LETTERS + 1, size=count)
    letters = rng.integers(0, len(ALPHABET), size=(count, MAX_LETTERS))
    alphabet = np.array(list(ALPHABET))
    return ["".join(alphabet[row[:length]]) for row, length in zip(letters, lengths)]


def make_examples(task_names: Sequence[str], split: str) -> tuple[list[str], list[str]]:
    """Inputs `"<task>: <word>"` and targets for the split, the tasks interleaved in turn."""
    words = random_words(SPLIT_SIZES[split] * len(task_names), SPLIT_SEEDS[split])
    inputs, targets = [], []
    for i, word in enumerate(words):
        name = task_names[i % len(task_names)]
        inputs.append(f"{name}: {word}")
        targets.append(DEMO_TASKS[name](word))
    return inputs, targets


def _dataset_fn(task_names: Sequence[str]) -> Callable[..., tf.data.Dataset]:
    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        inputs, targets = make_examples(task_names, split)
        return tf.data.Dataset.from_tensor_slices({"inputs": inputs, "targets": targets})

    return dataset_fn


def _add_task(name: str, task_names: Sequence[str], taskless: bool) -> None:
    seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(
            _dataset_fn(task_names),
            splits=tuple(SPLIT_SEEDS),
            num_input_examples={s: n * len(task_names) for s, n in SPLIT_SIZES.items()},
        ),
        preprocessors=[
            *([preprocessors.remove_first_text_token] if taskless else []),
            seqio.preprocessors.tokenize,
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features=OUTPUT_FEATURES,
        metric_fns=[metrics.accuracy],
    )


def register_demo_tasks() -> list[str]:
    """(Re)registers the demo tasks and their two mixtures; returns the tasks' names."""
    names = ["demo_multitask"]
    _add_task("demo_multitask", tuple(DEMO_TASKS), taskless=False)
    for name in DEMO_TASKS:
        _add_task(f"demo_{name}", (name,), taskless=False)
        _add_task(f"taskless_demo_{name}", (name,), taskless=True)
        names += [f"demo_{name}", f"taskless_demo_{name}"]
    for mixture, prefix in ((DEMO_MIXTURE, "demo_"), (TASKLESS_DEMO_MIXTURE, "taskless_demo_")):
        seqio.MixtureRegistry.remove(mixture)
        seqio.MixtureRegistry.add(
            mixture, [f"{prefix}{name}" for name in DEMO_TASKS], default_rate=1.0
        )
    return names
