"""Dynamic batching: requests for any prompts wait a few milliseconds and run as one batch.

Handlers `submit` their rows (`Work`) and await the results. One asyncio task forms batches:
it takes the oldest waiting row's mode, waits until `max_batch` rows of that mode are queued
or the oldest has waited `max_wait` seconds, and runs them (rows of every prompt together)
through `run` on a worker thread, so the event loop keeps accepting requests meanwhile. Rows
queued while a batch runs form the next one. A row's failure is its own result: it never
fails the other rows of its batch. With `mix_prompts=False` a batch holds one prompt's rows
only, as a server running one adapter at a time would (for comparison). A submission that
would queue more than `max_queued` rows is refused (`QueueFull`), and a bug while forming or
finishing a batch fails that batch's rows only: the task goes on forming the next ones.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from softprompt_jax.serving.engine import Mode, Work

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds too many rows to take a request's rows now (retry later)."""


class BatchFailed(RuntimeError):
    """Forming, running or finishing a batch hit a bug (logged); its rows fail with this."""


@dataclasses.dataclass
class _Queued:
    work: Work
    future: asyncio.Future
    since: float  # loop time when queued


@dataclasses.dataclass(frozen=True)
class BatchStats:
    """What the batcher reports per batch (for metrics)."""

    size: int
    queue_seconds: Sequence[float]  # each row's wait before its batch started
    run_seconds: float


class Batcher:
    """Collects `Work` rows from handlers into batches; `run(mode, works)` computes one batch
    (returning per row a result or an exception) on a single worker thread. At most
    `max_queued` rows wait (None: no limit)."""

    def __init__(
        self,
        run: Callable[[Mode, list[Work]], list[Any]],
        *,
        max_batch: int,
        max_wait: float,
        mix_prompts: bool = True,
        max_queued: int | None = None,
        on_batch: Callable[[BatchStats], None] = lambda stats: None,
    ) -> None:
        self._run, self.on_batch = run, on_batch
        self.max_batch, self.max_wait, self.mix_prompts = max_batch, max_wait, mix_prompts
        self.max_queued = max_queued
        self._queue: collections.deque[_Queued] = collections.deque()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="serve-batch")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start forming batches (in the running event loop)."""
        self._task = asyncio.get_running_loop().create_task(self._form_batches())

    async def close(self) -> None:
        """Stop after the batch in progress; rows still queued are cancelled."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for queued in self._queue:
            queued.future.cancel()
        self._queue.clear()
        self._executor.shutdown(wait=True)

    def queued_rows(self) -> int:
        """Rows waiting for a batch (not counting the batch running)."""
        return len(self._queue)

    async def submit(self, works: Sequence[Work]) -> list[Any]:
        """Each row's result (or the exception that stopped it), once its batch has run;
        `QueueFull` at once if queuing `works` would pass `max_queued` rows."""
        if self.max_queued is not None and len(self._queue) + len(works) > self.max_queued:
            raise QueueFull(
                f"the server has {len(self._queue)} rows queued; {len(works)} more would pass "
                f"its limit of {self.max_queued} (SERVE_MAX_QUEUED_ROWS); retry later"
            )
        loop = asyncio.get_running_loop()
        futures = []
        for work in works:
            future = loop.create_future()
            self._queue.append(_Queued(work, future, loop.time()))
            futures.append(future)
        self._wake.set()
        return list(await asyncio.gather(*futures, return_exceptions=True))

    async def _form_batches(self) -> None:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            batch: list[_Queued] = []
            try:
                batch = await self._next_batch()
                await self._run_batch(batch)
            except Exception:  # a bug: fail this batch's rows, keep serving the others
                log.exception("forming or finishing a batch of %d rows failed", len(batch))
                if not batch and self._queue:  # failed before taking it: drop the oldest row
                    batch = [self._queue.popleft()]
                error = BatchFailed("the server failed on this request's batch (logged)")
                for queued in batch:
                    if not queued.future.done():
                        queued.future.set_exception(error)

    async def _next_batch(self) -> list[_Queued]:
        """Wait until the oldest row's batch is full or has waited `max_wait`; take it."""
        loop = asyncio.get_running_loop()
        oldest = self._queue[0]
        key = self._key(oldest.work)
        while self._count(key) < self.max_batch:
            left = oldest.since + self.max_wait - loop.time()
            if left <= 0:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                break
        return self._take(key)

    def _key(self, work: Work) -> Hashable:
        """Rows of equal keys may share a batch: the same mode (and prompt, unless mixing)."""
        return work.mode if self.mix_prompts else (work.mode, work.prompt)

    def _count(self, key: Hashable) -> int:
        return sum(self._key(queued.work) == key for queued in self._queue)

    def _take(self, key: Hashable) -> list[_Queued]:
        """Up to `max_batch` rows of `key`, oldest first; the others stay queued in order."""
        batch, rest = [], collections.deque()
        for queued in self._queue:
            fits = self._key(queued.work) == key and len(batch) < self.max_batch
            (batch if fits else rest).append(queued)
        self._queue = rest
        return batch

    async def _run_batch(self, batch: list[_Queued]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        clock = time.perf_counter()
        try:
            results = await loop.run_in_executor(
                self._executor, self._run, batch[0].work.mode, [queued.work for queued in batch]
            )
        except Exception as error:  # `run` isolates rows; this is a bug in it: fail the batch
            log.exception("running a batch of %d failed", len(batch))
            results = [error] * len(batch)
        self.on_batch(
            BatchStats(
                len(batch),
                [started - queued.since for queued in batch],
                time.perf_counter() - clock,
            )
        )
        for queued, result in zip(batch, results, strict=True):
            if queued.future.done():  # the request was cancelled meanwhile
                continue
            if isinstance(result, BaseException):
                queued.future.set_exception(result)
            else:
                queued.future.set_result(result)
