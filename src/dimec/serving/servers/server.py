"""HTTP service of the edge and cloud tiers (FastAPI; run with uvicorn, bound to 127.0.0.1 by default).

    POST /v1/classify   one text (or pair) or a batch -> labels, probs, per sample the tier and exit that
                        answered (bearer token); with "plan": the rest of a routing plan that starts on
                        this tier, else this tier's own exit (one answer shape: PlanAnswer, continuation.py)
    POST /v1/continue   a hidden state after layer k (safetensors body, wire.py): run the plan on from there
    POST /v1/ping       echo the body size: lets `dimec profile` measure a link's throughput (bearer token)
    GET  /healthz       liveness and what this tier serves
    GET  /metrics       Prometheus text: requests by path and status, latency histogram, samples per tier,
                        per source and class (fleet.py), drift histograms (monitor.py)
    GET  /v1/drift/reference  the validation distributions the drift monitor compares with
    with live control (the cloud, `--live`): POST /v1/shadow, POST /v1/feedback, GET /v1/policy, GET /v1/live
                        (serving/live/http.py, docs/live-control.md)
    GET  /openapi.json  the schema

Bad input never gets a 5xx: bodies over the size limit get 413; bodies that are not UTF-8 JSON, have wrong
fields or types, hold text that is not valid Unicode (a lone surrogate) or go over a limit get 422, whose
JSON says what is wrong and where; a missing or wrong token (or one no source maps to) 401; a request the edge's
queue cannot take 429 with Retry-After (sources mode, docs/fleet.md). The OpenAPI schema lists these statuses and
the bearer scheme. `TierService` holds the request logic so the Ray Serve deployments (ray_app.py) answer
exactly like this app.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException

from dimec.config import at_least, raise_problems, section_problems, setting
from dimec.errors import ConfigError, DataError, TierAuthError
from dimec.runtime import wire
from dimec.runtime.tier import TierModel
from dimec.runtime.validate import ids_problem
from dimec.serving.servers.batched import TierBatcher
from dimec.serving.servers.batcher import BatchingConfig
from dimec.serving.servers.bounds import InFlight
from dimec.serving.servers.continuation import PlanAnswer, PlanRunner, PlanStage, request_plan
from dimec.serving.servers.fleet import Fleet, attach_gateway_drift
from dimec.serving.servers.scheduling import CLIENT_GONE
from dimec.serving.servers.sources import Source, SourceTable
from dimec.textinput import check_batch, text_problem

log = logging.getLogger("dimec.serving")
LIMITS_SECTION = "server.limits"  # its name in `dimec settings` and in saved settings (serving/settings.py)
KNOWN_PATHS = ("/v1/classify", "/v1/continue", "/v1/ping", "/healthz", "/metrics", "/openapi.json", "/docs",
               "/v1/drift/reference", "/v1/shadow", "/v1/feedback", "/v1/policy", "/v1/live")


MIN_BODY_BYTES = 1024  # below this no real request fits: a limit that refuses everything is a mistake


@dataclass(frozen=True)
class Limits:
    """What one server accepts (`dimec serve --max-*`; section server.limits of `dimec settings`). Checked
    when made, so no server runs under limits that refuse every request or let one source starve the rest."""

    max_body_bytes: int = setting(1_000_000, "body limit of /v1/classify, bytes (over it: 413)",
                                  at_least(MIN_BODY_BYTES))
    max_text_chars: int = setting(20_000, "characters per text (or pair member); over it: 422", at_least(1))
    max_batch: int = setting(64, "texts (or hidden states) per request", at_least(1))
    max_hidden_bytes: int = setting(8_000_000, "body limit of /v1/continue (hidden states), bytes",
                                    at_least(MIN_BODY_BYTES))
    max_inflight_bytes: int = setting(32_000_000, "request bytes the server holds at once, all sources "
                                                  "together; over it: 429 (docs/serving.md)", at_least(1))
    max_source_inflight_bytes: int = setting(16_000_000, "request bytes the server holds at once for one source "
                                                         "(token)", at_least(1))

    def body_limit(self, path: str) -> int:
        return self.max_hidden_bytes if path == "/v1/continue" else self.max_body_bytes

    def __post_init__(self) -> None:
        self.check()  # every place that makes Limits (the CLI, a settings file, Python) gets the same error

    def check(self) -> Limits:
        raise_problems(section_problems(self, f"{LIMITS_SECTION}."))
        return self

    def cross_checks(self) -> list[str]:
        """One request of the largest kind must fit in one source's share, and that share in the server's."""
        biggest = max(self.max_body_bytes, self.max_hidden_bytes)
        problems = []
        if self.max_source_inflight_bytes < biggest:
            problems.append(f"{LIMITS_SECTION}.max_source_inflight_bytes must be at least the largest body "
                            f"(max_body_bytes, max_hidden_bytes: {biggest}), got {self.max_source_inflight_bytes}")
        if self.max_inflight_bytes < self.max_source_inflight_bytes:
            problems.append(f"{LIMITS_SECTION}.max_inflight_bytes must be at least max_source_inflight_bytes "
                            f"({self.max_source_inflight_bytes}), got {self.max_inflight_bytes}")
        return problems


class ClassifyRequest(BaseModel):
    """Either `text` (+ optional `text_pair`) or `texts` (+ optional `text_pairs`); `ids` are echoed back."""

    model_config = ConfigDict(extra="forbid", strict=True)
    text: str | None = None
    text_pair: str | None = None
    texts: list[str] | None = None
    text_pairs: list[str] | None = None
    ids: list[str] | None = Field(None, description="request ids, one per text, echoed in the answer")
    deadline_ms: float | None = Field(None, ge=0, description="answer within this many ms or refuse at once (429)")
    plan: list[PlanStage] | None = Field(None, description="the rest of a routing plan, starting on this tier "
                                         "(default: this tier's own exit)")
    confidence: Literal["max_prob", "entropy"] = Field("max_prob", description="what the plan's thresholds read")

    @model_validator(mode="after")
    def _one_form(self) -> ClassifyRequest:
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of 'text' or 'texts'")
        if self.text is not None and self.text_pairs is not None:
            raise ValueError("'text_pairs' goes with 'texts'; use 'text_pair' with 'text'")
        if self.texts is not None and self.text_pair is not None:
            raise ValueError("'text_pair' goes with 'text'; use 'text_pairs' with 'texts'")
        n = len(self.batch()[0])
        for name in ("text_pairs", "ids"):
            if getattr(self, name) is not None and len(getattr(self, name)) != n:
                raise ValueError(f"'{name}' must have one entry per text ({n}), got {len(getattr(self, name))}")
        return self

    @field_validator("text", "text_pair", "texts", "text_pairs", "ids")
    @classmethod
    def _valid_unicode(cls, value: str | list[str] | None) -> str | list[str] | None:
        """JSON can carry a lone surrogate ("\\ud800") that no tokenizer or JSON answer can encode."""
        for i, text in enumerate([value] if isinstance(value, str) else value or []):
            problem = text_problem(text)
            if problem:
                raise ValueError(problem if isinstance(value, str) else f"item {i} {problem}")
        return value

    def batch(self) -> tuple[list[str], list[str] | None]:
        if self.text is not None:
            return [self.text], None if self.text_pair is None else [self.text_pair]
        return list(self.texts or []), self.text_pairs


class ErrorBody(BaseModel):
    """Every refusal: what is wrong, and for an invalid body each problem's location and message."""

    error: str
    detail: list[dict[str, Any]] | None = None


