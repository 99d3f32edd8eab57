"""Ctrl-C and SIGTERM as a request to stop at the next step boundary, not mid-step.

Inside `with StopRequests() as stop:` the first SIGINT or SIGTERM only sets
`stop.signal`; the training loop checks it after each step, saves a checkpoint and ends
(see `trainer.train`). A second signal interrupts at once (`KeyboardInterrupt`). Outside the
block, and in a multi-process run (where processes would stop at different steps and
wait on each other forever), the signals keep their usual effect.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

import jax

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """Records the first SIGINT/SIGTERM in `signal` (its name) while the block runs."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = {number: signal.signal(number, self._handle) for number in SIGNALS}
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(number).name}: stopping at once")
        self.signal = signal.Signals(number).name
