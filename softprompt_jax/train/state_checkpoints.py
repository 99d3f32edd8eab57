"""Training checkpoints: the prompt, its optimizer state and the step, never the frozen model.

Orbax writes each step into a temporary directory and renames it when complete
(on gs://, it marks the step complete last), so a run killed mid-save resumes from the
last finished step. Kept: the last `keep` steps plus the best one by the chosen eval
metric (recorded in `best.json` after the step's evaluation). Beside each step the prompt
is also written as a numpy file at the official code's path
(`numpy_checkpoints/checkpoint_<step>/encoder.prompt.prompt.prompt`); a kill between the
two leaves a step without it, which `missing_sidecars` finds for the trainer to repair.

A run with one prompt per task (a `PromptBank` named by task) keeps the same layout once
per task: the numpy prompt of task T at `numpy_checkpoints/checkpoint_<step>/T/
encoder.prompt.prompt.prompt`, and T's best step in `best_T.json`; every task's best step
is protected from deletion. `model_dir` may be local or a `gs://` URL.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

from softprompt_jax import storage
from softprompt_jax.errors import SoftpromptError
from softprompt_jax.methods import prefix_checkpoint_table
from softprompt_jax.partitioning.multihost import sync, to_host
from softprompt_jax.prefixes import is_prefix
from softprompt_jax.prompt_bank import PromptBank

CHECKPOINT_DIR = "checkpoints"
NUMPY_DIR = "numpy_checkpoints"
PROMPT_SIDECAR = "encoder.prompt.prompt.prompt"
BEST_FILE = "best.json"


class TrainCheckpointer:
    """Save and restore `PromptTrainState`s under `model_dir/checkpoints/checkpoint_<step>`.

    A step is saved before it is evaluated (a failed evaluation loses no training); its
    metrics arrive afterwards through `record_eval`, which keeps the best step in
    `best.json` and protects it from deletion. With `prompt_names` (a bank's prompts, one
    per task) each task has its own numpy prompt and best step (see the module doc).
    """

    def __init__(
        self,
        model_dir: storage.PathLike,
        *,
        keep: int = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
        prompt_names: Sequence[str] | None = None,
    ) -> None:
        if best_mode not in ("max", "min"):
            raise SoftpromptError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.model_dir = storage.as_path(model_dir)
        self.best_metric, self.best_mode = best_metric, best_mode
        # Whose numpy prompt and best step are kept: each task of a bank, or (None) the run's.
        self.tasks: tuple[str | None, ...] = tuple(prompt_names) if prompt_names else (None,)
        self._best = {task: self._own_best(task) for task in self.tasks}
        options = ocp.CheckpointManagerOptions(
            step_prefix="checkpoint",
            enable_async_checkpointing=False,
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(
                [checkpoint_managers.LatestN(n=keep), _KeepSteps(self.best_steps)]
            ),
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.model_dir / CHECKPOINT_DIR, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def best_step(self, task: str | None = None) -> int | None:
        """The saved step whose evaluation (of `task`'s prompt) was best so far, if any."""
        best = self._best.get(task)
        return None if best is None else best["step"]

    def best_steps(self) -> set[int]:
        """Every task's best step: the steps kept whatever `keep` says."""
        return {best["step"] for best in self._best.values() if best is not None}

    def _own_best(self, task: str | None) -> dict | None:
        """`task`'s recorded best, if it was judged by this run's metric."""
        best = read_best(self.model_dir, task) if self.best_metric else None
        # Another metric: the best step starts over at the next evaluation.
        return best if best is not None and best["metric"] == self.best_metric else None

    def save(self, step: int, state: Any, run_info: dict) -> None:
        """Write the state and `run_info` (task, seed, data position) for `step`."""
        if step in self._manager.all_steps():
            return
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), run_info=ocp.args.JsonSave(run_info)
            ),
        )
        self.write_sidecar(step, state)

    def write_sidecar(self, step: int, state: Any) -> None:
        """The prompt(s) of `state` as numpy files beside checkpoint `step` (process 0).

        A bank's prompts get one file per task; files already there are left as they are.
        """
        prompt = to_host(state.prompt)  # every process takes part in the gather
        if jax.process_index() == 0:
            for task, array in _named_prompts(prompt):
                write_prompt_sidecar(self.model_dir, step, array, task=task)

    def record_eval(self, step: int, metrics: dict, task: str | None = None) -> None:
        """Let the evaluation of saved `step` (of `task`'s prompt) compete for its best step."""
        if self.best_metric not in metrics or step not in self._manager.all_steps():
            return
        value = float(metrics[self.best_metric])
        if not math.isfinite(value):
            return
        best = self._best.get(task)
        if best is None or _better(value, best["value"], self.best_mode):
            self._best[task] = {"step": step, "metric": self.best_metric, "value": value}
        if jax.process_index() == 0:
            update_best(self.model_dir, step, self.best_metric, value, self.best_mode, task=task)

    def missing_sidecars(self) -> list[int]:
        """Saved steps lacking a numpy prompt (a kill came between the writes)."""
        return [
            step
            for step in self.all_steps()
            if not all(sidecar_path(self.model_dir, step, task).exists() for task in self.tasks)
        ]

    def remove_temporaries(self) -> list[str]:
        """Delete what killed atomic writes left in the run directory (hold the run lock)."""
        numpy_dir = self.model_dir / NUMPY_DIR
        folders = [
            self.model_dir,
            *numpy_dir.glob("checkpoint_*"),
            *(folder for folder in numpy_dir.glob("checkpoint_*/*") if folder.is_dir()),
        ]
        return [path for folder in folders for path in storage.remove_temporaries(folder)]

    def run_info(self, step: int) -> dict:
        """The run info saved with `step` (reads no array)."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(run_info=ocp.args.JsonRestore())
        )
        return dict(restored["run_info"])

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """The state (shaped like `abstract_state`) and run info at `step` (default: latest)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(
                f"no training checkpoint under {self.model_dir / CHECKPOINT_DIR}"
            )
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), run_info=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["run_info"])

    def set_aside(self, step: int) -> str:
        """Rename a damaged `checkpoint_<step>` out of orbax's sight, keeping it for a look."""
        damaged = self.model_dir / CHECKPOINT_DIR / f"checkpoint_{step}"
        aside = damaged.parent / f"{damaged.name}.damaged-{int(time.time())}"
        if jax.process_index() == 0:
            damaged.rename(aside)
        sync(f"set_aside_{step}")
        self._manager.reload()
        return str(aside)

    def close(self) -> None:
        self._manager.close()


