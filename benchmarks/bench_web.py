"""The mobile tier in a real browser (issue 20): onnxruntime-web in headless chromium against onnxruntime in
Python, on a trained run's mobile package, edge and cloud servers on loopback.

1. page weight and artifact download + init time (fresh browser context each load; medians);
2. mobile-stage latency per text in the browser (int8 graph; 1 and 2 threads; SIMD on and off) against
   onnxruntime in Python on the same texts (1 and 2 threads); best of 3 per text, medians over texts,
   tokenisation excluded;
3. agreement with the Python MobileClient on the test split: labels, plans (the policy's decision) and the tier
   that answered; the browser's kernels are not bit-identical to Python's;
4. end-to-end latency per tier path (which tier the plan started on, which answered) over loopback;
5. a screenshot of the demo page (benchmarks/results/web_demo.png).

Writes benchmarks/results/web.json in report.py's format; `render(data)` is the BENCHMARKS.md section body.
`--smoke` runs a few texts only and marks the results as a smoke run (not figures to quote).

    python benchmarks/bench_web.py [RUN_DIR (default runs/default)] [--texts 1000] [--latency-texts 100]
        [--loads 3] [--smoke]
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "web.json"
SCREENSHOT = ROOT / "benchmarks" / "results" / "web_demo.png"
COMMAND = "python benchmarks/bench_web.py runs/default"
TITLE = "The mobile tier in the browser (issue 20): onnxruntime-web vs Python, agreement, page weight"


def median(values) -> float:
    return float(statistics.median(values)) if values else float("nan")


def python_stage_ms(package: Path, texts: list[str], threads: int) -> list[float]:
    """Best of 3 per text of the mobile stage (int8 graph, logits + hidden), onnxruntime in Python."""
    from dimec.runtime.tier import TierModel

    model = TierModel(package, "onnx-int8", onnx_threads=threads)
    out = []
    for text in texts:
        batch = model.encode([text])
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            model._stage(batch)
            best = min(best, time.perf_counter() - start)
        out.append(best * 1e3)
    return out


def open_page(browser, url: str, query: str = ""):
    context = browser.new_context(viewport={"width": 900, "height": 760})
    page = context.new_page()
    page.set_default_timeout(300_000)
    start = time.perf_counter()
    page.goto(f"{url}/{query}")
    page.wait_for_function("window.dimec && (window.dimec.ready || window.dimec.failed)")
    ready_ms = (time.perf_counter() - start) * 1e3
    failed = page.evaluate("window.dimec.failed")
    if failed:
        raise SystemExit(f"the page did not load: {failed}")
    return context, page, ready_ms


def page_weight(page) -> dict:
    entries = page.evaluate("performance.getEntriesByType('resource').concat(performance.getEntriesByType("
                            "'navigation')).map(e => [e.name, e.encodedBodySize])")
    weight: dict[str, int] = defaultdict(int)
    for name, size in entries:
        kind = ("artifact" if "/artifact/" in name else "wasm runtime" if name.endswith((".wasm", ".mjs"))
                else "page code" if name.endswith(".js") else "html/css/api")
        weight[kind] += int(size)
    return dict(weight)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", nargs="?", default=str(ROOT / "runs" / "default"))
    parser.add_argument("--texts", type=int, default=1000, help="test texts for agreement and end-to-end latency")
    parser.add_argument("--latency-texts", type=int, default=100, help="texts for the mobile-stage latency")
    parser.add_argument("--loads", type=int, default=3, help="page loads for download + init time")
    parser.add_argument("--smoke", action="store_true", help="a few texts; results marked as a smoke run")
    args = parser.parse_args()
    if args.smoke:
        args.texts, args.latency_texts, args.loads = 30, 10, 1
    sys.path.insert(0, str(ROOT / "src"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from playwright.sync_api import sync_playwright
    from report import save

    from dimec.pipeline import load_saved_config, task_data
    from dimec.serving.deploy.export import ensure_package
    from dimec.serving.deploy.local import ProcessServer, ThreadServer
    from dimec.serving.deploy.web import create_web_app
    from dimec.serving.phone.client import MobileClient, Timeouts

    run = Path(args.run_dir)
    packages = {t: ensure_package(run, t, "onnx-int8" if t == "mobile" else None, log=print)
                for t in ("mobile", "edge", "cloud")}
    test = task_data(load_saved_config(run)).test
    texts = [e.text for e in test][: args.texts]
    token = secrets.token_urlsafe(16)
    cloud = ProcessServer("cloud", packages["cloud"], token).start()
    edge = ProcessServer("edge", packages["edge"], token, extra_args=["--cloud-url", cloud.url]).start()
    chromium = next(p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists())
    data: dict = {"run_dir": str(run), "smoke": args.smoke, "texts": len(texts)}
    try:
        cloud.wait()
        edge.wait()
        app = create_web_app(packages["mobile"], {"edge": edge.url, "cloud": cloud.url}, token)
        with ThreadServer(app) as web, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            # 1. page weight, download + init
            loads = []
            for _ in range(args.loads):
                context, page, ready_ms = open_page(browser, web.url)
                loads.append({**page.evaluate("window.dimec.timings"), "ready_ms": ready_ms})
                weight = page_weight(page)
                context.close()
            data["load"] = {k: median([x[k] for x in loads]) for k in ("download_ms", "init_ms", "total_ms", "ready_ms")}
            data["load"]["artifact_bytes"] = loads[0]["artifact_bytes"]
            data["page_weight"] = weight
            # 2. mobile-stage latency: browser (threads, SIMD) vs Python
            sample = texts[: args.latency_texts]
            stage = {}
            for threads, simd in ((1, True), (2, True), (1, False)):
                context, page, _ = open_page(browser, web.url, f"?threads={threads}&simd={int(simd)}")
                got = page.evaluate("window.dimec.timings.threads")
                times = page.evaluate("(ts) => window.dimec.client.timeMobile(ts, 3)", sample)
                stage[f"browser, {got} thread{'s' if got > 1 else ''}, SIMD {'on' if simd else 'off'}"] = median(times)
                context.close()
            for threads in (1, 2):
                stage[f"Python onnxruntime, {threads} thread{'s' if threads > 1 else ''}"] = \
                    median(python_stage_ms(packages["mobile"], sample, threads))
            data["mobile_stage_ms"] = stage
            data["latency_texts"] = len(sample)
            # 3./4. agreement with MobileClient, end-to-end latency per path
            context, page, _ = open_page(browser, web.url)
            web_answers = page.evaluate("async (ts) => { const out = []; for (const t of ts) "
                                        "out.push(await window.dimec.classify(t)); return out; }", texts)
            # the reference: MobileClient one text per call, as a phone (and the page) runs; a batch call
            # quantises its activations with one dynamic int8 scale over the padded batch, so its answers
            # depend on the batch-mates: reported beside it
            def python_answers(batched: bool):
                with MobileClient(packages["mobile"], edge.url, cloud.url, token, Timeouts(2, 30)) as client:
                    return client.classify(texts) if batched else [client.classify([t])[0] for t in texts]

            n = len(texts)

            def agree(py) -> dict:
                pairs = list(zip(web_answers, py, strict=True))
                return {"labels": sum(w["label"] == a.label for w, a in pairs) / n,
                        "plans": sum(w["plan"] == a.plan for w, a in pairs) / n,
                        "answering_tier": sum(w["tier"] == a.tier for w, a in pairs) / n,
                        "accuracy_python": sum(a.label_id == test[i].label for i, a in enumerate(py)) / n}

            single, batch = python_answers(False), python_answers(True)
            data["agreement"] = {**agree(single), "accuracy_browser": sum(w["label_id"] == test[i].label
                                                                          for i, w in enumerate(web_answers)) / n}
            data["agreement_batched"] = agree(batch)
            paths: dict[str, list[float]] = defaultdict(list)
            for w in web_answers:
                paths[f"{w['routed']} -> {w['tier']}" if w["routed"] != w["tier"] else w["tier"]].append(w["ms"]["total"])
            data["paths"] = {k: {"n": len(v), "p50_ms": median(v), "share": len(v) / n} for k, v in sorted(paths.items())}
            data["degraded"] = sum(w["degraded"] for w in web_answers)
            data["tiers"] = dict(Counter(w["tier"] for w in web_answers))
            data["bytes_up_median"] = median([w["bytes_up"] for w in web_answers if w["bytes_up"]])
            data["policy"] = page.evaluate("window.dimec.client.policy.describe()")
            # 5. the screenshot
            page.fill("#text", texts[0])
            page.click("#classify")
            page.wait_for_function("document.getElementById('result').dataset.tier")
            page.screenshot(path=str(SCREENSHOT), full_page=False)
            data["screenshot"] = SCREENSHOT.relative_to(ROOT).as_posix()
            context.close()
            browser.close()
    finally:
        edge.stop()
        cloud.stop()
    command = COMMAND + (" --smoke" if args.smoke else "")
    path = save("web", TITLE + (" [SMOKE RUN]" if args.smoke else ""), command, "bench_web.py", data)
    print(f"wrote {path}")


def render(r: dict) -> str:
    from report import markdown_table

    lines = []
    if r.get("smoke"):
        lines += ["**Smoke run** (a few texts, on a busy machine): these numbers check that the benchmark runs; "
                  "they are not figures to quote. The full run: the command above without `--smoke`.", ""]
    load, weight = r["load"], r["page_weight"]
    lines += [f"Run `{r['run_dir']}`, policy: {r['policy']}. Headless Debian chromium (Playwright), onnxruntime-web "
              "1.31 (WebAssembly), edge and cloud servers on loopback.", "",
              f"**Page load**: artifact {load['artifact_bytes'] / 1e6:.1f} MB downloaded and sha256-checked in "
              f"{load['download_ms']:.0f} ms, onnxruntime-web session created in {load['init_ms']:.0f} ms, page ready "
              f"{load['ready_ms']:.0f} ms after navigation (medians). Page weight: "
              + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sorted(weight.items()))
              + f"; total {sum(weight.values()) / 1e6:.1f} MB.", "",
              f"**Mobile stage** per text (int8 graph, layers 1..m, best of 3, median over {r['latency_texts']} "
              "test texts, tokenisation excluded):", ""]
    lines.append(markdown_table(["runtime", "ms per text"], [[k, f"{v:.2f}"] for k, v in r["mobile_stage_ms"].items()]))
    a, b = r["agreement"], r["agreement_batched"]
    lines += ["", "onnxruntime-web 1.31 ships SIMD WebAssembly builds only: `env.wasm.simd = false` runs the same "
              "binary, so 'SIMD off' measures no non-SIMD kernel. The browser runs the whole graph (routing "
              "embedding with the mobile stage); Python's stage session is pruned to logits and hidden state.", "",
              f"**Agreement with the Python `MobileClient`** (one text per call, as the page runs) on {r['texts']} "
              f"test texts: labels {a['labels']:.4f}, plans (the policy's decision) {a['plans']:.4f}, answering "
              f"tier {a['answering_tier']:.4f} (target >= 0.99 each). Against one batched `classify` call: labels "
              f"{b['labels']:.4f}, plans {b['plans']:.4f}, answering tier {b['answering_tier']:.4f} (the int8 "
              "graph quantises activations with one dynamic scale per tensor, so a batched text's mobile "
              f"confidence depends on its batch-mates). Accuracy browser {a['accuracy_browser']:.4f} vs Python "
              f"{a['accuracy_python']:.4f}; degraded answers {r['degraded']}. Median bytes sent up per offloaded text: "
              f"{r['bytes_up_median']:.0f}.", "",
              "**End to end** per tier path (browser `classify`: tokenise, mobile stage, any remote exchange through "
              "the demo server's proxy):", ""]
    lines.append(markdown_table(["path (routed -> answered)", "texts", "share", "p50 ms"],
                                [[k, v["n"], f"{v['share']:.1%}", f"{v['p50_ms']:.1f}"] for k, v in r["paths"].items()]))
    lines += ["", f"![the demo page]({r['screenshot']})"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
