"""Dynamic batching: concurrent users gathered into one engine call, split back.

One public entry point, `DynamicBatcher.submit`. Requests are grouped by (model, padded
candidate count): a request with 1000 candidates never forces a batch of 100-candidate
users to be padded to 1000 (requests scored from the item table form one group: their
batches are padded along the support only). The group whose oldest request has waited longest is served
first. The batch is padded, run on an engine thread (the engine releases the GIL) and
split back, and every caller gets its own result or an error: nobody is left waiting
when the engine raises or the batcher closes.

When does a batch close? Always when it holds `max_batch_size` users. Otherwise it
depends on load, because with closed-loop clients waiting only pays when others are
actually coming:
- idle (nobody arrived while the engine last ran): the batch takes whoever the event
  loop has ready and runs at once, so a lone request never waits;
- loaded (requests arrived while the engine last ran): the batch waits for company
  until it is larger than the previous batch, or until its oldest request has waited
  `max_wait_s`: fewer, larger engine calls (the engine's cost is mostly per call, not
  per user) for at most that much latency. The previous batch's size is what closed-loop
  clients have in circulation; waiting for one more lets batches grow while arrivals
  allow, and the time limit lets them shrink when they do not.

The queue is bounded: when `queue_size` requests are waiting, `submit` refuses at once
(Overloaded → RESOURCE_EXHAUSTED) instead of letting latency grow. Requests that were
cancelled, or whose deadline passed while they waited, are dropped before the engine.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from service.errors import DeadlineExpired, EngineFailure, NotReady, Overloaded
from service.metrics import Metrics
from service.padding import ShapeBuckets, UserInputs, UserOutputs

log = logging.getLogger(__name__)

ENGINE_THREAD_PREFIX = "warmstart-engine"


class Servable(Protocol):
    """A loaded model as the batcher sees it."""

    buckets: ShapeBuckets

    def query_bucket(self, user: UserInputs) -> int:
        """The padded query length the user's batch runs at (users of one batch share it)."""
        ...

    def run_users(self, users: list[UserInputs], support_length: int, query_length: int) -> list[UserOutputs]:
        """Pads, runs and splits one batch: one output per user, in order."""
        ...


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_size: int = 32  # users per engine call
    max_wait_s: float = 0.002  # under load, how long a batch's oldest request may wait for company
    queue_size: int = 256  # requests waiting; beyond, submit refuses
    workers: int = 1  # engine calls in flight at once (one engine thread each)

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.queue_size < 1 or self.workers < 1:
            raise ValueError("max_batch_size, queue_size and workers must be >= 1")
        if not (math.isfinite(self.max_wait_s) and self.max_wait_s >= 0):
            raise ValueError(f"max_wait_s must be a finite number >= 0, got {self.max_wait_s}")


@dataclass(eq=False, slots=True)
class _Pending:
    user: UserInputs
    deadline_s: float | None
    enqueued_s: float
    future: asyncio.Future


_GroupKey = tuple[Servable, int]  # (model, padded query length; 0 = scored from the item table)


