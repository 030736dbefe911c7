"""Many sources end to end on the tiny run: tokens mapped to sources, 429 and the client's redirect, the
edge's advice honoured, constraints (private, deadline, budget), per-source metrics and bad input.
Loopback only; every loop and wait bounded."""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")

from conftest import tier_models  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from dimec.config import build_config  # noqa: E402
from dimec.errors import ConfigError  # noqa: E402
from dimec.runtime.tier import TierModel  # noqa: E402
from dimec.serving.deploy.export import export_packages  # noqa: E402
from dimec.serving.deploy.local import ThreadServer  # noqa: E402
from dimec.serving.phone.client import MobileClient, RemoteResult, Timeouts  # noqa: E402
from dimec.serving.phone.constraints import CloudBudget, Constraints, FleetPolicy, LatencyTracker  # noqa: E402
from dimec.serving.servers.server import create_app  # noqa: E402
from dimec.serving.servers.sources import FleetConfig, SourceTable  # noqa: E402

TEXTS = ["good movie", "the film was very boring", "a lovely plot and acting", "dull", "great fun", "poor acting",
         "the movie was quite weak and the plot dull", "superb", "the acting was fine", "awful and boring film"]
TOKENS = {"hi": "high-token-1", "lo": "low-token-01", "lo2": "low-token-02"}


def sources(capacity: int = 2, policy: str = "strict", retry_after_s: float = 1.0) -> SourceTable:
    return SourceTable.from_config(build_config(FleetConfig, {
        "classes": [{"name": "high", "weight": 4}, {"name": "low"}],
        "sources": [{"name": "hi", "token": TOKENS["hi"], "priority": "high"},
                    {"name": "lo", "token": TOKENS["lo"], "priority": "low"},
                    {"name": "lo2", "token": TOKENS["lo2"], "priority": "low"}],
        "scheduling": {"policy": policy, "queue_capacity": capacity, "retry_after_s": retry_after_s},
        "allocation": {"horizon_s": 0.5, "smoothing": 1.0, "valid_s": 5.0}}))


class SlowModel:
    """A tier model that takes `delay_s` per text, so that a few requests fill the edge's queue (every text
    request starts from its embedding layer output: `start`)."""

    def __init__(self, model: TierModel, delay_s: float) -> None:
        self._model, self.delay_s = model, delay_s

    def __getattr__(self, name):
        return getattr(self._model, name)

    def start(self, batch):
        time.sleep(self.delay_s * len(batch))
        return self._model.start(batch)


@pytest.fixture(scope="module")
def packages(unscaled_tiny_run, tmp_path_factory):
    return export_packages(unscaled_tiny_run, tmp_path_factory.mktemp("fleet_packages"), onnx=False)


@pytest.fixture(scope="module")
def models(packages):
    return tier_models(packages)


@pytest.fixture()
def servers(models):
    """A slow edge with priorities (queue of 2) and a cloud with the same sources (room for everyone)."""
    edge_app = create_app(None, "edge", None, model=SlowModel(models["edge"], 0.12), sources=sources(2))
    cloud_app = create_app(None, "cloud", None, model=models["cloud"], sources=sources(100, "fifo"))
    started = {"edge": ThreadServer(edge_app).start(), "cloud": ThreadServer(cloud_app).start()}
    yield started
    for server in started.values():
        server.stop()
        server.app.state.fleet.close()


def post(url: str, token: str, body: dict, timeout: float = 10.0) -> httpx.Response:
    return httpx.post(f"{url}/v1/classify", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=timeout)


