"""One remote tier over HTTP(S), as the phone client (and the edge, forwarding to the cloud) talks to it.

`HttpRemote` posts raw texts (POST /v1/classify) or hidden states (POST /v1/continue, wire.py) with the rest of
a plan, under bounded timeouts (`Timeouts`, section client.timeouts of `dimec settings`) and retries, through
an emulated link if one is given; a tier that failed is skipped for `cooldown_s`. Every answer is checked
(validate.py) before it is used: a malformed answer is a failed exchange, never a wrong label.
"""

from __future__ import annotations

import contextvars
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import numpy as np

from dimec.config import between, raise_problems, section_problems, setting
from dimec.errors import ConfigError, TierAuthError, TierBusyError, TierUnavailableError
from dimec.runtime import wire
from dimec.runtime.executor import Outcome
from dimec.runtime.plans import Plan
from dimec.runtime.validate import answer_problem, id_problem
from dimec.serving.phone.links import LinkProfile, LinkTransport
from dimec.tiers import TIERS

MAX_HIDDEN_BYTES = 4_000_000  # per continuation request (the servers accept 8 MB by default)
MAX_ANSWER_BYTES = 8_000_000  # an answer is ids, labels and probabilities: far below this
MAX_RETRIES = 10  # extra attempts per exchange at most: more only delays the fallback
TIMEOUTS_SECTION = "client.timeouts"  # its name in `dimec settings` and in saved settings (serving/settings.py)
SECONDS = between(0.001, 3600)  # a timeout under a millisecond fails every exchange; over an hour hangs the caller


@dataclass(frozen=True)
class Timeouts:
    """`dimec client --connect-timeout/--timeout/--call-timeout`; checked when made."""

    connect_s: float = setting(1.0, "seconds to open a connection to a tier", SECONDS)
    read_s: float = setting(10.0, "read timeout: seconds between two reads of an answer", SECONDS)
    total_s: float = setting(30.0, "seconds one classify call may take, every exchange and retry together (a tier "
                                   "that drips its answer cannot hold a call longer; the rest falls back or "
                                   "degrades)", SECONDS)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> Timeouts:
        raise_problems(section_problems(self, f"{TIMEOUTS_SECTION}."))
        return self


# The deadline of the classify call running in this thread (time.monotonic()), read by every exchange it makes.
CALL_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("dimec_call_deadline", default=None)


@dataclass
class RemoteResult:
    """A remote tier's answer (one shape for every request, a plan's: per sample which exit of which tier)."""

    probs: np.ndarray  # (N, C)
    label_names: list[str]
    tiers: list[str]  # per sample: the tier whose exit answered
    exits: list[int]  # per sample: the exit that answered (0: m, 1: n, 2: l)
    attempts: int = 1
    meta: dict[str, Any] = field(default_factory=dict)  # the server's queue_ms, compute_ms, advice
    exit_layers: list[int] | None = None  # per sample, as the tier reports them (checked against this model)
    fallback: list[bool] | None = None  # the tier answered for the next one, which failed
    errors: list[str] = field(default_factory=list)

    def outcome(self) -> Outcome:
        """The executor's view: per sample, its probabilities, exit, tier, and the errors of a fallback."""
        n = len(self.exits)
        fallback = np.asarray(self.fallback if self.fallback is not None else [False] * n, dtype=bool)
        return Outcome(np.asarray(self.probs, dtype=np.float64), np.asarray(self.exits, dtype=np.int64),
                       np.array([TIERS.index(t) for t in self.tiers], dtype=np.int64), fallback, np.zeros(n, bool),
                       [list(self.errors) if f else [] for f in fallback])


class Remote(Protocol):
    """An offload target: HTTP here; test doubles in the tests."""

    name: str

    def available(self) -> bool: ...

    def classify(self, texts: list[str], pairs: list[str] | None, ids: list[str]) -> RemoteResult: ...

    # optional: `classify(..., plan=, confidence=)` and `continue_hidden(...)` for model-distributed plans;
    # without a plan a tier answers at its own exit (the one-stage plan), in the same shape


