"""Dynamic batching across requests: concurrent requests are gathered into one forward pass.

    request -> submit(item) -> pending ---(batch closes)---> one run(key, payloads) in the batch thread
                   ^ awaits its own future <------------- each item's own result (or its own error)

A batch holds requests of one `key` (what can share a forward pass: plain classification, or one plan from one
layer). It is headed by the oldest request of the highest priority class waiting (the fleet's classes: rank 0
first); batch-mates join by class, then by closeness in length to the head (less padding), then by age, up to
`max_batch` texts. It closes when it is full, when its oldest request has waited `max_wait_ms`, or when one of
its requests would miss its deadline by waiting longer: waiting never costs a request its deadline. A request
whose deadline cannot be met even alone (the batch running now plus its own compute) is refused at once (429,
reason deadline), and so is one arriving when `max_queue` requests wait (reason full).

One batch runs at a time, in the batcher's own thread (a GPU runs one stream; on a CPU torch's intra-op threads
already use every core); while it runs the next one gathers. A batch that fails is not the failure of its
requests: out of memory splits it in halves and runs each (down to one request: then that request alone is
refused, 413); any other error runs each request alone, so only the request that fails gets its error.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from dimec.config import at_least, between, build_config, raise_problems, section_problems, setting
from dimec.devices import is_out_of_memory
from dimec.serving.servers.scheduling import Done, Shed, settle

BATCHING_SECTION = "server.batching"  # its name in `dimec settings` and in saved settings (serving/settings.py)


@dataclass
class BatchingConfig:
    """`dimec serve --batch-max/--batch-wait-ms/--batch-queue` (docs/serving.md; section server.batching)."""

    max_batch: int = setting(32, "texts (or hidden states) per gathered forward pass", at_least(1))
    max_wait_ms: float = setting(5.0, "longest the oldest request of a batch waits for batch-mates, ms (0: only "
                                      "requests already waiting join)", between(0, 10_000))
    max_queue: int = setting(1024, "requests waiting at most; a newcomer beyond it is refused (429)", at_least(1))

    @classmethod
    def checked(cls, **values: Any) -> BatchingConfig:
        """Built from values with every type and bound checked (one ConfigError listing the bad ones)."""
        return build_config(cls, values, f"{BATCHING_SECTION}.").validate()

    def validate(self) -> BatchingConfig:
        raise_problems(section_problems(self, f"{BATCHING_SECTION}."))
        return self


class BatchRefused(Exception):
    """A request the batcher answers with a 4xx (e.g. 413: out of memory even alone): status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(eq=False)
class Item:
    """One request as the batcher sees it."""

    key: Hashable  # requests of one key can share a forward pass
    payload: Any  # what `run` gets for this request
    size: int  # texts (or hidden states)
    length: int  # its longest text (characters or tokens): batch-mates of similar length pad less
    rank: int = 0  # priority class, 0 = highest
    deadline: float | None = None  # time.monotonic() by which it must be answered
    owner: Any = None  # who sent it (the fleet's Source): for the shed hook's metrics
    arrived: float = 0.0
    seq: int = 0
    future: asyncio.Future | None = None
    loop: asyncio.AbstractEventLoop | None = None


DEADLINE_MARGIN_S = 0.005  # a batch closes this much before a deadline needs it (the thread's wake-up, scatter)
Run = Callable[[Hashable, list[Any]], list[Any]]  # (key, payloads) -> one result per payload, in order


