"""Serving figures (issue 4) on a trained run, everything on this machine over loopback:

1. mobile tier: onnxruntime int8 vs PyTorch fp32, per-sample latency and accuracy on the test split;
2. three-tier system vs cloud-only serving of the same model: throughput and p50/p99 latency under the
   same offered load (C concurrent clients sending back-to-back single-text requests from the test split),
   rounds alternated side by side, medians reported, with each system's accuracy;
3. a bounded load test with the edge server killed (SIGKILL) and restarted mid-run: requests lost,
   answered twice, fallbacks counted.

    python benchmarks/bench_serving.py [RUN_DIR (default runs/default)] [--requests 600] [--rounds 5]
                                       [--concurrency 4] [--fault-requests 400] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import update_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COMMAND = "python benchmarks/bench_serving.py runs/default"


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


# ---- 1. mobile tier: int8 vs fp32 ------------------------------------------------------------------------------
def bench_mobile(mobile_dir: Path, texts: list[str], labels: list[int], repeats: int = 3) -> dict:
    import numpy as np
    import torch

    from dimec.serving.tier import TierModel

    torch.set_num_threads(1)  # a phone-like single stream; onnxruntime gets one thread too
    fp32, int8 = TierModel(mobile_dir, "torch", verify=False), TierModel(mobile_dir, "onnx-int8", onnx_threads=1)
    batches = [fp32.encode([t]) for t in texts]
    fp32.logits(batches[0]), int8.logits(batches[0])  # warm-up
    times: dict[str, list[float]] = {"torch": [], "int8": []}
    preds: dict[str, list[int]] = {"torch": [], "int8": []}
    for batch in batches:  # interleaved, so drift in machine load hits both alike
        for name, model in (("torch", fp32), ("int8", int8)):
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                logits = model.logits(batch)
                best = min(best, time.perf_counter() - start)
            times[name].append(best * 1e3)
            preds[name].append(int(logits.argmax(-1)[0]))
    y = np.asarray(labels)
    out = {name: {"median_ms": statistics.median(times[name]), "p99_ms": percentile(times[name], 99),
                  "accuracy": float((np.asarray(preds[name]) == y).mean())} for name in times}
    out["agreement"] = float((np.asarray(preds["torch"]) == np.asarray(preds["int8"])).mean())
    out["ratio"] = out["int8"]["median_ms"] / out["torch"]["median_ms"]
    return out


# ---- 2./3. load generator ---------------------------------------------------------------------------------------
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
    from dimec.serving.client import MobileClient

    clients = {name: MobileClient(mobile_dir, urls["edge"], urls["cloud"], token, backend="onnx-int8",
                                  routing=routing) for name, routing in (("three-tier", "fixed"),
                                                                          ("cloud-only", "cloud-only"))}
    for client in clients.values():  # warm-up: connections, lazy init on both servers
        run_load(client, texts, labels, 2 * concurrency, concurrency, "warm")
    runs: dict[str, list[dict]] = {name: [] for name in clients}
    for r in range(rounds):  # alternate A, B, A, B: load drift hits both systems alike
        for name, client in clients.items():
            runs[name].append(run_load(client, texts, labels, requests, concurrency, f"{name}-{r}"))
            print(f"  round {r + 1} {name:<10} {runs[name][-1]['throughput']:7.1f} req/s  "
                  f"p50 {runs[name][-1]['p50_ms']:6.1f} ms  p99 {runs[name][-1]['p99_ms']:6.1f} ms", flush=True)
    for client in clients.values():
        client.close()
    summary = {}
    for name, rs in runs.items():
        summary[name] = {k: statistics.median(r[k] for r in rs) for k in ("throughput", "p50_ms", "p99_ms", "accuracy")}
        summary[name]["tiers"] = rs[-1]["tiers"]
        summary[name]["lost"] = sum(r["lost"] for r in rs)
        summary[name]["errors"] = sum(len(r["errors"]) for r in rs)
    ratios = [a["throughput"] / b["throughput"] for a, b in zip(runs["three-tier"], runs["cloud-only"], strict=True)]
    summary["ratio"], summary["ratio_range"] = statistics.median(ratios), (min(ratios), max(ratios))
    return summary


def bench_edge_failure(mobile_dir: Path, urls: dict, token: str, edge_server, texts, labels, cap: int,
                       concurrency: int) -> dict:
    """Kill the edge a second into the run and restart it at once (model import and load take seconds);
    the load goes on until the edge has answered again for 3 s (at most `cap` requests)."""
    from dimec.serving.client import MobileClient

    timeline: dict[str, float] = {}
    client = MobileClient(mobile_dir, urls["edge"], urls["cloud"], token, backend="onnx-int8", routing="fixed",
                          cooldown_s=0.5, retries=1)
    stop = threading.Event()
    t0 = time.perf_counter()

    def chaos() -> None:
        try:
            time.sleep(1.0)
            edge_server.kill()
            timeline["killed_s"] = time.perf_counter() - t0
            edge_server.start().wait(120)
            timeline["back_s"] = time.perf_counter() - t0
            time.sleep(3.0)
        finally:
            stop.set()

    result = run_load(client, texts, labels, cap, concurrency, "fault", during=chaos, stop=stop)
    result["client_stats"] = client.stats()
    result.update(timeline)
    back = timeline.get("back_s", float("inf"))
    result["edge_after_restart"] = sum(tier == "edge" and t > back for t, tier in result["finished"])
    client.close()
    return result


# ---- report ---------------------------------------------------------------------------------------------------
def render(mobile: dict, systems: dict, fault: dict, check: dict, args, run_metrics: dict) -> str:
    three, cloud = systems["three-tier"], systems["cloud-only"]
    shares = ", ".join(f"{k} {v / max(1, sum(three['tiers'].values())):.0%}" for k, v in three["tiers"].items())
    fixed = next((r for r in run_metrics.get("results", []) if r["method"] == "dimec-fixed"), None)
    lines = [
        f"Run `{args.run_dir}` (made by `make run`); test split, {args.requests} requests per round, {args.concurrency} concurrent "
        f"clients (closed loop, one text per request), {args.rounds} rounds per system alternated; edge and cloud "
        "are `dimec serve` subprocesses (PyTorch fp32, 1 thread each), the mobile tier runs in the client "
        "process (onnxruntime int8, 1 thread). All on this one 2-core machine, so the mobile work competes "
        "with the servers for the same cores.",
        "",
        "| system | throughput (req/s) | p50 (ms) | p99 (ms) | accuracy | answered on mobile/edge/cloud |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
        f"| three-tier (DIMEC fixed) | {three['throughput']:.1f} | {three['p50_ms']:.1f} | {three['p99_ms']:.1f} | "
        f"{three['accuracy']:.4f} | {shares} |",
        f"| cloud-only | {cloud['throughput']:.1f} | {cloud['p50_ms']:.1f} | {cloud['p99_ms']:.1f} | "
        f"{cloud['accuracy']:.4f} | cloud 100% |",
        "",
        f"- Throughput ratio three-tier / cloud-only, median of the per-round ratios: **{systems['ratio']:.2f}x** "
        f"(rounds {systems['ratio_range'][0]:.2f}-{systems['ratio_range'][1]:.2f}x; target >= 2x: "
        f"{'reached' if systems['ratio'] >= 2 else 'not reached'}). Lost requests: {three['lost'] + cloud['lost']}, "
        f"errors: {three['errors'] + cloud['errors']}. Table figures are medians over rounds.",
    ]
    if fixed:
        _, n, l = json.loads((Path(args.run_dir) / "model" / "dimec_model.json").read_text())["exit_layers"]
        server_share = (fixed["tier_shares"][1] * n + fixed["tier_shares"][2] * l) / l  # layers run on servers
        lines.append(f"- The router sends {fixed['tier_shares'][0]:.0%}/{fixed['tier_shares'][1]:.0%}/"
                     f"{fixed['tier_shares'][2]:.0%} of the test split to mobile/edge/cloud (metrics.json), so "
                     f"the servers run {server_share:.0%} of cloud-only's layers per request (edge exit {n}, "
                     f"cloud {l}): even with the mobile work free the gain is bounded by about "
                     f"{1 / server_share:.2f}x, and here the mobile work shares the same two cores.")
    lines += [
        "",
        "Mobile tier, one sample at a time (exit m only, tokenisation excluded; min of 3 per sample, median over "
        "samples):",
        "",
        "| mobile backend | median (ms) | p99 (ms) | accuracy (exit m) |",
        "| --- | ---: | ---: | ---: |",
        f"| PyTorch fp32 | {mobile['torch']['median_ms']:.2f} | {mobile['torch']['p99_ms']:.2f} | "
        f"{mobile['torch']['accuracy']:.4f} |",
        f"| onnxruntime int8 | {mobile['int8']['median_ms']:.2f} | {mobile['int8']['p99_ms']:.2f} | "
        f"{mobile['int8']['accuracy']:.4f} |",
        "",
        f"- int8 / fp32 time: **{mobile['ratio']:.2f}** (target <= 0.5: "
        f"{'reached' if mobile['ratio'] <= 0.5 else 'not reached'}); accuracy change "
        f"{mobile['int8']['accuracy'] - mobile['torch']['accuracy']:+.4f}, label agreement {mobile['agreement']:.4f}.",
        f"- Export check ({check['samples']} texts, {check['source']}): int8 agreement "
        f"{check['onnx_int8']['agreement']:.4f}, max |logit diff| {check['onnx_int8']['max_logit_diff']:.3f}; "
        f"fp32 ONNX max |logit diff| {check['onnx_fp32']['max_logit_diff']:.1e}; routing agreement "
        f"{check['onnx_int8']['route_agreement']:.4f}.",
        "",
        f"Edge killed (SIGKILL) {fault.get('killed_s', 0):.1f} s into a run of {fault['sent']} requests "
        f"({args.concurrency} concurrent clients, three-tier routing) and restarted at once (healthy again at "
        f"{fault.get('back_s', 0):.1f} s; the run goes on 3 s more):",
        "",
        f"- sent {fault['sent']}, answered {fault['answered']}, lost **{fault['lost']}**, answered twice "
        f"**{sum('twice' in e for e in fault['errors'])}**, explicit errors {len(fault['errors'])};",
        f"- fallbacks counted by the client: {fault['client_stats'].get('fallbacks', 0)} (answers whose tier differs "
        f"from the routed one: {fault['fallbacks']}), degraded (mobile exit): {fault['degraded']}, retries "
        f"{fault['client_stats'].get('retries', 0)}; answered on mobile/edge/cloud: "
        f"{fault['tiers']['mobile']}/{fault['tiers']['edge']}/{fault['tiers']['cloud']}, of which "
        f"{fault['edge_after_restart']} by the restarted edge.",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", default="runs/default")
    parser.add_argument("--requests", type=int, default=600, help="requests per system and round (600: the "
                        "whole test split of the default run)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--fault-requests", type=int, default=5000, help="cap on the fault run's requests")
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()

    run_dir = Path(args.run_dir)
    if not (run_dir / "model").is_dir() or not (run_dir / "router.json").is_file():
        print(f"{run_dir} is not a trained and calibrated run. Make it with `make run` (the embedded "
              "all-MiniLM-L6-v2 on Rotten Tomatoes, about 8 minutes on 2 cores), or give another RUN_DIR.",
              file=sys.stderr)
        return 2

    from dimec.pipeline import load_run_config, task_data
    from dimec.serving.local import ProcessServer
    from dimec.serving.package import export_packages, read_manifest

    test = task_data(load_run_config(run_dir)).test
    texts, labels = [e.text for e in test], [e.label for e in test]
    root = Path(tempfile.mkdtemp(prefix="dimec-bench-serving-"))
    print(f"exporting packages to {root}", flush=True)
    packages = export_packages(run_dir, root, log=print)
    check = read_manifest(packages["mobile"])["onnx"]["check"]

    print("mobile tier: int8 vs fp32", flush=True)
    mobile = bench_mobile(packages["mobile"], texts, labels)
    print(json.dumps(mobile, indent=1))

    token = secrets.token_urlsafe(24)
    servers = {tier: ProcessServer(tier, packages[tier], token, threads=1).start() for tier in ("edge", "cloud")}
    try:
        for server in servers.values():
            server.wait(180)
        urls = {tier: s.url for tier, s in servers.items()}
        print("three-tier vs cloud-only", flush=True)
        systems = bench_systems(packages["mobile"], urls, token, texts, labels, args.requests, args.concurrency,
                                args.rounds)
        print(json.dumps(systems, indent=1, default=str))
        print("edge killed and restarted under load", flush=True)
        fault = bench_edge_failure(packages["mobile"], urls, token, servers["edge"], texts, labels,
                                   args.fault_requests, args.concurrency)
        print(json.dumps({k: v for k, v in fault.items() if k not in ("errors", "finished")}, indent=1))
    finally:
        for server in servers.values():
            server.stop()

    metrics_path = run_dir / "metrics.json"
    run_metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    body = render(mobile, systems, fault, check, args, run_metrics)
    print("\n" + body)
    if not args.no_write:
        update_section("Serving (issue 4)", body, COMMAND)
        print("\nupdated BENCHMARKS.md")
    ok = fault["lost"] == 0 and not any("twice" in e for e in fault["errors"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
