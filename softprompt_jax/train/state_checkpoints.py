"""Training checkpoints: the prompt, its optimizer state and the step, never the frozen model.

Orbax writes each step into a temporary directory and renames it when complete
(on gs://, it marks the step complete last), so a run killed mid-save resumes from the
last finished step. Kept: the last `keep` steps plus the best one by the chosen eval
metric. Beside each step the prompt is also written as a numpy file at the official
code's path (`numpy_checkpoints/checkpoint_<step>/encoder.prompt.prompt.prompt`).
`model_dir` may be local or a `gs://` URL.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from softprompt_jax import storage
from softprompt_jax.partitioning.multihost import to_host

CHECKPOINT_DIR = "checkpoints"
NUMPY_DIR = "numpy_checkpoints"
PROMPT_SIDECAR = "encoder.prompt.prompt.prompt"
BEST_FILE = "best.json"


class TrainCheckpointer:
    """Save and restore `PromptTrainState`s under `model_dir/checkpoints/checkpoint_<step>`."""

    def __init__(
        self,
        model_dir: storage.PathLike,
        *,
        keep: int = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
    ) -> None:
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        self.model_dir = storage.as_path(model_dir)
        self.best_metric, self.best_mode = best_metric, best_mode
        policies: list[Any] = [checkpoint_managers.LatestN(n=keep)]
        if best_metric:
            policies.append(
                checkpoint_managers.BestN(
                    get_metric_fn=lambda metrics: metrics[best_metric],
                    reverse=best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            step_prefix="checkpoint",
            enable_async_checkpointing=False,
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.model_dir / CHECKPOINT_DIR, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, run_info: dict, metrics: dict | None = None) -> None:
        """Write the state and `run_info` (task, seed, data position) for `step`."""
        if step in self._manager.all_steps():
            return
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), run_info=ocp.args.JsonSave(run_info)
            ),
            metrics=metrics if self.best_metric in metrics else None,
        )
        prompt = to_host(state.prompt)  # every process takes part in the gather
        if jax.process_index() == 0:
            write_prompt_sidecar(self.model_dir, step, prompt)
            if self.best_metric in metrics:
                update_best(
                    self.model_dir,
                    step,
                    self.best_metric,
                    metrics[self.best_metric],
                    self.best_mode,
                )

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

    def close(self) -> None:
        self._manager.close()


def write_prompt_sidecar(model_dir: storage.PathLike, step: int, prompt: np.ndarray) -> str:
    """The official code's numpy export of the prompt, written atomically; returns its path."""
    path = storage.as_path(model_dir) / NUMPY_DIR / f"checkpoint_{step}" / PROMPT_SIDECAR
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        storage.write_npy_atomic(path, np.asarray(prompt, np.float32))
    return str(path)


def update_best(
    model_dir: storage.PathLike, step: int, metric: str, value: float, mode: str = "max"
) -> None:
    """Record `step` in `best.json` if its `metric` beats the recorded best (`max`/`min`)."""
    best_file = storage.as_path(model_dir) / BEST_FILE
    if best_file.exists():
        best = json.loads(best_file.read_text())
        better = value > best["value"] if mode == "max" else value < best["value"]
        if not better:
            return
    storage.write_text_atomic(
        best_file, json.dumps({"step": step, "metric": metric, "value": value, "mode": mode})
    )


def best_step(model_dir: storage.PathLike) -> int | None:
    """The step recorded as best by evaluation, if any."""
    best_file = storage.as_path(model_dir) / BEST_FILE
    return json.loads(best_file.read_text())["step"] if best_file.exists() else None