class Batcher:
    """`await submit(item)` -> Done(its result, queue_ms, compute_ms); `run` does the batched forward pass."""

    def __init__(self, run: Run, config: BatchingConfig, on_shed: Callable[[Item, str], None] | None = None) -> None:
        self.run, self.config, self.on_shed = run, config.validate(), on_shed
        self.max_wait_s = config.max_wait_ms / 1e3
        self.seconds_per_text: float | None = None  # measured (exponential average): for deadlines
        self.batches = self.texts = 0  # counters: mean batch size = texts / batches
        self._pending: list[Item] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._running_until: float | None = None  # expected end of the batch running now
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="dimec-batcher", daemon=True)
        self._thread.start()

    # ---- the request side (any event loop) ---------------------------------------------------------------------
    async def submit(self, item: Item) -> Done:
        item.loop = asyncio.get_running_loop()
        item.future = item.loop.create_future()
        with self._cond:
            item.arrived, item.seq = time.monotonic(), next(self._seq)
            self._admit(item)
            self._pending.append(item)
            self._cond.notify_all()
        try:
            return await item.future
        except asyncio.CancelledError:  # the client went away: do not run it for nobody
            with self._cond:
                if item in self._pending:
                    self._pending.remove(item)
            raise

    def _admit(self, item: Item) -> None:
        if self._closed:
            raise Shed("full", "the server is shutting down", 1.0)
        if len(self._pending) >= self.config.max_queue:
            self._shed(item, "full")
            raise Shed("full", f"{len(self._pending)} requests wait for the model", 1.0)
        if item.deadline is not None:
            ready = max(item.arrived, self._running_until or item.arrived)
            if ready + self._compute_s(item.size) > item.deadline:
                self._shed(item, "deadline")
                left = (item.deadline - item.arrived) * 1e3
                raise Shed("deadline", f"cannot answer within {left:.0f} ms (the model is busy for "
                                       f"{(ready - item.arrived) * 1e3:.0f} ms, this request needs "
                                       f"{self._compute_s(item.size) * 1e3:.0f} ms)", 1.0)

    def _shed(self, item: Item, reason: str) -> None:
        if self.on_shed is not None:
            self.on_shed(item, reason)

    def _compute_s(self, texts: int) -> float:
        return texts * (self.seconds_per_text or 0.0)

    # ---- the batch side (the batcher's thread) -----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                batch = self._next_batch()
                if batch is None:
                    return
                self._running_until = time.monotonic() + self._compute_s(sum(i.size for i in batch))
            start = time.monotonic()
            results = self._run_isolated(batch)
            compute_s = time.monotonic() - start
            with self._cond:
                self._running_until = None
                texts = sum(i.size for i in batch)
                per_text = compute_s / max(1, texts)
                old = self.seconds_per_text
                self.seconds_per_text = per_text if old is None else 0.8 * old + 0.2 * per_text
                self.batches, self.texts = self.batches + 1, self.texts + texts
            for item, (value, error) in zip(batch, results, strict=True):
                _answer(item, Done(value, (start - item.arrived) * 1e3, compute_s * 1e3), error)

    def _next_batch(self) -> list[Item] | None:
        """Wait until a batch closes (under the lock); None when the batcher is closed."""
        while True:
            if self._closed:
                return None
            self._drop_expired()
            if not self._pending:
                self._cond.wait()
                continue
            head = min(self._pending, key=lambda i: (i.rank, i.seq))
            batch = self._fill(head)
            now = time.monotonic()
            close_at = min(i.arrived for i in batch) + self.max_wait_s
            run_s = self._compute_s(sum(j.size for j in batch)) + DEADLINE_MARGIN_S
            deadlines = [i.deadline - run_s for i in batch if i.deadline is not None]
            close_at = min([close_at, *deadlines])
            if sum(i.size for i in batch) >= self.config.max_batch or now >= close_at:
                for i in batch:
                    self._pending.remove(i)
                return batch
            self._cond.wait(timeout=close_at - now)

    def _fill(self, head: Item) -> list[Item]:
        """The head, then requests of its key by class, closeness in length and age, up to max_batch texts."""
        others = sorted((i for i in self._pending if i is not head and i.key == head.key),
                        key=lambda i: (i.rank, abs(i.length - head.length), i.seq))
        batch, size = [head], head.size
        for i in others:
            if size + i.size <= self.config.max_batch:
                batch.append(i)
                size += i.size
        return batch

    def _drop_expired(self) -> None:
        """Requests whose deadline passed while they waited (a busy model): refused, not answered late."""
        now = time.monotonic()
        for item in [i for i in self._pending if i.deadline is not None and i.deadline <= now]:
            self._pending.remove(item)
            self._shed(item, "deadline")
            _answer(item, None, Shed("deadline", "the deadline passed while waiting for the model", 1.0))

    def _run_isolated(self, batch: list[Item]) -> list[tuple[Any, BaseException | None]]:
        return run_isolated(self.run, batch)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending, self._pending = self._pending, []
            self._cond.notify_all()
        for item in pending:
            _answer(item, None, Shed("full", "the server is shutting down", 1.0))


def run_isolated(run: Run, batch: list[Item]) -> list[tuple[Any, BaseException | None]]:
    """(result, error) per item of one key: a failing batch is split (out of memory) or run one by one
    (anything else), so an error reaches only the requests that cause it."""
    try:
        values = run(batch[0].key, [i.payload for i in batch])
        if len(values) != len(batch):
            raise RuntimeError(f"batched run returned {len(values)} results for {len(batch)} requests")
        return [(v, None) for v in values]
    except Exception as exc:  # noqa: BLE001  (each request gets its own outcome below)
        if len(batch) == 1:
            if is_out_of_memory(exc):
                return [(None, BatchRefused(413, f"out of memory on this request alone ({batch[0].size} texts): "
                                                 "send fewer or shorter texts"))]
            return [(None, exc)]
        if is_out_of_memory(exc):
            half = len(batch) // 2
            return run_isolated(run, batch[:half]) + run_isolated(run, batch[half:])
        return [r for i in batch for r in run_isolated(run, [i])]


def _answer(item: Item, done: Done | None, error: BaseException | None) -> None:
    """Hand the outcome to the request's event loop; a loop that is gone (its client with it) is skipped, and
    never stops the batcher's thread."""
    try:
        item.loop.call_soon_threadsafe(settle, item.future, done, error)
    except RuntimeError:  # "Event loop is closed"
        pass