class DynamicBatcher:
    """Gathers concurrent `submit` calls into padded engine batches."""

    def __init__(self, config: BatcherConfig, metrics: Metrics) -> None:
        self._config = config
        self._metrics = metrics
        metrics.queue_capacity.set(config.queue_size)
        self._groups: dict[_GroupKey, deque[_Pending]] = {}
        self._queued = 0
        self._arrivals = 0  # requests ever submitted
        self._arrival_waiters: list[asyncio.Future] = []
        self._loaded = False  # did requests arrive while the engine last ran?
        self._last_batch = 1  # users in the last engine call
        self._threads = _EngineThreads(config.workers)
        self._workers: list[asyncio.Task] = []
        self._closed = False
        self._draining = False

    def start(self) -> None:
        """Starts the engine threads and worker tasks (call from the running event loop)."""
        if not self._workers:
            self._threads.start()
            self._workers = [asyncio.create_task(self._work(), name=f"batcher-{i}") for i in range(self._config.workers)]

    async def submit(self, model: Servable, user: UserInputs, deadline_s: float | None = None) -> UserOutputs:
        """Runs one user through the model's engine, batched with whoever else is waiting.

        deadline_s: a time.monotonic() value; the request is dropped if it is still
        waiting then. Raises Overloaded when the queue is full, NotReady when closing,
        EngineFailure when the engine raised on this request's batch.
        """
        if self._closed:
            raise NotReady("the server is shutting down")
        if self._queued >= self._config.queue_size:
            raise Overloaded(f"{self._queued} requests are already waiting; retry with backoff")
        key = (model, model.query_bucket(user))
        pending = _Pending(user, deadline_s, time.monotonic(), asyncio.get_running_loop().create_future())
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = deque()
        group.append(pending)
        self._arrivals += 1
        self._set_queued(self._queued + 1)
        self._wake()
        return await pending.future

    def drain(self) -> None:
        """Stops waiting for batches to fill: run what is queued as soon as possible."""
        self._draining = True
        self._wake()

    async def close(self) -> None:
        """Stops the workers and engine threads; whoever is still waiting gets NotReady.

        A batch still inside the engine is abandoned to its (daemon) thread."""
        self._closed = True
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        self._threads.stop()
        for group in self._groups.values():
            _fail(group, lambda: NotReady("the server is shutting down"))
        self._groups.clear()
        self._set_queued(0)

    # -- private machinery ----------------------------------------------------------

    def _set_queued(self, n: int) -> None:
        self._queued = n
        self._metrics.queue_depth.set(n)

    def _wake(self) -> None:
        waiters, self._arrival_waiters = self._arrival_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _next_arrival(self, timeout_s: float | None) -> None:
        """Returns at the next submit (or drain), or after timeout_s."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._arrival_waiters.append(waiter)
        timer = loop.call_later(timeout_s, _resolve, waiter) if timeout_s is not None else None
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()

    async def _work(self) -> None:
        while True:
            if not self._groups:
                await self._next_arrival(None)
                continue
            key = min(self._groups, key=lambda k: self._groups[k][0].enqueued_s)
            batch: list[_Pending] = []
            try:
                await self._wait_to_fill(self._groups[key])
                batch = self._take(key)
                if batch:
                    await self._run(key, batch)
            except Exception as exc:  # a bug here must not strand the callers or stop the worker
                log.error("batcher failed on a batch of %d", len(batch), exc_info=exc)
                _fail(batch, lambda: EngineFailure("internal batching error"))

    async def _wait_to_fill(self, group: deque[_Pending]) -> None:
        limit = self._config.max_batch_size
        close_at = group[0].enqueued_s + self._config.max_wait_s
        while group and len(group) < limit and not self._draining:
            remaining = close_at - time.monotonic()
            if remaining <= 0:
                return
            if self._loaded:
                if len(group) > self._last_batch:
                    return
                await self._next_arrival(remaining)
            else:
                # Idle: take what the event loop has ready, pass by pass, then go.
                arrivals = self._arrivals
                await asyncio.sleep(0)
                if self._arrivals == arrivals:
                    return

    def _take(self, key: _GroupKey) -> list[_Pending]:
        """Pops up to max_batch_size requests of a group; drops cancelled and expired ones."""
        group = self._groups.get(key)
        if not group:
            self._groups.pop(key, None)
            return []
        taken = [group.popleft() for _ in range(min(len(group), self._config.max_batch_size))]
        if not group:
            del self._groups[key]
        self._set_queued(self._queued - len(taken))
        now = time.monotonic()
        live = []
        for pending in taken:
            if pending.future.done():  # the caller went away (cancelled, or its deadline fired)
                self._metrics.reject("cancelled")
            elif pending.deadline_s is not None and pending.deadline_s <= now:
                pending.future.set_exception(DeadlineExpired("the deadline passed while the request was queued"))
            else:
                self._metrics.queue_wait(now - pending.enqueued_s)
                live.append(pending)
        return live

    async def _run(self, key: _GroupKey, batch: list[_Pending]) -> None:
        model, query_length = key
        users = [p.user for p in batch]
        arrivals_before = self._arrivals
        try:
            support_length = model.buckets.support_length(max(u.support_size for u in users))
            outputs, seconds = await self._threads.run(_execute, model, users, support_length, query_length, self._metrics)
        except asyncio.CancelledError:
            _fail(batch, lambda: NotReady("the server is shutting down"))
            raise
        except Exception as exc:
            log.error("engine failed on a batch of %d users (query length %d)", len(users), query_length, exc_info=exc)
            _fail(batch, lambda: EngineFailure("the engine failed on this request's batch"))
            return
        finally:
            self._loaded = self._arrivals > arrivals_before
        self._metrics.batch(len(users), seconds)
        self._last_batch = len(users)
        for pending, output in zip(batch, outputs):
            if not pending.future.done():
                pending.future.set_result(output)


class _EngineThreads:
    """Engine calls off the event loop: daemon threads fed by a queue, answering through
    call_soon_threadsafe (half the cost of run_in_executor's chained futures). Daemon, so
    that an engine call that never returns cannot keep the process from exiting."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._threads = [
            threading.Thread(target=self._serve, name=f"{ENGINE_THREAD_PREFIX}-{i}", daemon=True) for i in range(self._count)
        ]
        for thread in self._threads:
            thread.start()

    def run(self, function: Callable[..., Any], *args: Any) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put((loop, future, function, args))
        return future

    def stop(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, function, args = job
            try:
                result = function(*args)
            except BaseException as exc:  # delivered to the awaiting coroutine, which logs it
                loop.call_soon_threadsafe(_set_exception, future, exc)
            else:
                loop.call_soon_threadsafe(_set_result, future, result)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _set_result(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _fail(batch: Sequence[_Pending], error: Callable[[], Exception]) -> None:
    """Gives every caller still waiting its own exception instance."""
    for pending in batch:
        if not pending.future.done():
            pending.future.set_exception(error())


def _execute(
    model: Servable, users: list[UserInputs], support_length: int, query_length: int, metrics: Metrics | None = None
) -> tuple[list[UserOutputs], float]:
    """Runs one batch (on an engine thread); returns outputs and seconds. Records each
    user's support losses here, off the event loop (users with interactions)."""
    started = time.perf_counter()
    outputs = model.run_users(users, support_length, query_length)
    if len(outputs) != len(users):
        raise RuntimeError(f"{len(outputs)} outputs for a batch of {len(users)} users")
    seconds = time.perf_counter() - started
    if metrics is not None:
        for user, output in zip(users, outputs):
            if user.support_size:
                metrics.support_loss(output.support_loss_before, output.support_loss_after)
    return outputs, seconds