def check_url(name: str, url: str) -> str:
    """`url` without a trailing slash, or a ConfigError when it is not an http(s) URL with a host."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ConfigError(f"the {name} URL {url!r} is not a URL ({exc})", "e.g. http://127.0.0.1:8101") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"the {name} URL {url!r} is not an http:// or https:// URL with a host",
                          "e.g. http://127.0.0.1:8101 (the tiers speak HTTP)")
    return url.rstrip("/")


class HttpRemote:
    """One remote tier over HTTP(S) with timeouts, bounded retries, link emulation and a cooldown."""

    RETRY_STATUS = frozenset({500, 502, 503, 504})  # 429 is not retried: the text goes elsewhere at once

    def __init__(self, name: str, url: str, token: str | None, timeouts: Timeouts = Timeouts(), retries: int = 2,
                 link: LinkProfile | None = None, cooldown_s: float = 1.0, backoff_s: float = 0.05,
                 max_batch: int = 32, seed: int = 0) -> None:
        if not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:  # the CLI checks client.mobile.retries
            raise ConfigError(f"retries must be in 0..{MAX_RETRIES}, got {retries!r}")
        self.name, self.url = name, check_url(name, url)
        self.total_s = timeouts.total_s
        self.retries, self.cooldown_s, self.backoff_s, self.max_batch = retries, cooldown_s, backoff_s, max_batch
        transport = httpx.HTTPTransport()
        if link is not None and not link.is_ideal:
            transport = LinkTransport(link, transport, seed=seed)
        self.http = httpx.Client(transport=transport, timeout=httpx.Timeout(timeouts.read_s, connect=timeouts.connect_s),
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
        self._down_until, self._busy = 0.0, False  # busy: down because of a 429, not a failure
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.retry_count = 0  # exchanges repeated after a failure
        self.bytes_sent: Counter[str] = Counter()  # request bodies sent, by kind: "raw" text or "hidden" state
        self.requests_sent: Counter[str] = Counter()

    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def classify(self, texts: list[str], pairs: list[str] | None, ids: list[str], plan: Plan | None = None,
                 confidence: str = "max_prob", deadline_ms: float | None = None) -> RemoteResult:
        """Raw texts to this tier with the rest of a plan that starts here (None: the tier's own exit)."""
        self._check_available()
        parts = []
        for start in range(0, len(texts), self.max_batch):
            part = slice(start, start + self.max_batch)
            body: dict[str, Any] = {"texts": texts[part], "ids": ids[part]}
            if pairs is not None:
                body["text_pairs"] = pairs[part]
            if plan is not None:
                body["plan"], body["confidence"] = wire.plan_to_json(plan), confidence
            if deadline_ms is not None:
                body["deadline_ms"] = round(deadline_ms, 3)
            content = json.dumps(body).encode()
            parts.append(self._post("/v1/classify", body["ids"], content, "application/json", "raw"))
        return _merge(parts)

    def continue_hidden(self, rows: list[np.ndarray], layer: int, model_id: str, ids: list[str],
                        plan: Plan | None = None, confidence: str = "max_prob", dtype=np.float16) -> RemoteResult:
        """Hidden states after `layer` (one (T_i, H) array per sample) to this tier, which runs the plan on."""
        self._check_available()
        parts, start, row_bytes = [], 0, rows[0].shape[1] * np.dtype(dtype).itemsize  # per token
        while start < len(rows):  # split by count and by bytes: each body stays under the servers' limit
            stop, width = start, 0
            while stop < len(rows) and stop - start < self.max_batch:
                width = max(width, len(rows[stop]))
                if stop > start and (stop + 1 - start) * width * row_bytes > MAX_HIDDEN_BYTES:
                    break
                stop += 1
            content = wire.encode(rows[start:stop], layer, model_id, ids[start:stop], plan, confidence, dtype)
            parts.append(self._post("/v1/continue", ids[start:stop], content, wire.CONTENT_TYPE, "hidden"))
            start = stop
        return _merge(parts)

    def probe(self) -> str | None:
        """One POST /v1/ping at start-up: None if the tier takes this token, a warning if it cannot be reached,
        a ConfigError if it refuses the token (a deployment error to fix before serving)."""
        try:
            response = self.http.post(f"{self.url}/v1/ping", content=b"probe")
        except httpx.TransportError as exc:
            return f"the {self.name} at {self.url} cannot be reached ({type(exc).__name__})"
        if response.status_code in (401, 403):
            raise ConfigError(f"the {self.name} at {self.url} refused the token this server would send it "
                              f"(HTTP {response.status_code})", "give --cloud-token a token the cloud accepts")
        if response.status_code != 200:
            return f"the {self.name} at {self.url} answered HTTP {response.status_code} to a ping"
        return None

    def _check_available(self) -> None:
        if not self.available():
            if self._busy:  # it answered 429: honour its Retry-After
                raise TierBusyError(f"{self.name} skipped: busy (429), Retry-After not over", 0.0)
            raise TierUnavailableError(f"{self.name} skipped: it failed less than {self.cooldown_s:g} s ago")

    def _post(self, path: str, ids: list[str], content: bytes, content_type: str,
              kind: str) -> tuple[dict[str, Any], int]:
        error = "no attempt"
        call_deadline = CALL_DEADLINE.get()
        deadline = time.monotonic() + self.total_s
        deadline = deadline if call_deadline is None else min(deadline, call_deadline)
        for attempt in range(self.retries + 1):
            if attempt:
                with self._lock:
                    self.retry_count += 1
                    pause = min(1.0, self.backoff_s * 2 ** (attempt - 1)) * (0.5 + self._rng.random())
                time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                error = f"the call's deadline passed ({error})"
                break
            with self._lock:
                self.bytes_sent[kind] += len(content)
                self.requests_sent[kind] += 1
            headers = {"Content-Type": content_type}
            if id_problem(ids[0]) is None:  # only an inert id goes into a header (validate.ID_RULE)
                headers["X-Request-ID"] = ids[0]
            try:
                status, body, retry_after = self._exchange(f"{self.url}{path}", content, headers, deadline)
            except httpx.TransportError as exc:  # refused, reset, timeout, emulated loss, the deadline
                error = f"{type(exc).__name__}: {exc}"
                continue
            if status == 200:
                payload, problem = _json(body), None
                problem = answer_problem(payload, ids)
                if problem is None:
                    return payload, attempt + 1
                error = f"malformed answer: {problem}"
                continue
            error = f"HTTP {status}: {_error_text(body)}"
            if status in (401, 403):  # a wrong token: no tier will accept it, say so loudly
                raise TierAuthError(f"{self.name} refused this client's token ({error})",
                                    "give the client and every tier the same token (--token or DIMEC_TOKEN)")
            if status == 429:  # busy for this source's class: skip it for its Retry-After
                self._down_until, self._busy = time.monotonic() + retry_after, True
                raise TierBusyError(f"{self.name} is busy: {error}", retry_after)
            if status in (409, 413, 415, 422):  # this request's fault, not the tier's: no retry or cooldown
                raise TierUnavailableError(f"{self.name} refused the request: {error}")
            if status not in self.RETRY_STATUS:
                break  # 404 and the like: a retry will not help
        self._down_until, self._busy = time.monotonic() + self.cooldown_s, False
        raise TierUnavailableError(f"{self.name} failed after {attempt + 1} attempt(s): {error}")

    def _exchange(self, url: str, content: bytes, headers: dict[str, str], deadline: float) -> tuple[int, bytes, float]:
        """(status, body, Retry-After) of one POST, read chunk by chunk so that the deadline bounds it whole."""
        left = max(0.01, deadline - time.monotonic())
        timeout = httpx.Timeout(min(self.http.timeout.read or left, left), connect=min(self.http.timeout.connect or left, left))
        with self.http.stream("POST", url, content=content, headers=headers, timeout=timeout) as response:
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                chunks.append(chunk)
                size += len(chunk)
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout("the answer was still arriving at the call's deadline", request=None)
                if size > MAX_ANSWER_BYTES:
                    raise httpx.RemoteProtocolError(f"an answer over {MAX_ANSWER_BYTES} bytes", request=None)
            return response.status_code, b"".join(chunks), _retry_after(response)

    def close(self) -> None:
        self.http.close()


def _merge(parts: list[tuple[dict[str, Any], int]]) -> RemoteResult:
    """One RemoteResult from the answers to consecutive parts of one batch."""
    payloads = [p for p, _ in parts]

    def cat(key):
        return [x for p in payloads for x in p[key]]

    errors = sorted({e for p in payloads for e in p.get("errors", [])})
    meta = {k: payloads[-1].get(k) for k in ("queue_ms", "compute_ms", "advice", "source", "priority")}
    return RemoteResult(np.concatenate([np.asarray(p["probs"], dtype=np.float32) for p in payloads]),
                        payloads[0]["label_names"], cat("tiers"), cat("exits"), sum(tries for _, tries in parts),
                        meta, exit_layers=cat("exit_layers"), fallback=cat("fallback"), errors=errors)


def _retry_after(response: httpx.Response, default: float = 1.0) -> float:
    try:
        return min(60.0, max(0.0, float(response.headers.get("retry-after", default))))
    except ValueError:
        return default


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _error_text(body: bytes) -> str:
    """The `error` of a refusal, short; a tier's own URLs or internals are not repeated to the caller."""
    payload = _json(body)
    text = payload.get("error") if isinstance(payload, dict) else None
    return (text if isinstance(text, str) else body.decode("utf-8", "replace"))[:200]