# ---- the server ------------------------------------------------------------------------------------------------------
def test_sources_answer_with_their_class_and_unmapped_tokens_get_401(models):
    app = create_app(None, "edge", None, model=models["edge"], sources=sources())
    http = TestClient(app)
    try:
        r = http.post("/v1/classify", json={"text": "good"}, headers={"Authorization": "Bearer nobody-knows-me"})
        assert r.status_code == 401 and "maps to no source" in r.json()["error"]
        r = http.post("/v1/classify", json={"texts": ["good", "dull"]}, headers={"Authorization": f"Bearer {TOKENS['lo']}"})
        body = r.json()
        assert r.status_code == 200 and body["source"] == "lo" and body["priority"] == "low"
        assert body["queue_ms"] >= 0 and body["advice"]["class"] == "low" and 0 <= body["advice"]["keep_fraction"] <= 1
        assert http.get("/healthz").json()["status"] == "ok"  # still healthy
        # the single token of `--token` is not accepted beside a sources file
        assert http.post("/v1/classify", json={"text": "a"}, headers={"Authorization": "Bearer x"}).status_code == 401
    finally:
        app.state.fleet.close()


@pytest.mark.parametrize("deadline", [-5, "soon", [1]])
def test_bad_deadlines_are_422(models, deadline):
    app = create_app(None, "edge", "tok-12345", model=models["edge"])
    r = TestClient(app).post("/v1/classify", json={"text": "good", "deadline_ms": deadline},
                             headers={"Authorization": "Bearer tok-12345"})
    assert r.status_code == 422 and "deadline_ms" in json.dumps(r.json())


def test_single_token_mode_is_unchanged(models):
    app = create_app(None, "edge", "tok-12345", model=models["edge"])
    http = TestClient(app)
    body = http.post("/v1/classify", json={"text": "good", "deadline_ms": 1000},
                     headers={"Authorization": "Bearer tok-12345"}).json()
    assert body["source"] == "default" and body["priority"] == "default" and body["advice"] is None
    assert app.state.fleet.scheduler is None
    assert 'dimec_source_requests_total{class="default",outcome="answered",source="default"} 1.0' in \
        http.get("/metrics").text


def test_full_edge_sheds_low_priority_never_high_while_low_waits(servers):
    url, scheduler = servers["edge"].url, servers["edge"].app.state.fleet.scheduler
    results: dict[str, list[int]] = {"lo": [], "hi": []}
    headers: list[str] = []
    lock = threading.Lock()

    def send(source: str, i: int) -> None:
        r = post(url, TOKENS[source], {"text": TEXTS[i % len(TEXTS)]})
        with lock:
            results[source[:2]].append(r.status_code)
            if r.status_code == 429:
                headers.append(r.headers.get("retry-after", ""))
                assert r.json()["reason"] in ("full", "evicted")

    lows = [threading.Thread(target=send, args=("lo" if i % 2 else "lo2", i)) for i in range(6)]
    for t in lows:
        t.start()
    deadline = time.monotonic() + 10
    while scheduler.depth("low") < 2 and time.monotonic() < deadline:  # the queue is full of low requests
        time.sleep(0.002)
    highs = [threading.Thread(target=send, args=("hi", i)) for i in range(2)]
    for t in highs:
        t.start()
    for t in lows + highs:
        t.join(30)
    assert results["hi"] == [200, 200]  # both highs got in: each evicted a waiting low one
    assert results["lo"].count(429) >= 2 and results["lo"].count(200) >= 1 and len(results["lo"]) == 6
    assert headers and all(h == "1" for h in headers)
    metrics = httpx.get(f"{url}/metrics").text
    shed_lines = [line for line in metrics.splitlines() if line.startswith('dimec_source_shed_total{class="low"')]
    assert sum(float(line.split()[-1]) for line in shed_lines) == results["lo"].count(429)  # each one counted
    assert 'dimec_source_requests_total{class="high",outcome="shed",source="hi"} 0.0' in metrics
    for name in ("dimec_queue_depth{class=\"high\"}", "dimec_advice_keep_fraction{class=\"low\"}",
                 "dimec_edge_capacity_texts_per_second", "dimec_source_latency_seconds_bucket",
                 "dimec_queue_wait_seconds_bucket", "dimec_class_demand_texts_per_second"):
        assert name in metrics, name
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"


