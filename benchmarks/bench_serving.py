"""Serving figures (issue 10, model-distributed paths) on a trained and calibrated run, over loopback:

1. the phone's deployable: size on disk of the default mobile package (one int8 ONNX graph), its accuracy
   change, label, routing and decision agreement against PyTorch fp32 on the test split, and its latency;
2. the routing decision on the client's own path (`MobileClient.route`: the int8 graph's routing embedding,
   then the router), per sample, against the mobile stage it precedes (int8: layers 1..m, exit m, hidden);
3. three-tier serving with the run's router.json (whatever policy it holds; reported) against cloud-only
   serving of the same model: throughput, p50/p99 latency and accuracy under the same offered load
   (C concurrent closed-loop clients, single-text requests from the test split), rounds alternated;
4. hidden-state continuation against raw-text offload to the edge, one request at a time on emulated wifi and
   4G links (latency, jitter and bandwidth of the presets, no loss): bytes per request and end-to-end latency;
5. the edge killed (SIGKILL) and restarted under load: requests lost, answered twice, fallbacks counted.

Writes benchmarks/results/serving.json in report.py's format ({"title", "command", "script", "measured",
"data"}); `render(data)` is the BENCHMARKS.md section body (`python benchmarks/report.py` renders it).

    python benchmarks/bench_serving.py [RUN_DIR (default runs/default)] [--requests 600] [--rounds 5]
        [--concurrency 4] [--mobile-samples 300] [--link-samples 100] [--fault-requests 5000] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import secrets
import statistics
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "serving.json"
COMMAND = "python benchmarks/bench_serving.py runs/default"
TITLE = "Serving (issue 10): model-distributed paths, the phone's deployable, three tiers vs cloud-only"
LINKS = {"wifi": "wifi,loss=0", "4g": "4g,loss=0"}  # presets of dimec.serving.phone.links, without loss


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def best_ms(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


# ---- 1./2. the phone's deployable and the routing decision ---------------------------------------------------
def bench_mobile(run_dir: Path, lean: Path, full: Path, texts, pairs, labels, limit: int) -> dict:
    """Size, agreement and accuracy of the int8 graph the phone downloads; per-sample latency of the mobile
    stage (int8 vs PyTorch fp32) and of the routing decision on the client's path. Tokenisation excluded;
    min of 3 per sample, medians over samples; one thread each, as on a phone."""
    import numpy as np
    import torch

    from dimec.modeling.multi_exit import MultiExitModel
    from dimec.runtime.package import package_bytes, read_manifest
    from dimec.runtime.tier import TierModel
    from dimec.serving.deploy.onnx_export import check_agreement
    from dimec.serving.phone.client import MobileClient

    torch.set_num_threads(1)
    sliced = MultiExitModel.from_pretrained(run_dir / "model").slice(0)
    check = check_agreement(sliced, lean, texts, pairs, labels, "test split")
    manifest = read_manifest(lean)
    size = {"package_bytes": package_bytes(manifest), "int8_graph_bytes": manifest["files"]["model.int8.onnx"]["bytes"],
            "files": sorted(manifest["files"]), "full_package_bytes": package_bytes(read_manifest(full))}
    int8, fp32 = TierModel(lean, "onnx-int8"), TierModel(full, "torch")
    client = MobileClient(int8)  # no remotes: only its routing decision is timed here
    batches = [int8.encode([t], None if pairs is None else [pairs[i]]) for i, t in enumerate(texts[:limit])]

    def preroute(b):  # what any pre-router needs: the routing embedding, then the router's choice
        return client.router.choose_plans(int8.embed(b), b.attention_mask.sum(1))

    for fn in (lambda b: int8.mobile_stage(b), lambda b: fp32.mobile_stage(b), client.route, preroute):
        fn(batches[0])  # warm-up
    times: dict[str, list[float]] = {"int8": [], "torch": [], "route": [], "preroute": []}
    for b in batches:  # interleaved, so drift in machine load hits each path alike
        times["int8"].append(best_ms(lambda b=b: int8.mobile_stage(b)))
        times["torch"].append(best_ms(lambda b=b: fp32.mobile_stage(b)))
        times["route"].append(best_ms(lambda b=b: client.route(b)))
        times["preroute"].append(best_ms(lambda b=b: preroute(b)))
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = [r / m for r, m in zip(times["route"], times["int8"], strict=True)]
    pre_ratios = [r / m for r, m in zip(times["preroute"], times["int8"], strict=True)]
    # the same per sample when the client classifies 32 texts in one call (fixed per-call costs amortised)
    chunks = [int8.encode(texts[i : i + 32], None if pairs is None else pairs[i : i + 32])
              for i in range(0, min(len(texts), limit), 32)]
    batched = {"int8": statistics.median(best_ms(lambda b=b: int8.mobile_stage(b)) / len(b) for b in chunks),
               "preroute": statistics.median(best_ms(lambda b=b: preroute(b)) / len(b) for b in chunks)}
    return {
        "size": size, "check": check,
        "latency_ms": {k: {"median": med[k], "p99": percentile(v, 99)} for k, v in times.items()},
        "int8_vs_torch_time": med["int8"] / med["torch"],
        "routing": {"router": client.router.name, "plans": len(client.plans),
                    "path": "one plan: nothing to decide" if len(client.plans) == 1 and client.online is None else
                            f"the int8 graph's routing embedding (pruned session), then {client.router.name}"
                            ".choose_plans",
                    "median_us": med["route"] * 1e3, "share_of_mobile_stage_pct": 100 * statistics.median(ratios),
                    "preroute_median_us": med["preroute"] * 1e3,
                    "preroute_share_pct": 100 * statistics.median(pre_ratios), "samples": len(batches),
                    "batched_32_preroute_us_per_sample": batched["preroute"] * 1e3,
                    "batched_32_preroute_share_pct": 100 * batched["preroute"] / batched["int8"]},
        "accuracy_change": check["onnx_int8"].get("accuracy", np.nan) - check.get("torch_accuracy", np.nan),
    }


# ---- 3./5. load generator ---------------------------------------------------------------------------------------
def run_load(client, texts: list[str], labels: list[int], total: int, concurrency: int, tag: str,
             during=None, stop: threading.Event | None = None, max_seconds: float = 300) -> dict:
    """`concurrency` workers share up to `total` single-text requests (bounded in count and time; `stop`
    ends it earlier)."""
    lock = threading.Lock()
    next_index = [0]
    results: dict[str, tuple[float, object, float]] = {}  # id -> (latency ms, answer, finished at)
    sent: list[str] = []
    errors: list[str] = []
    error_ids: set[str] = set()
    deadline = time.monotonic() + max_seconds

    def worker() -> None:
        while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            with lock:
                i = next_index[0]
                if i >= total:
                    return
                next_index[0] += 1
                rid = f"{tag}-{i}"
                sent.append(rid)
            start = time.perf_counter()
            try:
                answer = client.classify([texts[i % len(texts)]], ids=[rid])[0]
            except Exception as exc:  # noqa: BLE001  (an explicit error is an outcome; count it)
                with lock:
                    errors.append(f"{rid}: {exc}")
                    error_ids.add(rid)
                continue
            with lock:
                if rid in results:
                    errors.append(f"{rid} answered twice")
                results[rid] = ((time.perf_counter() - start) * 1e3, answer, time.perf_counter())

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    if during is not None:
        during()
    for t in threads:
        t.join(max(1.0, deadline - time.monotonic()))
    seconds = time.perf_counter() - start
    latencies = [lat for lat, _, _ in results.values()]
    answers = [a for _, a, _ in results.values()]
    correct = sum(a.label_id == labels[int(a.id.rsplit("-", 1)[1]) % len(labels)] for a in answers)
    return {
        "sent": len(sent), "answered": len(answers), "errors": errors, "seconds": seconds,
        "throughput": len(answers) / seconds, "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
        "accuracy": correct / max(1, len(answers)),
        "tiers": {t: sum(a.tier == t for a in answers) for t in ("mobile", "edge", "cloud")},
        "fallbacks": sum(a.fallback for a in answers), "degraded": sum(a.degraded for a in answers),
        "lost": len(set(sent) - set(results) - error_ids),  # neither answered nor refused explicitly
        "finished": [(done - start, a.tier) for _, a, done in results.values()],
    }


def bench_systems(mobile_dir: Path, urls: dict, token: str, texts, labels, requests: int, concurrency: int,
                  rounds: int) -> dict:
    from dimec.serving.phone.client import MobileClient

    clients = {name: MobileClient(mobile_dir, urls["edge"], urls["cloud"], token, backend="onnx-int8",
                                  routing=routing) for name, routing in (("three-tier", "router"),
                                                                          ("cloud-only", "cloud-only"))}
    for client in clients.values():  # warm-up: connections, lazy init on both servers
        run_load(client, texts, labels, 2 * concurrency, concurrency, "warm")
    runs: dict[str, list[dict]] = {name: [] for name in clients}
    for r in range(rounds):  # alternate A, B, A, B: load drift hits both systems alike
        for name, client in clients.items():
            runs[name].append(run_load(client, texts, labels, requests, concurrency, f"{name}-{r}"))
            print(f"  round {r + 1} {name:<10} {runs[name][-1]['throughput']:7.1f} req/s  "
                  f"p50 {runs[name][-1]['p50_ms']:6.1f} ms  p99 {runs[name][-1]['p99_ms']:6.1f} ms", flush=True)
    stats = clients["three-tier"].stats()
    for client in clients.values():
        client.close()
    summary: dict = {}
    for name, rs in runs.items():
        summary[name] = {k: statistics.median(r[k] for r in rs) for k in ("throughput", "p50_ms", "p99_ms", "accuracy")}
        summary[name]["tiers"] = rs[-1]["tiers"]
        summary[name]["lost"] = sum(r["lost"] for r in rs)
        summary[name]["errors"] = sum(len(r["errors"]) for r in rs)
        summary[name]["fallbacks"] = sum(r["fallbacks"] for r in rs)
    summary["three-tier"]["client_stats"] = stats
    ratios = [a["throughput"] / b["throughput"] for a, b in zip(runs["three-tier"], runs["cloud-only"], strict=True)]
    summary["ratio"], summary["ratio_range"] = statistics.median(ratios), (min(ratios), max(ratios))
    summary["settings"] = {"requests": requests, "concurrency": concurrency, "rounds": rounds}
    return summary


def bench_edge_failure(mobile_dir: Path, urls: dict, token: str, edge_server, texts, labels, cap: int,
                       concurrency: int) -> dict:
    """Kill the edge a second into the run and restart it at once (model import and load take seconds);
    the load goes on until the edge has answered again for 3 s (at most `cap` requests)."""
    from dimec.serving.phone.client import MobileClient

    timeline: dict[str, float] = {}
    client = MobileClient(mobile_dir, urls["edge"], urls["cloud"], token, backend="onnx-int8", routing="router",
                          cooldown_s=0.5, retries=1)
    stop = threading.Event()
    t0 = time.perf_counter()

    def chaos() -> None:
        try:
            time.sleep(1.0)
            edge_server.kill()
            timeline["killed_s"] = time.perf_counter() - t0
            edge_server.start().wait(180)
            timeline["back_s"] = time.perf_counter() - t0
            time.sleep(3.0)
        finally:
            stop.set()

    result = run_load(client, texts, labels, cap, concurrency, "fault", during=chaos, stop=stop)
    result["client_stats"] = client.stats()
    result.update(timeline)
    back = timeline.get("back_s", float("inf"))
    result["edge_after_restart"] = sum(tier == "edge" and t > back for t, tier in result.pop("finished"))
    result["answered_twice"] = sum("twice" in e for e in result["errors"])
    result["errors"] = result["errors"][:10]
    client.close()
    return result


# ---- 4. hidden-state continuation vs raw offload ------------------------------------------------------------------
def bench_links(mobile: Path, edge_url: str, token: str, texts: list[str], samples: int) -> dict:
    """One request at a time to the edge (exit n) over an emulated link: raw text (the edge runs layers 1..n)
    against the mobile's hidden state after layer m (the mobile runs 1..m in int8, the edge m+1..n). End to
    end: from the text on the phone to the answer on the phone, tokenisation and mobile compute included.
    Transfer: the round trip minus the server's model time (what `dimec profile` calls the offload time)."""
    import httpx

    from dimec.routing.plan import Stage
    from dimec.runtime import wire
    from dimec.runtime.tier import TierModel
    from dimec.serving.phone.links import LinkProfile, LinkTransport
    from dimec.tiers import EDGE

    int8 = TierModel(mobile, "onnx-int8")
    plan = (Stage(EDGE, EDGE),)
    out: dict = {}
    for name, spec in LINKS.items():
        link = LinkProfile.parse(spec)
        http = httpx.Client(transport=LinkTransport(link, seed=7), timeout=30,
                            headers={"Authorization": f"Bearer {token}"})
        rows: dict[str, dict[str, list[float]]] = {k: {"bytes": [], "e2e_ms": [], "transfer_ms": [], "answer_bytes": []}
                                                   for k in ("raw", "hidden")}
        for i, text in enumerate(texts[: samples + 3]):
            start = time.perf_counter()
            body = json.dumps({"texts": [text], "ids": [f"r{i}"]}).encode()
            r = http.post(f"{edge_url}/v1/classify", content=body, headers={"Content-Type": "application/json"})
            raw_ms = (time.perf_counter() - start) * 1e3
            raw = (len(body), raw_ms, raw_ms - r.json()["compute_ms"], len(r.content))
            start = time.perf_counter()
            _, hidden = int8.mobile_stage(int8.encode([text]))
            content = wire.encode(hidden, int8.exit_layer, int8.model_id, [f"h{i}"], plan)
            sent = time.perf_counter()
            r = http.post(f"{edge_url}/v1/continue", content=content, headers={"Content-Type": wire.CONTENT_TYPE})
            done = time.perf_counter()
            hid = (len(content), (done - start) * 1e3, (done - sent) * 1e3 - r.json()["compute_ms"], len(r.content))
            if i < 3:
                continue  # warm-up
            for kind, values in (("raw", raw), ("hidden", hid)):
                for key, v in zip(("bytes", "e2e_ms", "transfer_ms", "answer_bytes"), values, strict=True):
                    rows[kind][key].append(v)
        http.close()
        out[name] = {"link": link.to_dict(), **{kind: {k: statistics.median(v) for k, v in r.items()}
                                                for kind, r in rows.items()}}
        out[name]["hidden_state_factor"] = out[name]["hidden"]["transfer_ms"] / out[name]["raw"]["transfer_ms"]
        print(f"  {name}: raw {out[name]['raw']['bytes']:.0f} B, {out[name]['raw']['e2e_ms']:.1f} ms; hidden "
              f"{out[name]['hidden']['bytes']:.0f} B, {out[name]['hidden']['e2e_ms']:.1f} ms", flush=True)
    out["samples"] = samples
    return out


