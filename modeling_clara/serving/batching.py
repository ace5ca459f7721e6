"""Dynamic batching: concurrent requests wait briefly in a bounded queue and run as one model call.

A request joins the queue of its operation with a cost (the documents it compresses). The worker takes the oldest
request, waits until `max_batch_size` requests with the same key are queued, their costs fill `max_batch_cost`, or
`max_wait_s` has passed (both since the oldest arrived and since the previous batch finished), and runs them as one
call of `run_batch` on the model's executor (one thread: the model switches adapters and is not thread-safe). The
queue is bounded (`QueueFullError` instead of growing memory). A request whose caller stops waiting (a timeout, a
client that went away) leaves the queue; if its batch is already taken, the model thread skips it when the batch
starts, and skips the whole call when no request in it is still waited for.

Long work is bounded in one of two ways. Callers split it into units of at most `max_batch_cost` and submit one
after the other, so each call holds the model for one unit's time and a caller that stops waiting costs at most the
unit that is running (compression). Or the call itself stops early (generation): a `stoppable` batcher hands
`run_batch` a `should_stop` callable, true once no request of the running call is still waited for, which the call
asks between its steps; its results are then discarded. While some requests of a call are still waited for, it runs
to its end for them.
"""

import asyncio
import math
import threading
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


class RequestTimeoutError(TimeoutError):
    """No result within the caller's timeout. `started`: whether the model had started on the request (its result
    is then discarded when it arrives) or it was still waiting (it left the queue and cost nothing)."""

    def __init__(self, operation: str, timeout: float, started: bool, stoppable: bool = False):
        if not started:
            state = "it was still waiting for the model and left the queue"
        elif stoppable:
            state = ("its model call was running: its result is discarded, and the call stops at its next step once "
                     "no request in it is still waited for")
        else:
            state = "its model call was running and its result is discarded"
        super().__init__(f"no {operation} result within {timeout:.1f} s; {state}")
        self.started = started


@dataclass
class _Entry:
    item: object
    key: Hashable
    cost: int
    future: asyncio.Future
    enqueued_at: float = field(default_factory=time.monotonic)
    # Set on the event loop when the caller stops waiting, read by the model thread before it runs the batch.
    abandoned: bool = False
    started: bool = False