# ---- the client ----------------------------------------------------------------------------------------------------
def test_client_redirects_shed_requests_to_the_cloud_and_loses_nothing(models, servers):
    answers, stats, lock = [], {}, threading.Lock()

    def worker(w: int) -> None:
        with MobileClient(models["mobile"], servers["edge"].url, servers["cloud"].url, TOKENS["lo"],
                          timeouts=Timeouts(read_s=10), routing="edge-only") as client:
            for i in range(4):
                got = client.classify([TEXTS[(w + i) % len(TEXTS)]], ids=[f"w{w}-{i}"])
                with lock:
                    answers.extend(got)
            stats[w] = client.stats()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(a.id for a in answers) == sorted(f"w{w}-{i}" for w in range(6) for i in range(4))
    shed = [a for a in answers if "shed" in a.flags]
    assert shed and all(a.tier == "cloud" and a.fallback and not a.degraded for a in shed)
    # the rest: on the edge, or kept on the device because the loaded edge advised this low class to
    rest = [a for a in answers if a not in shed]
    assert all(a.tier == "edge" or (a.tier == "mobile" and a.flags == ["advice"]) for a in rest), rest
    for w in range(6):  # every redirect counted once, by the client that made it
        mine = [a for a in shed if a.id.startswith(f"w{w}-")]
        assert stats[w].get("shed_texts_edge", 0) == stats[w].get("flag_shed", 0) == len(mine)


class FakeRemote:
    """A remote tier answering like the real one, with advice; counts what it was sent."""

    def __init__(self, name: str, mobile: TierModel, advice: dict | None = None) -> None:
        self.name, self.mobile, self.advice, self.sent = name, mobile, advice, []

    def available(self) -> bool:
        return True

    def classify(self, texts, pairs, ids, deadline_ms=None) -> RemoteResult:
        self.sent.append((list(ids), deadline_ms))
        probs = np.tile(np.array([[0.1, 0.9]], np.float32), (len(texts), 1))
        tier = ("mobile", "edge", "cloud").index(self.name)
        return RemoteResult(probs, self.mobile.label_names, [self.name] * len(texts), [tier] * len(texts), 1,
                            {"advice": self.advice, "queue_ms": 0.0})


def test_client_honours_the_edges_advice_within_its_bound(models):
    edge = FakeRemote("edge", models["mobile"], {"keep_fraction": 0.5, "valid_s": 30, "expected_wait_ms": 5})
    policy = FleetPolicy(min_mobile_confidence=0.0)
    with MobileClient(models["mobile"], routing="edge-only", remotes={"edge": edge}, fleet=policy) as client:
        first = client.classify(TEXTS)  # no advice yet: all to the edge
        assert all(a.tier == "edge" and not a.flags for a in first)
        second = client.classify(TEXTS * 2)
        kept = [a for a in second if "advice" in a.flags]
        assert kept and all(a.tier == "mobile" and a.routed == "edge" and not a.degraded for a in kept)
        assert 0.2 <= len(kept) / len(second) <= 0.8  # about the advised half
        assert client.stats()["flag_advice"] == len(kept)
    strict = FleetPolicy(min_mobile_confidence=1.0)  # the bound: never below full confidence
    edge2 = FakeRemote("edge", models["mobile"], {"keep_fraction": 0.9, "valid_s": 30})
    with MobileClient(models["mobile"], routing="edge-only", remotes={"edge": edge2}, fleet=strict) as client:
        client.classify(TEXTS)
        assert not any("advice" in a.flags for a in client.classify(TEXTS))
    ignoring = FleetPolicy(honour_advice=False)
    edge3 = FakeRemote("edge", models["mobile"], {"keep_fraction": 0.9, "valid_s": 30})
    with MobileClient(models["mobile"], routing="edge-only", remotes={"edge": edge3}, fleet=ignoring) as client:
        client.classify(TEXTS)
        assert all(a.tier == "edge" for a in client.classify(TEXTS))


