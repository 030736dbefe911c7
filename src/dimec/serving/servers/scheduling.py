"""The edge's queue in front of the model: priority scheduling, bounded queues, admission control, and
PA-MDI's allocation advice. Used when the tier runs with a sources file (serving/sources.py).

    request (source, class) -> admit?  -> per-class FIFO queues -> pick by policy -> worker thread(s) -> model
                                 \\-> 429 + Retry-After (the client answers it elsewhere)

Policies (`scheduling.policy`):
- "strict": always the oldest request of the highest class that has one waiting.
- "wfq": self-clocked weighted fair queuing (Golestani, 1994): each request gets the finish tag
  max(V, last tag of its class) + texts / weight, V is the tag of the request last started, and the smallest
  tag goes next; over time each busy class gets the edge in proportion to its weight.
- "fifo": one queue in arrival order, full = refuse the newcomer whatever its class (the baseline).

Reservation (`reserved_workers`, strict and wfq): that many of the `workers` model threads only ever run
requests of the highest class, so a high request never waits behind a lower one that is already running
(the others run any class). FIFO ignores it.

Admission (strict and wfq): a newcomer is queued if fewer than `queue_capacity` requests wait (and fewer
than its class's `max_queue`). Otherwise the newest waiting request of the lowest class below the
newcomer's is shed (429) to make room; only when nothing of lower priority waits is the newcomer shed. So a
request of the highest class is never shed while a lower one waits. A request that states a deadline is
shed at once if the expected wait plus its compute would miss it.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dimec.serving.servers.sources import AllocationConfig, Source, SourceTable

# Set by the server's guard for each request: an Event set when the client disconnects (the connection closed).
CLIENT_GONE: contextvars.ContextVar[asyncio.Event | None] = contextvars.ContextVar("dimec_client_gone", default=None)


class Abandoned(Exception):
    """The client went away while its request waited in the queue: it is dropped, never run."""


class Shed(Exception):
    """A request the edge will not run now: answered 429 with Retry-After; `reason` is full, evicted or
    deadline."""

    def __init__(self, reason: str, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.reason, self.message, self.retry_after_s = reason, message, retry_after_s


@dataclass(eq=False)
class _Job:
    source: Source
    size: int  # texts in the request
    work: Callable[[], Any]
    arrived: float
    seq: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    tag: float = 0.0  # wfq finish tag


@dataclass
class Done:
    value: Any
    queue_ms: float  # waited before a worker took it
    compute_ms: float  # the worker's time on it


class Allocator:
    """PA-MDI's allocation, adapted to a shared edge (docs/fleet.md): the edge's measured capacity, times
    `target_utilization`, is handed to the classes in priority order, each getting at most its demand; a
    class that gets a share s of its demand is advised to keep 1 - s of its edge-bound work on the device.

    Demand is the arrival rate in texts/s (exponentially decayed over `horizon_s`), divided by the share
    the class is currently sending (1 - its advice), because compliant clients already keep the rest.
    Capacity is workers / (model seconds per text, an exponential average). The advice moves `smoothing`
    of the way to its new target at each update, so it does not flap."""

    def __init__(self, config: AllocationConfig, classes: list[str], workers: int) -> None:
        self.config, self.classes, self.workers = config, classes, workers
        self._rate = dict.fromkeys(classes, 0.0)
        self._last = dict.fromkeys(classes, 0.0)
        self.keep = dict.fromkeys(classes, 0.0)
        self.seconds_per_text: float | None = None

    def arrival(self, priority: str, size: int, now: float) -> None:
        self._rate[priority] = self.rate(priority, now) + size / self.config.horizon_s
        self._last[priority] = now
        self.update(now)

    def served(self, size: int, compute_s: float) -> None:
        per_text = compute_s / max(1, size)
        old = self.seconds_per_text
        self.seconds_per_text = per_text if old is None else 0.9 * old + 0.1 * per_text

    def rate(self, priority: str, now: float) -> float:
        """Texts per second arriving from this class (decayed to `now`)."""
        return self._rate[priority] * math.exp(-(now - self._last[priority]) / self.config.horizon_s)

    def capacity(self) -> float | None:
        """Texts per second the model can run, or None before anything ran."""
        return None if not self.seconds_per_text else self.workers / self.seconds_per_text

    def update(self, now: float) -> None:
        capacity = self.capacity()
        if not self.config.enabled or capacity is None:
            return
        left = self.config.target_utilization * capacity
        for c in self.classes:  # highest priority first
            demand = self.rate(c, now) / max(0.05, 1.0 - self.keep[c])
            granted = min(demand, left)
            left -= granted
            target = 0.0 if demand <= 0 else 1.0 - granted / demand
            self.keep[c] += self.config.smoothing * (target - self.keep[c])

    def advice(self, priority: str) -> dict[str, Any]:
        capacity = self.capacity()
        return {"class": priority, "keep_fraction": round(min(1.0, max(0.0, self.keep[priority])), 4),
                "valid_s": self.config.valid_s, "capacity_texts_per_s": None if capacity is None else round(capacity, 2)}


class Scheduler:
    """Bounded per-class queues served by `workers` threads. `await run(source, size, work)` queues `work`
    (a function that runs the model) and returns its result with the time it waited and ran, or raises Shed."""

    def __init__(self, table: SourceTable, on_shed: Callable[[Source, str], None] | None = None) -> None:
        cfg = table.config.scheduling
        self.policy, self.capacity, self.retry_after_s = cfg.policy, cfg.queue_capacity, cfg.retry_after_s
        self.workers = cfg.workers
        self.open_workers = cfg.workers - (cfg.reserved_workers if cfg.policy != "fifo" else 0)  # for any class
        self.classes = [c.name for c in table.config.classes]  # highest first
        self.limits = {c.name: c.max_queue for c in table.config.classes}
        self.weights = {c.name: c.weight for c in table.config.classes}
        self.allocator = Allocator(table.config.allocation, self.classes, cfg.workers)
        self.on_shed = on_shed
        self._queues: dict[str, deque[_Job]] = {c: deque() for c in self.classes}
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._vtime = 0.0
        self._last_tag = dict.fromkeys(self.classes, 0.0)
        self._busy = 0
        self._busy_lower = 0  # workers running a request below the highest class
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"dimec-worker-{i}", daemon=True)
                         for i in range(cfg.workers)]
        for t in self._threads:
            t.start()

    # ---- the request side (event loop) -------------------------------------------------------------------
    async def run(self, source: Source, size: int, work: Callable[[], Any], deadline_ms: float | None = None) -> Done:
        loop = asyncio.get_running_loop()
        job = _Job(source, size, work, time.monotonic(), next(self._seq), loop.create_future(), loop)
        with self._cond:
            self.allocator.arrival(source.priority, size, job.arrived)
            try:
                victim = self._admit(job, deadline_ms)
            except Shed as shed:
                self._shed_hook(source, shed.reason)
                raise
            self._cond.notify_all()
        if victim is not None:
            self._shed_hook(victim.source, "evicted")
            victim.loop.call_soon_threadsafe(settle, victim.future, None, Shed(
                "evicted", f"shed from the edge's queue to make room for a request of class {source.priority!r}",
                self.retry_after_s))
        try:
            await self._wait(job)
            return await job.future
        except asyncio.CancelledError:  # the client went away: do not run it for nobody
            with self._cond:
                self._remove(job)
            raise

    async def _wait(self, job: _Job) -> None:
        """Until the job is done, or its client has gone while it still waits (then it is dropped: Abandoned).
        A job a worker already runs is waited for: its thread cannot be stopped halfway."""
        gone = CLIENT_GONE.get()
        if gone is None:
            return
        watcher = asyncio.ensure_future(gone.wait())
        try:
            await asyncio.wait({job.future, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if job.future.done() or not gone.is_set():
            return
        with self._cond:
            queued = job in self._queues[job.source.priority]
            if queued:
                self._remove(job)
        if queued:
            job.future.cancel()
            raise Abandoned(f"the client of a {job.source.priority!r} request went away while it was queued")

    def _admit(self, job: _Job, deadline_ms: float | None) -> _Job | None:
        """Queue `job` (returns a request shed to make room, or None) or raise Shed."""
        c = job.source.priority
        if deadline_ms is not None:
            wait = self.expected_wait_ms(c)
            run = 1e3 * job.size * (self.allocator.seconds_per_text or 0.0) / len(self._threads)
            if wait + run > deadline_ms:
                raise Shed("deadline", f"the edge cannot answer within {deadline_ms:g} ms (expected wait "
                                       f"{wait:.0f} ms + compute {run:.0f} ms)", self.retry_after_s)
        waiting = sum(len(q) for q in self._queues.values())
        class_full = self.limits[c] is not None and len(self._queues[c]) >= self.limits[c]
        victim = None
        if waiting >= self.capacity or class_full:
            victim = None if (self.policy == "fifo" or class_full) else self._lowest_below(job.source.rank)
            if victim is None:
                why = f"class {c!r} has {len(self._queues[c])} waiting" if class_full else \
                    f"{waiting} requests wait, none of lower priority than {c!r}"
                raise Shed("full", f"the edge is full ({why})", self.retry_after_s)
            self._remove(victim)
        self._push(job)
        return victim

    def _lowest_below(self, rank: int) -> _Job | None:
        for c in reversed(self.classes[rank + 1 :]):  # the lowest class first
            if self._queues[c]:
                return self._queues[c][-1]  # its newest: it has waited least
        return None

    def _push(self, job: _Job) -> None:
        c = job.source.priority
        job.tag = max(self._vtime, self._last_tag[c]) + job.size / self.weights[c]
        self._last_tag[c] = job.tag
        self._queues[c].append(job)

    def _remove(self, job: _Job) -> None:
        q = self._queues[job.source.priority]
        if job in q:
            q.remove(job)
            self._last_tag[job.source.priority] = q[-1].tag if q else self._vtime

    def _shed_hook(self, source: Source, reason: str) -> None:
        if self.on_shed is not None:
            self.on_shed(source, reason)

    # ---- the worker side (threads) -----------------------------------------------------------------------
    def _pick(self) -> _Job | None:
        """The next job for a free worker, or None when only lower classes wait and the open workers are
        all taken (the reserved ones wait for the highest class)."""
        heads = [q[0] for q in self._queues.values() if q]
        if self._busy_lower >= self.open_workers:
            heads = [j for j in heads if j.source.rank == 0]
        if not heads:
            return None
        if self.policy == "strict":
            job = min(heads, key=lambda j: (j.source.rank, j.seq))
        elif self.policy == "wfq":
            job = min(heads, key=lambda j: (j.tag, j.seq))
            self._vtime = job.tag
        else:
            job = min(heads, key=lambda j: j.seq)
        self._queues[job.source.priority].popleft()
        return job

    def _work(self) -> None:
        while True:
            with self._cond:
                job = None
                while not self._closed and job is None:
                    job = self._pick()
                    if job is None:
                        self._cond.wait()
                if self._closed:
                    return
                self._busy += 1
                lower = job.source.rank > 0
                self._busy_lower += lower
            start = time.monotonic()
            value, error = None, None
            try:
                value = job.work()
            except Exception as exc:  # noqa: BLE001  (handed to the request, which answers it)
                error = exc
            compute_s = time.monotonic() - start
            with self._cond:
                self._busy -= 1
                self._busy_lower -= lower
                self.allocator.served(job.size, compute_s)
                self._cond.notify_all()  # a worker held back for lower classes may take one now
            done = Done(value, (start - job.arrived) * 1e3, compute_s * 1e3)
            job.loop.call_soon_threadsafe(settle, job.future, done, error)

    # ---- what the queue looks like -------------------------------------------------------------------------
    def depth(self, priority: str) -> int:
        return len(self._queues[priority])

    def expected_wait_ms(self, priority: str) -> float:
        """Texts ahead of a newcomer of this class (strict: its class and higher; otherwise all waiting,
        which over-estimates wfq), plus half of those running, times the model's time per text."""
        per_text = self.allocator.seconds_per_text or 0.0
        ahead_classes = self.classes[: self.classes.index(priority) + 1] if self.policy == "strict" else self.classes
        ahead = sum(j.size for c in ahead_classes for j in self._queues[c]) + 0.5 * self._busy
        return 1e3 * ahead * per_text / (len(self._threads) if priority == self.classes[0] else self.open_workers)

    def advice(self, priority: str) -> dict[str, Any]:
        with self._cond:
            return {**self.allocator.advice(priority), "expected_wait_ms": round(self.expected_wait_ms(priority), 2)}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending = [j for q in self._queues.values() for j in q]
            for q in self._queues.values():
                q.clear()
            self._cond.notify_all()
        for job in pending:
            job.loop.call_soon_threadsafe(settle, job.future, None,
                                          Shed("full", "the edge is shutting down", self.retry_after_s))


def settle(future: asyncio.Future, done: Done | None, error: BaseException | None) -> None:
    """Resolve a waiting request's future on its own event loop (call through call_soon_threadsafe): the
    scheduler's workers and the batcher's thread both hand outcomes back this way."""
    if future.done():  # cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(done)

