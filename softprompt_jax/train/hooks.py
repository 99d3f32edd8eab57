"""Periodic work around the training loop: hooks that run every N steps, and one step meter.

The loop itself only steps; logging, evaluation and checkpointing are hooks added with
`Hooks.add(fn, every=N)` (levanter's `Trainer.add_hook(every=...)`). A hook runs after
every N-th finished step and after the last one, in the order hooks were added, and sees
the `StepInfo` of that step. The `StepMeter` counts steps and losses since the last log and
pauses while hooks run, so throughput and ETA measure training alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from softprompt_jax.partitioning import to_host


@dataclasses.dataclass
class StepInfo:
    """What a hook sees: the finished step (1-based), the last step, the state, and results.

    `results` starts empty at every step; a hook leaves what later hooks (and the trainer's
    result) need there, e.g. the evaluation's metrics for the checkpoint's best-step policy.
    """

    step: int
    last_step: int
    state: Any
    results: dict[str, Any]


Hook = Callable[[StepInfo], None]


class Hooks:
    """Hooks with their periods, run after every `every`-th step and after the last step."""

    def __init__(self) -> None:
        self._hooks: list[tuple[Hook, int]] = []

    def add(self, hook: Hook, *, every: int) -> None:
        if every <= 0:
            raise ValueError(f"a hook's period must be positive, got every={every}")
        self._hooks.append((hook, every))

    def run(self, info: StepInfo) -> None:
        for hook, every in self._hooks:
            if info.step % every == 0 or info.step == info.last_step:
                hook(info)


class StepMeter:
    """Losses of the steps since the last `reset`, and their time with hook time excluded."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.losses: list[Any] = []
        self.restart_clock()

    def restart_clock(self) -> None:
        """Time from now on (e.g. after the compiling first step); losses are kept."""
        self.timed_steps, self._paused, self._start = 0, 0.0, time.perf_counter()

    def record(self, loss: Any) -> None:
        """One step done; `loss` may stay on the device until the next read."""
        self.losses.append(loss)
        self.timed_steps += 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside is not training time (a `reset` inside restarts from there)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - max(start, self._start)

    def first_non_finite(self) -> tuple[int, float] | None:
        """(steps back from the latest, loss) of the first NaN or infinite loss recorded, if any.

        0 is the latest step. Waits for the device, so call it only where the loop syncs anyway.
        """
        losses = np.asarray(to_host(self.losses), dtype=np.float64).reshape(-1)
        bad = np.flatnonzero(~np.isfinite(losses))
        return (len(losses) - 1 - int(bad[0]), float(losses[bad[0]])) if bad.size else None

    def mean_loss(self) -> float:
        """The mean loss of the recorded steps (waits for the device)."""
        return float(np.mean(to_host(self.losses)))

    def seconds_per_step(self) -> float | None:
        """Training time per timed step; None before any. Call after `mean_loss` (it waits)."""
        if not self.timed_steps:
            return None
        return (time.perf_counter() - self._start - self._paused) / self.timed_steps