class RequestError(Exception):
    """A request the service refuses: HTTP status and a message for the JSON body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class TierService:
    """Auth, limits and classification for one tier; shared by the FastAPI app and Ray Serve."""

    def __init__(self, model: TierModel, token: str | None, limits: Limits = Limits(),
                 sources: SourceTable | None = None, forward=None) -> None:
        self.model, self.limits = model, limits
        self.sources = sources or SourceTable.single(token)  # one token, one source "default"
        self.plans = PlanRunner(model, limits.max_batch, forward)  # `forward`: the edge's cloud
        self.metrics_token: str | None = None  # set: /metrics and /v1/drift/reference need it (the guard checks)
        self.settings: dict[str, Any] | None = None  # what /healthz shows of the settings the server runs under

    def authorize(self, authorization: str | None) -> Source:
        """`authorization`: the raw Authorization header -> the source its token maps to (constant time)."""
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise RequestError(401, "missing bearer token (Authorization: Bearer TOKEN)")
        source = self.sources.lookup(given.strip())
        if source is None:
            raise RequestError(401, "invalid bearer token" if not self.sources.scheduled else
                               "invalid bearer token: it maps to no source in this tier's sources file")
        return source

    def check(self, request: ClassifyRequest) -> tuple[list[str], list[str] | None]:
        texts, pairs = request.batch()
        lim = self.limits
        try:
            check_batch(texts, pairs, None, lim.max_batch, lim.max_text_chars)
        except DataError as exc:
            raise RequestError(422, exc.message) from None
        problem = None if request.ids is None else ids_problem(request.ids, len(texts))
        if problem:  # ids go into the next hop's X-Request-ID and into logs: held to validate.ID_RULE
            raise RequestError(422, f"'ids': {problem}")
        return texts, pairs

    def classify(self, request: ClassifyRequest) -> PlanAnswer:
        """Every request is a plan: the one it carries, or this tier's own exit (continuation.py)."""
        texts, pairs = self.check(request)
        try:
            plan = request_plan(request.plan) or self.plans.own_plan()
            return self.plans.classify(texts, pairs, request.ids, plan, request.confidence)
        except wire.WireError as exc:
            raise RequestError(exc.status, exc.message) from None

    def health(self) -> dict[str, Any]:
        m = self.model
        health = {"status": "ok", "tier": m.tier, "exit_layer": m.exit_layer, "exit_layers": list(m.exit_layers),
                  "label_names": m.label_names, "backend": m.backend, "model_id": m.model_id}
        if self.settings:  # `dimec serve`'s checked settings (no secrets), as saved beside the package
            health["settings"] = self.settings
        return health


