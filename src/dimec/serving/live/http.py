"""Live control over HTTP: the cloud's endpoints and gauges, and the client's shadow sender and policy follower.

Cloud (server.create_app(..., live=LiveControl)):

    POST /v1/shadow    sampled texts (or, for texts the cloud's last exit answered, just the answer) with the
                       answer given and its policy version; the cloud answers them and records the
                       disagreement. Refused with 429 while user requests wait in the cloud's queue (shed first).
    POST /v1/feedback  {"items": [{"id", "label"}]}: labels for earlier answers (bearer token; all or nothing;
                       404 unknown id, 409 already labelled, 422 out of range, 429 over the token's rate)
    GET  /v1/policy    the served step of the calibrated path, its version and an ETag (If-None-Match: 304;
                       bearer token)
    GET  /v1/live      the status `dimec monitor` prints (like /metrics, no token)
    gauges             dimec_live_{disagreement,disagreement_low,disagreement_high,accuracy_loss,
                       accuracy_loss_high,budget,shadow_share,policy_version,policy_step,missing,shadow_cost}

Client (client.MobileClient.live = ShadowSender(...)): after each classify call it draws the uniform sample
(seeded), flags the sampled answers `shadowed`, and queues them for a background thread: the user's answers
return before any shadow request is made. A shadow that times out or fails is reported as missing, never as
agreement; after a failure the sender pauses (1 s doubling to 30 s) and counts the texts it could not shadow.
PolicyFollower polls GET /v1/policy with If-None-Match (backoff on failure) and swaps the client's plans.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from dimec.serving.live.controller import LiveControl, LiveSettings
from dimec.serving.live.ledger import FeedbackError, ShadowSampler

log = logging.getLogger("dimec.serving.live")
MAX_ITEMS = 1000  # per shadow or feedback request


class ShadowItem(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: str = Field(max_length=128)
    version: int = Field(ge=1)
    label_id: int = Field(ge=0)
    text: str | None = Field(None, max_length=20_000)
    text_pair: str | None = Field(None, max_length=20_000)
    free: bool = False  # answered by the cloud's last exit: loss 0, nothing to run


class ShadowRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    items: list[ShadowItem] = Field(max_length=MAX_ITEMS)
    missed: list[ShadowItem] = Field([], max_length=MAX_ITEMS,
                                     description="sampled texts whose shadow the client lost (timeout, cloud down, "
                                                 "shed): recorded missing unless the cloud recorded them already")
    texts: int = Field(0, ge=0, le=10**9, description="texts the client answered since its last report")
    deadline_ms: float | None = Field(None, gt=0, description="shadow answers computed later are missing")


class FeedbackItem(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: str = Field(max_length=128)
    label: int | str = Field(description="label id, or label name")


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    items: list[FeedbackItem] = Field(min_length=1, max_length=MAX_ITEMS)


def attach_live(app: FastAPI, live: LiveControl, model, dependencies: list, registry=None) -> None:
    """The live endpoints on the cloud's app; `model` (a TierModel) answers shadow texts at its last exit."""
    label_names = list(model.label_names)
    live.ledger.n_labels = len(label_names)

    @app.post("/v1/shadow", dependencies=dependencies)
    async def shadow(body: ShadowRequest) -> dict[str, Any]:
        fleet = getattr(app.state, "fleet", None)
        scheduler = getattr(fleet, "scheduler", None)
        if scheduler is not None and any(scheduler.depth(c.name) for c in fleet.table.config.classes):
            raise HTTPException(429, "shadow answers yield to waiting user requests", headers={"Retry-After": "1"})
        run = [i for i in body.items if not i.free]
        if any(not (i.text or "").strip() for i in run):
            raise HTTPException(422, "a shadow item that is not free needs its text")
        labels: dict[str, int] = {}
        start = time.perf_counter()
        if run:
            pairs = [i.text_pair or "" for i in run] if any(i.text_pair for i in run) else None
            try:
                pred = await run_in_threadpool(model.classify, [i.text for i in run], pairs)
                labels = {i.id: int(k) for i, k in zip(run, pred.label_ids.tolist(), strict=True)}
            except Exception:  # the model failed on these: missing, never agreement
                log.exception("shadow answers failed")
        if body.deadline_ms is not None and (time.perf_counter() - start) * 1e3 > body.deadline_ms:
            labels = {}  # the client has given up on them: missing on both sides, never counted twice
        missed = [i.model_dump() for i in body.missed]
        return live.record([i.model_dump() for i in body.items], labels, missed, body.texts)

    @app.post("/v1/feedback", dependencies=dependencies)
    async def feedback(body: FeedbackRequest, request: Request) -> dict[str, Any]:
        items = []
        for it in body.items:
            label = it.label
            if isinstance(label, str):
                if label not in label_names:
                    raise HTTPException(422, f"unknown label {label!r} for id {it.id!r}; labels: {label_names}")
                label = label_names.index(label)
            items.append((it.id, label))
        source = getattr(request.state, "source", None)
        try:
            return live.feedback(getattr(source, "name", "default"), items)
        except FeedbackError as exc:
            headers = {"Retry-After": str(max(1, int(exc.retry_after + 0.999)))} if exc.retry_after else None
            return JSONResponse({"error": exc.message}, exc.status, headers=headers)

    @app.get("/v1/policy", dependencies=dependencies)  # the policy is the fleet's business: bearer token
    def policy(request: Request) -> Response:
        body = live.controller.policy()
        if request.headers.get("if-none-match") == body["etag"]:
            return Response(status_code=304, headers={"ETag": body["etag"]})
        return JSONResponse(body, headers={"ETag": body["etag"], "Cache-Control": "no-cache"})

    @app.get("/v1/live")
    def status() -> dict[str, Any]:
        return live.status()

    if registry is not None:
        add_gauges(registry, live)


