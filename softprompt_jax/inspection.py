"""What `softprompt-jax inspect` reports: prompts read back as vocabulary pieces.

Per prompt position, the nearest pieces of the frozen model's input embedding table by
cosine (`reading.nearest_tokens`), those that spell a label word of the task marked (the
paper finds class labels among them); for a bank, how alike its prompts are
(`reading.prompt_similarity`). The report is a JSON-ready dict; `format_report` prints it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import seqio

from softprompt_jax.errors import SoftpromptError
from softprompt_jax.prompt_bank import PromptBank
from softprompt_jax.reading import nearest_tokens, prompt_similarity
from softprompt_jax.tasks import evaluation as task_evaluation
from softprompt_jax.tasks import super_glue
from softprompt_jax.tasks.postprocessors import as_text

LABEL_EXAMPLES = 1000  # validation examples read for the label words of a task
WORD_MARK = "▁"  # SentencePiece's mark of a piece that starts a word


def label_words(task: str) -> list[str]:
    """A task's label texts: a SuperGLUE classification task's classes (no data read), else
    the distinct targets of the first `LABEL_EXAMPLES` examples of its validation split."""
    for spec in super_glue.SUPER_GLUE_TASKS:
        names = rf"({'|'.join(super_glue.PREFIXES)})super_glue_{spec.name}_v102(_rank)?"
        if spec.labels and re.fullmatch(names, task):
            return list(spec.labels)
    if "validation" not in seqio.get_mixture_or_task(task).splits:
        raise SoftpromptError(f"task {task!r} has no validation split to read labels from")
    examples = task_evaluation.load_examples(task, "validation", None, LABEL_EXAMPLES)
    return sorted({as_text(ex["targets_pretokenized"]) for ex in examples})


def is_label_piece(piece: str, labels: Iterable[str]) -> bool:
    """Whether `piece` (its word mark and case aside) is a label or a word of one
    (`not_entailment` has the words `not` and `entailment`)."""
    words = {w for label in labels for w in [label, *re.split(r"[\s_]+", label)] if w}
    text = piece.replace(WORD_MARK, " ").strip().lower()
    return bool(text) and text in {w.lower() for w in words}


def report(
    bank: PromptBank,
    params: Mapping[str, Any],
    vocabulary: Any,
    labels: Sequence[str],
    k: int,
    *,
    similarity: bool,
) -> dict[str, Any]:
    """Each prompt's shape and, per position, its `k` nearest pieces with their cosine and
    whether they are label words; with `similarity`, the bank's similarity matrix."""
    prompts = {
        name: {
            "shape": list(prompt.shape),
            "nearest": [
                [
                    {"piece": piece, "cosine": cosine, "label": is_label_piece(piece, labels)}
                    for piece, cosine in position
                ]
                for position in nearest_tokens(prompt, params, vocabulary, k)
            ],
        }
        for name, prompt in zip(bank.names, bank.prompts, strict=True)
    }
    result: dict[str, Any] = {"labels": list(labels), "prompts": prompts}
    if similarity:
        matrix = prompt_similarity(bank)
        result["similarity"] = {"names": list(bank.names), "matrix": matrix.tolist()}
    return result


def format_report(result: Mapping[str, Any], task: str | None = None) -> str:
    """The report as text: a line per prompt position, then the similarity matrix."""
    marked = f"; * marks a label word of {task or 'the labels'}" if result["labels"] else ""
    lines = []
    for name, prompt in result["prompts"].items():
        length, width = prompt["shape"]
        lines.append(
            f"prompt {name} ({length} x {width}): nearest vocabulary pieces by cosine{marked}"
        )
        for position, neighbours in enumerate(prompt["nearest"]):
            pieces = "  ".join(
                f"{_shown(n['piece'])}{'*' if n['label'] else ''} {n['cosine']:.3f}"
                for n in neighbours
            )
            lines.append(f"{position:5d}  {pieces}")
    if "similarity" in result:
        lines += _similarity_lines(result["similarity"]["names"], result["similarity"]["matrix"])
    return "\n".join(lines)


def _similarity_lines(names: Sequence[str], matrix: Sequence[Sequence[float]]) -> list[str]:
    """The matrix with row and column names: row i, column j is the mean over prompt i's
    positions of their best cosine with a position of prompt j."""
    width = max(8, *(len(name) for name in names))
    header = " " * width + "".join(f"  {name:>{width}}" for name in names)
    rows = [
        f"{name:<{width}}" + "".join(f"  {value:>{width}.3f}" for value in row)
        for name, row in zip(names, np.asarray(matrix).tolist(), strict=True)
    ]
    title = "prompt similarity (row: mean over its positions of the best cosine with the column)"
    return [title, header, *rows]


def _shown(piece: str) -> str:
    """A piece as printed: as is, or quoted when empty or holding unprintable characters."""
    return piece if piece and piece.isprintable() else repr(piece)