def create_app(package_dir: str | Path | None, tier: str, token: str | None, limits: Limits | None = None,
               model: TierModel | None = None, sources: SourceTable | None = None, forward=None,
               batching: BatchingConfig | None = None, live=None, metrics_token: str | None = None,
               settings: dict[str, Any] | None = None) -> FastAPI:
    """The FastAPI app of the edge or cloud tier. `model` may be given to share a loaded TierModel;
    `sources` (a SourceTable from a sources file) replaces the single token with sources and priorities;
    `metrics_token`: when given, /metrics and /v1/drift/reference need it (docs/serving.md, exposure);
    `forward` (the edge's cloud, a client.HttpRemote) receives the hidden states of plans that go on to the
    cloud; `batching` turns on dynamic batching across requests (batcher.py). `live` (a serving.live
    LiveControl, on the cloud) adds shadow answers, feedback and the versioned policy (docs/live-control.md).
    `settings`: the checked settings the server runs under (serving/settings.py, no secrets), shown by /healthz."""
    model = model or TierModel(package_dir)
    if model.tier != tier:
        raise ConfigError(f"the package at {model.directory} is the {model.tier} tier, not {tier}",
                          f"serve it as `dimec serve {model.tier}` or give the {tier} package")
    if tier == "mobile":
        raise ConfigError("the mobile tier runs in the client, not as a server", "serve edge or cloud")
    service = TierService(model, token, limits or Limits(), sources, forward)
    service.metrics_token, service.settings = metrics_token, settings
    app, metrics = _base_app(f"dimec {tier} tier", service)
    fleet = app.state.fleet = Fleet(service, app.state.registry, service.sources)  # sources, queue, metrics
    fleet.attach(app)
    if batching is not None:  # requests share forward passes; priorities and deadlines move to the batcher
        fleet.use_batcher(TierBatcher(service, batching, on_shed=fleet.on_batch_shed),
                          app.state.registry)
    if live is not None:  # live control: /v1/shadow, /v1/feedback, /v1/policy, /v1/live, gauges
        from dimec.serving.live.http import attach_live

        attach_live(app, live, model, [Depends(_authorized)], app.state.registry)

    @app.post("/v1/classify", response_model=PlanAnswer, dependencies=[Depends(_authorized)],
              responses=_errors(401, 413, 422, 429, 500))
    async def classify(body: ClassifyRequest, request: Request) -> PlanAnswer:
        answer = await fleet.classify(service, request.state.source, body)
        _count(metrics, tier, answer)
        return answer

    @app.post("/v1/continue", response_model=PlanAnswer, dependencies=[Depends(_authorized)],
              responses=_errors(401, 409, 413, 415, 422, 429, 500),
              openapi_extra={"requestBody": {"required": True, "content": {wire.CONTENT_TYPE: {
                  "schema": {"type": "string", "format": "binary"}}}}})
    async def continue_(request: Request) -> PlanAnswer:
        """Continue from a hidden state: a safetensors body (see dimec.runtime.wire) with the hidden state
        after layer k, its attention mask, k, the model identity, request ids and the rest of the plan."""
        kind = request.headers.get("content-type", "").split(";")[0].strip()
        if kind not in (wire.CONTENT_TYPE, "application/octet-stream"):
            raise RequestError(415, f"send the hidden state as {wire.CONTENT_TYPE} (got {kind or 'no type'})")
        try:
            state = wire.decode(await request.body())
            service.plans.check_state(state)  # 409/422 before queueing
        except wire.WireError as exc:
            raise RequestError(exc.status, exc.message) from None
        item = None if fleet.batcher is None else fleet.batcher.continue_item(state)
        answer = await fleet.serve(request.state.source, len(state), lambda: service.plans.continue_state(state),
                                   item=item)
        _count(metrics, tier, answer)
        return answer

    return app


