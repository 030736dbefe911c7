"""The long versions of issue 17's hardening tests, run by bench_reliability.py (section "serving surface"):
hostile continuation bodies and request ids against a real edge -> cloud pair, mutated sources files, bad
`dimec monitor` / `route` / `plan` inputs, and the memory attacks with the cloud's RSS sampled against the
stated in-flight bound. Every case counts its statuses, 5xx and tracebacks; loopback only, every wait bounded.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
import socket
import struct
import threading
import time
from pathlib import Path

import numpy as np

TOKEN = "bench-reliability-token"
OTHER = "bench-reliability-other-1"  # a second source: its answers must not change with the first's input
JUNK = [None, True, -1, 0, 10**400, 1e308, "x", "", "\ud800", "café", "a\nb", [], ["F16"], {"a": 1}, [[1]] * 3]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# ---- continuation bodies and ids against a real edge -> cloud pair ------------------------------------------------
def _valid_body(model, rng: random.Random, n: int = 2) -> tuple[dict, bytes]:
    from dimec.runtime import wire

    batch = model.encode(["good movie", "the plot was dull and the acting weak"][:n])
    hidden = model.start(batch)
    rows = [h[: int(k.sum())] for h, k in zip(hidden, batch.attention_mask, strict=True)]
    plan = wire.plan_from_json([{"tier": "edge", "exit": 1, "threshold": rng.random()},
                                {"tier": "cloud", "exit": 2, "threshold": None}])
    body = wire.encode(rows, 0, model.model_id, [f"id-{i}" for i in range(n)], plan)
    (size,) = struct.unpack("<Q", body[:8])
    return json.loads(body[8 : 8 + size]), body[8 + size :]


def mutated_body(model, rng: random.Random) -> bytes:
    """A valid body with one to three hostile mutations of its header, metadata or tensors."""
    header, data = _valid_body(model, rng)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(9)
        if kind == 0:
            header[rng.choice(["hidden", "attention_mask"])]["dtype"] = rng.choice(JUNK + ["F64", "I64"])
        elif kind == 1:
            header["hidden"]["shape"] = rng.choice([JUNK, [rng.choice(JUNK) for _ in range(3)], [2, 99, 64]])
        elif kind == 2:
            key = rng.choice(["layer", "ids", "plan", "model", "confidence", "dimec"])
            header["__metadata__"][key] = rng.choice(JUNK)
        elif kind == 3:
            ids = rng.choice([["café", "b"], ["a\nb", "c"], ["d", "d"], ["x" * 200, "y"], ["\ud800", "z"], [1, 2]])
            header["__metadata__"]["ids"] = json.dumps(ids)
        elif kind == 4:
            th = rng.choice(["9" * 400, "1e999", "NaN", '"x"', "[]"])
            header["__metadata__"]["plan"] = '[{"tier": "edge", "exit": 1, "threshold": ' + th + \
                '}, {"tier": "cloud", "exit": 2, "threshold": null}]'
        elif kind == 5:  # huge but finite fp16 values
            arr = np.frombuffer(data, dtype=np.uint8).copy()
            start = header["hidden"]["data_offsets"][0]
            arr[start : start + 64] = np.full(32, 60000, np.float16).view(np.uint8)
            data = arr.tobytes()
        elif kind == 6:  # a mask with a hole
            start, stop = header["attention_mask"]["data_offsets"]
            arr = bytearray(data)
            arr[start : stop] = bytes(i % 2 for i in range(stop - start))
            data = bytes(arr)
        elif kind == 7:
            header["x" * rng.randint(1, 50)] = {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]}
        else:
            text = json.dumps(header)
            cut = rng.randrange(len(text))
            return struct.pack("<Q", len(text)) + text[:cut].encode() + b"9" * 5000 + text[cut:].encode() + data
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def continuation_fuzz(urls: dict[str, str], model, count: int, seed: int) -> dict:
    """`count` mutated bodies to each tier over one keep-alive connection per tier; after every body a good
    request from another source must get a non-fallback answer."""
    import httpx

    from dimec.runtime import wire

    rng = random.Random(seed)
    out = {"cases": 0, "statuses": {}, "server_5xx": 0, "connection_errors": 0, "other_source_changed": 0}
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": wire.CONTENT_TYPE}
    other = {"Authorization": f"Bearer {OTHER}"}
    plan = [{"tier": "edge", "exit": 1, "threshold": 1.01}, {"tier": "cloud", "exit": 2, "threshold": None}]
    with httpx.Client(timeout=30) as http:
        for i in range(count):
            for url in urls.values():
                body = mutated_body(model, rng)
                out["cases"] += 1
                try:
                    status = http.post(f"{url}/v1/continue", content=body, headers=headers).status_code
                except httpx.TransportError:
                    out["connection_errors"] += 1
                    continue
                out["statuses"][str(status)] = out["statuses"].get(str(status), 0) + 1
                out["server_5xx"] += status >= 500
            if i % 10 == 0:  # another source's answer, on the path through the cloud
                r = http.post(f"{urls['edge']}/v1/classify", json={"texts": ["dull"], "ids": [f"o{i}"], "plan": plan},
                              headers=other)
                out["other_source_changed"] += r.status_code != 200 or r.json()["fallback"] != [False]
    return out


def id_fuzz(urls: dict[str, str], count: int, seed: int) -> dict:
    """Random request ids (non-ASCII, control characters, long, duplicates) on plans the edge forwards."""
    import httpx

    rng = random.Random(seed)
    alphabet = ["a", "Z", "9", "-", "é", "\n", "\r", "\x00", " ", "\u2028", "\ud800", "\"", "\\", "😀", ":"]
    plan = [{"tier": "edge", "exit": 1, "threshold": 1.01}, {"tier": "cloud", "exit": 2, "threshold": None}]
    out = {"cases": 0, "statuses": {}, "server_5xx": 0, "accepted_bad_ids": 0, "other_source_changed": 0}
    with httpx.Client(timeout=30) as http:
        for i in range(count):
            n = rng.randint(1, 3)
            ids = ["".join(rng.choice(alphabet) for _ in range(rng.choice([1, 5, 130]))) for _ in range(n)]
            if rng.random() < 0.2:
                ids = [ids[0]] * n
            raw = json.dumps({"texts": ["good movie"] * n, "ids": ids, "plan": plan}, ensure_ascii=True).encode()
            r = http.post(f"{urls['edge']}/v1/classify", content=raw,
                          headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
            out["cases"] += 1
            out["statuses"][str(r.status_code)] = out["statuses"].get(str(r.status_code), 0) + 1
            out["server_5xx"] += r.status_code >= 500
            valid = len(set(ids)) == n and all(1 <= len(x) <= 128 and all(0x21 <= ord(c) <= 0x7E for c in x)
                                               for x in ids)
            out["accepted_bad_ids"] += r.status_code == 200 and not valid
            r = http.post(f"{urls['edge']}/v1/classify", json={"texts": ["dull"], "ids": [f"g{i}"], "plan": plan},
                          headers={"Authorization": f"Bearer {OTHER}"})
            out["other_source_changed"] += r.status_code != 200 or r.json()["fallback"] != [False]
    return out


# ---- the operator's inputs, in-process (a traceback is an exception escaping main) ---------------------------------
def _main(argv: list[str]) -> tuple[int, bool]:
    from dimec.cli import main

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 2
    except Exception:  # noqa: BLE001  (what the benchmark counts)
        return -1, True
    return code, "Traceback" in err.getvalue()


def _tally(out: dict, code: int, traceback: bool, expected=(2,)) -> None:
    out["cases"] += 1
    out["tracebacks"] += traceback
    out["unexpected_exit"] += code not in expected
    out["exits"][str(code)] = out["exits"].get(str(code), 0) + 1


def sources_fuzz(work: Path, count: int, seed: int) -> dict:
    import yaml

    rng = random.Random(seed)
    out = {"cases": 0, "tracebacks": 0, "unexpected_exit": 0, "exits": {}}
    base = {"classes": [{"name": "high", "weight": 4}, {"name": "low"}],
            "sources": [{"name": "a", "token": "token-aaaa-1", "priority": "high"},
                        {"name": "b", "token": "token-bbbb-1", "priority": "low"}],
            "scheduling": {"policy": "strict", "queue_capacity": 32, "retry_after_s": 1.0},
            "allocation": {"enabled": True, "valid_s": 2.0}}
    values = [*JUNK, float("inf"), float("nan"), -5, 1e12, "strict", 0.5]
    for _ in range(count):
        raw = json.loads(json.dumps(base))
        for _ in range(rng.randint(1, 4)):
            section = rng.choice(list(raw))
            if isinstance(raw[section], list):
                i = rng.randrange(len(raw[section]))
                if rng.random() < 0.2 or not isinstance(raw[section][i], dict):  # (an earlier change made it a scalar)
                    raw[section][i] = rng.choice(values)
                else:
                    raw[section][i][rng.choice(["name", "weight", "max_queue", "priority", "token", "x"])] = \
                        rng.choice(values)
            else:
                key = rng.choice(list(raw[section]) + ["x", "workers", "horizon_s"])
                raw[section][key] = rng.choice(values)
        path = work / "fleet.yaml"
        path.write_text(yaml.safe_dump(raw, allow_unicode=False))
        code, tb = _main(["serve", "edge", str(work / "no-package"), "--sources", str(path)])
        _tally(out, code, tb)
    return out


def monitor_fuzz(count: int, seed: int) -> dict:
    """Bad metrics text and drift references served by a fake tier, and bad options."""
    from conftest import FakeTier  # tests/ is on the path (bench_reliability.py)

    rng = random.Random(seed)
    tier = FakeTier()
    reference = {"format_version": 2, "model": "m0", "samples": 100, "router": "fixed", "anchors": [[0.0, 0.0]],
                 "routing_distance": {"edges": [0.5, 1.0], "counts": [30, 40, 30]}, "routed": {"counts": [5, 3, 2]},
                 "confidence": {"edges": [0.6, 0.9], "counts": {"m": [1, 2, 3], "n": [1, 1, 1], "l": [1, 2, 3]}}}
    metrics = ('dimec_drift_routed_total{model="m0",tier="mobile"} 5.0\n'
               'dimec_drift_confidence_bucket{model="m0",exit="m",le="0.6"} 1.0\n'
               'dimec_drift_confidence_bucket{model="m0",exit="m",le="+Inf"} 3.0\n')
    out = {"cases": 0, "tracebacks": 0, "unexpected_exit": 0, "exits": {}}
    try:
        for _ in range(count):
            ref = json.loads(json.dumps(reference))
            text, extra = metrics, []
            kind = rng.randrange(4)
            if kind == 0:
                key = rng.choice(list(ref))
                ref[key] = rng.choice([v for v in JUNK if v is not None and not isinstance(v, str)] + ["x"])
            elif kind == 1:
                text = metrics.replace(rng.choice(['"mobile"', '"0.6"', "5.0", "1.0", 'exit="m"']),
                                       rng.choice(['"moon"', '"abc"', "NaN", "-1", "", "{"]))
            elif kind == 2:
                extra = [rng.choice(["--interval", "--threshold", "--min-samples"]),
                         rng.choice(["inf", "nan", "-1", "0", "1e400"])]
            else:
                tier.reference = "[" * rng.choice([10, 100_000]) + rng.choice(["", "]"])
            if kind != 3:
                tier.reference = json.dumps(ref)
            tier.metrics = text
            code, tb = _main(["monitor", tier.url, *extra])
            _tally(out, code, tb, expected=(0, 1, 2))
    finally:
        tier.close()
    return out


def route_plan_fuzz(run: Path, work: Path, count: int, seed: int) -> dict:
    """Tampered run directories for `dimec route`, bad profiles, prices and policies for `dimec plan`."""
    rng = random.Random(seed)
    out = {"route": {"cases": 0, "tracebacks": 0, "unexpected_exit": 0, "exits": {}},
           "plan": {"cases": 0, "tracebacks": 0, "unexpected_exit": 0, "exits": {}}}
    copy = work / "tampered"
    bad = [float("nan"), float("inf"), -1, 0, "x", [], None, {"a": 1}, 10**400]
    profile = {"lambda_m_ms": 2.0, "lambda_e_ms": 1.0, "o_e_ms": 5.0, "o_c_ms": 40.0, "cloud_layer_ms": 0.5}
    router = json.loads((run / "router.json").read_text())
    policies = {"policies": [{"name": "served", "router": router["router"], "params": router["params"],
                              "state": router["state"]}]}
    for i in range(count):
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("packages", "checkpoint", "dynamics"))
        raw = json.loads(json.dumps(router))
        model_cfg = copy / "model" / "dimec_model.json"
        kind = rng.randrange(3)
        if kind == 0:
            cfg = json.loads(model_cfg.read_text())
            cfg["temperatures"] = rng.choice([[rng.choice(bad)] * 3, [1.0], "x", [1.0, -1.0, 1.0]])
            model_cfg.write_text(json.dumps(cfg))
        elif kind == 1:
            raw["state"]["plans"] = rng.choice([[], "x", [[["edge", 1, float("nan")], ["cloud", 2, None]]]])
        else:
            chosen = []
            for plan in raw["state"]["plans"]:
                for stage in plan[:-1]:
                    stage[2] = rng.choice(bad)
                    chosen.append(stage[2])
        # thresholds of -1, 0 or inf are odd but valid (always, always, never answer here): those runs may answer
        odd_but_valid = kind == 2 and all(v in (-1, 0, float("inf")) and not isinstance(v, bool) for v in chosen)
        (copy / "router.json").write_text(json.dumps(raw))
        code, tb = _main(["route", str(copy), "a good movie", "a dull film"])
        _tally(out["route"], code, tb, expected=(0,) if odd_but_valid else (2,))
        p = dict(profile)
        key, value = rng.choice(list(p)), rng.choice(bad)
        p[key] = value
        (work / "profile.json").write_text(json.dumps(p) if i % 4 else "[" * 100_000)
        pol = json.loads(json.dumps(policies))
        if i % 3 == 0:
            pol = rng.choice([{"policies": []}, {"policies": 5}, {"x": 1}])
        (work / "policies.json").write_text(json.dumps(pol))
        extra = [] if i % 5 else ["--cloud-price", rng.choice(["inf", "nan", "-1"])]
        code, tb = _main(["plan", str(run), "--profile", str(work / "profile.json"), "--policies",
                          str(work / "policies.json"), "--out", str(work / "plan-out"), *extra])
        # a zero time (other than the edge's layer, the unit the others are scaled by) is a valid profile
        valid = i % 4 and i % 3 and not extra and value == 0 and not isinstance(value, bool) and key != "lambda_e_ms"
        _tally(out["plan"], code, tb, expected=(0, 2) if valid else (2,))
    return out


# ---- memory attacks against a real cloud process ------------------------------------------------------------------
def memory_attacks(packages: dict[str, Path], connections: int, concurrent: int) -> dict:
    """(1) `connections` unauthenticated sockets each announcing an 8 MB continuation and sending 1 MB;
    (2) `concurrent` authenticated clients each sending max-size continuation bodies at once. The cloud's
    RSS is sampled every 50 ms; the bound is the server's in-flight limit (32 MB in all, 16 MB per source)."""
    import httpx

    from dimec.runtime import wire
    from dimec.runtime.tier import TierModel
    from dimec.serving.deploy.local import ProcessServer

    model = TierModel(packages["cloud"])
    out: dict = {}
    with ProcessServer("cloud", packages["cloud"], TOKEN) as cloud:
        pid = cloud.proc.pid
        peak, stop = [0.0], threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mb(pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        base = rss_mb(pid)
        sampler.start()
        statuses: dict[str, int] = {}
        socks = []
        for _ in range(connections):
            try:
                s = socket.create_connection(("127.0.0.1", cloud.port), timeout=5)
                s.sendall(f"POST /v1/continue HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong-token\r\n"
                          f"Content-Type: {wire.CONTENT_TYPE}\r\nContent-Length: 8000000\r\n\r\n".encode())
                s.sendall(b"\0" * 1_000_000)
                socks.append(s)
            except OSError:
                statuses["refused"] = statuses.get("refused", 0) + 1
        for s in socks:
            s.settimeout(5)
            try:
                status = s.recv(64).split()[1].decode()
            except (OSError, IndexError):
                status = "none"
            statuses[status] = statuses.get(status, 0) + 1
            s.close()
        unauth_peak = peak[0]
        out["unauthenticated"] = {"connections": connections, "statuses": statuses, "rss_before_mb": round(base, 1),
                                  "rss_peak_mb": round(unauth_peak, 1), "rss_after_mb": round(rss_mb(pid), 1)}
        # (2) authenticated: bodies as large as the limit allows (max_length tokens, fp32)
        width = model.max_length
        rows = [np.random.default_rng(i).standard_normal((width, model.start(model.encode(["a"])).shape[-1]))
                .astype(np.float32) for i in range(64)]
        body = wire.encode(rows, 0, model.model_id, [f"m{i}" for i in range(64)], dtype=np.float32)
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": wire.CONTENT_TYPE}
        codes: dict[str, int] = {}
        lock = threading.Lock()
        before = rss_mb(pid)
        peak[0] = before

        def send():
            try:
                code = str(httpx.post(f"{cloud.url}/v1/continue", content=body, headers=headers, timeout=60).status_code)
            except httpx.TransportError:
                code = "transport error"
            with lock:
                codes[code] = codes.get(code, 0) + 1

        threads = [threading.Thread(target=send) for _ in range(concurrent)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        out["authenticated"] = {"concurrent": concurrent, "body_bytes": len(body), "statuses": codes,
                                "rss_before_mb": round(before, 1), "rss_peak_mb": round(peak[0], 1),
                                "rss_after_mb": round(rss_mb(pid), 1)}
        # (3) authenticated bodies just under the 8 MB limit (refused 422 once read): what holding them costs
        body, codes, before = body + b"\0" * (7_900_000 - len(body)), {}, rss_mb(pid)
        peak[0] = before
        threads = [threading.Thread(target=send) for _ in range(concurrent)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        stop.set()
        sampler.join(2)
        out["authenticated_large"] = {"concurrent": concurrent, "body_bytes": len(body), "statuses": codes,
                                      "rss_before_mb": round(before, 1), "rss_peak_mb": round(peak[0], 1),
                                      "rss_after_mb": round(rss_mb(pid), 1)}
        out["bound"] = {"max_inflight_bytes": 32_000_000, "max_source_inflight_bytes": 16_000_000}
        out["server_5xx"] = sum(n for part in ("unauthenticated", "authenticated", "authenticated_large")
                                for c, n in out[part]["statuses"].items() if c.isdigit() and int(c) >= 500)
    return out


def run_all(packages: dict[str, Path], run: Path, work: Path, cases: int, seed: int, log=print) -> dict:
    """Every surface of issue 17; `cases` scales the counts (the smoke run uses a handful)."""
    from dimec.runtime.tier import TierModel
    from dimec.serving.deploy.local import ProcessServer

    sources = work / "bench-sources.json"
    sources.write_text(json.dumps({
        "classes": [{"name": "high"}, {"name": "low"}],
        "sources": [{"name": "prober", "token_env": "DIMEC_BENCH_A", "priority": "low"},
                    {"name": "other", "token_env": "DIMEC_BENCH_B", "priority": "high"}],
        "scheduling": {"queue_capacity": 64}}))
    import os

    os.environ["DIMEC_BENCH_A"], os.environ["DIMEC_BENCH_B"] = TOKEN, OTHER
    os.environ["DIMEC_CLOUD_TOKEN"] = OTHER  # the edge's token at the cloud, out of argv
    result: dict = {}
    with ProcessServer("cloud", packages["cloud"], TOKEN, extra_args=["--sources", str(sources)]) as cloud, \
            ProcessServer("edge", packages["edge"], TOKEN, extra_args=[
                "--sources", str(sources), "--cloud-url", cloud.url]) as edge:
        urls = {"edge": edge.url, "cloud": cloud.url}
        log("  continuation bodies")
        result["continuation"] = continuation_fuzz(urls, TierModel(packages["edge"]), cases, seed)
        log(f"    {json.dumps(result['continuation'])}")
        log("  request ids")
        result["ids"] = id_fuzz(urls, cases, seed)
        log(f"    {json.dumps(result['ids'])}")
    log("  sources files, monitor, route, plan")
    result["sources"] = sources_fuzz(work, cases, seed)
    result["monitor"] = monitor_fuzz(cases, seed)
    result.update(route_plan_fuzz(run, work, max(2, cases // 4), seed))
    for key in ("sources", "monitor", "route", "plan"):
        log(f"    {key}: {json.dumps(result[key])}")
    log("  memory attacks")
    result["memory"] = memory_attacks(packages, connections=min(200, 4 * cases), concurrent=min(32, cases))
    log(f"    {json.dumps(result['memory'])}")
    return result


def render(s: dict) -> list[str]:
    """Markdown lines for docs/reliability.md and BENCHMARKS.md."""
    c, i, m = s["continuation"], s["ids"], s["memory"]
    ua, au, al = m["unauthenticated"], m["authenticated"], m["authenticated_large"]
    lines = ["", "### The serving surface (issue 17)", "",
             "| surface | cases | 5xx | tracebacks | other |", "| --- | ---: | ---: | ---: | --- |",
             f"| hostile `/v1/continue` bodies, edge and cloud | {c['cases']} | {c['server_5xx']} | - | statuses "
             f"{c['statuses']}; connection errors {c['connection_errors']}; another source's answer changed "
             f"{c['other_source_changed']} |",
             f"| request ids on plans the edge forwards | {i['cases']} | {i['server_5xx']} | - | statuses "
             f"{i['statuses']}; bad ids accepted {i['accepted_bad_ids']}; another source's answer changed "
             f"{i['other_source_changed']} |"]
    for key, name in (("sources", "mutated sources files (`dimec serve --sources`)"),
                      ("monitor", "`dimec monitor`: bad metrics, references, options"),
                      ("route", "`dimec route` on tampered run directories"),
                      ("plan", "`dimec plan`: bad profiles, prices, policies")):
        x = s[key]
        lines.append(f"| {name} | {x['cases']} | - | {x['tracebacks']} | exits {x['exits']}; unexpected "
                     f"{x['unexpected_exit']} |")
    lines += ["", f"Memory (the cloud's RSS, sampled every 50 ms; bound: {m['bound']['max_inflight_bytes']:,} "
                  f"request bytes in flight, {m['bound']['max_source_inflight_bytes']:,} per source): "
                  f"{ua['connections']} unauthenticated connections announcing 8 MB each: statuses {ua['statuses']}, "
                  f"RSS {ua['rss_before_mb']} -> peak {ua['rss_peak_mb']} -> {ua['rss_after_mb']} MB; "
                  f"{au['concurrent']} concurrent authenticated continuations of {au['body_bytes']:,} bytes: "
                  f"statuses {au['statuses']}, RSS {au['rss_before_mb']} -> peak {au['rss_peak_mb']} -> "
                  f"{au['rss_after_mb']} MB; {al['concurrent']} concurrent authenticated bodies of "
                  f"{al['body_bytes']:,} bytes: statuses {al['statuses']}, RSS {al['rss_before_mb']} -> peak "
                  f"{al['rss_peak_mb']} -> {al['rss_after_mb']} MB; 5xx {m['server_5xx']}."]
    return lines