def test_private_texts_stay_on_the_device_or_on_trusted_tiers(models):
    edge, cloud = FakeRemote("edge", models["mobile"]), FakeRemote("cloud", models["mobile"])
    remotes = {"edge": edge, "cloud": cloud}
    with MobileClient(models["mobile"], routing="cloud-only", remotes=remotes) as client:
        private = client.classify(TEXTS[:3], constraints=Constraints(private=True))
        assert all(a.tier == "mobile" and "private" in a.flags and not a.degraded for a in private)
        assert not edge.sent and not cloud.sent  # nothing left the device
        public = client.classify(TEXTS[:3])
        assert all(a.tier == "cloud" for a in public) and len(cloud.sent) == 1
    trusted = FleetPolicy(Constraints(private=True), trusted=("edge",))
    edge.sent.clear()
    with MobileClient(models["mobile"], routing="cloud-only", remotes={"edge": edge, "cloud": cloud},
                      fleet=trusted) as client:
        answers = client.classify(TEXTS[:3])
        assert all(a.tier == "edge" and "private" in a.flags for a in answers) and len(cloud.sent) == 1

    class Down(FakeRemote):
        def classify(self, *a, **kw):
            from dimec.errors import TierUnavailableError

            raise TierUnavailableError("edge down")

    down = Down("edge", models["mobile"])
    with MobileClient(models["mobile"], routing="edge-only", remotes={"edge": down, "cloud": cloud},
                      fleet=trusted) as client:
        before = len(cloud.sent)
        answers = client.classify(TEXTS[:2])
        assert all(a.tier == "mobile" and a.degraded for a in answers) and len(cloud.sent) == before


def test_deadline_picks_the_cheapest_tier_that_fits_else_the_fastest(models):
    edge, cloud = FakeRemote("edge", models["mobile"]), FakeRemote("cloud", models["mobile"])
    latency = LatencyTracker({"mobile": 5.0, "edge": 4000.0, "cloud": 50000.0})  # mobile is then measured
    policy = FleetPolicy(latency=latency, honour_advice=False)
    with MobileClient(models["mobile"], routing="cloud-only", remotes={"edge": edge, "cloud": cloud},
                      fleet=policy) as client:
        fits = client.classify(["good"], constraints=Constraints(max_latency_ms=3000))[0]
        assert fits.tier == "mobile" and "deadline" in fits.flags  # mobile is the cheapest tier that fits
        none = client.classify(["good"], constraints=Constraints(max_latency_ms=0.001))[0]
        assert none.tier == "mobile" and "deadline-unmet" in none.flags  # nothing fits: the fastest
        easy = client.classify(["good"], constraints=Constraints(max_latency_ms=1e6))[0]
        assert easy.tier == "cloud" and not {"deadline", "deadline-unmet"} & set(easy.flags)
    with MobileClient(models["mobile"], routing="edge-only", remotes={"edge": edge}, fleet=FleetPolicy()) as client:
        client.classify(["good"], constraints=Constraints(max_latency_ms=250))
        assert edge.sent[-1][1] is not None and 0 < edge.sent[-1][1] <= 250  # the edge is told the time left


    class Plain(FakeRemote):  # a remote that takes no deadline (a Ray handle, a test double) still works
        def classify(self, texts, pairs, ids) -> RemoteResult:
            return super().classify(texts, pairs, ids)

    plain = Plain("edge", models["mobile"])
    with MobileClient(models["mobile"], routing="edge-only", remotes={"edge": plain}) as client:
        assert client.classify(["good"], constraints=Constraints(max_latency_ms=250))[0].tier == "edge"
        assert plain.sent[-1][1] is None


def test_edge_refuses_what_it_cannot_answer_in_time_and_the_cloud_answers(models, servers):
    fleet = servers["edge"].app.state.fleet
    fleet.scheduler.allocator.served(1, 0.2)  # the edge has measured 200 ms per text
    with MobileClient(models["mobile"], servers["edge"].url, servers["cloud"].url, TOKENS["hi"],
                      routing="edge-only", fleet=FleetPolicy(Constraints(max_latency_ms=50))) as client:
        answer = client.classify(["good"])[0]
    assert answer.tier == "cloud" and "shed" in answer.flags and "cannot answer within" in " ".join(answer.errors), answer


