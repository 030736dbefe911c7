"""Reliability under bad input and faults (issue 11), on a small throwaway run built here (a random 4-layer
BERT, hidden 64, on a separable toy sentiment CSV: every figure below is about robustness, not accuracy):

1. inputs: fuzzed HTTP bodies sent to a real `dimec serve edge` over one keep-alive loopback connection
   (statuses, 5xx, connection resets); bad command-line input run as real `dimec` processes (invalid UTF-8
   in arguments, --file and stdin, bad settings, malformed --set, damaged artifacts, bad serve options, a
   wrong token or URL): exit status, traceback or not, and whether the run directory was left alone;
2. faults: SIGKILL of `dimec calibrate` at random moments, then the artifacts are checked and calibrate is
   run again; SIGKILL of `dimec train` at random moments and at the moment a checkpoint write begins, then
   `dimec train` resumes; SIGKILL of the edge, then of the cloud server, during a burst of client requests;
3. the serving surface (issue 17, reliability_serving.py): hostile continuation bodies and request ids against
   a real edge -> cloud pair, mutated sources files, bad `dimec monitor` / `route` / `plan` inputs, and the
   memory attacks with the cloud's RSS against the stated in-flight bound (--serving-cases; --only-serving
   runs just this part, --no-save for a smoke run).

    python benchmarks/bench_reliability.py [--workdir DIR] [--kills 8] [--fuzz 1000] [--requests 400] [--doc]

Writes benchmarks/results/reliability.json; `render(result)` turns it into the Markdown of
docs/reliability.md's measured section (rewritten in place with --doc). Loopback only, every wait bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the toy encoder and CSV of the test suite
RESULT = ROOT / "benchmarks" / "results" / "reliability.json"
TITLE = "Reliability: bad input, crash-safe artifacts, faults (issue 11)"
DOC = ROOT / "docs" / "reliability.md"
COMMAND = "python benchmarks/bench_reliability.py --doc"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
       "TOKENIZERS_PARALLELISM": "false", "PYTHONIOENCODING": "utf-8"}
TOKEN = "bench-reliability-token"
CONFIG = """\
data: {task: file, path: PATH, max_length: 32}
model: {name_or_path: ENCODER, exit_layers: [1, 2, 4]}
train: {epochs: 4, batch_size: 32, learning_rate: 0.001, progress: false, num_threads: 1}
calibration: {beta_grid: [0.0, 0.001, 0.01, 0.05]}
"""


# ---- processes -------------------------------------------------------------------------------------------------
def dimec(*args, stdin: bytes | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """A real `dimec` process (arguments may be bytes: the shell passes bytes, Python decodes them)."""
    return subprocess.run([sys.executable, "-m", "dimec", *args], input=stdin, capture_output=True,
                          timeout=timeout, env=ENV)


def start(*args, log: Path) -> subprocess.Popen:
    with log.open("wb") as f:
        return subprocess.Popen([sys.executable, "-m", "dimec", *args], stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=ENV)


def kill(proc: subprocess.Popen) -> bool:
    """SIGKILL a process this script started; True if it was still running."""
    alive = proc.poll() is None
    if alive:
        proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    return alive


def outcome(done: subprocess.CompletedProcess) -> dict:
    err = done.stderr.decode("utf-8", "replace")
    lines = [line for line in err.splitlines() if "error:" in line]  # dimec's own line, or argparse's last
    return {"exit": done.returncode, "traceback": "Traceback" in err, "message": (lines[0] if lines else "")[:200]}


# ---- setup -----------------------------------------------------------------------------------------------------
def build(work: Path) -> dict[str, Path]:
    from conftest import make_sentiment_csv, make_tiny_encoder

    encoder = make_tiny_encoder(work / "encoder", layers=4, hidden=64, intermediate=256)
    csv = make_sentiment_csv(work / "sentiment.csv", n=1000)
    config = work / "bench.yaml"
    config.write_text(CONFIG.replace("PATH", str(csv)).replace("ENCODER", str(encoder)))
    reference = work / "reference"
    t0 = time.perf_counter()
    done = dimec("run", "--config", str(config), "--run-dir", str(reference), timeout=1200)
    if done.returncode != 0:
        raise SystemExit(f"the reference run failed:\n{done.stderr.decode()[-2000:]}")
    print(f"reference run in {time.perf_counter() - t0:.1f} s", flush=True)
    return {"encoder": encoder, "csv": csv, "config": config, "reference": reference}


# ---- 1. inputs -------------------------------------------------------------------------------------------------
def random_body(rng: random.Random) -> bytes:
    """One request body: random JSON (lone surrogates, NaN, huge numbers included), near-valid bodies,
    truncated or byte-flipped JSON, deep nesting, invalid UTF-8 or plain garbage."""
    def value(depth: int = 0):
        kind = rng.choice(["str", "int", "float", "bool", "null", "list", "dict"] if depth < 3 else ["str", "int"])
        if kind == "str":
            return "".join(rng.choice(["a", " ", "\u00e9", "\u4e2d", "\n", "\x00", '"', "\\", "\ud800", "\udcff",
                                       "\U0001f600"]) for _ in range(rng.randint(0, 10)))
        if kind == "int":
            return rng.choice([0, -1, 2**63, -(2**70), 10**30])
        if kind == "float":
            return rng.choice([0.5, -1e308, float("nan"), float("inf")])
        if kind in ("bool", "null"):
            return rng.random() < 0.5 if kind == "bool" else None
        if kind == "list":
            return [value(depth + 1) for _ in range(rng.randint(0, 4))]
        return {rng.choice(["text", "texts", "text_pair", "text_pairs", "ids", "x"]): value(depth + 1)
                for _ in range(rng.randint(0, 4))}

    form = rng.choice(["json", "json", "near", "near", "valid", "valid", "truncated", "flipped", "deep", "digits",
                       "garbage"])
    if form == "valid":  # right shape, any text: emoji, NUL, RTL marks, long texts (some lone surrogates: 422)
        texts = ["".join(rng.choice(["good ", "film ", "\u00e9", "\U0001f600", "\x00", "\u200f", "\ufeff", " ",
                                     "\n", "\ud800" if rng.random() < 0.05 else "a"])
                         for _ in range(rng.choice([1, 5, 50, 3000]))) for _ in range(rng.randint(1, 3))]
        body = {"texts": texts, "ids": [str(i) for i in range(len(texts))]}
    elif form == "near":
        body = {"texts": [value(3) for _ in range(rng.randint(1, 3))]}
        body[rng.choice(["ids", "text_pairs", "text"])] = value()
    else:
        body = value()
    raw = json.dumps(body, allow_nan=True).encode()
    if form == "truncated":
        raw = raw[: rng.randint(0, len(raw))]
    elif form == "flipped" and raw:
        i = rng.randrange(len(raw))
        raw = raw[:i] + bytes([raw[i] ^ 0x80]) + raw[i + 1:]
    elif form == "deep":
        raw = b"[" * 5000 + b"]" * 5000
    elif form == "digits":
        raw = b'{"text": ' + b"7" * 5000 + b"}"
    elif form == "garbage":
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    return raw


def fuzz_http(url: str, count: int, seed: int = 0) -> dict:
    import httpx

    rng = random.Random(seed)
    statuses: dict[str, int] = {}
    resets = 0
    headers = {"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
        for i in range(count):
            raw = random_body(rng) if i % 50 else b'{"text": "' + b"good " * 400_000 + b'"}'  # some over 1 MB
            try:
                status = http.post("/v1/classify", content=raw).status_code
            except httpx.TransportError:
                resets += 1
                continue
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if i % 10 == 0:  # a good request on the same connection after the bad ones
                good = http.post("/v1/classify", json={"text": "good film"}).status_code
                statuses["good-after-bad:" + str(good)] = statuses.get("good-after-bad:" + str(good), 0) + 1
        metrics = http.get("/metrics").text
    documented = set(httpx.get(f"{url}/openapi.json").json()["paths"]["/v1/classify"]["post"]["responses"])
    return {"requests": count, "statuses": dict(sorted(statuses.items())), "connection_errors": resets,
            "server_5xx": sum(n for s, n in statuses.items() if s.startswith("5")),
            "undocumented": sorted(s for s in statuses if ":" not in s and s not in documented),
            "metrics_show_500": 'status="500"' in metrics}


def cli_cases(paths: dict[str, Path], work: Path, packages: dict[str, Path], edge_url: str) -> list[dict]:
    """Each case: what was tried, the expected exit status, and what happened."""
    ref, config = paths["reference"], paths["config"]
    bad_file = work / "bad.txt"
    bad_file.write_bytes(b"a fine film\nbad \xff text\n")
    nan_csv = work / "nan.csv"
    nan_csv.write_text(paths["csv"].read_text().replace(",pos\n", ",NaN\n", 3))
    damaged = work / "damaged"
    cases: list[tuple[str, list, bytes | None, int, Path | None]] = [
        ("invalid UTF-8 in an argument", ["route", str(ref), b"bad \xff text"], None, 2, None),
        ("invalid UTF-8 in --file", ["route", str(ref), "--file", str(bad_file)], None, 2, None),
        ("invalid UTF-8 on stdin", ["client", str(packages["mobile"]), "--routing", "mobile-only", "--backend",
                                    "torch"], b"fine\nbad \xff\n", 2, None),
        ("train.epochs=-1", ["train", "--config", str(config), "--run-dir", str(work / "r1"), "--set",
                             "train.epochs=-1"], None, 2, work / "r1"),
        ("train.epochs=0 and learning_rate=.nan and batch_size=0 (reported together)",
         ["train", "--config", str(config), "--run-dir", str(work / "r2"), "--set", "train.epochs=0", "--set",
          "train.learning_rate=.nan", "--set", "train.batch_size=0"], None, 2, work / "r2"),
        ("data.max_length=0", ["train", "--config", str(config), "--run-dir", str(work / "r3"), "--set",
                               "data.max_length=0"], None, 2, work / "r3"),
        ("malformed --set value 'train.epochs=[1'", ["train", "--config", str(config), "--run-dir",
                                                    str(work / "r4"), "--set", "train.epochs=[1"], None, 2,
         work / "r4"),
        ("YAML tag in --set (!!python/object/apply)", ["train", "--config", str(config), "--run-dir",
                                                      str(work / "r5"), "--set",
                                                      "train.epochs=!!python/object/apply:os.getpid []"], None, 2,
         work / "r5"),
        ("'NaN' labels in the CSV", ["train", "--config", str(config), "--run-dir", str(work / "r6"), "--set",
                                     f"data.path={nan_csv}"], None, 2, work / "r6"),
        ("calibrate with bad calibration and cost settings",
         ["calibrate", str(damaged / "a"), "--set", "calibration.medium_rule=bogus", "--set",
          "cost.offload_cloud=7"], None, 2, None),
        ("calibrate with a truncated outputs cache (recomputed)", ["calibrate", str(damaged / "b")], None, 0, None),
        ("evaluate with a damaged router.json", ["evaluate", str(damaged / "c")], None, 2, None),
        ("route with a damaged model", ["route", str(damaged / "d"), "good"], None, 2, None),
        ("serve --port 99999", ["serve", "edge", str(packages["edge"]), "--token", TOKEN, "--port", "99999"],
         None, 2, None),
        ("serve on a port in use", ["serve", "edge", str(packages["edge"]), "--token", TOKEN, "--port",
                                    edge_url.rsplit(":", 1)[1]], None, 2, None),
        ("serve --max-batch -1", ["serve", "edge", str(packages["edge"]), "--token", TOKEN, "--max-batch", "-1"],
         None, 2, None),
        ("client with a wrong token", ["client", str(packages["mobile"]), "good", "--routing", "edge-only",
                                       "--backend", "torch", "--edge-url", edge_url, "--token", "WRONG"], None, 2,
         None),
        ("client with an ftp:// URL", ["client", str(packages["mobile"]), "good", "--backend", "torch",
                                       "--edge-url", "ftp://127.0.0.1:21", "--token", TOKEN], None, 2, None),
    ]
    for name in "abcd":
        shutil.copytree(ref, damaged / name)
    (damaged / "b" / "outputs" / "validation.safetensors").write_bytes(
        (ref / "outputs" / "validation.safetensors").read_bytes()[:1000])
    (damaged / "c" / "router.json").write_text('{"router": "dimec-fixed", "par')
    (damaged / "d" / "model" / "model.safetensors").write_bytes(b"\x00" * 100)
    config_before = (damaged / "a" / "config.json").read_bytes()
    results = []
    for name, args, stdin, expected, must_not_exist in cases:
        got = outcome(dimec(*args, stdin=stdin, timeout=300))
        got["message"] = got["message"].replace(str(work), "WORK")  # the scratch folder, named once
        got.update(case=name, expected_exit=expected,
                   run_dir_untouched=None if must_not_exist is None else not must_not_exist.exists())
        if name.startswith("calibrate with bad"):
            got["run_dir_untouched"] = (damaged / "a" / "config.json").read_bytes() == config_before
        got["ok"] = got["exit"] == expected and not got["traceback"] and got["run_dir_untouched"] is not False
        results.append(got)
        print(f"  {'ok ' if got['ok'] else 'BAD'} {name}: exit {got['exit']} {got['message'][:90]}", flush=True)
    return results


# ---- 2. faults -------------------------------------------------------------------------------------------------
def check_run_artifacts(run: Path) -> tuple[list[str], int]:
    """Every artifact present must load; returns (problems, temporary files left behind)."""
    from dimec.config import RunConfig
    from dimec.outputs import ExitOutputs
    from dimec.routing.base import load_router

    problems = []
    checks = [("config.json", RunConfig.load), ("router.json", load_router),
              ("calibration.json", lambda p: json.loads(p.read_text())),
              ("outputs/validation.safetensors", ExitOutputs.load), ("data_map.png", _whole_png)]
    for name, load in checks:
        if (run / name).exists():
            try:
                load(run / name)
            except Exception as exc:  # noqa: BLE001  (any failure to load is what we count)
                problems.append(f"{name}: {type(exc).__name__}: {str(exc)[:120]}")
    leftovers = sum(1 for p in run.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)
    return problems, leftovers


def _whole_png(path: Path) -> None:
    if not path.read_bytes().endswith(b"IEND\xaeB`\x82"):  # a PNG ends with its IEND chunk
        raise ValueError("truncated PNG")


def kill_calibrate(paths: dict[str, Path], work: Path, kills: int, rng: random.Random) -> dict:
    from dimec.routing.base import load_router

    ref = paths["reference"]
    reference = load_router(ref / "router.json")[1]  # the served policy's file: kind, state, cost model

    def fresh(name: str) -> Path:
        run = work / name
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(ref, run)
        shutil.rmtree(run / "outputs")  # calibrate redoes it all: outputs, router, report, data map
        for stale in ("router.json", "calibration.json", "data_map.png"):
            (run / stale).unlink()
        return run

    t0 = time.perf_counter()
    assert dimec("calibrate", str(fresh("cal-timing"))).returncode == 0
    full = time.perf_counter() - t0
    trials = []
    for k in range(kills):
        run = fresh(f"cal-{k}")
        at = rng.uniform(0.25, 0.95) * full  # the first quarter is Python and torch starting up
        proc = start("calibrate", str(run), log=work / f"cal-{k}.log")
        time.sleep(at)
        was_running = kill(proc)
        problems, leftovers = check_run_artifacts(run)
        present = [n for n in ("outputs/validation.safetensors", "router.json", "calibration.json") if (run / n).exists()]
        again = outcome(dimec("calibrate", str(run)))
        rerun = load_router(run / "router.json")[1] if again["exit"] == 0 else None
        same = rerun is not None and json.dumps(rerun, sort_keys=True) == json.dumps(reference, sort_keys=True)
        evaluate = outcome(dimec("evaluate", str(run)))["exit"] if again["exit"] == 0 else None
        trials.append({"kill_at_s": round(at, 2), "killed_running": was_running, "present_after_kill": present,
                       "damaged_after_kill": problems, "temp_files_left": leftovers, "rerun": again,
                       "router_identical": same, "evaluate_exit": evaluate})
        print(f"  calibrate killed at {at:.1f}s: present {present}, damaged {problems}, rerun exit "
              f"{again['exit']}, identical router {same}", flush=True)
    return {"full_run_s": round(full, 1), "trials": trials,
            "killed_running": sum(t["killed_running"] for t in trials),
            "damaged_after_kill": sum(bool(t["damaged_after_kill"]) for t in trials),
            "recovered": sum(t["rerun"]["exit"] == 0 and t["evaluate_exit"] == 0 for t in trials),
            "router_identical": sum(t["router_identical"] for t in trials)}


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    try:
        return {e.name: (e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(folder)}
    except (FileNotFoundError, OSError):
        return {}


def kill_train(paths: dict[str, Path], work: Path, kills: int, rng: random.Random, at_checkpoint: bool) -> dict:
    """Kill `dimec train` (at a random moment, or as a checkpoint write begins), then run it again: it must
    resume and finish with one log row per epoch and a loadable model."""
    train = ["train", "--config", str(paths["config"])]
    epochs = 4
    t0 = time.perf_counter()
    timing = start(*train, "--run-dir", str(work / "train-timing"), log=work / "train-timing.log")
    first_row = _wait_for_log_rows(work / "train-timing", 1, timing, 1200)
    assert timing.wait(1200) == 0
    full = time.perf_counter() - t0
    epoch_s = (time.perf_counter() - first_row) / (epochs - 1)
    trials = []
    for k in range(kills):
        run = work / f"train-{'ckpt' if at_checkpoint else 'rand'}-{k}"
        shutil.rmtree(run, ignore_errors=True)
        started = time.perf_counter()
        proc = start(*train, "--run-dir", str(run), log=work / f"{run.name}.log")
        if at_checkpoint:  # the write of checkpoint number `target` (2..epochs-1) begins: kill at once
            target, writes, last_change, seen = rng.randint(2, epochs - 1), 0, 0.0, _snapshot(run / "checkpoint")
            deadline = time.monotonic() + 3 * full
            while proc.poll() is None and time.monotonic() < deadline:
                now = _snapshot(run / "checkpoint")
                if now != seen:
                    if time.monotonic() - last_change > 0.3:  # a new burst of writes: a new checkpoint
                        writes += 1
                    last_change, seen = time.monotonic(), now
                    if writes == target:
                        break
                time.sleep(0.0005)
            at = None
        else:  # a random moment of epoch `k`: after k-1 logged epochs, somewhere within the next epoch
            k = rng.randint(1, epochs)
            if k > 1:
                _wait_for_log_rows(run, k - 1, proc, 1200)
            else:  # data.json is written as training begins
                _wait_for_file(run / "data.json", proc, 1200)
            pause = rng.uniform(0, epoch_s)
            time.sleep(pause)
            at = round(time.perf_counter() - started, 2)
        was_running = kill(proc)
        state = run / "checkpoint" / "state.json"
        try:
            done_epochs = json.loads(state.read_text())["state"]["epoch"] if state.exists() else 0
        except ValueError:
            done_epochs = "state.json damaged"
        resumed = outcome(dimec(*train, "--run-dir", str(run), timeout=1200))
        log_epochs = []
        if (run / "train_log.jsonl").exists():
            log_epochs = [json.loads(line)["epoch"] for line in (run / "train_log.jsonl").read_text().splitlines()
                          if line.strip()]
        model_ok = resumed["exit"] == 0 and _model_loads(run)
        trials.append({"kill_at_s": None if at is None else round(at, 2), "checkpoint_write": at_checkpoint,
                       "killed_running": was_running, "epochs_checkpointed_at_kill": done_epochs,
                       "resume": resumed, "log_epochs": log_epochs,
                       "log_exact": log_epochs == list(range(1, epochs + 1)), "model_loads": model_ok})
        print(f"  train killed {'at checkpoint write' if at_checkpoint else f'at {at:.1f}s'} after "
              f"{done_epochs} epoch(s): resume exit {resumed['exit']} {resumed['message'][:80]}, log {log_epochs}",
              flush=True)
    ok = [t["resume"]["exit"] == 0 and t["log_exact"] and t["model_loads"] for t in trials]
    return {"full_run_s": round(full, 1), "epochs": epochs, "trials": trials,
            "killed_running": sum(t["killed_running"] for t in trials), "resumed_clean": sum(ok),
            "tracebacks": sum(t["resume"]["traceback"] for t in trials)}


def _wait_for_file(path: Path, proc: subprocess.Popen, timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    return time.perf_counter()


def _wait_for_log_rows(run: Path, rows: int, proc: subprocess.Popen, timeout_s: float) -> float:
    """Until train_log.jsonl holds `rows` lines (or the process ends); returns the time it happened."""
    deadline = time.monotonic() + timeout_s
    log = run / "train_log.jsonl"
    while proc.poll() is None and time.monotonic() < deadline:
        if log.exists() and log.read_text().count("\n") >= rows:
            break
        time.sleep(0.005)
    return time.perf_counter()


def _model_loads(run: Path) -> bool:
    from dimec.pipeline import load_model

    try:
        load_model(run)
    except Exception:  # noqa: BLE001
        return False
    return True


def kill_servers(packages: dict[str, Path], texts: list[str], requests: int) -> dict:
    """SIGKILL the edge mid-burst (edge-first routing), restart it; then the cloud (cloud-first routing)."""
    from dimec.serving.deploy.local import ProcessServer
    from dimec.serving.phone.client import MobileClient

    out = {}
    servers = {tier: ProcessServer(tier, packages[tier], TOKEN).start() for tier in ("edge", "cloud")}
    try:
        for server in servers.values():
            server.wait(180)
        for victim, routing in (("edge", "edge-only"), ("cloud", "cloud-only")):
            client = MobileClient(packages["mobile"], servers["edge"].url, servers["cloud"].url, TOKEN,
                                  backend="torch", routing=routing, retries=1, cooldown_s=0.5)
            out[victim] = burst(client, texts, requests, servers[victim])
            client.close()
            print(f"  {victim} killed mid-burst: {json.dumps({k: v for k, v in out[victim].items() if k != 'client_stats'})}",
                  flush=True)
    finally:
        for server in servers.values():
            server.stop()
    return out


class Burst:
    """4 client threads share `requests` single-text requests; every answer is recorded by request id."""

    def __init__(self, client, texts: list[str], requests: int) -> None:
        self.client, self.texts, self.requests = client, texts, requests
        self.lock, self.sent, self.twice = threading.Lock(), 0, 0
        self.answers: dict[str, object] = {}
        self.errors: list[str] = []

    def worker(self, w: int) -> None:
        while True:
            with self.lock:
                if self.sent >= self.requests:
                    return
                i, self.sent = self.sent, self.sent + 1
            rid = f"{w}-{i}"
            try:
                answer = self.client.classify([self.texts[i % len(self.texts)]], ids=[rid])[0]
            except Exception as exc:  # noqa: BLE001  (an explicit error is an outcome; count it)
                with self.lock:
                    self.errors.append(f"{rid}: {exc}")
                continue
            with self.lock:
                self.twice += rid in self.answers
                self.answers[rid] = answer


def burst(client, texts: list[str], requests: int, victim) -> dict:
    """Send the burst; SIGKILL `victim` (a ProcessServer) a quarter of the way in and restart it at once."""
    b = Burst(client, texts, requests)
    threads = [threading.Thread(target=b.worker, args=(w,), daemon=True) for w in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while b.sent < requests // 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    victim.kill()  # SIGKILL, mid-burst
    killed_at = b.sent
    victim.start().wait(180)
    restarted_at = b.sent
    for t in threads:
        t.join(300)
    values = list(b.answers.values())
    return {"requests": requests, "answered": len(values), "errors": len(b.errors),
            "lost": requests - len(values) - len(b.errors), "answered_twice": b.twice,
            "killed_after": killed_at, "restarted_after": restarted_at,
            "fallbacks": sum(a.fallback for a in values), "degraded": sum(a.degraded for a in values),
            "answered_by": {t: sum(a.tier == t for a in values) for t in ("mobile", "edge", "cloud")},
            "client_stats": client.stats()}


# ---- report ----------------------------------------------------------------------------------------------------
def render(result: dict) -> str:
    """The measured section of docs/reliability.md, from reliability.json."""
    f, cli, cal = result["inputs"]["http_fuzz"], result["inputs"]["cli"], result["faults"]["calibrate"]
    tr, tc, sv = result["faults"]["train_random"], result["faults"]["train_checkpoint"], result["faults"]["serving"]
    statuses = ", ".join(f"{s}: {n}" for s, n in f["statuses"].items() if ":" not in s)
    good_after = ", ".join(f"{s.split(':')[1]}: {n}" for s, n in f["statuses"].items() if ":" in s)
    lines = [
        f"Measured {result['date']} on {result['machine']} with `{result['command']}` (branch state: "
        f"{result['note']}). Model: {result['model']}.",
        "",
        "### Inputs tried",
        "",
        f"- **{f['requests']} fuzzed HTTP bodies** to a real `dimec serve edge` over one keep-alive loopback "
        f"connection (random JSON with lone surrogates, NaN and huge numbers, near-valid bodies, truncated and "
        f"byte-flipped JSON, 5,000-deep nesting, 5,000-digit numbers, raw garbage, bodies over 1 MB): statuses "
        f"{statuses}; server 5xx **{f['server_5xx']}**; connection errors **{f['connection_errors']}**; statuses "
        f"missing from the OpenAPI schema: {f['undocumented'] or 'none'}; a good request after a bad one on the "
        f"same connection: {good_after}.",
        f"- **{len(cli)} bad command-line inputs** as real `dimec` processes: "
        f"{sum(c['ok'] for c in cli)}/{len(cli)} gave the expected exit status with one message and no "
        f"traceback, and left the run directory as it was where that applies (WORK: the script's scratch "
        f"folder):",
        "",
        "| input | exit (expected) | traceback | run dir untouched | message |",
        "| --- | ---: | --- | --- | --- |",
    ]
    for c in cli:
        untouched = "-" if c["run_dir_untouched"] is None else ("yes" if c["run_dir_untouched"] else "**no**")
        lines.append(f"| {c['case']} | {c['exit']} ({c['expected_exit']}) | {'**yes**' if c['traceback'] else 'no'} "
                     f"| {untouched} | {c['message'].replace('|', '/')[:110]} |")
    lines += [
        "",
        "### Faults injected (SIGKILL) and what survived",
        "",
        "| fault | trials | killed while running | damaged artifacts after the kill | recovered cleanly | notes |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
        f"| `dimec calibrate` killed at a random moment (run takes {cal['full_run_s']} s) | {len(cal['trials'])} | "
        f"{cal['killed_running']} | {cal['damaged_after_kill']} | {cal['recovered']} (calibrate, then evaluate) | "
        f"router identical to an uninterrupted run: {cal['router_identical']}/{len(cal['trials'])} |",
        _train_row(f"`dimec train` killed at a random moment of a random epoch ({tr['epochs']} epochs, "
                   f"{tr['full_run_s']} s)", tr),
        _train_row("`dimec train` killed as a checkpoint write begins", tc),
    ]
    for victim, s in sv.items():
        lines.append(f"| {victim} server killed mid-burst ({s['requests']} requests, 4 clients, {victim}-first "
                     f"routing), restarted | 1 | yes | - | {s['answered']}/{s['requests']} answered | lost "
                     f"{s['lost']}, answered twice {s['answered_twice']}, explicit errors {s['errors']}, "
                     f"fallbacks {s['fallbacks']}, degraded {s['degraded']} |")
    failures = [t for t in tr["trials"] + tc["trials"] if not (t["resume"]["exit"] == 0 and t["log_exact"])]
    if failures:
        lines += ["", "Resume failures (the trainer's checkpointing, issue 9's part of the hardening):", ""]
        for t in failures:
            when = "at a checkpoint write" if t["checkpoint_write"] else f"at {t['kill_at_s']} s"
            lines.append(f"- killed {when} after {t['epochs_checkpointed_at_kill']} checkpointed epoch(s): resume "
                         f"exit {t['resume']['exit']}, {t['resume']['message'][:120]}; log epochs {t['log_epochs']}")
    if "serving_surface" in result:
        import reliability_serving

        lines += reliability_serving.render(result["serving_surface"])
    return "\n".join(lines)


def _train_row(name: str, t: dict) -> str:
    n = len(t["trials"])
    exit0 = sum(x["resume"]["exit"] == 0 for x in t["trials"])
    exact = sum(x["log_exact"] for x in t["trials"])
    loads = sum(x["model_loads"] for x in t["trials"])
    return (f"| {name} | {n} | {t['killed_running']} | - | {t['resumed_clean']} | `dimec train` again: exit 0 "
            f"{exit0}/{n}, one log row per epoch {exact}/{n}, model loads {loads}/{n}, tracebacks "
            f"{t['tracebacks']} |")


def write_doc(body: str) -> None:
    begin, end = "<!-- measured:begin -->", "<!-- measured:end -->"
    text = DOC.read_text()
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    DOC.write_text(f"{head}{begin}\n{body}\n{end}{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", help="scratch folder (default: a new temporary one, removed at the end)")
    parser.add_argument("--kills", type=int, default=8, help="kills per fault kind (calibrate, train x2)")
    parser.add_argument("--fuzz", type=int, default=1000, help="fuzzed HTTP bodies")
    parser.add_argument("--requests", type=int, default=400, help="requests per server-kill burst")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="main",
                        help="what code was measured, for the report")
    parser.add_argument("--doc", action="store_true", help="also rewrite the measured section of docs/reliability.md")
    parser.add_argument("--render", action="store_true", help="only re-render docs/reliability.md from the JSON")
    parser.add_argument("--serving-cases", type=int, default=200, help="cases per serving-surface input kind")
    parser.add_argument("--only-serving", action="store_true",
                        help="run only the serving surface (merged into the existing reliability.json)")
    parser.add_argument("--no-save", action="store_true", help="print, write nothing (a smoke run)")
    args = parser.parse_args()
    if args.render:
        write_doc(render(json.loads(RESULT.read_text())["data"]))
        return 0

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="dimec-reliability-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    sys.path.insert(0, str(ROOT / "src"))
    from dimec.pipeline import load_saved_config, task_data
    from dimec.serving.deploy.export import export_packages
    from dimec.serving.deploy.local import ProcessServer

    paths = build(work)
    packages = export_packages(paths["reference"], work / "packages", onnx=False)
    texts = [e.text for e in task_data(load_saved_config(paths["reference"])).test]
    result: dict = {"command": COMMAND, "date": date.today().isoformat(), "note": args.note,
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                    "model": "random 4-layer BERT (hidden 64, exits 1/2/4) on a 1,000-row toy sentiment CSV, "
                             "4 epochs, 1 torch thread", "inputs": {}, "faults": {}}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import reliability_serving

    if args.only_serving:
        print("the serving surface (issue 17)", flush=True)
        surface = reliability_serving.run_all(packages, paths["reference"], work, args.serving_cases, args.seed)
        if not args.no_save and RESULT.is_file():
            from report import save

            result = json.loads(RESULT.read_text())["data"] | {"serving_surface": surface}
            save("reliability", TITLE, COMMAND, "bench_reliability.py", result)
        print("\n".join(reliability_serving.render(surface)))
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        return 0
    print("inputs: HTTP fuzz and bad command lines", flush=True)
    with ProcessServer("edge", packages["edge"], TOKEN) as edge:
        result["inputs"]["http_fuzz"] = fuzz_http(edge.url, args.fuzz, args.seed)
        print(f"  {json.dumps(result['inputs']['http_fuzz'])}", flush=True)
        result["inputs"]["cli"] = cli_cases(paths, work, packages, edge.url)
    print("faults: calibrate killed", flush=True)
    result["faults"]["calibrate"] = kill_calibrate(paths, work, args.kills, rng)
    print("faults: train killed at random moments", flush=True)
    result["faults"]["train_random"] = kill_train(paths, work, args.kills, rng, at_checkpoint=False)
    print("faults: train killed at checkpoint writes", flush=True)
    result["faults"]["train_checkpoint"] = kill_train(paths, work, args.kills, rng, at_checkpoint=True)
    print("faults: servers killed mid-burst", flush=True)
    result["faults"]["serving"] = kill_servers(packages, texts, args.requests)
    print("the serving surface (issue 17)", flush=True)
    result["serving_surface"] = reliability_serving.run_all(packages, paths["reference"], work, args.serving_cases,
                                                            args.seed)

    from report import save

    if not args.no_save:
        save("reliability", TITLE, COMMAND, "bench_reliability.py", result)
    body = render(result)
    print("\n" + body)
    if args.doc:
        write_doc(body)
        print(f"\nupdated {DOC}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
