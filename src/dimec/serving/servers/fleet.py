"""The server side of many sources: who sent a request, its place in the queue, the advice it gets back, and
the metrics per source and class. `server.create_app` builds one `Fleet` per app and hands it every
classification; with a sources file the model runs behind the priority scheduler (scheduling.py), without
one (single-token mode) it runs as before, straight in the request's thread.

Metrics (one registry per app, beside the server's own):

    dimec_source_requests_total{source,class,outcome}   outcome: answered, shed, abandoned (the client left
                                                        while its request was queued: dropped, never run)
    dimec_source_shed_total{source,class,reason}        reason: full, evicted, deadline
    dimec_source_latency_seconds{source,class}          histogram: time in the server (queue + model)
    dimec_queue_wait_seconds{class}                     histogram: time waiting for a worker
    dimec_queue_depth{class}                            gauge: requests waiting now
    dimec_advice_keep_fraction{class}                   gauge: PA-MDI advice (share kept on the device)
    dimec_edge_capacity_texts_per_second                gauge: measured model throughput
    dimec_class_demand_texts_per_second{class}          gauge: arrival rate (decayed)
    dimec_batches, dimec_batched_texts                  gauges: forward passes and texts of dynamic batching
    dimec_drift_*                                       the drift histograms (monitor.py)
"""

from __future__ import annotations

import math
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from dimec.serving.ops.monitor import DriftRecorder
from dimec.serving.servers.batcher import BatchRefused
from dimec.serving.servers.scheduling import Abandoned, Scheduler, Shed
from dimec.serving.servers.sources import Source, SourceTable
from dimec.tiers import TIERS

LATENCY_BUCKETS = (.0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)


class SourceMetrics:
    def __init__(self, registry, table: SourceTable, scheduler: Scheduler | None) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        labels = ["source", "class"]
        self.requests = Counter("dimec_source_requests", "Requests by source, class and outcome",
                                [*labels, "outcome"], registry=registry)
        self.shed_total = Counter("dimec_source_shed", "Requests shed (429) by source, class and reason",
                                  [*labels, "reason"], registry=registry)
        self.latency = Histogram("dimec_source_latency_seconds", "Time in the server (queue + model)", labels,
                                 registry=registry, buckets=LATENCY_BUCKETS)
        self.wait = Histogram("dimec_queue_wait_seconds", "Time waiting for a worker", ["class"],
                              registry=registry, buckets=LATENCY_BUCKETS)
        for s in table.sources:  # every known source shows up, at zero, from the start
            for outcome in ("answered", "shed", "abandoned"):
                self.requests.labels(s.name, s.priority, outcome)
        if scheduler is None:
            return
        depth = Gauge("dimec_queue_depth", "Requests waiting for a worker", ["class"], registry=registry)
        keep = Gauge("dimec_advice_keep_fraction", "PA-MDI advice: share of edge-bound work to keep on the device",
                     ["class"], registry=registry)
        demand = Gauge("dimec_class_demand_texts_per_second", "Arrival rate (exponentially decayed)", ["class"],
                       registry=registry)
        capacity = Gauge("dimec_edge_capacity_texts_per_second", "Measured model throughput", registry=registry)
        allocator = scheduler.allocator
        for c in scheduler.classes:
            depth.labels(c).set_function(lambda c=c: scheduler.depth(c))
            keep.labels(c).set_function(lambda c=c: allocator.keep[c])
            demand.labels(c).set_function(lambda c=c: allocator.rate(c, time.monotonic()))
        capacity.set_function(lambda: allocator.capacity() or 0.0)

    def shed(self, source: Source, reason: str) -> None:
        self.shed_total.labels(source.name, source.priority, reason).inc()
        self.requests.labels(source.name, source.priority, "shed").inc()