def _count(metrics: dict[str, Any], tier: str, answer: PlanAnswer) -> None:
    """Samples answered, by the tier whose exit answered (a plan's samples may be answered further up)."""
    for t in answer.tiers:
        metrics["samples"].labels(t).inc()


class GatewayAnswer(BaseModel):
    answers: list[dict[str, Any]]


def create_gateway_app(client, token: str | None, limits: Limits | None = None) -> FastAPI:
    """The mobile tier as an HTTP entry point (used on Ray Serve): a MobileClient routes each text, answers
    easy ones itself and offloads the rest; same auth, limits and metrics as the tier servers."""
    service = TierService(client.mobile, token, limits or Limits())
    app, metrics = _base_app("dimec mobile gateway", service)
    attach_gateway_drift(app, client)  # routing distances, routed tiers, mobile confidences (monitor.py)

    @app.post("/v1/classify", response_model=GatewayAnswer, dependencies=[Depends(_authorized)],
              responses=_errors(401, 413, 422, 500, 502))
    def classify(body: ClassifyRequest) -> GatewayAnswer:
        texts, pairs = service.check(body)
        try:
            answers = client.classify(texts, pairs, body.ids)
        except TierAuthError as exc:  # the gateway's own deployment is wrong, not the request
            log.error("gateway misconfigured: %s", exc.message)
            raise RequestError(502, "the gateway's token is refused by a tier behind it (a deployment error)") \
                from None
        for a in answers:
            metrics["samples"].labels(a.tier).inc()
        return GatewayAnswer(answers=[a.to_dict() for a in answers])

    return app


