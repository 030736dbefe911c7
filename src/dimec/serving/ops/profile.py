"""`dimec profile`: measure the three tiers and both links, write the cost-model profile in milliseconds.

    lambda_m_ms     mobile compute per layer (mobile exit time for one sample / m)
    lambda_e_ms     edge compute per layer (server-side model time for one sample / n)
    cloud_layer_ms  cloud compute per layer (server-side model time for one sample / l)
    o_e_ms, o_c_ms  per-sample offload time: a one-sample request's round trip minus the server's model time
                    (HTTP, JSON, the link and any emulated link delay)
    hidden_state_factor   a hidden-state transfer's time over a raw-text offload's on the same link: the
                    same one-sample exchange, but the body is the mobile's hidden state after layer m (fp16
                    safetensors, POST /v1/continue); the mean of the edge's and the cloud's ratio of medians

That file is exactly what `CostModel.from_profile` reads (`--set cost.profile=PATH` for calibrate); the raw
figures (medians, p90, link RTT and throughput) go beside it in *_details.json.
"""

from __future__ import annotations

import json
import secrets
import statistics
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from dimec.atomic import write_json, write_text
from dimec.costs import PROFILE_TIMES
from dimec.errors import DimecError, TierUnavailableError
from dimec.rundir import RunDir
from dimec.runtime import wire
from dimec.runtime.plans import Stage
from dimec.runtime.tier import TierModel
from dimec.serving.deploy.export import check_texts_for, ensure_package
from dimec.serving.deploy.local import ProcessServer
from dimec.serving.phone.links import LinkProfile, LinkTransport
from dimec.serving.phone.remote import check_url
from dimec.tiers import TIERS

PROFILE_KEYS = (*PROFILE_TIMES, "hidden_state_factor")  # what profile.json holds (costs.read_profile reads it)
PING_BYTES = 256 * 1024


