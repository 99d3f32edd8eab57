"""Checks of a training run's settings, made before anything is written or loaded.

A mistake in a setting that is only used late (the evaluation task, the metric that picks
the best checkpoint) must not cost a run: each check raises SoftpromptError with one line
naming the setting (by its gin macro) and the value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import seqio

from softprompt_jax.errors import SoftpromptError
from softprompt_jax.prompt_eval import metric_names


def check_model_dir(model_dir: str) -> None:
    """A run needs a directory: '' would scatter its files over the working directory."""
    if not str(model_dir).strip():
        raise SoftpromptError("MODEL_DIR is empty; give the run's directory")


def check_positive(settings: Mapping[str, int]) -> None:
    """Counts and periods, keyed by the setting's name, must be positive integers."""
    for name, value in settings.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise SoftpromptError(f"{name} must be a positive integer, got {value!r}")


def check_feature_lengths(name: str, lengths: Mapping[str, int] | None) -> None:
    """`inputs` and `targets` lengths, when given, must be positive integers."""
    if lengths is None:
        return
    missing = {"inputs", "targets"} - set(lengths)
    if missing:
        raise SoftpromptError(f"{name} {dict(lengths)} lacks {sorted(missing)}")
    check_positive({f"{name}[{key!r}]": value for key, value in lengths.items()})


def check_task(name: str, task: str) -> None:
    """`task` is a registered seqio task or mixture."""
    try:
        seqio.get_mixture_or_task(task)
    except ValueError:
        raise SoftpromptError(
            f"{name} {task!r} is not a registered seqio task or mixture"
        ) from None


def check_evaluation(task: str, split: str, best_metric: str | None, best_mode: str) -> None:
    """The eval split can be read, and BEST_METRIC is one of the names its evaluation reports.

    Reads one example, so missing data shows now rather than at the first evaluation.
    """
    if best_mode not in ("max", "min"):
        raise SoftpromptError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    mixture = seqio.get_mixture_or_task(task)
    if isinstance(mixture, seqio.Mixture):  # metrics belong to tasks, not to a mixture
        names = sorted(t.name for t in mixture.tasks)
        raise SoftpromptError(
            f"{task!r} is a mixture: evaluate one of its tasks (EVAL_TASK, one of {names}) or "
            "train a prompt per task (PROMPT_PER_TASK=True)"
        )
    try:
        names = metric_names(task, split)
    except KeyError as error:
        raise SoftpromptError(f"eval task {task!r} has no split {error}") from None
    if best_metric is not None and best_metric not in names:
        raise SoftpromptError(
            f"BEST_METRIC {best_metric!r} is not reported by eval task {task!r}; "
            f"it reports {sorted(names)}"
        )


def check_prompt_per_task(task: str, prompt_per_task: bool, eval_task: str | None) -> None:
    """PROMPT_PER_TASK needs a mixture, and then each task is evaluated with its own prompt."""
    if not prompt_per_task:
        return
    if not isinstance(seqio.get_mixture_or_task(task), seqio.Mixture):
        raise SoftpromptError(
            f"PROMPT_PER_TASK needs a seqio Mixture as MIXTURE_OR_TASK_NAME; {task!r} is a "
            "single task"
        )
    if eval_task is not None:
        raise SoftpromptError(
            f"EVAL_TASK {eval_task!r} does not apply with PROMPT_PER_TASK: each task of "
            f"{task!r} is evaluated with its own prompt"
        )


def check_labels(
    labels: Sequence[str] | Mapping[str, Sequence[str]], tasks: Sequence[str] | None
) -> None:
    """Class labels by task (a dict) need one prompt per task, and labels for every task."""
    if not isinstance(labels, Mapping):
        return
    if tasks is None:
        raise SoftpromptError(
            "CLASS_LABELS (PromptSpec.labels) maps tasks to labels; that needs PROMPT_PER_TASK"
        )
    missing = [task for task in tasks if task not in labels]
    if missing:
        raise SoftpromptError(
            f"CLASS_LABELS (PromptSpec.labels) has no labels for tasks {missing}; "
            f"give a list for each of {list(tasks)}"
        )