_ERROR_MEANING = {
    401: "missing or wrong bearer token",
    413: "request body over the size limit",
    422: "invalid request: body not UTF-8 JSON, unknown field, wrong type, text that is not valid Unicode, "
         "empty text, or over a limit",
    500: "internal error: a bug in the server, never caused by the request's content",
    429: "the edge's queue is full for this source's class, or the deadline cannot be met; see Retry-After",
    409: "the hidden state comes from another model than this tier serves (deploy packages of one export)",
    415: f"the body of a continuation request is not {wire.CONTENT_TYPE}",
    502: "a tier behind the gateway refuses the gateway's token (a deployment error)",
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the refusals a route can answer, all with the ErrorBody schema."""
    return {s: {"model": ErrorBody, "description": _ERROR_MEANING[s]} for s in statuses}


BEARER = HTTPBearer(auto_error=False, description="the tiers' shared token: `Authorization: Bearer TOKEN`")


def _authorized(request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
    """The scheme is declared through BEARER (so OpenAPI lists it); the check is TierService.authorize's."""
    request.state.source = request.app.state.service.authorize(request.headers.get("authorization"))


def _printable(text: Any) -> str:
    """Text safe to put in a JSON answer: a lone surrogate from the request is shown escaped."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def _body_error(exc: HTTPException) -> str:
    """Why FastAPI could not parse a body (it answers a bare 400 and keeps the reason as __cause__)."""
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return f"request body is not valid UTF-8 (byte 0x{cause.object[cause.start]:02x} at offset {cause.start})"
    if isinstance(cause, RecursionError):
        return "request body is nested too deeply to parse"
    if cause is not None:
        return f"request body is not valid JSON ({_printable(cause).split(';')[0][:200]})"
    return f"request body could not be parsed ({_printable(exc.detail)})"


def _base_app(title: str, service: TierService) -> tuple[FastAPI, dict[str, Any]]:
    """App with the guard (body limit, metrics), JSON error handlers, /healthz, /metrics and /v1/ping."""
    registry = CollectorRegistry()  # one per app: several apps in one process (tests) do not clash
    metrics = {
        "requests": Counter("dimec_requests", "HTTP requests by path and status", ["path", "status"],
                            registry=registry),
        "latency": Histogram("dimec_request_latency_seconds", "Request latency", ["path"], registry=registry,
                             buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)),
        "samples": Counter("dimec_samples", "Samples answered, by tier", ["tier"], registry=registry),
    }
    app = FastAPI(title=title, version="1", description=__doc__, responses=_errors(413))
    app.state.service, app.state.registry = service, registry
    app.add_middleware(_Guard, limits=service.limits, metrics=metrics, service=service)

    @app.exception_handler(RequestError)
    async def _request_error(_request: Request, exc: RequestError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": exc.message}, exc.status, headers=headers)

    @app.exception_handler(wire.WireError)  # raised while the model runs (a non-finite result): still a 4xx
    async def _wire_error(_request: Request, exc: wire.WireError):
        return JSONResponse({"error": exc.message}, exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        detail = [{"loc": [_printable(x) for x in e.get("loc", ())], "msg": _printable(e.get("msg", ""))}
                  for e in exc.errors()]
        first = f": {'.'.join(detail[0]['loc'])}: {detail[0]['msg']}" if detail else ""
        return JSONResponse({"error": f"invalid request body{first}", "detail": detail[:20]}, 422)

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Request, exc: HTTPException):
        if exc.status_code == 400:  # an unparsable body is unprocessable content, as the docs promise
            return JSONResponse({"error": _body_error(exc)}, 422)
        return JSONResponse({"error": _printable(exc.detail)}, exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(_request: Request, exc: Exception):  # a bug, never bad input: log it, say little
        log.exception("internal error")
        return JSONResponse({"error": "internal error"}, 500)

    @app.post("/v1/ping", dependencies=[Depends(_authorized)], responses=_errors(401, 500))
    async def ping(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return service.health()

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app, metrics


class _Guard:
    """Outermost ASGI layer: counts every request (even ones refused early), checks the token of a protected
    path before reading a byte of its body, holds the request's bytes against the in-flight bounds
    (bounds.py) and enforces the body limit while reading, so an oversized body is never buffered whole."""

    PROTECTED = ("/v1/classify", "/v1/continue", "/v1/ping")
    OBSERVED = ("/metrics", "/v1/drift/reference")  # need the metrics token when the server has one

    def __init__(self, app, limits: Limits, metrics: dict, service: TierService) -> None:
        self.app, self.limits, self.metrics, self.service = app, limits, metrics, service
        self.inflight = InFlight(limits.max_inflight_bytes, limits.max_source_inflight_bytes)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]
        path, root = scope["path"], scope.get("root_path", "")
        path = path[len(root):] if root and path.startswith(root) else path  # behind Ray's /edge prefix
        path = path if path in KNOWN_PATHS else "other"  # bounded label values

        async def tracked_send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        held = [0]
        source = ""
        try:
            if path in self.PROTECTED:  # the token first: an unknown caller never gets a byte read
                try:
                    source = self.service.authorize(_header(scope, b"authorization")).name
                except RequestError as exc:
                    await _send_json(tracked_send, 401, {"error": exc.message},
                                     [(b"www-authenticate", b"Bearer")])
                    return
            elif path in self.OBSERVED and self.service.metrics_token and not _bearer_is(
                    _header(scope, b"authorization"), self.service.metrics_token):
                await _send_json(tracked_send, 401, {"error": "this server's metrics need its metrics token"},
                                 [(b"www-authenticate", b"Bearer")])
                return
            limit = self.limits.body_limit(path)
            declared = _header(scope, b"content-length")
            declared = int(declared) if declared and declared.isascii() and declared.isdigit() else None
            if declared is not None and declared > limit:
                await _send_json(tracked_send, 413, {"error": f"request body is over the limit of {limit} bytes"})
                return
            if not self._hold(source, declared or 0, held):
                await self._busy(tracked_send)
                return
            body = await self._read_body(receive, limit, source, held)
            if body is None:
                await _send_json(tracked_send, 413, {"error": f"request body is over the limit of {limit} bytes"})
                return
            if body is False:
                await self._busy(tracked_send)
                return
            replayed, gone = [False], asyncio.Event()

            async def replay():
                if not replayed[0]:
                    replayed[0] = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await gone.wait()
                return {"type": "http.disconnect"}

            async def watch() -> None:  # the body is read: the next message is the client leaving
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone.set()

            watcher, context = asyncio.ensure_future(watch()), CLIENT_GONE.set(gone)
            try:
                await self.app(scope, replay, tracked_send)
            finally:
                watcher.cancel()
                CLIENT_GONE.reset(context)
        finally:
            self.inflight.release(source, held[0])
            self.metrics["requests"].labels(path, str(status[0])).inc()
            self.metrics["latency"].labels(path).observe(time.perf_counter() - start)

    def _hold(self, source: str, nbytes: int, held: list[int]) -> bool:
        if nbytes <= 0:
            return True
        if not self.inflight.acquire(source, nbytes):
            return False
        held[0] += nbytes
        return True

    async def _busy(self, send) -> None:
        lim = self.limits
        await _send_json(send, 429, {"error": f"this server holds its bound of request bytes in flight "
                                              f"({lim.max_inflight_bytes} in all, {lim.max_source_inflight_bytes} "
                                              "per source): try again shortly", "reason": "memory"},
                         [(b"retry-after", b"1")])

    async def _read_body(self, receive, limit: int, source: str, held: list[int]) -> bytes | None | bool:
        """The body; None when it is over `limit`; False when holding it would go over an in-flight bound."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return None
            if size > held[0] and not self._hold(source, size - held[0], held):  # no (or a short) Content-Length
                return False
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _bearer_is(authorization: str | None, token: str) -> bool:
    import hmac

    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8", "surrogatepass"),
                                                              token.encode("utf-8", "surrogatepass"))


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


async def _send_json(send, status: int, payload: dict, headers: list | None = None) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
