"""`dimec demo RUN_DIR`: the browser's mobile tier, the demo page and the fleet dashboard, served on loopback.

The page (web/, built with `npm ci && npm run build`) downloads the mobile package exactly as `dimec export`
wrote it, checks every file's sha256 against the manifest (and the manifest against the sha256 this server
pinned when it started), runs the int8 graph in onnxruntime-web and continues on the edge and cloud. This app:

    GET  /  /dashboard              the demo page and the fleet dashboard
    GET  /static/NAME               the bundle and onnxruntime-web's wasm runtime (web/dist)
    GET  /artifact/PATH             manifest.json and the files it lists (the phone artifact)
    POST /api/session               a short-lived token for this page (loopback clients only)
    ANY  /tier/{edge,cloud}/PATH    the tiers' /v1/classify, /v1/continue (POST), /healthz, /metrics (GET),
                                    proxied with the tiers' own token, which never reaches the page
    POST /api/report                a page's answer, counted by tier (the dashboard's shares)
    GET  /api/metrics  /api/drift   those counts (Prometheus text); PSI verdicts per tier (monitor.py)

Security: the page holds only a session token that expires after `token_ttl_s` (401 with "expired": true,
and the page says so); every request with an Origin header other than the page's own, or a Host that is not
a loopback name (DNS rebinding), is refused (403); the tiers' limits (body sizes, batch, 429s) answer browser
requests unchanged because the proxy forwards them to the tiers. Responses carry COOP/COEP headers so the page
is cross-origin isolated (onnxruntime-web's threads need SharedArrayBuffer).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response

from dimec.config import above, at_least, between, raise_problems, section_problems, setting
from dimec.errors import ConfigError
from dimec.runtime.package import MANIFEST, read_manifest

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
PROXIED = {("POST", "v1/classify"), ("POST", "v1/continue"), ("GET", "healthz"), ("GET", "metrics")}
DIST_HINT = "build the page first: `cd web && npm ci && npm run build` (or `make web`)"


DEMO_SECTION = "demo"  # its name in `dimec settings` (serving/settings.py)


@dataclass(frozen=True)
class WebConfig:
    """The demo page's proxy (`dimec demo --token-ttl`; section demo of `dimec settings`); checked when made."""

    token_ttl_s: float = setting(900.0, "life of the page's session token, seconds (the page offers to renew it)",
                                 between(1, 86_400))
    max_body_bytes: int = setting(8_000_000, "what the proxy reads of a request before refusing it (413); the tiers "
                                             "apply their own limits", at_least(1024))
    max_text_chars: int = setting(20_000, "shown to the page so that it refuses over-long text before any work",
                                  at_least(1))
    timeout_s: float = setting(30.0, "seconds per proxied request", above(0))

    def __post_init__(self) -> None:
        raise_problems(section_problems(self, f"{DEMO_SECTION}."))


def default_dist() -> Path:
    """web/dist of the source tree this module belongs to (an editable install)."""
    return Path(__file__).resolve().parents[4] / "web" / "dist"