def test_cloud_budget_moves_work_to_the_edge_then_refills(models):
    edge, cloud = FakeRemote("edge", models["mobile"]), FakeRemote("cloud", models["mobile"])
    budget = CloudBudget(limit=0.003, window_s=0.5, price_per_text=0.001)
    with MobileClient(models["mobile"], routing="cloud-only", remotes={"edge": edge, "cloud": cloud},
                      fleet=FleetPolicy(budget=budget)) as client:
        answers = [client.classify([t])[0] for t in TEXTS[:5]]
        assert [a.tier for a in answers] == ["cloud"] * 3 + ["edge"] * 2
        assert all("budget" in a.flags for a in answers[3:])
        assert client.stats()["cloud_spent"] == pytest.approx(0.003)
        time.sleep(0.6)  # the window slides: the cloud may bill again
        assert client.classify(["good"])[0].tier == "cloud"
    private_budget = FleetPolicy(Constraints(private=True), trusted=("cloud",), budget=CloudBudget(0.0))
    with MobileClient(models["mobile"], routing="cloud-only", remotes={"edge": edge, "cloud": cloud},
                      fleet=private_budget) as client:
        answer = client.classify(["good"])[0]
        assert answer.tier == "mobile" and "budget" in answer.flags  # the edge is not trusted: stays here

    class Down(FakeRemote):
        def classify(self, *a, **kw):
            from dimec.errors import TierUnavailableError

            raise TierUnavailableError("edge down")

    with MobileClient(models["mobile"], routing="edge-only", remotes={"edge": Down("edge", models["mobile"]),
                      "cloud": cloud}, fleet=FleetPolicy(budget=CloudBudget(0.0))) as client:
        before = len(cloud.sent)
        answer = client.classify(["good"])[0]  # the edge is down and the cloud's budget is spent
        assert answer.tier == "mobile" and answer.degraded and "budget" in answer.flags
        assert len(cloud.sent) == before and "cloud budget spent" in answer.errors[-1]


def test_bad_constraints_are_clear_errors(models, tmp_path, capsys):
    with pytest.raises(ConfigError, match="max_latency_ms must be > 0"):
        Constraints(max_latency_ms=-1)
    with pytest.raises(ConfigError, match="cloud budget"):
        CloudBudget(-1.0)
    with pytest.raises(ConfigError, match="trusted tiers"):
        FleetPolicy(trusted=("mars",))
    from dimec.cli import main

    package = str(models["mobile"].directory)
    # the options are the declared client settings (`dimec settings client`), checked by config.py's one path
    for args, message in ((["--max-latency-ms", "-5"], "client.max_latency_ms must be a finite number > 0"),
                          (["--cloud-budget", "-1"], "client.cloud_budget must be at least 0"),
                          (["--budget-window", "0"], "client.budget_window must be a finite number > 0"),
                          (["--trusted", "moon"], "client.trusted item 0 must be one of 'edge', 'cloud'"),
                          (["--min-mobile-confidence", "2"], "client.min_mobile_confidence"),
                          (["--latency-profile", str(tmp_path / "none.json")], "latency profile")):
        code = main(["client", package, "good", "--edge-url", "http://127.0.0.1:9", "--backend", "torch", *args])
        assert code == 2 and message in capsys.readouterr().err, args


def test_cascade_mobile_stage_under_advice():
    policy = FleetPolicy(min_mobile_confidence=0.7)
    probs = np.stack([np.linspace(0.5, 1.0, 101), 1 - np.linspace(0.5, 1.0, 101)], 1)  # max-prob 0.5 .. 1
    assert not policy.advised(probs).any()  # no advice: the plan's own thresholds alone
    policy._advice = (0.5, time.monotonic() + 30)  # the edge asks to keep half
    assert policy.advised(probs).mean() == pytest.approx(0.5, abs=0.02)  # at or above the median of the history
    policy._advice = (0.9, time.monotonic() + 30)
    assert policy.advised(probs).tolist() == (probs.max(-1) >= 0.7).tolist()  # never below the floor


