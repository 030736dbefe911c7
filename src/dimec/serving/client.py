"""The mobile side: embed, route, answer easy samples locally, offload the rest with bounded retries.

Fallback order: a sample routed to the edge goes to the cloud if the edge fails, one routed to the cloud
goes to the edge; if both fail it is answered from the mobile exit and marked `degraded`. Every sample
gets exactly one answer (checked before returning, by request id); a tier that failed is skipped for
`cooldown_s` so a dead tier costs one failed exchange, not one per request.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np

from dimec.errors import ConfigError, DataError, DimecError, TierUnavailableError
from dimec.serving.links import LinkProfile, LinkTransport
from dimec.serving.package import ROUTER_FILE
from dimec.serving.tier import TierModel
from dimec.tiers import CLOUD, EDGE, MOBILE, TIERS

ROUTINGS = ("fixed", "dynamic", "cloud-only", "edge-only", "mobile-only")


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 1.0
    read_s: float = 10.0


@dataclass
class Answer:
    id: str
    label: str
    label_id: int
    probs: list[float]
    tier: str  # the tier that answered
    routed: str  # the tier the router chose
    exit_layer: int
    degraded: bool = False  # both remote tiers failed: answered from the mobile exit instead
    errors: list[str] = field(default_factory=list)

    @property
    def fallback(self) -> bool:
        return self.tier != self.routed

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fallback": self.fallback}


@dataclass
class RemoteResult:
    probs: np.ndarray  # (N, C)
    exit_layer: int
    label_names: list[str]
    attempts: int


class Remote(Protocol):
    """An offload target: HTTP here, a Ray Serve handle in ray_app.py."""

    name: str

    def available(self) -> bool: ...

    def classify(self, texts: list[str], pairs: list[str] | None, ids: list[str]) -> RemoteResult: ...


class HttpRemote:
    """One remote tier over HTTP(S) with timeouts, bounded retries, link emulation and a cooldown."""

    RETRY_STATUS = frozenset({429, 500, 502, 503, 504})

    def __init__(self, name: str, url: str, token: str | None, timeouts: Timeouts = Timeouts(), retries: int = 2,
                 link: LinkProfile | None = None, cooldown_s: float = 1.0, backoff_s: float = 0.05,
                 max_batch: int = 32, seed: int = 0) -> None:
        if retries < 0 or retries > 10:
            raise ConfigError(f"retries must be in 0..10, got {retries}")
        self.name, self.url = name, url.rstrip("/")
        self.retries, self.cooldown_s, self.backoff_s, self.max_batch = retries, cooldown_s, backoff_s, max_batch
        transport = httpx.HTTPTransport()
        if link is not None and not link.is_ideal:
            transport = LinkTransport(link, transport, seed=seed)
        self.http = httpx.Client(transport=transport, timeout=httpx.Timeout(timeouts.read_s, connect=timeouts.connect_s),
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
        self._down_until = 0.0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.retry_count = 0  # exchanges repeated after a failure

    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def classify(self, texts: list[str], pairs: list[str] | None, ids: list[str]) -> RemoteResult:
        if not self.available():
            raise TierUnavailableError(f"{self.name} skipped: it failed less than {self.cooldown_s:g} s ago")
        probs, exit_layer, labels, attempts = [], 0, [], 0
        for start in range(0, len(texts), self.max_batch):
            part = slice(start, start + self.max_batch)
            body: dict[str, Any] = {"texts": texts[part], "ids": ids[part]}
            if pairs is not None:
                body["text_pairs"] = pairs[part]
            payload, tries = self._post(body)
            probs.append(np.asarray(payload["probs"], dtype=np.float32))
            exit_layer, labels, attempts = int(payload["exit_layer"]), payload["label_names"], attempts + tries
        return RemoteResult(np.concatenate(probs), exit_layer, labels, attempts)

    def _post(self, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
        error = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                with self._lock:
                    self.retry_count += 1
                    pause = min(1.0, self.backoff_s * 2 ** (attempt - 1)) * (0.5 + self._rng.random())
                time.sleep(pause)
            try:
                response = self.http.post(f"{self.url}/v1/classify", json=body,
                                          headers={"X-Request-ID": body["ids"][0]})
            except httpx.TransportError as exc:  # refused, reset, timeout, emulated loss
                error = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code == 200:
                payload = self._valid(response, body)
                if payload is not None:
                    return payload, attempt + 1
                error = "malformed answer"
                continue
            error = f"HTTP {response.status_code}: {_error_text(response)}"
            if response.status_code in (413, 422):  # this request's fault, not the tier's: no retry, no cooldown
                raise TierUnavailableError(f"{self.name} at {self.url} refused the request: {error}")
            if response.status_code not in self.RETRY_STATUS:
                break  # 401/403/404: a retry will not help
        self._down_until = time.monotonic() + self.cooldown_s
        raise TierUnavailableError(f"{self.name} at {self.url} failed after {attempt + 1} attempt(s): {error}")

    @staticmethod
    def _valid(response: httpx.Response, body: dict[str, Any]) -> dict[str, Any] | None:
        """The answer must be for exactly the ids we sent, one probability row each."""
        try:
            payload = response.json()
            ok = payload["ids"] == body["ids"] and len(payload["probs"]) == len(body["ids"]) and \
                all(len(p) == len(payload["label_names"]) for p in payload["probs"])
        except (ValueError, KeyError, TypeError):
            return None
        return payload if ok else None

    def close(self) -> None:
        self.http.close()


def _error_text(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", response.text[:200]))
    except (ValueError, AttributeError):
        return response.text[:200]


class MobileClient:
    """The mobile device: its tier package (tokenizer, embeddings, layers 1..m, router) and two remotes."""

    def __init__(self, mobile_package: str | Path | TierModel, edge_url: str | None = None,
                 cloud_url: str | None = None, token: str | None = None, timeouts: Timeouts = Timeouts(),
                 retries: int = 2, links: dict[str, LinkProfile] | None = None, backend: str = "onnx-int8",
                 routing: str = "fixed", cooldown_s: float = 1.0, remotes: dict[str, Remote] | None = None,
                 seed: int = 0) -> None:
        if routing not in ROUTINGS:
            raise ConfigError(f"unknown routing {routing!r}", f"use one of {', '.join(ROUTINGS)}")
        self.mobile = mobile_package if isinstance(mobile_package, TierModel) else TierModel(mobile_package, backend)
        if self.mobile.tier != "mobile":
            raise ConfigError(f"{self.mobile.directory} is the {self.mobile.tier} package, not the mobile one")
        self.routing = routing
        self.router = self._load_router(routing)
        links = links or {}
        self.remotes: dict[str, Remote] = dict(remotes or {})
        for name, url, offset in (("edge", edge_url, 1), ("cloud", cloud_url, 2)):
            if url and name not in self.remotes:
                self.remotes[name] = HttpRemote(name, url, token, timeouts, retries, links.get(name), cooldown_s,
                                                seed=seed + offset)
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def _load_router(self, routing: str):
        if routing not in ("fixed", "dynamic"):
            return None
        from dimec.routing.dimec import DimecFixedRouter

        router = DimecFixedRouter.load(self.mobile.directory / ROUTER_FILE)
        if routing == "dynamic":
            from dimec.pipeline import dynamic_from_fixed

            router = dynamic_from_fixed(router)
        return router

    # ---- the one entry point --------------------------------------------------------------------------
    def classify(self, texts: list[str], pairs: list[str] | None = None, ids: list[str] | None = None) -> list[Answer]:
        call = _Call(*_check_inputs(texts, pairs, ids))
        tiers = self._route(call)
        local = np.flatnonzero(tiers == MOBILE)
        if len(local):
            self._answer_locally(call, local, routed="mobile", degraded=False, errors=[])
        for routed in (EDGE, CLOUD):
            rows = np.flatnonzero(tiers == routed)
            if len(rows):
                self._offload(call, rows, routed)
        answers = call.answers
        missing = [call.ids[i] for i, a in enumerate(answers) if a is None]
        if missing or len({a.id for a in answers}) != len(call.ids):  # a bug, never expected: say so loudly
            raise DimecError(f"internal error: request ids {missing[:5]} got no answer or were answered twice")
        with self._lock:
            self.counts["answers"] += len(answers)
            for a in answers:
                self.counts[f"routed_{a.routed}"] += 1
                self.counts[f"answered_{a.tier}"] += 1
                self.counts["fallbacks"] += a.fallback
                self.counts["degraded"] += a.degraded
        return answers  # type: ignore[return-value]

    def _route(self, call: _Call) -> np.ndarray:
        if self.router is None:
            fixed = {"cloud-only": CLOUD, "edge-only": EDGE, "mobile-only": MOBILE}[self.routing]
            return np.full(len(call.texts), fixed, dtype=np.int64)
        emb = self.mobile.embed(call.batch(self.mobile))  # (N, H): the embedding layer only
        if self.routing == "dynamic":
            with self._lock:  # the moving centroids are shared state
                return np.array([self.router.update(e) for e in emb], dtype=np.int64)
        return self.router.predict_tiers(emb).astype(np.int64)

    def _offload(self, call: _Call, rows: np.ndarray, routed: int) -> None:
        sub_texts = [call.texts[i] for i in rows]
        sub_pairs = None if call.pairs is None else [call.pairs[i] for i in rows]
        sub_ids = [call.ids[i] for i in rows]
        errors: list[str] = []
        other = CLOUD if routed == EDGE else EDGE
        for target in (TIERS[routed], TIERS[other]):
            remote = self.remotes.get(target)
            if remote is None:
                errors.append(f"no {target} tier configured")
                continue
            try:
                result = remote.classify(sub_texts, sub_pairs, sub_ids)
                self._check_same_model(target, result)
            except TierUnavailableError as exc:
                errors.append(exc.message)
                with self._lock:
                    self.counts[f"failed_{target}"] += 1
                continue
            for j, i in enumerate(rows):
                call.answers[i] = self._answer(call.ids[i], result.probs[j], target, TIERS[routed],
                                               result.exit_layer, errors=list(errors))
            return
        self._answer_locally(call, rows, routed=TIERS[routed], degraded=True, errors=errors)

    def _check_same_model(self, target: str, result: RemoteResult) -> None:
        """A tier serving another model (other labels or exit layers) must not answer for this one."""
        expected = self.mobile.exit_layers[TIERS.index(target)]
        if list(result.label_names) != self.mobile.label_names or result.exit_layer != expected:
            raise TierUnavailableError(
                f"{target} serves another model (labels {result.label_names}, exit layer {result.exit_layer}; "
                f"expected {self.mobile.label_names}, exit layer {expected}): deploy packages of one export")

    def _answer_locally(self, call: _Call, rows: np.ndarray, routed: str, degraded: bool,
                        errors: list[str]) -> None:
        probs = self.mobile.probs(call.batch(self.mobile).rows(rows))  # at the exit's temperature
        for j, i in enumerate(rows):
            call.answers[i] = self._answer(call.ids[i], probs[j], "mobile", routed, self.mobile.exit_layer,
                                           degraded, list(errors))

    def _answer(self, rid: str, probs: np.ndarray, tier: str, routed: str, exit_layer: int,
                degraded: bool = False, errors: list[str] | None = None) -> Answer:
        label_id = int(np.argmax(probs))
        return Answer(rid, self.mobile.label_names[label_id], label_id, [round(float(p), 6) for p in probs],
                      tier, routed, exit_layer, degraded, errors or [])

    def stats(self) -> dict[str, int]:
        with self._lock:
            out = dict(self.counts)
        out["retries"] = sum(getattr(r, "retry_count", 0) for r in self.remotes.values())
        return out

    def close(self) -> None:
        for remote in self.remotes.values():
            if hasattr(remote, "close"):
                remote.close()

    def __enter__(self) -> MobileClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Call:
    """One classify call: its inputs, answers so far, and the tokens, made only if the mobile needs them
    (a cloud-only client never tokenises)."""

    def __init__(self, texts: list[str], pairs: list[str] | None, ids: list[str]) -> None:
        self.texts, self.pairs, self.ids = texts, pairs, ids
        self.answers: list[Answer | None] = [None] * len(texts)
        self._batch = None

    def batch(self, mobile: TierModel):
        if self._batch is None:
            self._batch = mobile.encode(self.texts, self.pairs)
        return self._batch


def _check_inputs(texts, pairs, ids) -> tuple[list[str], list[str] | None, list[str]]:
    if isinstance(texts, str):
        raise DataError("texts must be a list of strings, got one string", "wrap it in a list")
    texts = list(texts)
    if not texts:
        raise DataError("no texts to classify")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise DataError(f"text {i} is empty or not a string")
    if pairs is not None and len(pairs) != len(texts):
        raise DataError(f"{len(texts)} texts but {len(pairs)} text pairs", "give one pair per text")
    ids = [uuid.uuid4().hex for _ in texts] if ids is None else [str(x) for x in ids]
    if len(ids) != len(texts) or len(set(ids)) != len(ids):
        raise DataError("request ids must be unique, one per text")
    return texts, (list(pairs) if pairs is not None else None), ids


def answers_jsonl(answers: list[Answer]) -> str:
    return "\n".join(json.dumps(a.to_dict()) for a in answers)