class SessionTokens:
    """Short-lived random tokens: issued to loopback pages, checked in constant time, forgotten when expired."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._expiry: dict[str, float] = {}
        self._lock = threading.Lock()

    def issue(self) -> tuple[str, float]:
        token, expires = secrets.token_urlsafe(24), time.time() + self.ttl_s
        with self._lock:
            now = time.time()
            self._expiry = {t: e for t, e in self._expiry.items() if e > now - 3600}  # keep "expired" answerable 1 h
            self._expiry[token] = expires
        return token, expires

    def check(self, authorization: str | None) -> str | None:
        """None when valid, else "missing", "invalid" or "expired"."""
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            return "missing"
        given = given.strip()
        with self._lock:
            found = next((e for t, e in self._expiry.items() if secrets.compare_digest(t, given)), None)
        if found is None:
            return "invalid"
        return "expired" if time.time() >= found else None

    def expire_all(self) -> None:
        """Every issued token expires now (tests, and an operator revoking sessions)."""
        with self._lock:
            self._expiry = dict.fromkeys(self._expiry, time.time() - 1)


def create_web_app(mobile_package: str | Path, tiers: dict[str, str], tier_token: str | None,
                   dist: str | Path | None = None, config: WebConfig = WebConfig()):
    """The demo app. `tiers`: {"edge": URL, "cloud": URL} of running tier servers; `tier_token`: their token."""
    import httpx
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

    package = Path(mobile_package)
    manifest = read_manifest(package, verify=False)  # the page checks the hashes itself, and refuses a mismatch
    if manifest["tier"] != "mobile":
        raise ConfigError(f"{package} is the {manifest['tier']} package, not the mobile one")
    manifest_sha = hashlib.sha256((package / MANIFEST).read_bytes()).hexdigest()  # pinned now
    dist = Path(dist) if dist else default_dist()
    if not (dist / "demo.js").is_file():
        raise ConfigError(f"the web page is not built ({dist / 'demo.js'} is missing)", DIST_HINT)
    files = {MANIFEST, *manifest["files"]}
    tokens = SessionTokens(config.token_ttl_s)
    registry = CollectorRegistry()
    answers = Counter("dimec_web_answers", "Answers pages got, by the tier that answered", ["tier", "routed"],
                      registry=registry)
    degraded = Counter("dimec_web_degraded", "Degraded answers (both remote tiers failed)", registry=registry)
    http = httpx.AsyncClient(timeout=config.timeout_s)
    reference = _drift_reference(package)

    app = FastAPI(title="dimec demo", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.tokens, app.state.tiers = tokens, dict(tiers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        host = request.headers.get("host", "")
        if host.rsplit(":", 1)[0] not in LOOPBACK_NAMES:
            return JSONResponse({"error": f"Host {host!r} refused: this demo answers loopback names only"}, 403)
        own = f"http://{host}"
        origin = request.headers.get("origin")
        if origin is not None and origin != own:
            return JSONResponse({"error": f"cross-origin request from {origin} refused (only {own})"}, 403)
        if request.method == "OPTIONS":
            response = Response(status_code=204, headers={"Access-Control-Allow-Methods": "GET, POST",
                                                          "Access-Control-Allow-Headers": "Authorization, Content-Type, X-Request-ID"})
        else:
            response = await call_next(request)
        response.headers["Access-Control-Allow-Origin"] = own
        response.headers["Vary"] = "Origin"
        response.headers["Cross-Origin-Opener-Policy"] = "same-origin"
        response.headers["Cross-Origin-Embedder-Policy"] = "require-corp"
        response.headers["Cross-Origin-Resource-Policy"] = "same-origin"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    def refused(authorization: str | None) -> JSONResponse | None:
        problem = tokens.check(authorization)
        if problem is None:
            return None
        message = {"missing": "missing session token (Authorization: Bearer TOKEN from POST /api/session)",
                   "invalid": "unknown session token: reload the page",
                   "expired": "session token expired"}[problem]
        return JSONResponse({"error": message, "expired": problem == "expired"}, 401,
                            headers={"WWW-Authenticate": "Bearer"})

    @app.get("/")
    def demo_page():
        return FileResponse(dist / "demo.html")

    @app.get("/dashboard")
    def dashboard_page():
        return FileResponse(dist / "dashboard.html")

    @app.get("/static/{name}")
    def static(name: str):
        path = dist / name
        if "/" in name or name.startswith(".") or not path.is_file():
            return JSONResponse({"error": f"no static file {name!r}"}, 404)
        kind = "text/javascript" if name.endswith((".js", ".mjs")) else None
        return FileResponse(path, media_type=kind)

    @app.get("/artifact/{path:path}")
    def artifact(path: str):
        if path not in files:  # only what the manifest lists: never another file of the folder
            return JSONResponse({"error": f"{path!r} is not a file of the mobile package"}, 404)
        return FileResponse(package / path, headers={"Cache-Control": "no-store"})

    @app.post("/api/session")
    def session(request: Request):
        client = request.client.host if request.client else ""
        if client not in ("127.0.0.1", "::1"):
            return JSONResponse({"error": "session tokens go to loopback clients only"}, 403)
        token, expires = tokens.issue()
        return JSONResponse({"token": token, "expires_at": expires, "ttl_s": config.token_ttl_s,
                             "manifest_sha256": manifest_sha, "max_text_chars": config.max_text_chars,
                             "tiers": sorted(tiers)}, headers={"Cache-Control": "no-store"})

    @app.api_route("/tier/{tier}/{path:path}", methods=["GET", "POST"])
    async def proxy(tier: str, path: str, request: Request):
        if (no := refused(request.headers.get("authorization"))) is not None:
            return no
        if tier not in tiers or (request.method, path) not in PROXIED:
            return JSONResponse({"error": f"no {request.method} /tier/{tier}/{path} here"}, 404)
        body = await _read_limited(request, config.max_body_bytes)
        if body is None:
            return JSONResponse({"error": f"request body is over the limit of {config.max_body_bytes} bytes"}, 413)
        headers = {"Authorization": f"Bearer {tier_token}"} if tier_token else {}
        for name in ("content-type", "x-request-id"):
            if name in request.headers:
                headers[name] = request.headers[name]
        try:
            upstream = await http.request(request.method, f"{tiers[tier]}/{path}", content=body or None,
                                          headers=headers)
        except httpx.HTTPError as exc:
            return JSONResponse({"error": f"the {tier} tier is unreachable ({type(exc).__name__})"}, 502)
        keep = {k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "retry-after")}
        return Response(upstream.content, upstream.status_code, headers=keep)

    @app.post("/api/report")
    async def report(request: Request):
        if (no := refused(request.headers.get("authorization"))) is not None:
            return no
        try:
            raw = json.loads(await request.body())
            tier, routed = raw["tier"], raw["routed"]
            if tier not in ("mobile", "edge", "cloud") or routed not in ("mobile", "edge", "cloud"):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "give {tier, routed, degraded} with tiers mobile, edge or cloud"}, 422)
        answers.labels(tier, routed).inc()
        if raw.get("degraded") is True:
            degraded.inc()
        return {"ok": True}

    @app.get("/api/metrics")
    def metrics(request: Request):
        if (no := refused(request.headers.get("authorization"))) is not None:
            return no
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/drift")
    def drift(request: Request):
        if (no := refused(request.headers.get("authorization"))) is not None:
            return no
        return {"rows": _drift_rows(reference, tiers), "loss_bound": None}

    return app


async def _read_limited(request, limit: int) -> bytes | None:
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > limit:
        return None
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _drift_reference(package: Path) -> dict[str, Any] | None:
    path = package / "drift_reference.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _drift_rows(reference: dict[str, Any] | None, tiers: dict[str, str]) -> list[dict[str, Any]]:
    """PSI verdicts per tier (monitor.compare on each tier's scrape); a tier that does not answer says so."""
    from dimec.errors import DimecError
    from dimec.serving.ops.monitor import compare, scrape

    rows = []
    for name, url in sorted(tiers.items()):
        if reference is None:
            rows.append({"tier": name, "distribution": "-", "samples": 0, "psi": None, "noise_floor": None,
                         "verdict": "no drift reference in the package"})
            continue
        try:
            found = compare(reference, scrape(url, timeout_s=2.0))
        except DimecError as exc:
            rows.append({"tier": name, "distribution": "-", "samples": 0, "psi": None, "noise_floor": None,
                         "verdict": f"unavailable: {exc.message}"})
            continue
        rows.extend({"tier": name, **r} for r in found)
    return rows