# ---- a task with more than two classes ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def three_class_mobile(tiny_encoder, tmp_path_factory):
    """The mobile package of a 3-class run (exits at T = 1) whose router is a mobile -> edge cascade reading
    the entropy (what calibration tries for more than two classes), with a mobile threshold no sample
    reaches: without advice every text goes on to the edge."""
    import csv
    import random
    import shutil

    from conftest import FILLER, NEGATIVE, POSITIVE, tiny_run_config

    from dimec.config import CostConfig
    from dimec.costs import CostModel
    from dimec.modeling.multi_exit import MODEL_CONFIG
    from dimec.pipeline import run_all
    from dimec.routing.base import save_router
    from dimec.routing.cascade import CascadeRouter
    from dimec.runtime.package import ROUTER_FILE, read_manifest, write_manifest

    root = tmp_path_factory.mktemp("three_class")
    rng = random.Random(0)
    with (root / "task.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(300):
            words = [POSITIVE, NEGATIVE, FILLER][i % 3]
            w.writerow([" ".join(rng.choices(FILLER, k=rng.randint(2, 8)) + [rng.choice(words)]),
                        ["pos", "neg", "neutral"][i % 3]])
    run_all(tiny_run_config(tiny_encoder, root / "task.csv", epochs=1), root / "run")
    config = root / "run" / "model" / MODEL_CONFIG
    config.write_text(json.dumps(json.loads(config.read_text()) | {"temperatures": [1.0, 1.0, 1.0]}))
    directory = export_packages(root / "run", root / "packages", tiers=("mobile",), onnx=False)["mobile"]
    router = CascadeRouter()  # mobile@m -> edge@n -> cloud@l; minus the entropy is < 0: never on the mobile
    router.set_thresholds((0.0, -1e-9), "entropy")
    layers = tuple(read_manifest(directory)["exit_layers"])
    save_router(router, directory / ROUTER_FILE, CostModel.from_config(CostConfig(), layers))
    manifest = read_manifest(directory, verify=False)
    manifest.pop("files")
    write_manifest(directory, manifest)
    shutil.rmtree(root / "run")
    return TierModel(directory)


class FakeEdge:
    """An edge that continues hidden states and asks the client to keep half of its work."""

    name = "edge"

    def __init__(self, mobile: TierModel) -> None:
        self.mobile, self.sent = mobile, 0

    def available(self) -> bool:
        return True

    def continue_hidden(self, rows, layer, model_id, ids, plan=None, confidence="max_prob", dtype=None):
        self.sent += len(rows)
        probs = np.tile(np.array([[0.2, 0.2, 0.6]], np.float32), (len(rows), 1))
        return RemoteResult(probs, self.mobile.label_names, ["edge"] * len(rows), [1] * len(rows), 1,
                            {"advice": {"keep_fraction": 0.5, "valid_s": 30}, "queue_ms": 0.0})


def test_advice_keeps_work_on_the_device_for_a_multi_class_entropy_cascade(three_class_mobile):
    """The edge's advice lowers the mobile stage's bar on the max-probability scale `min_mobile_confidence` is
    set on, whatever the plan's thresholds read (here minus the entropy of 3 classes, always < 0)."""
    assert len(three_class_mobile.label_names) == 3
    edge = FakeEdge(three_class_mobile)
    policy = FleetPolicy(min_mobile_confidence=0.0)
    with MobileClient(three_class_mobile, routing="router", remotes={"edge": edge}, fleet=policy) as client:
        assert client.confidence == "entropy"
        first = client.classify(TEXTS)  # no advice yet: the plan sends every text on
        assert all(a.tier == "edge" for a in first) and edge.sent == len(TEXTS)
        second = client.classify(TEXTS * 3)
    kept = [a for a in second if a.tier == "mobile"]
    assert all(a.routed == "mobile" and not a.degraded and a.exit_layer == client.mobile.exit_layer for a in kept)
    assert 0.2 <= len(kept) / len(second) <= 0.8  # about the advised half