class Fleet:
    """Per app: the source table, the scheduler (sources mode only), metrics and the drift recorder."""

    def __init__(self, service, registry, sources: SourceTable) -> None:
        self.table = sources
        self.scheduler = Scheduler(sources, on_shed=self._on_shed) if sources.scheduled else None
        self.metrics = SourceMetrics(registry, sources, self.scheduler)
        self.drift = DriftRecorder.for_package(registry, service.model.directory)
        self.exit_index = TIERS.index(service.model.tier)
        self.batcher = None  # a batched.TierBatcher when the tier batches across requests (server.create_app)

    def _on_shed(self, source: Source, reason: str) -> None:
        self.metrics.shed(source, reason)

    def use_batcher(self, batcher, registry) -> None:
        """Batch across requests (batched.TierBatcher) and export its counts: batches run and texts in them."""
        from prometheus_client import Gauge

        self.batcher = batcher
        inner = batcher.batcher
        Gauge("dimec_batches", "Forward passes the batcher ran (dynamic batching)",
              registry=registry).set_function(lambda: inner.batches)
        Gauge("dimec_batched_texts", "Texts answered by the batcher's forward passes (/ dimec_batches: mean batch)",
              registry=registry).set_function(lambda: inner.texts)

    def on_batch_shed(self, item, reason: str) -> None:
        """A request the batcher refused (full, deadline): counted like the scheduler's."""
        if item.owner is not None:
            self.metrics.shed(item.owner, reason)

    async def classify(self, service, source: Source, body):
        """Checks (422) before queueing; the model in a worker (sources) or the request's thread (single token)."""
        texts, pairs = service.check(body)
        deadline = getattr(body, "deadline_ms", None)
        item = None if self.batcher is None else \
            self.batcher.classify_item(body, texts, pairs, source.rank, deadline)
        return await self.serve(source, len(texts), lambda: service.classify(body), deadline, item)

    async def serve(self, source: Source, size: int, work, deadline: float | None = None, item=None):
        """Run `work` (the model on `size` texts or hidden states, checked already) for `source`: with dynamic
        batching (`item`, batcher.py) in a forward pass shared with other requests, else queued in sources mode,
        in a thread otherwise; the answer gets the queue time, the source and the advice."""
        import numpy as np

        start = time.perf_counter()
        if item is not None and self.batcher is not None:  # priorities and deadlines: the batcher's
            item.rank, item.owner = source.rank, source
            done = await self.batcher.submit(item)
            answer, queue_ms = done.value, done.queue_ms
        elif self.scheduler is None:
            answer, queue_ms = await run_in_threadpool(work), 0.0
        else:
            try:
                done = await self.scheduler.run(source, size, work, deadline)
            except Abandoned:
                self.metrics.requests.labels(source.name, source.priority, "abandoned").inc()
                raise
            answer, queue_ms = done.value, done.queue_ms
        elapsed = time.perf_counter() - start
        self.metrics.requests.labels(source.name, source.priority, "answered").inc()
        self.metrics.latency.labels(source.name, source.priority).observe(elapsed)
        self.metrics.wait.labels(source.priority).observe(queue_ms / 1e3)
        if self.drift is not None:
            exits = np.asarray(getattr(answer, "exits", None) or [self.exit_index] * len(answer.probs))
            tiers = getattr(answer, "tiers", None)  # a plan's answers: the texts this tier forwarded are the
            mine = np.ones(len(exits), dtype=bool) if not tiers else \
                np.array([t == TIERS[self.exit_index] for t in tiers])  # next tier's to record, not this one's
            for k in np.unique(exits[mine]):  # a plan's samples may be answered at several exits
                self.drift.observe_confidence(int(k), np.asarray(answer.probs)[mine & (exits == k)])
        answer.queue_ms, answer.source, answer.priority = round(queue_ms, 3), source.name, source.priority
        if self.scheduler is not None and self.table.config.allocation.enabled:
            answer.advice = self.scheduler.advice(source.priority)
        return answer

    def attach(self, app: FastAPI) -> None:
        """The 429 answer for shed requests and the drift reference endpoint."""

        @app.exception_handler(Shed)
        async def _shed(_request: Request, exc: Shed):
            headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
            return JSONResponse({"error": exc.message, "reason": exc.reason, "retry_after_s": exc.retry_after_s},
                                429, headers=headers)

        @app.exception_handler(BatchRefused)
        async def _refused(_request: Request, exc: BatchRefused):
            return JSONResponse({"error": exc.message}, exc.status)

        @app.exception_handler(Abandoned)
        async def _abandoned(_request: Request, exc: Abandoned):  # nobody reads it: nginx's "client closed"
            return JSONResponse({"error": str(exc)}, 499)

        add_reference_route(app, self.drift)

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
        if self.batcher is not None:
            self.batcher.close()


def add_reference_route(app: FastAPI, drift: DriftRecorder | None) -> None:
    @app.get("/v1/drift/reference")
    def drift_reference() -> dict[str, Any]:
        if drift is None:
            return JSONResponse({"error": "this package has no drift reference (export it again)"}, 404)
        return drift.reference


def attach_gateway_drift(app: FastAPI, client) -> None:
    """A mobile gateway records the routing side of drift (distances, routed tiers, mobile confidences)
    through its client, into the gateway's registry."""
    client.fleet.drift = DriftRecorder.for_package(app.state.registry, client.mobile.directory)
    add_reference_route(app, client.fleet.drift)