def add_gauges(registry, live: LiveControl) -> None:
    from prometheus_client import Gauge

    def current() -> dict:
        return live.ledger.summary(live.controller.version)

    def value(kind: str, key: str):
        def read() -> float:
            v = current()[kind][key]
            return float("nan") if v is None else float(v)
        return read

    def counted(key: str):
        return lambda: float(current()[key])

    for name, doc, fn in (
        ("dimec_live_disagreement", "Live disagreement with the cloud's shadow answers (current version)",
         value("disagreement", "estimate")),
        ("dimec_live_disagreement_low", "Lower end of its confidence sequence", value("disagreement", "low")),
        ("dimec_live_disagreement_high", "Upper end of its confidence sequence", value("disagreement", "high")),
        ("dimec_live_accuracy_loss", "Live accuracy loss from feedback labels", value("accuracy_loss", "estimate")),
        ("dimec_live_accuracy_loss_high", "Upper end of its confidence sequence", value("accuracy_loss", "high")),
        ("dimec_live_shadowed", "Shadow answers counted for the current version", value("disagreement", "n")),
        ("dimec_live_missing", "Shadow answers missing for the current version", counted("missing")),
        ("dimec_live_budget", "The served step's live disagreement budget",
         lambda: live.controller.steps[live.controller.step].budget),
        ("dimec_live_shadow_share", "Shadowed texts per answered text", lambda: live.status()["shadow_share"]),
        ("dimec_live_shadow_cost", "Cost-model units spent on shadow answers", lambda: live.cost),
        ("dimec_live_policy_version", "Version of the served policy", lambda: live.controller.version),
        ("dimec_live_policy_step", "Served step of the calibrated path (0: safest)", lambda: live.controller.step),
    ):
        Gauge(name, doc, registry=registry).set_function(fn)


