"""Picking up a run where it stopped: the same run, its newest good checkpoint, and repairs.

`run_info` is saved with every checkpoint; a rerun refuses to continue another run (other
task, data order, frozen model or prompt length) with one line saying what differs. A
checkpoint that fails to restore is set aside (renamed, kept for a look) and the one before
it is used; a checkpoint whose numpy prompt a kill prevented gets it written now.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from softprompt_jax import storage
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.model.config import T5Config
from softprompt_jax.train.state_checkpoints import TrainCheckpointer

Console = Callable[[str], None]


def make_run_info(
    *,
    task: str,
    seed: int,
    batch_size: int,
    feature_lengths: Mapping[str, int],
    checkpoint_path: str,
    model: T5Config,
    prompt_length: int,
    prompt_names: Sequence[str] | None = None,
) -> dict:
    """What a checkpoint must share with the run that continues it, as plain JSON values.

    `prompt_names` are a per-task run's tasks (None: one prompt), so neither kind of run
    continues the other.
    """
    info = {
        "task": task,
        "seed": seed,
        "batch_size": batch_size,
        "feature_lengths": dict(feature_lengths),
        "checkpoint_path": str(storage.as_path(checkpoint_path)),
        "model_architecture": model.architecture(),
        "prompt_length": prompt_length,
        "prompt_names": None if prompt_names is None else list(prompt_names),
    }
    return json.loads(json.dumps(info))  # tuples become lists, as they come back from disk


def check_resumable(saved: Mapping[str, Any], current: Mapping[str, Any], model_dir: str) -> None:
    """Refuse to continue a different run, naming every setting that differs in one line.

    Keys an older run did not record are not checked.
    """
    differences = [
        f"{name} (saved {there!r}, now {here!r})"
        for key, value in current.items()
        if key in saved
        for name, there, here in _differences(key, saved[key], value)
    ]
    if differences:
        raise SoftpromptError(
            f"{model_dir} holds another run: {'; '.join(differences)}; "
            "use another MODEL_DIR or the same settings"
        )


def _differences(key: str, saved: Any, current: Any) -> list[tuple[str, Any, Any]]:
    """(name, saved, current) for each difference; a dict's fields as `key.field`."""
    if isinstance(saved, dict) and isinstance(current, dict):
        fields = sorted(set(saved) | set(current))
        return [
            (f"{key}.{k}", saved.get(k), current.get(k))
            for k in fields
            if saved.get(k) != current.get(k)
        ]
    return [(key, saved, current)] if saved != current else []


def restore_latest(
    checkpointer: TrainCheckpointer, template: Any, run_info: dict, console: Console
) -> tuple[int, Any]:
    """(step, state) of the newest checkpoint of this run that restores; (0, template) if none.

    A checkpoint that fails to read is set aside, said in one line, and the one before it tried.
    """
    for step in reversed(checkpointer.all_steps()):
        saved = _or_damaged(
            checkpointer, step, console, functools.partial(checkpointer.run_info, step)
        )
        if saved is None:
            continue
        check_resumable(saved, run_info, str(checkpointer.model_dir))
        restored = _or_damaged(
            checkpointer, step, console, functools.partial(checkpointer.restore, template, step)
        )
        if restored is not None:
            return step, restored[0]
    return 0, template


def repair_sidecars(checkpointer: TrainCheckpointer, template: Any, console: Console) -> None:
    """Write the numpy prompt(s) every kept checkpoint lacks (a kill between the writes).

    In a per-task run, a step missing any task's file gets the missing ones.
    """
    for step in checkpointer.missing_sidecars():
        restored = _or_damaged(
            checkpointer, step, console, functools.partial(checkpointer.restore, template, step)
        )
        if restored is not None:
            checkpointer.write_sidecar(step, restored[0])
            console(f"wrote the missing numpy prompt of checkpoint {step}")


def _or_damaged(
    checkpointer: TrainCheckpointer, step: int, console: Console, read: Callable[[], Any]
) -> Any:
    """`read()`, or None after setting checkpoint `step` aside when reading it fails."""
    try:
        return read()
    except Exception as error:  # orbax and tensorstore fail in many ways on a damaged file
        reason = (str(error).splitlines() or [""])[0][:200]
        aside = checkpointer.set_aside(step)
        console(
            f"checkpoint {step} is damaged ({type(error).__name__}: {reason}); "
            f"set aside as {aside}, falling back to the checkpoint before it"
        )
        return None
