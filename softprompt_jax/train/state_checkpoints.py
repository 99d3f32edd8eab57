"""Training checkpoints: the prompt, its optimizer state and the step, never the frozen model.

Orbax writes each step into a temporary directory and renames it when complete
(on gs://, it marks the step complete last), so a run killed mid-save resumes from the
last finished step. Kept: the last `keep` steps plus the best one by the chosen eval
metric (recorded in `best.json` after the step's evaluation). Beside each step the prompt
is also written as a numpy file at the official code's path
(`numpy_checkpoints/checkpoint_<step>/encoder.prompt.prompt.prompt`); a kill between the
two leaves a step without it, which `missing_sidecars` finds for the trainer to repair.
`model_dir` may be local or a `gs://` URL.
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
from softprompt_jax.partitioning.multihost import sync, to_host

CHECKPOINT_DIR = "checkpoints"
NUMPY_DIR = "numpy_checkpoints"
PROMPT_SIDECAR = "encoder.prompt.prompt.prompt"
BEST_FILE = "best.json"


class TrainCheckpointer:
    """Save and restore `PromptTrainState`s under `model_dir/checkpoints/checkpoint_<step>`.

    A step is saved before it is evaluated (a failed evaluation loses no training); its
    metrics arrive afterwards through `record_eval`, which keeps the best step in
    `best.json` and protects it from deletion.
    """

    def __init__(
        self,
        model_dir: storage.PathLike,
        *,
        keep: int = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
    ) -> None:
        if best_mode not in ("max", "min"):
            raise SoftpromptError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.model_dir = storage.as_path(model_dir)
        self.best_metric, self.best_mode = best_metric, best_mode
        self._best = read_best(self.model_dir) if best_metric else None
        if self._best is not None and self._best["metric"] != best_metric:
            self._best = None  # another metric: best.json starts over at the next evaluation
        options = ocp.CheckpointManagerOptions(
            step_prefix="checkpoint",
            enable_async_checkpointing=False,
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(
                [checkpoint_managers.LatestN(n=keep), _KeepStep(self.best_step)]
            ),
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.model_dir / CHECKPOINT_DIR, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def best_step(self) -> int | None:
        """The saved step whose evaluation was best so far, if any."""
        return None if self._best is None else self._best["step"]

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
        """The prompt of `state` as the numpy file beside checkpoint `step` (process 0)."""
        prompt = to_host(state.prompt)  # every process takes part in the gather
        if jax.process_index() == 0:
            write_prompt_sidecar(self.model_dir, step, prompt)

    def record_eval(self, step: int, metrics: dict) -> None:
        """Let the evaluation of saved `step` compete for best step (by `best_metric`)."""
        if self.best_metric not in metrics or step not in self._manager.all_steps():
            return
        value = float(metrics[self.best_metric])
        if not math.isfinite(value):
            return
        if self._best is None or _better(value, self._best["value"], self.best_mode):
            self._best = {"step": step, "metric": self.best_metric, "value": value}
        if jax.process_index() == 0:
            update_best(self.model_dir, step, self.best_metric, value, self.best_mode)

    def missing_sidecars(self) -> list[int]:
        """Saved steps without their numpy prompt (a kill came between the two writes)."""
        return [
            step for step in self.all_steps() if not sidecar_path(self.model_dir, step).exists()
        ]

    def remove_temporaries(self) -> list[str]:
        """Delete what killed atomic writes left in the run directory (hold the run lock)."""
        folders = [self.model_dir, *(self.model_dir / NUMPY_DIR).glob("checkpoint_*")]
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


class _KeepStep(checkpoint_managers.PreservationPolicy):
    """An orbax preservation policy: keep the step `step_fn()` names (the best one)."""

    def __init__(self, step_fn: Callable[[], int | None]) -> None:
        self._step_fn = step_fn

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> Sequence[bool]:
        keep = self._step_fn()
        return [checkpoint.step == keep for checkpoint in checkpoints]


def _better(value: float, best: float, mode: str) -> bool:
    return value > best if mode == "max" else value < best


def sidecar_path(model_dir: storage.PathLike, step: int) -> epath.Path:
    """Where the numpy prompt of checkpoint `step` lives (the official code's layout)."""
    return storage.as_path(model_dir) / NUMPY_DIR / f"checkpoint_{step}" / PROMPT_SIDECAR


def write_prompt_sidecar(model_dir: storage.PathLike, step: int, prompt: np.ndarray) -> str:
    """The official code's numpy export of the prompt, written atomically; returns its path."""
    path = sidecar_path(model_dir, step)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        storage.write_npy_atomic(path, np.asarray(prompt, np.float32))
    return str(path)


def update_best(
    model_dir: storage.PathLike, step: int, metric: str, value: float, mode: str = "max"
) -> None:
    """Record `step` in `best.json` if its `metric` beats the recorded best (`max`/`min`)."""
    best = read_best(model_dir)
    if best is not None and best["metric"] == metric and not _better(value, best["value"], mode):
        return
    storage.write_text_atomic(
        storage.as_path(model_dir) / BEST_FILE,
        json.dumps({"step": step, "metric": metric, "value": value, "mode": mode}),
    )


def read_best(model_dir: storage.PathLike) -> dict | None:
    """`best.json`: the best step, its metric, value and mode; None before any evaluation."""
    best_file = storage.as_path(model_dir) / BEST_FILE
    return json.loads(best_file.read_text()) if best_file.exists() else None


def best_step(model_dir: storage.PathLike) -> int | None:
    """The step recorded as best by evaluation, if any."""
    best = read_best(model_dir)
    return None if best is None else best["step"]