def _median_p90(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {"median": statistics.median(values), "p90": values[min(len(values) - 1, int(0.9 * len(values)))]}


def profile_mobile(mobile: TierModel, texts: list[str], repeats: int = 3) -> dict[str, Any]:
    """One sample at a time, as a phone would: time of the mobile exit (layers 1..m), tokens excluded."""
    batches = [mobile.encode([t]) for t in texts]
    mobile.logits(batches[0])  # warm-up
    times = []
    for batch in batches:
        best = min(_timed(lambda b=batch: mobile.logits(b)) for _ in range(repeats))
        times.append(best * 1e3)
    return {"backend": mobile.backend, "exit_layer": mobile.exit_layer, "sample_ms": _median_p90(times)}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def profile_remote(url: str, token: str, texts: list[str], link: LinkProfile | None = None,
                   timeout_s: float = 30, mobile: TierModel | None = None) -> dict[str, Any]:
    """Per-sample model time (reported by the server) and offload time (the rest of the round trip),
    plus the link's idle round trip (GET /healthz) and throughput (POST of PING_BYTES to /v1/ping). With
    `mobile`, the same for the mobile's hidden state after layer m (a continuation request), and the bytes
    each kind of request sends."""
    url = check_url("tier", url)
    transport: httpx.BaseTransport = httpx.HTTPTransport()
    if link is not None and not link.is_ideal:
        transport = LinkTransport(link, transport)
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(transport=transport, timeout=timeout_s, headers=headers) as http:
        try:
            health = _ok(http.get(f"{url}/healthz")).json()
        except httpx.TransportError as exc:
            raise TierUnavailableError(f"cannot reach {url} ({type(exc).__name__}: {exc})",
                                       "start the tier (`dimec serve`) or leave the URL out to start one here") from None
        for text in texts[:3]:  # warm-up: connection, allocator, lazy init
            _ok(http.post(f"{url}/v1/classify", json={"text": text}))
        compute, offload, raw_bytes = [], [], []
        for text in texts:
            body = json.dumps({"text": text}).encode()
            start = time.perf_counter()
            answer = _ok(http.post(f"{url}/v1/classify", content=body,
                                   headers={"Content-Type": "application/json"})).json()
            total = (time.perf_counter() - start) * 1e3
            compute.append(answer["compute_ms"])
            offload.append(max(0.0, total - answer["compute_ms"]))
            raw_bytes.append(len(body))
        hidden = _profile_hidden(http, url, health, texts, mobile) if mobile is not None else None
        rtt = [_timed(lambda: _ok(http.get(f"{url}/healthz"))) * 1e3 for _ in range(10)]
        blob = b"x" * PING_BYTES
        upload = [_timed(lambda: _ok(http.post(f"{url}/v1/ping", content=blob))) * 1e3 for _ in range(5)]
    rtt_ms, upload_ms = statistics.median(rtt), statistics.median(upload)
    mbit = PING_BYTES * 8 / max(1e-6, (upload_ms - rtt_ms) / 1e3) / 1e6
    out = {"tier": health["tier"], "exit_layer": health["exit_layer"], "compute_ms": _median_p90(compute),
           "offload_ms": _median_p90(offload), "request_bytes": statistics.median(raw_bytes), "rtt_ms": rtt_ms,
           "throughput_mbit": mbit, "link": None if link is None else link.to_dict()}
    if hidden is not None:
        out["hidden"] = hidden
        out["hidden_state_factor"] = hidden["offload_ms"]["median"] / max(1e-6, out["offload_ms"]["median"])
    return out


def _profile_hidden(http: httpx.Client, url: str, health: dict, texts: list[str], mobile: TierModel) -> dict:
    """One-sample continuation requests: the mobile's hidden state after layer m, answered at the tier's exit."""
    tier = TIERS.index(health["tier"])
    plan = (Stage(tier, tier),)
    bodies = []
    for i, text in enumerate(texts):
        _, hidden = mobile.mobile_stage(mobile.encode([text]))
        bodies.append(wire.encode(hidden, mobile.exit_layer, mobile.model_id, [f"p{i}"], plan))
    headers = {"Content-Type": wire.CONTENT_TYPE}
    for body in bodies[:3]:  # warm-up
        _ok(http.post(f"{url}/v1/continue", content=body, headers=headers))
    compute, offload = [], []
    for body in bodies:
        start = time.perf_counter()
        answer = _ok(http.post(f"{url}/v1/continue", content=body, headers=headers)).json()
        total = (time.perf_counter() - start) * 1e3
        compute.append(answer["compute_ms"])
        offload.append(max(0.0, total - answer["compute_ms"]))
    return {"compute_ms": _median_p90(compute), "offload_ms": _median_p90(offload),
            "request_bytes": statistics.median(len(b) for b in bodies), "dtype": "float16"}


def _ok(response: httpx.Response) -> httpx.Response:
    if response.status_code != 200:
        raise DimecError(f"{response.request.method} {response.request.url} answered {response.status_code}: "
                         f"{response.text[:200]}", "check the URL and the token (--token or DIMEC_TOKEN)")
    return response


def profile_run(run_dir: str | Path, edge_url: str | None = None, cloud_url: str | None = None,
                token: str | None = None, backend: str = "onnx-int8", samples: int = 50,
                links: dict[str, LinkProfile] | None = None, out: str | Path | None = None,
                texts: list[str] | None = None, log=print) -> dict[str, float]:
    run_dir = Path(run_dir)
    links = links or {}
    out = Path(out) if out else RunDir(run_dir).profile
    mobile = TierModel(ensure_package(run_dir, "mobile", backend, log=log), backend)
    texts, _, _, source = check_texts_for(run_dir, texts, None, samples, mobile.tokenizer)
    log(f"profiling on {len(texts)} texts ({source})")
    details: dict[str, Any] = {"samples": len(texts), "source": source, "mobile": profile_mobile(mobile, texts)}
    with ExitStack() as stack:
        if not (edge_url and cloud_url):  # start our own servers on loopback, one torch thread each
            token = token or secrets.token_urlsafe(24)
            servers = {tier: ProcessServer(tier, ensure_package(run_dir, tier, log=log), token).start()
                       for tier in ("edge", "cloud") if not (edge_url if tier == "edge" else cloud_url)}
            for server in servers.values():
                stack.callback(server.stop)
            for server in servers.values():
                server.wait()
            edge_url = edge_url or servers["edge"].url
            cloud_url = cloud_url or servers["cloud"].url
            details["servers"] = "started locally on loopback (1 torch thread each)"
        if not token:
            raise DimecError("a token is needed for the given servers", "pass --token T or set DIMEC_TOKEN")
        for tier, url in (("edge", edge_url), ("cloud", cloud_url)):
            log(f"profiling {tier} at {url}")
            details[tier] = profile_remote(url, token, texts, links.get(tier), mobile=mobile)
    m, n, top = mobile.exit_layers
    profile = {
        "lambda_m_ms": details["mobile"]["sample_ms"]["median"] / m,
        "lambda_e_ms": details["edge"]["compute_ms"]["median"] / n,
        "o_e_ms": details["edge"]["offload_ms"]["median"],
        "o_c_ms": details["cloud"]["offload_ms"]["median"],
        "cloud_layer_ms": details["cloud"]["compute_ms"]["median"] / top,
        "hidden_state_factor": (details["edge"]["hidden_state_factor"] + details["cloud"]["hidden_state_factor"]) / 2,
    }
    profile = {k: round(max(v, 1e-4), 4) for k, v in profile.items()}  # the cost model divides by lambda_e
    write_text(out.with_name(out.stem + "_details.json"), json.dumps(details, indent=2) + "\n")
    write_json(out, profile)  # last: a profile on disk always has its details beside it
    return profile