# ---- the client's side ----------------------------------------------------------------------------------------
class ShadowSender:
    """Draws the shadow sample after each classify call and sends it from a background thread."""

    PAUSE_MIN_S, PAUSE_MAX_S = 1.0, 30.0

    def __init__(self, cloud_url: str, token: str | None, settings: LiveSettings | None = None, seed: int = 0,
                 cloud_exit_layer: int | None = None, transport=None) -> None:
        self.settings = settings = (settings or LiveSettings()).check()
        self.sampler = ShadowSampler(settings.shadow_rate, seed)
        self.cloud_exit_layer = cloud_exit_layer
        self.http = httpx.Client(base_url=cloud_url.rstrip("/"), transport=transport,
                                 timeout=httpx.Timeout(settings.shadow_timeout_s, connect=min(1.0, settings.shadow_timeout_s)),
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
        self.queue: queue.Queue = queue.Queue(maxsize=settings.shadow_queue)
        self.version = 1  # the policy version answers are given under (PolicyFollower moves it)
        self.follower: PolicyFollower | None = None  # closed with this sender (live/cli.py)
        self._missed: list[dict] = []  # sampled items whose shadow was lost, to report (bounded)
        self._texts, self._paused_until, self._pause = 0, 0.0, self.PAUSE_MIN_S
        self._lock = threading.Lock()
        self.counts = {"sent": 0, "free": 0, "missing": 0, "private": 0, "failures": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dimec-shadow", daemon=True)
        self._thread.start()

    def after(self, texts: list[str], pairs: list[str] | None, answers: list, private: bool = False) -> None:
        """Called by the client after answering (the answers are final; only their flags may gain 'shadowed').
        `private`: the texts may not reach the cloud (a private request, the cloud not trusted): never shadowed."""
        with self._lock:
            self._texts += len(answers)
        if not self.sampler.rate:
            return
        for i, (a, pick) in enumerate(zip(answers, self.sampler.draw(len(answers)), strict=True)):
            if not pick:
                continue
            if private:  # never to an untrusted tier: outside the sample (the bound covers the other traffic)
                self.counts["private"] += 1
                continue
            free = a.tier == "cloud" and not a.degraded and a.exit_layer == self.cloud_exit_layer
            item = {"id": a.id, "version": self.version, "label_id": int(a.label_id), "free": free}
            if not free:
                item["text"] = texts[i]
                if pairs is not None:
                    item["text_pair"] = pairs[i]
            a.flags.append("shadowed")
            if time.monotonic() < self._paused_until:  # the cloud failed recently: shadowing paused
                self.sampler.count("paused")
                self._lose([item])
                continue
            try:
                self.queue.put_nowait(item)
            except queue.Full:  # shed first: the user's traffic never waits for shadows
                self.sampler.count("shed")
                self._lose([item])

    MAX_MISSED = 10_000  # lost items kept for the next report; beyond it they are only counted here

    def _lose(self, items: list[dict], count: bool = True) -> None:
        with self._lock:
            room = self.MAX_MISSED - len(self._missed)
            self._missed += [{k: v for k, v in i.items() if k not in ("text", "text_pair")} | {"free": False}
                             for i in items[:max(0, room)]]
            if count:
                self.counts["missing"] += len(items)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                first = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            batch, size = [first], len(first.get("text") or "")
            while len(batch) < 64 and size < 200_000:  # well under the servers' 1 MB body limit
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
                size += len(batch[-1].get("text") or "") + len(batch[-1].get("text_pair") or "")
            self._send(batch)
            for _ in batch:
                self.queue.task_done()

    def _send(self, batch: list[dict]) -> None:
        with self._lock:
            missed, texts = self._missed[:MAX_ITEMS], self._texts
            self._missed, self._texts = self._missed[MAX_ITEMS:], 0
        body = {"items": batch, "missed": missed, "texts": texts,
                "deadline_ms": 1e3 * self.settings.shadow_timeout_s}
        try:
            r = self.http.post("/v1/shadow", json=body)
            ok = r.status_code == 200
            if r.status_code == 404 and self.sampler.rate:  # this cloud serves no live control: stop sampling
                log.warning("the cloud has no live control (POST /v1/shadow: 404): shadowing off")
                self.sampler.rate = 0.0
        except httpx.HTTPError:  # refused, reset, timed out: the batch is missing
            ok = False
        if ok:
            self._pause = self.PAUSE_MIN_S
            free = sum(1 for b in batch if b["free"])
            self.counts["free"] += free
            self.counts["sent"] += len(batch) - free
            return
        self._lose(missed, count=False)  # the report is lost: carry it to the next one, plus this batch
        self._lose(batch)
        with self._lock:
            self._texts += texts
            self.counts["failures"] += 1
            self._paused_until = time.monotonic() + self._pause
            self._pause = min(self.PAUSE_MAX_S, 2 * self._pause)

    def flush(self, timeout_s: float = 10.0) -> None:
        """Wait until the queued shadows are sent (tests and benchmarks), then send the counts."""
        end = time.monotonic() + timeout_s
        while self.queue.unfinished_tasks and time.monotonic() < end:
            time.sleep(0.01)
        with self._lock:
            pending = bool(self._missed) or self._texts
        if pending and time.monotonic() >= self._paused_until:
            self._send([])

    def stats(self) -> dict[str, int]:
        return {**{f"shadow_{k}": v for k, v in self.counts.items()},
                **{f"shadow_{k}": v for k, v in self.sampler.counts.items()}}

    def close(self) -> None:
        if self.follower is not None:
            self.follower.close()
        self._stop.set()
        self._thread.join(timeout=2)
        self.http.close()


def apply_policy(client, policy: dict) -> None:
    """Serve a new step of the path in a running MobileClient (plans, confidence, pre-router)."""
    from dimec.routing.plan import PlanRouter

    router = client.router
    if router is None:
        return
    if getattr(client, "online", None) is not None:  # moving pool means (--routing dynamic) index its own plans
        log.warning("policy v%s not applied: a client with moving pool means keeps its policy", policy.get("version"))
        return
    PlanRouter.load_state(router, policy["state"])
    client.plans, client.confidence = list(router.plans_), router.confidence_
    live = getattr(client, "live", None)
    if live is not None:
        live.version = int(policy["version"])


class PolicyFollower:
    """Polls GET /v1/policy with If-None-Match; applies a new version; backs off (x2, up to 16x) on failure."""

    def __init__(self, cloud_url: str, token: str | None, apply, poll_s: float = 5.0, transport=None) -> None:
        self.apply, self.poll_s = apply, poll_s
        self.http = httpx.Client(base_url=cloud_url.rstrip("/"), transport=transport, timeout=2.0,
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
        self.etag: str | None = None
        self.version: int | None = None
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> bool:
        """One poll; True when a new version was applied."""
        try:
            r = self.http.get("/v1/policy", headers={"If-None-Match": self.etag} if self.etag else {})
        except httpx.HTTPError:
            self.failures += 1
            return False
        if r.status_code == 304:
            self.failures = 0
            return False
        if r.status_code == 404:  # this cloud serves no live control: nothing to follow
            self._stop.set()
            return False
        if r.status_code != 200:
            self.failures += 1
            return False
        self.failures = 0
        policy = r.json()
        if policy.get("version") == self.version:
            self.etag = r.headers.get("etag")
            return False
        self.apply(policy)
        self.etag, self.version = r.headers.get("etag"), policy.get("version")
        return True

    def start(self) -> PolicyFollower:
        def loop() -> None:
            while not self._stop.is_set():
                self.poll()
                self._stop.wait(self.poll_s * min(16, 2 ** self.failures))

        self._thread = threading.Thread(target=loop, name="dimec-policy", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        self.http.close()


def live_lines(urls: list[str], timeout_s: float = 5.0) -> list[str]:
    """`dimec monitor`'s live-control lines: one per URL that serves GET /v1/live (others are skipped)."""
    from dimec.serving.live.controller import status_line

    lines = []
    for url in urls:
        try:
            r = httpx.get(f"{url.rstrip('/')}/v1/live", timeout=timeout_s)
        except httpx.HTTPError:
            continue
        if r.status_code == 200:
            try:
                lines.append(f"{url}: {status_line(r.json())}")
            except (KeyError, TypeError, ValueError):
                lines.append(f"{url}: live status unreadable (another dimec version?)")
    return lines