class _NobodyWaits:
    """`should_stop` of a running call: true once every request in it has been abandoned; remembers having said so."""

    def __init__(self, entries: list[_Entry]):
        self.entries, self.said_stop = entries, False

    def __call__(self) -> bool:
        # Read without the lock: `abandoned` only ever turns True, and a late read stops one step later.
        self.said_stop = self.said_stop or all(entry.abandoned for entry in self.entries)
        return self.said_stop


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
        max_queue: Requests waiting (queued, or taken into a batch the model thread has not started) at most; one
            more is a `QueueFullError`.
        max_batch_cost: The summed `cost` of the requests in one call at most (a request costing more runs alone).
        on_batch: Called with `(operation, batch_size, seconds)` after each call, `seconds` timing the model call
            alone (metrics).
        stoppable: Call `run_batch(items, should_stop=...)`: `should_stop()` turns true once no request of the call
            is still waited for (each timed out or its client left), and `run_batch` ends early when it does.
        on_stopped: Called with `(operation,)` after a call that `should_stop` told to stop (metrics).
    """

    def __init__(self, operation: str, run_batch: Callable[[list], list], executor: Executor, max_batch_size: int,
                 max_wait_s: float, max_queue: int, max_batch_cost: int | None = None,
                 on_batch: Callable[[str, int, float], None] | None = None, stoppable: bool = False,
                 on_stopped: Callable[[str], None] | None = None):
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0 or (max_batch_cost is not None and max_batch_cost < 1):
            raise ValueError(f"need max_batch_size >= 1, max_queue >= 1, max_wait_s >= 0, max_batch_cost >= 1; got "
                             f"{max_batch_size}, {max_queue}, {max_wait_s}, {max_batch_cost}")
        self.operation, self.run_batch, self.executor = operation, run_batch, executor
        self.max_batch_size, self.max_wait_s, self.max_queue = max_batch_size, max_wait_s, max_queue
        self.max_batch_cost = math.inf if max_batch_cost is None else max_batch_cost
        self.on_batch, self.stoppable, self.on_stopped = on_batch, stoppable, on_stopped
        self._pending: deque[_Entry] = deque()
        self._taken: list[_Entry] = []  # the batch handed to the executor, until the model thread starts it
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._seconds_per_batch = 1.0  # running estimate of a model call, for Retry-After
        self._last_batch_done = -math.inf
        self._running_since: float | None = None  # written by the model thread
        self._lock = threading.Lock()  # `abandoned` and `started` change on the loop and on the model thread

    @property
    def queue_depth(self) -> int:
        """Requests waiting for the model: queued, or in a batch the model thread has not started yet."""
        return len(self._pending) + len(self._taken)

    @property
    def is_full(self) -> bool:
        return self.queue_depth >= self.max_queue

    @property
    def busy_seconds(self) -> float:
        """How long the model call of this operation that is running has run (0 when none runs)."""
        since = self._running_since
        return 0.0 if since is None else time.monotonic() - since

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._arrived = asyncio.Event()
        self._worker = asyncio.get_running_loop().create_task(self._work(), name=f"batcher-{self.operation}")

    async def stop(self) -> None:
        """Stop forming batches; every waiting request is cancelled, and a taken batch is skipped."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        for entry in [*self._pending, *self._taken]:
            self._abandon(entry)
            entry.future.cancel()
        self._pending.clear()

    async def submit(self, item, key: Hashable = None, timeout: float | None = None, cost: int = 1):
        """Queue `item` and wait for its result. Requests batch together only when their `key`s are equal.

        Raises:
            QueueFullError: `max_queue` requests are already waiting.
            RequestTimeoutError: No result within `timeout` seconds; the request is dropped (from the queue if not
                started).
        """
        if self.is_full:
            raise QueueFullError(self.operation, self.max_queue, self._retry_after())
        entry = _Entry(item, key, cost, asyncio.get_running_loop().create_future())
        self._pending.append(entry)
        self._arrived.set()
        try:
            return await asyncio.wait_for(entry.future, timeout)
        except TimeoutError as error:
            raise RequestTimeoutError(self.operation, timeout, entry.started, self.stoppable) from error
        finally:
            # Timed out or cancelled (client gone): no model time is spent on it from here on.
            if not entry.future.done() or entry.future.cancelled():
                self._abandon(entry)

    def _abandon(self, entry: _Entry) -> None:
        with self._lock:
            entry.abandoned = True
        try:
            self._pending.remove(entry)
        except ValueError:
            pass  # already taken into a batch: the model thread skips it, or its result is dropped

    def _retry_after(self) -> int:
        batches_ahead = math.ceil(self.queue_depth / self.max_batch_size)
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
        # request that queued while it ran would otherwise start alone just before they return (with 16
        # closed-loop clients: batches of 15 and 1, alternating). So the window also opens when the previous batch
        # finishes.
        deadline = max(first.enqueued_at, self._last_batch_done) + self.max_wait_s
        while not self._is_complete(self._fill(first)) and (left := deadline - time.monotonic()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                break
            if not self._pending or self._pending[0] is not first:
                break
        if not self._pending or self._pending[0] is not first:
            return []  # the oldest request left (timed out) meanwhile: start over with the new oldest
        batch = self._fill(first)
        for entry in batch:
            self._pending.remove(entry)
        return batch

    def _fill(self, first: _Entry) -> list[_Entry]:
        """The oldest request and, in arrival order, those with its key that fit the batch's size and cost."""
        batch, cost = [first], first.cost
        for entry in self._pending:
            if len(batch) == self.max_batch_size:
                break
            if entry is not first and entry.key == first.key and cost + entry.cost <= self.max_batch_cost:
                batch.append(entry)
                cost += entry.cost
        return batch

    def _is_complete(self, batch: list[_Entry]) -> bool:
        """No request can join: the batch has `max_batch_size` requests or its cost leaves no room for one more."""
        return len(batch) == self.max_batch_size or sum(entry.cost for entry in batch) >= self.max_batch_cost

    async def _run(self, batch: list[_Entry]) -> None:
        self._taken = batch
        try:
            ran = await asyncio.get_running_loop().run_in_executor(self.executor, self._run_live, batch)
        finally:
            self._taken = []
        self._last_batch_done = time.monotonic()
        if ran is None:
            return  # every request of the batch had left before the model thread reached it
        live, outcomes, seconds = ran
        self._seconds_per_batch = 0.8 * self._seconds_per_batch + 0.2 * seconds
        if self.on_batch is not None:
            self.on_batch(self.operation, len(live), seconds)
        for entry, outcome in zip(live, outcomes):
            if entry.future.done():  # timed out or cancelled while running
                continue
            if isinstance(outcome, BaseException):
                entry.future.set_exception(outcome)
            else:
                entry.future.set_result(outcome)

    def _run_live(self, batch: list[_Entry]) -> tuple[list[_Entry], list, float] | None:
        """On the model thread: run the requests of `batch` still waited for; time the model call alone."""
        with self._lock:
            live = [entry for entry in batch if not entry.abandoned]
            for entry in live:
                entry.started = True
        self._taken = []
        if not live:
            return None
        self._running_since = started = time.monotonic()
        try:
            outcomes = self._run_isolated(live)
        finally:
            self._running_since = None
        return live, outcomes, time.monotonic() - started

    def _run_isolated(self, entries: list[_Entry]) -> list:
        items = [entry.item for entry in entries]
        try:
            if not self.stoppable:
                return self.run_batch(items)
            should_stop = _NobodyWaits(entries)
            outcomes = self.run_batch(items, should_stop=should_stop)
            if should_stop.said_stop and self.on_stopped is not None:
                self.on_stopped(self.operation)
            return outcomes
        except Exception as error:
            if len(entries) == 1:
                return [error]
            logger.warning(f"{self.operation} batch of {len(items)} failed ({error!r}); running its requests one by one")
            return [self._run_isolated([entry])[0] for entry in entries]