class _KeepSteps(checkpoint_managers.PreservationPolicy):
    """An orbax preservation policy: keep the steps `steps_fn()` names (the best ones)."""

    def __init__(self, steps_fn: Callable[[], set[int]]) -> None:
        self._steps_fn = steps_fn

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> Sequence[bool]:
        keep = self._steps_fn()
        return [checkpoint.step in keep for checkpoint in checkpoints]


def _named_prompts(prompt: Any) -> list[tuple[str | None, np.ndarray]]:
    """(task, prompt) for each prompt of a bank; (None, prompt) for a single prompt.

    A prefix is written as one 2-D table, its MLP folded (`methods.prefix_checkpoint_table`).
    """
    if isinstance(prompt, PromptBank):
        return list(zip(prompt.names, prompt.prompts, strict=True))
    return [(None, prefix_checkpoint_table(prompt) if is_prefix(prompt) else prompt)]


def _better(value: float, best: float, mode: str) -> bool:
    return value > best if mode == "max" else value < best


def sidecar_path(model_dir: storage.PathLike, step: int, task: str | None = None) -> epath.Path:
    """Where the numpy prompt (of `task`) of checkpoint `step` lives (the official layout)."""
    folder = storage.as_path(model_dir) / NUMPY_DIR / f"checkpoint_{step}"
    return (folder if task is None else folder / task) / PROMPT_SIDECAR


def write_prompt_sidecar(
    model_dir: storage.PathLike, step: int, prompt: np.ndarray, *, task: str | None = None
) -> str:
    """The official code's numpy export of the prompt, written atomically; returns its path."""
    path = sidecar_path(model_dir, step, task)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        storage.write_npy_atomic(path, np.asarray(prompt, np.float32))
    return str(path)


def best_path(model_dir: storage.PathLike, task: str | None = None) -> epath.Path:
    """`best.json`, or `best_<task>.json` for the prompt of `task` in a per-task run."""
    name = BEST_FILE if task is None else f"best_{task}.json"
    return storage.as_path(model_dir) / name


def update_best(
    model_dir: storage.PathLike,
    step: int,
    metric: str,
    value: float,
    mode: str = "max",
    *,
    task: str | None = None,
) -> None:
    """Record `step` in `task`'s best file if its `metric` beats the recorded best."""
    best = read_best(model_dir, task)
    if best is not None and best["metric"] == metric and not _better(value, best["value"], mode):
        return
    storage.write_text_atomic(
        best_path(model_dir, task),
        json.dumps({"step": step, "metric": metric, "value": value, "mode": mode}),
    )


def read_best(model_dir: storage.PathLike, task: str | None = None) -> dict | None:
    """The best step, its metric, value and mode (of `task`); None before any evaluation."""
    best_file = best_path(model_dir, task)
    return json.loads(best_file.read_text()) if best_file.exists() else None


def best_step(model_dir: storage.PathLike, task: str | None = None) -> int | None:
    """The step recorded as best by evaluation (of `task`'s prompt), if any."""
    best = read_best(model_dir, task)
    return None if best is None else best["step"]