# ---- report ---------------------------------------------------------------------------------------------------
def render(r: dict) -> str:
    """The BENCHMARKS.md section body, from the results JSON alone."""
    m, s, links, fault = r["mobile"], r["systems"], r["links"], r["fault"]
    three, cloud = s["three-tier"], s["cloud-only"]
    shares = ", ".join(f"{k} {v / max(1, sum(three['tiers'].values())):.0%}" for k, v in three["tiers"].items())
    int8, fp32 = m["check"]["onnx_int8"], m["check"].get("onnx_fp32")
    lines = [
        f"Run `{r['run_dir']}`, served policy `{r['router']['name']}` from its router.json: "
        f"{r['router']['describe']}. Everything on this one machine, over loopback.",
        "",
        "**What a phone downloads** (`dimec export`, default): "
        f"{m['size']['package_bytes'] / 1e6:.1f} MB on disk ({m['size']['int8_graph_bytes'] / 1e6:.1f} MB int8 "
        f"graph: routing embedding, exit m and the hidden state after layer m from one int8 embedding table; "
        f"router and tokenizer; target <= 20 MB: {'reached' if m['size']['package_bytes'] <= 20e6 else 'NOT reached'})"
        f". `--full` adds the fp32 graph and PyTorch weights: {m['size']['full_package_bytes'] / 1e6:.1f} MB.",
        "",
        f"Against PyTorch fp32 on the test split ({m['check']['samples']} texts):",
        "",
        "| mobile graph | accuracy (exit m) | label agreement | routing agreement | decision agreement | "
        "max abs logit diff |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| PyTorch fp32 | {m['check'].get('torch_accuracy', float('nan')):.4f} | 1 | 1 | 1 | 0 |",
        f"| int8 ONNX (shipped) | {int8.get('accuracy', float('nan')):.4f} | {int8['agreement']:.4f} | "
        f"{int8['route_agreement']:.4f} | {int8['decision_agreement']:.4f} | {int8['max_logit_diff']:.3f} |",
    ]
    if fp32:
        lines.append(f"| fp32 ONNX (`--full`) | {fp32.get('accuracy', float('nan')):.4f} | {fp32['agreement']:.4f} | "
                     f"{fp32['route_agreement']:.4f} | {fp32['decision_agreement']:.4f} | "
                     f"{fp32['max_logit_diff']:.1e} |")
    lat = m["latency_ms"]
    lines += [
        "",
        f"Accuracy change int8 - PyTorch: {100 * m['accuracy_change']:+.2f} pt. Routing agreement: the plan the "
        "router picks from the int8 routing embedding vs from PyTorch's; decision agreement: the plan and whether "
        "its mobile stage answers or passes the sample on.",
        "",
        "| per sample, one thread, tokenisation excluded (median / p99) | ms |",
        "| --- | ---: |",
        f"| mobile stage, int8 ONNX (layers 1..m, exit m, hidden state) | {lat['int8']['median']:.3f} / "
        f"{lat['int8']['p99']:.3f} |",
        f"| mobile stage, PyTorch fp32 | {lat['torch']['median']:.3f} / {lat['torch']['p99']:.3f} |",
        f"| routing decision as served (`MobileClient.route`) | {lat['route']['median']:.3f} / "
        f"{lat['route']['p99']:.3f} |",
        f"| routing embedding + `choose_plans` (what a pre-router costs) | {lat['preroute']['median']:.3f} / "
        f"{lat['preroute']['p99']:.3f} |",
        "",
        f"- int8 / fp32 mobile time: {m['int8_vs_torch_time']:.2f}. The routing decision the client serves is the "
        f"one timed (`MobileClient.route`; FastRouter's tables are not on the served path). For `{r['router']['name']}` "
        f"({m['routing']['plans']} plan(s)): {m['routing']['path']}: **{m['routing']['share_of_mobile_stage_pct']:.1f}%** "
        f"of the int8 mobile stage (median of per-sample ratios; target < 1%: "
        f"{'reached' if m['routing']['share_of_mobile_stage_pct'] < 1 else 'not reached'}). A policy with a pre-router "
        f"(hybrid, DIMEC-DC) pays the routing embedding and the router's choice: "
        f"{m['routing']['preroute_share_pct']:.1f}% one sample per call (mostly fixed cost: one onnxruntime run and "
        f"the router's call), {m['routing']['batched_32_preroute_share_pct']:.1f}% per sample when the client "
        "classifies 32 texts in one call.",
        "",
        f"**Three-tier vs cloud-only**, same offered load: {s['settings']['requests']} single-text requests per round "
        f"from the test split, {s['settings']['concurrency']} concurrent closed-loop clients, "
        f"{s['settings']['rounds']} rounds per system alternated; edge and cloud are `dimec serve` subprocesses "
        "(PyTorch fp32, 1 thread each; the edge forwards plans that go on to the cloud), the mobile stage runs in "
        "the client process (int8, 1 thread) on the same cores.",
        "",
        "| system | throughput (req/s) | p50 (ms) | p99 (ms) | accuracy | answered on mobile/edge/cloud |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
        f"| three-tier (`{r['router']['name']}`) | {three['throughput']:.1f} | {three['p50_ms']:.1f} | "
        f"{three['p99_ms']:.1f} | {three['accuracy']:.4f} | {shares} |",
        f"| cloud-only | {cloud['throughput']:.1f} | {cloud['p50_ms']:.1f} | {cloud['p99_ms']:.1f} | "
        f"{cloud['accuracy']:.4f} | cloud 100% |",
        "",
        f"- Throughput ratio, median of per-round ratios: **{s['ratio']:.2f}x** (rounds {s['ratio_range'][0]:.2f}-"
        f"{s['ratio_range'][1]:.2f}x; target >= 2x: {'reached' if s['ratio'] >= 2 else 'not reached'}) at "
        f"{100 * (three['accuracy'] - cloud['accuracy']):+.2f} pt accuracy. Lost: {three['lost'] + cloud['lost']}, "
        f"errors: {three['errors'] + cloud['errors']}, fallbacks: {three['fallbacks']}.",
        "",
        "**Hidden-state continuation vs raw offload** to the edge (exit n), one request at a time, "
        f"{links['samples']} test texts per link (emulated in the client's transport, no loss):",
        "",
        "| link | path | bytes up | bytes down | transfer (ms) | end to end (ms) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name in LINKS:
        x = links[name]
        lat_ms, bw = x["link"]["latency_ms"], x["link"]["bandwidth_mbit"]
        for kind, label in (("raw", "raw text, edge runs 1..n"), ("hidden", "hidden state (fp16), mobile 1..m, edge m+1..n")):
            lines.append(f"| {name} ({lat_ms:g} ms, {bw:g} Mbit/s) | {label} | {x[kind]['bytes']:.0f} | "
                         f"{x[kind]['answer_bytes']:.0f} | {x[kind]['transfer_ms']:.1f} | {x[kind]['e2e_ms']:.1f} |")
    lines += [
        "",
        "- Transfer: round trip minus the server's model time; its ratio hidden/raw is what `dimec profile` writes as "
        "`hidden_state_factor` (here " + ", ".join(f"{n} {links[n]['hidden_state_factor']:.2f}" for n in LINKS) + ").",
        "",
        f"**Edge killed** (SIGKILL) {fault.get('killed_s', 0):.1f} s into a run of {fault['sent']} requests "
        f"(router `{r['router']['name']}`) and restarted at once (healthy again at {fault.get('back_s', 0):.1f} s): "
        f"sent {fault['sent']}, answered {fault['answered']}, lost **{fault['lost']}**, answered twice "
        f"**{fault['answered_twice']}**; fallbacks {fault['client_stats'].get('fallbacks', 0)}, degraded "
        f"{fault['degraded']}, retries {fault['client_stats'].get('retries', 0)}; answered on mobile/edge/cloud "
        f"{fault['tiers']['mobile']}/{fault['tiers']['edge']}/{fault['tiers']['cloud']}, "
        f"{fault['edge_after_restart']} by the restarted edge.",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", default="runs/default")
    parser.add_argument("--requests", type=int, default=600, help="requests per system and round")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mobile-samples", type=int, default=300, help="texts timed one by one on the mobile")
    parser.add_argument("--link-samples", type=int, default=100)
    parser.add_argument("--fault-requests", type=int, default=5000, help="cap on the fault run's requests")
    parser.add_argument("--out", default=str(RESULTS), help="results file (default benchmarks/results/serving.json)")
    args = parser.parse_args()

    from report import trained_run

    run_dir = Path(args.run_dir)
    if not trained_run(run_dir):
        return 2

    from dimec.atomic import write_json
    from dimec.pipeline import load_saved_config, task_data
    from dimec.routing.base import load_router
    from dimec.routing.plan import plan_text
    from dimec.serving.deploy.export import export_packages
    from dimec.serving.deploy.local import ProcessServer

    test = task_data(load_saved_config(run_dir)).test
    texts, labels = [e.text for e in test], [e.label for e in test]
    pairs = [e.text_pair for e in test] if test and test[0].text_pair is not None else None
    router, _ = load_router(run_dir / "router.json")
    root = Path(tempfile.mkdtemp(prefix="dimec-bench-serving-"))
    print(f"exporting packages to {root}", flush=True)
    packages = export_packages(run_dir, root / "full", full=True, check_texts=texts[:200], log=print)
    lean = export_packages(run_dir, root / "lean", tiers=("mobile",), check_texts=texts[:200], log=print)["mobile"]

    print("mobile deployable and routing decision", flush=True)
    mobile = bench_mobile(run_dir, lean, packages["mobile"], texts, pairs, labels, args.mobile_samples)
    print(json.dumps({k: v for k, v in mobile.items() if k != "check"}, indent=1, default=str))

    token = secrets.token_urlsafe(24)
    cloud = ProcessServer("cloud", packages["cloud"], token, threads=1)
    edge = ProcessServer("edge", packages["edge"], token, threads=1, extra_args=["--cloud-url", cloud.url])
    try:
        for server in (cloud, edge):
            server.start()
        for server in (cloud, edge):
            server.wait(300)
        urls = {"edge": edge.url, "cloud": cloud.url}
        print("hidden state vs raw text on emulated links", flush=True)
        links = bench_links(lean, edge.url, token, texts, args.link_samples)
        print("three-tier vs cloud-only", flush=True)
        systems = bench_systems(lean, urls, token, texts, labels, args.requests, args.concurrency, args.rounds)
        print("edge killed and restarted under load", flush=True)
        fault = bench_edge_failure(lean, urls, token, edge, texts, labels, args.fault_requests, args.concurrency)
    finally:
        for server in (edge, cloud):
            server.stop()

    import os

    data = {
        "run_dir": str(args.run_dir),
        "router": {"name": router.name, "describe": router.describe(), "confidence": router.confidence_,
                   "plans": [plan_text(p) for p in router.plans_]},
        "mobile": mobile, "systems": systems, "links": links, "fault": fault,
    }
    data = json.loads(json.dumps(data, default=float))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    write_json(args.out, {"title": TITLE, "command": COMMAND, "script": "bench_serving.py",
                          "measured": {"date": date.today().isoformat(), "machine": machine}, "data": data})
    print("\n" + render(data) + f"\n\nwrote {args.out} (render BENCHMARKS.md with `python benchmarks/report.py`)")
    return 0 if fault["lost"] == 0 and fault["answered_twice"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
