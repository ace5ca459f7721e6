"""Dynamic batching: concurrent requests wait briefly in a bounded queue and run as one model call.

A request joins the queue of its operation. The worker takes the oldest request, waits until `max_batch_size`
requests with the same key are queued or `max_wait_s` has passed, both since the oldest arrived and since the
previous batch finished, and runs them as one call of `run_batch` on the model's executor (one thread: the model
switches adapters and is not thread-safe). The queue is bounded (`QueueFullError` instead of growing memory), and a
request that times out or whose client goes away leaves the queue before it costs any model time.
"""

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from transformers.utils import logging

logger = logging.get_logger(__name__)


class QueueFullError(Exception):
    """The operation's queue holds `max_queue` requests; retry after `retry_after` seconds."""

    def __init__(self, operation: str, max_queue: int, retry_after: int):
        super().__init__(f"the {operation} queue is full ({max_queue} requests waiting); retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class _Entry:
    item: object
    key: Hashable
    future: asyncio.Future
    enqueued_at: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    """Group requests of one operation into batched calls of `run_batch(items) -> results`.

    `run_batch` returns one result per item, in order; a result that is an `Exception` is raised to that item's
    caller alone. If the whole call raises, every item is run again on its own, so one bad request cannot fail the
    requests batched with it.

    Args:
        operation: Name used in metrics and errors (`"answer"`).
        run_batch: The blocking batch function; runs on `executor`.
        executor: Where model work runs; share one single-thread executor between all batchers of a model.
        max_batch_size: Requests per call at most.
        max_wait_s: How long the oldest queued request waits for others before its batch runs; counted from the end
            of the previous batch when that is later (see `_next_batch`).
        max_queue: Requests waiting (not yet running) at most; one more is a `QueueFullError`.
        on_batch: Called with `(operation, batch_size, seconds)` after each call (metrics).
    """

    def __init__(self, operation: str, run_batch: Callable[[list], list], executor: Executor, max_batch_size: int,
                 max_wait_s: float, max_queue: int, on_batch: Callable[[str, int, float], None] | None = None):
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError(f"need max_batch_size >= 1, max_queue >= 1, max_wait_s >= 0; got {max_batch_size}, "
                             f"{max_queue}, {max_wait_s}")
        self.operation, self.run_batch, self.executor = operation, run_batch, executor
        self.max_batch_size, self.max_wait_s, self.max_queue = max_batch_size, max_wait_s, max_queue
        self.on_batch = on_batch
        self._pending: deque[_Entry] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._seconds_per_batch = 1.0  # running estimate for Retry-After
        self._last_batch_done = -math.inf

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._arrived = asyncio.Event()
        self._worker = asyncio.get_running_loop().create_task(self._work(), name=f"batcher-{self.operation}")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        for entry in self._pending:
            entry.future.cancel()
        self._pending.clear()

    async def submit(self, item, key: Hashable = None, timeout: float | None = None):
        """Queue `item` and wait for its result. Requests batch together only when their `key`s are equal.

        Raises:
            QueueFullError: `max_queue` requests are already waiting.
            TimeoutError: No result within `timeout` seconds; the request is dropped (from the queue if not started).
        """
        if len(self._pending) >= self.max_queue:
            raise QueueFullError(self.operation, self.max_queue, self._retry_after())
        entry = _Entry(item, key, asyncio.get_running_loop().create_future())
        self._pending.append(entry)
        self._arrived.set()
        try:
            return await asyncio.wait_for(entry.future, timeout)
        finally:
            # Timed out or cancelled (client gone): leave the queue so no model time is spent on it.
            if not entry.future.done() or entry.future.cancelled():
                self._discard(entry)

    def _discard(self, entry: _Entry) -> None:
        try:
            self._pending.remove(entry)
        except ValueError:
            pass  # already taken into a running batch; its result will be dropped

    def _retry_after(self) -> int:
        batches_ahead = math.ceil(len(self._pending) / self.max_batch_size)
        return max(1, math.ceil(batches_ahead * self._seconds_per_batch))

    async def _work(self) -> None:
        while True:
            batch = await self._next_batch()
            if batch:
                await self._run(batch)

    async def _next_batch(self) -> list[_Entry]:
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        first = self._pending[0]
        # Clients whose requests the previous batch answered send their next ones only once its results are out; a
        # request that queued while it ran would otherwise start alone just before they return, and they would wait
        # for it (with 16 closed-loop clients: batches of 15 and 1, alternating). So the window also opens when the
        # previous batch finishes.
        deadline = max(first.enqueued_at, self._last_batch_done) + self.max_wait_s
        while self._count(first.key) < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                break
            if not self._pending or self._pending[0] is not first:
                return []  # the oldest request left (timed out) meanwhile: start over with the new oldest
        batch = [e for e in self._pending if e.key == first.key][: self.max_batch_size]
        for entry in batch:
            self._pending.remove(entry)
        return batch

    def _count(self, key: Hashable) -> int:
        return sum(entry.key == key for entry in self._pending)

    async def _run(self, batch: list[_Entry]) -> None:
        started = time.monotonic()
        items = [entry.item for entry in batch]
        outcomes = await asyncio.get_running_loop().run_in_executor(self.executor, self._run_isolated, items)
        self._last_batch_done = time.monotonic()
        seconds = self._last_batch_done - started
        self._seconds_per_batch = 0.8 * self._seconds_per_batch + 0.2 * seconds
        if self.on_batch is not None:
            self.on_batch(self.operation, len(batch), seconds)
        for entry, outcome in zip(batch, outcomes):
            if entry.future.done():  # timed out or cancelled while running
                continue
            if isinstance(outcome, BaseException):
                entry.future.set_exception(outcome)
            else:
                entry.future.set_result(outcome)

    def _run_isolated(self, items: list) -> list:
        try:
            return self.run_batch(items)
        except Exception as error:
            if len(items) == 1:
                return [error]
            logger.warning(f"{self.operation} batch of {len(items)} failed ({error!r}); running its requests one by one")
            return [self._run_isolated([item])[0] for item in items]
