"""A run's prompts as its numpy sidecars hold them: by step (`latest`, `best`, a number) and task.

What `export` reads. A run with one prompt per task keeps each task's prompt in its own
folder of each checkpoint (see `state_checkpoints`); its bank lists the tasks in name order,
the order of the seqio mixture's tasks and so of the bank it trained.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from softprompt_jax.checkpoints.prompt_files import load_prompt
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.prompt_bank import PromptBank
from softprompt_jax.train.state_checkpoints import (
    NUMPY_DIR,
    PROMPT_SIDECAR,
    best_step,
    sidecar_path,
)


def prompt_steps(model_dir: str) -> list[int]:
    """The steps with a numpy prompt folder, in order; a run without any is a user mistake."""
    numpy_dir = Path(model_dir) / NUMPY_DIR
    steps = sorted(
        int(p.name.removeprefix("checkpoint_"))
        for p in numpy_dir.glob("checkpoint_*")
        if p.name.removeprefix("checkpoint_").isdigit()
    )
    if not steps:
        raise SoftpromptError(f"no prompt checkpoints under {numpy_dir}")
    return steps


def run_tasks(model_dir: str, step: int) -> list[str]:
    """The tasks with their own prompt at `step`, by name; [] for a run with one prompt."""
    folder = Path(model_dir) / NUMPY_DIR / f"checkpoint_{step}"
    return sorted(p.parent.name for p in folder.glob(f"*/{PROMPT_SIDECAR}"))


def choose_step(model_dir: str, steps: list[int], step: str, task: str | None = None) -> int:
    """The step `--step` names: `latest`, `best` (of `task`'s prompt) or a saved step number."""
    if step == "latest":
        return steps[-1]
    if step == "best":
        chosen = best_step(model_dir, task)
        if chosen is None:
            whose = "" if task is None else f" for task {task!r}"
            raise SoftpromptError(
                f"{model_dir} records no best step{whose} (no eval metric was kept)"
            )
        return chosen
    if step.isdigit():
        if int(step) not in steps:
            raise SoftpromptError(
                f"no prompt for step {int(step)} in {Path(model_dir) / NUMPY_DIR}; have {steps}"
            )
        return int(step)
    raise SoftpromptError(f"--step {step!r}: expected 'latest', 'best' or a step number")


def read_run_prompt(
    model_dir: str, step: str = "latest", task: str | None = None
) -> tuple[int, np.ndarray]:
    """(step, prompt) of the run, or of `task` in a run with one prompt per task."""
    steps = prompt_steps(model_dir)
    tasks = run_tasks(model_dir, steps[-1])
    if tasks and task is None:
        raise SoftpromptError(
            f"{model_dir} trained one prompt per task ({', '.join(tasks)}); "
            "choose one with --task or export them all with --bank"
        )
    if task is not None:
        _check_task(model_dir, tasks, task)
    chosen = choose_step(model_dir, steps, step, task)
    return chosen, load_prompt(sidecar_path(model_dir, chosen, task))


def read_run_bank(model_dir: str, step: str = "latest") -> tuple[dict[str, int], PromptBank]:
    """({task: step}, bank) of a run with one prompt per task; `best` is each task's best step."""
    steps = prompt_steps(model_dir)
    tasks = run_tasks(model_dir, steps[-1])
    if not tasks:
        raise SoftpromptError(
            f"{model_dir} trained one prompt; --bank applies to a run with PROMPT_PER_TASK"
        )
    chosen = {task: choose_step(model_dir, steps, step, task) for task in tasks}
    prompts = {task: load_prompt(sidecar_path(model_dir, chosen[task], task)) for task in tasks}
    return chosen, PromptBank.from_arrays(prompts)


def _check_task(model_dir: str, tasks: list[str], task: str) -> None:
    """`task` names a prompt of the run (which must have one per task)."""
    if not tasks:
        raise SoftpromptError(
            f"{model_dir} trained one prompt; --task applies to a run with PROMPT_PER_TASK"
        )
    if task not in tasks:
        raise SoftpromptError(f"{model_dir} has no prompt for task {task!r}; it has {tasks}")
