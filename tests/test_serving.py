"""Three-tier serving on the tiny run: packages, ONNX, the tier servers (auth, limits, metrics, fuzz), the
mobile client end to end over loopback, faults, links, profile and the CLI. Loopback only; every loop bounded."""

from __future__ import annotations

import json
import random
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")

from fastapi.testclient import TestClient  # noqa: E402

from dimec.errors import ArtifactError, ConfigError, DataError, TierAuthError  # noqa: E402
from dimec.runtime.package import MANIFEST, read_manifest, resolve_package  # noqa: E402
from dimec.runtime.tier import TierModel  # noqa: E402
from dimec.serving.deploy.export import export_packages  # noqa: E402
from dimec.serving.deploy.local import ThreadServer, free_port  # noqa: E402
from dimec.serving.phone.client import Answer, MobileClient, RemoteResult, Timeouts  # noqa: E402
from dimec.serving.phone.links import LinkProfile, LinkTransport  # noqa: E402
from dimec.serving.servers.server import Limits, create_app  # noqa: E402

TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TEXTS = ["good movie", "the film was very boring", "a lovely plot and acting", "dull", "great fun", "poor acting",
         "the movie was quite weak and the plot dull", "superb", "the acting was fine", "awful and boring film"]


# ---- fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packages(tiny_run, tmp_path_factory):
    return export_packages(tiny_run, tmp_path_factory.mktemp("packages"), full=True, check_texts=TEXTS * 5)


@pytest.fixture(scope="module")
def models(packages):
    return {"edge": TierModel(packages["edge"]), "cloud": TierModel(packages["cloud"]),
            "mobile": TierModel(packages["mobile"], "onnx-int8"), "mobile_torch": TierModel(packages["mobile"])}


@pytest.fixture(scope="module")
def app(models):
    return create_app(None, "edge", TOKEN, Limits(max_body_bytes=4000, max_text_chars=200, max_batch=8),
                      model=models["edge"])


@pytest.fixture(scope="module")
def http(app):
    return TestClient(app)


@pytest.fixture(scope="module")
def servers(models):
    """Edge and cloud uvicorn servers on loopback ports, in threads of this process."""
    started = {tier: ThreadServer(create_app(None, tier, TOKEN, model=models[tier])).start()
               for tier in ("edge", "cloud")}
    yield started
    for server in started.values():
        server.stop()


def client_for(models, servers, **kw) -> MobileClient:
    kw.setdefault("timeouts", Timeouts(connect_s=0.5, read_s=5))
    return MobileClient(models["mobile"], servers["edge"].url, servers["cloud"].url, TOKEN, **kw)


# ---- packages and ONNX ----------------------------------------------------------------------------------------
def test_packages_hold_only_their_tiers_layers(packages, tiny_run):
    layers = json.loads((tiny_run / "model" / "dimec_model.json").read_text())["exit_layers"]
    for index, tier in enumerate(("mobile", "edge", "cloud")):
        manifest = read_manifest(packages[tier])
        assert manifest["tier"] == tier and manifest["exit_layers"] == layers
        assert manifest["exit_layer"] == layers[index]
        config = json.loads((packages[tier] / "model" / "config.json").read_text())
        assert config["num_hidden_layers"] == layers[index]
        assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    mobile = read_manifest(packages["mobile"])["files"]
    assert {"router.json", "model.onnx", "model.int8.onnx", "model/model.safetensors", "model/tokenizer.json"} <= \
        set(mobile)  # exported with full=True
    assert "router.json" not in read_manifest(packages["edge"])["files"]
    ids = {read_manifest(packages[t])["model_id"] for t in ("mobile", "edge", "cloud")}
    assert len(ids) == 1 and len(ids.pop()) == 64  # one identity for every package of one export


def test_tampered_package_is_refused(packages, tmp_path):
    import shutil

    copy = tmp_path / "edge"
    shutil.copytree(packages["edge"], copy)
    (copy / "model" / "dimec_model.json").write_text("{}")
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        read_manifest(copy)
    with pytest.raises(ArtifactError, match="not a tier package"):
        read_manifest(tmp_path)
    with pytest.raises(ConfigError, match="is the edge package"):
        resolve_package(packages["edge"], "cloud")


def test_onnx_int8_agrees_with_pytorch(packages, models):
    check = read_manifest(packages["mobile"])["onnx"]["check"]
    assert check["samples"] == len(TEXTS) * 5 and check["router"] == "auto"  # the run's calibrated policy
    fp32, int8 = check["onnx_fp32"], check["onnx_int8"]
    assert fp32["agreement"] == 1.0 and fp32["max_logit_diff"] < 1e-4 and fp32["max_hidden_diff"] < 1e-4
    assert fp32["route_agreement"] == fp32["decision_agreement"] == 1.0
    assert int8["agreement"] >= 0.9 and int8["max_logit_diff"] < 0.5
    assert int8["route_agreement"] >= 0.9 and int8["max_hidden_diff"] < 0.1 * int8["hidden_scale"]
    # dynamic axes: other batch sizes and lengths than the traced example; one graph gives all three outputs
    fp32_model = TierModel(packages["mobile"], "onnx")
    for texts in (["good"], TEXTS, [" ".join(TEXTS)]):
        batch = models["mobile"].encode(texts)
        ref = models["mobile_torch"].logits(batch)
        assert np.abs(models["mobile"].logits(batch) - ref).max() < 0.5
        assert np.allclose(fp32_model.embed(batch), models["mobile_torch"].embed(batch), atol=1e-5)
        assert np.abs(models["mobile"].embed(batch) - models["mobile_torch"].embed(batch)).max() < 0.05
        logits, hidden = models["mobile"].mobile_stage(batch)
        ref_logits, ref_hidden = models["mobile_torch"].mobile_stage(batch)
        assert np.allclose(logits, models["mobile"].logits(batch), atol=1e-5) and np.abs(logits - ref_logits).max() < 0.5
        lengths = batch.attention_mask.sum(1)
        assert [len(h) for h in hidden] == [len(h) for h in ref_hidden] == lengths.tolist()  # real tokens only
        assert max(np.abs(a - b).max() for a, b in zip(hidden, ref_hidden, strict=True)) < 0.5


def test_the_phone_downloads_one_int8_graph(tiny_run, tmp_path):
    """Default export: the mobile package holds one int8 ONNX graph (int8 embedding table included), the
    router and the tokenizer; no fp32 graph, no PyTorch weights. The int8 graph's word table is int8."""
    import onnx

    mobile = export_packages(tiny_run, tmp_path, tiers=("mobile",), check_texts=TEXTS)["mobile"]
    files = set(read_manifest(mobile)["files"])
    assert {"model.int8.onnx", "router.json", "model/dimec_model.json", "model/tokenizer.json"} <= files
    assert not {"model.onnx", "embed.onnx", "model/model.safetensors"} & files
    graph = onnx.load(str(mobile / "model.int8.onnx")).graph
    assert [o.name for o in graph.output] == ["logits", "embedding", "hidden"]
    tables = [i for i in graph.initializer if list(i.dims) == [27, 32]]  # (V, H): one copy of the word table
    assert len(tables) == 1 and tables[0].data_type == onnx.TensorProto.INT8
    matmuls = [i for i in graph.initializer if list(i.dims) in ([32, 32], [32, 37], [37, 32])]
    assert matmuls and all(i.data_type == onnx.TensorProto.INT8 for i in matmuls)  # every MatMul weight
    with pytest.raises(ArtifactError, match="--full"):
        TierModel(mobile, "torch")
    with pytest.raises(ArtifactError, match="--full"):
        resolve_package(tmp_path, "mobile", "onnx")
    assert resolve_package(tmp_path, "mobile", "onnx-int8") == mobile


def test_resolve_package_never_exports(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("packages"))
    with pytest.raises(ArtifactError, match="dimec export"):
        resolve_package(run, "edge")
    assert not (run / "packages").exists()
    from dimec.serving.deploy.export import ensure_package

    said = []
    edge = ensure_package(run, "edge", log=said.append)  # exports on request, and says so
    assert edge == run / "packages" / "edge" and "exporting it now" in said[0]
    assert ensure_package(run, "edge", log=said.append) == edge and len(said) == 2  # found: nothing said


def test_tier_models_match_the_multi_exit_model(models, tiny_run):
    import torch

    from dimec.pipeline import load_model

    full = load_model(tiny_run)
    batch = models["cloud"].encode(TEXTS)
    inputs = {k: torch.from_numpy(v) for k, v in batch.arrays().items()}
    with torch.no_grad():
        logits = full(**inputs)  # every exit
    for tier, index in (("mobile_torch", 0), ("edge", 1), ("cloud", 2)):
        assert np.allclose(models[tier].logits(batch), logits[index].numpy(), atol=1e-5)


# ---- server: auth, limits, health, metrics, openapi ---------------------------------------------------------------
def test_classify_needs_the_bearer_token(http):
    assert http.post("/v1/classify", json={"text": "good"}).status_code == 401
    for header in ("Bearer wrong", "Basic dGVzdA==", "Bearer", TOKEN, f"Bearer {TOKEN}x"):
        r = http.post("/v1/classify", json={"text": "good"}, headers={"Authorization": header})
        assert r.status_code == 401 and "token" in r.json()["error"]
        assert r.headers["www-authenticate"] == "Bearer"
    r = http.post("/v1/classify", json={"text": "good movie", "text_pair": "fine"}, headers=AUTH)
    assert r.status_code == 200
    body = r.json()
    assert body["tier"] == "edge" and body["labels"][0] in body["label_names"]
    # one answer shape: a plain request is the tier's own one-stage plan
    assert body["tiers"] == ["edge"] and body["exits"] == [1] and body["exit_layers"] == [2]
    assert abs(sum(body["probs"][0]) - 1) < 1e-4


def test_batch_answers_in_order_with_ids(http, models):
    r = http.post("/v1/classify", json={"texts": TEXTS[:8], "ids": [f"r{i}" for i in range(8)]}, headers=AUTH)
    assert r.status_code == 200
    body = r.json()
    assert body["ids"] == [f"r{i}" for i in range(8)]
    assert body["labels"] == models["edge"].classify(TEXTS[:8]).labels


@pytest.mark.parametrize("body, status, message", [
    ({"texts": ["good"] * 9}, 422, "over the limit of 8"),
    ({"text": "x" * 201}, 422, "201 characters"),
    ({"text": "good", "text_pair": "y" * 201}, 422, "characters"),
    ({"text": "   "}, 422, "empty"),
    ({"texts": []}, 422, "empty"),
    ({}, 422, "exactly one"),
    ({"text": "a", "texts": ["b"]}, 422, "exactly one"),
    ({"text": 3}, 422, "valid string"),
    ({"texts": "good"}, 422, "valid list"),
    ({"text": "a", "extra": 1}, 422, "Extra inputs"),
    ({"texts": ["a"], "ids": ["1", "2"]}, 422, "one entry per text"),
    ({"texts": ["a", "b"], "text_pairs": ["c"]}, 422, "one entry per text"),
    ({"texts": ["a"], "ids": ["x" * 129]}, 422, "128 characters"),
    ([1, 2], 422, "dictionary"),
])
def test_bad_requests_get_clear_422(http, body, status, message):
    r = http.post("/v1/classify", json=body, headers=AUTH)
    assert r.status_code == status
    assert message in json.dumps(r.json())


def test_body_size_limit_413(http):
    big = json.dumps({"text": "good " * 1000})
    r = http.post("/v1/classify", content=big, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413 and "4000 bytes" in r.json()["error"]

    def chunks():  # no content-length: the limit holds while streaming
        for _ in range(10):
            yield b"x" * 1000

    assert http.post("/v1/classify", content=chunks(), headers=AUTH).status_code == 413
    bad = http.post("/v1/classify", content=b"{not json", headers={**AUTH, "content-type": "application/json"})
    assert bad.status_code == 422


def test_healthz_metrics_openapi(http):
    health = http.get("/healthz").json()
    assert health["status"] == "ok" and health["tier"] == "edge"
    http.post("/v1/classify", json={"texts": ["good", "bad"]}, headers=AUTH)
    http.post("/v1/classify", json={"text": "good"})
    text = http.get("/metrics").text
    assert 'dimec_requests_total{path="/v1/classify",status="200"}' in text
    assert 'dimec_requests_total{path="/v1/classify",status="401"}' in text
    assert "dimec_request_latency_seconds_bucket" in text
    samples = [line for line in text.splitlines() if line.startswith('dimec_samples_total{tier="edge"}')]
    assert samples and float(samples[0].split()[-1]) >= 2
    schema = http.get("/openapi.json").json()
    assert "/v1/classify" in schema["paths"] and "ClassifyRequest" in schema["components"]["schemas"]


def test_apps_refuse_bad_setup(models, packages):
    with pytest.raises(ConfigError, match="token"):
        create_app(None, "edge", None, model=models["edge"])
    with pytest.raises(ConfigError, match="not cloud"):
        create_app(None, "cloud", TOKEN, model=models["edge"])
    # two apps in one process keep separate metrics
    other = TestClient(create_app(packages["cloud"], "cloud", TOKEN))
    assert "status=" not in other.get("/metrics").text.split("dimec_requests_total")[-1][:50]


def _random_json(rng: random.Random, depth: int = 0):
    kinds = ["str", "int", "float", "bool", "null", "list", "dict"] if depth < 3 else ["str", "int", "null"]
    kind = rng.choice(kinds)
    if kind == "str":
        return "".join(rng.choice("ab \u00e9\u4e2d\n\x00\"\\") for _ in range(rng.randint(0, 12)))
    if kind == "int":
        return rng.choice([0, -1, 1, 2**63, -(2**70), 10**30])
    if kind == "float":
        return rng.choice([0.5, -1e308, 1e308, float("nan")])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["text", "texts", "text_pair", "text_pairs", "ids", "x"]
    return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def test_fuzzed_bodies_never_get_5xx(http):
    rng = random.Random(1234)
    statuses = set()
    for _ in range(250):
        body = _random_json(rng)
        if rng.random() < 0.3 and isinstance(body, dict):  # near-valid: one good field, one random
            body = {"texts": [rng.choice(TEXTS)], rng.choice(["ids", "text_pairs", "text"]): _random_json(rng)}
        raw = json.dumps(body, allow_nan=True).encode()
        if rng.random() < 0.1:
            raw = raw[: rng.randint(0, len(raw))]  # truncated
        if rng.random() < 0.05:
            raw = bytes(rng.randrange(256) for _ in range(40))  # garbage
        ctype = rng.choice(["application/json", "text/plain", "application/x-www-form-urlencoded"])
        r = http.post("/v1/classify", content=raw, headers={**AUTH, "content-type": ctype})
        statuses.add(r.status_code)
        assert r.status_code < 500, (raw, r.text)
        if r.status_code != 200:
            assert "error" in r.json()
    deep = b"[" * 3000 + b"]" * 3000  # under the byte limit, deeper than the JSON parser's recursion
    assert http.post("/v1/classify", content=deep, headers={**AUTH, "content-type": "application/json"}).status_code < 500
    assert statuses <= {200, 413, 422}  # 400 is no more: an unparsable body is a 422 too


# ---- links -----------------------------------------------------------------------------------------------------
def test_link_profiles_parse_and_delay():
    assert LinkProfile.parse("4g,loss=0.05").loss == 0.05
    assert LinkProfile.parse("latency=20,jitter=2,bandwidth=10").bandwidth_mbit == 10
    assert LinkProfile.parse(None).is_ideal
    for bad in ("latency=x", "speed=3", "mars", "loss=1.5", "bandwidth=0"):
        with pytest.raises(ConfigError):
            LinkProfile.parse(bad)
    rng = random.Random(0)
    slow = LinkProfile(latency_ms=40, bandwidth_mbit=1)
    assert slow.one_way_s(125_000, rng) == pytest.approx(0.02 + 1.0)  # 1 Mbit at 1 Mbit/s


def test_link_transport_adds_latency_and_drops(servers):
    import httpx

    url = f"{servers['edge'].url}/healthz"
    with httpx.Client(transport=LinkTransport(LinkProfile(latency_ms=60))) as http:
        start = time.perf_counter()
        assert http.get(url).status_code == 200
        assert time.perf_counter() - start >= 0.06
    with httpx.Client(transport=LinkTransport(LinkProfile(loss=0.99), seed=1)) as http:
        with pytest.raises(httpx.TransportError):
            for _ in range(20):
                http.get(url)


# ---- mobile client end to end over loopback ----------------------------------------------------------------------
def test_three_tiers_end_to_end_match_the_pipeline(models, servers, tiny_run):
    from dimec.pipeline import route_texts

    expected = route_texts(tiny_run, TEXTS)  # torch fp32, fixed router, one process
    with client_for(models, servers, backend="torch") as client:
        client.mobile = models["mobile_torch"]
        answers = client.classify(TEXTS, ids=[f"q{i}" for i in range(len(TEXTS))])
    assert [a.id for a in answers] == [f"q{i}" for i in range(len(TEXTS))]
    assert [a.tier for a in answers] == [e["tier"] for e in expected]
    assert [a.label for a in answers] == [e["label"] for e in expected]
    assert not any(a.fallback or a.degraded for a in answers)
    layers = models["cloud"].exit_layers
    assert all(a.exit_layer == layers[("mobile", "edge", "cloud").index(a.tier)] for a in answers)


@pytest.mark.parametrize("routing", ["edge-only", "cloud-only", "fixed", "router"])
def test_every_routing_answers_each_request_once(models, servers, routing):
    with client_for(models, servers, routing=routing) as client:
        answers = client.classify(TEXTS * 2)
        stats = client.stats()
    assert len({a.id for a in answers}) == len(answers) == 2 * len(TEXTS)
    assert stats["answers"] == len(answers) and stats.get("fallbacks", 0) == 0
    if routing in ("edge-only", "cloud-only"):
        assert {a.tier for a in answers} == {routing.split("-")[0]}


def test_dynamic_routing_moves_the_pool_means(models, servers, packages, tiny_run, tmp_path):
    """DIMEC-DC Dynamic on the client: a DIMEC router.json served with --routing dynamic; each sample moves
    its pool's mean (shared by the client's threads); the package's own means stay."""
    import shutil

    from dimec.pipeline import load_cartography, load_cost_model, load_saved_config, split_outputs
    from dimec.routing.base import save_router
    from dimec.routing.dimec import DimecFixedRouter
    from dimec.runtime.package import write_manifest

    cfg = load_saved_config(tiny_run)
    fixed = DimecFixedRouter.from_config(cfg.calibration).fit(
        split_outputs(tiny_run, "validation"), load_cost_model(tiny_run), load_cartography(tiny_run, cfg.calibration))
    mobile = tmp_path / "mobile"
    shutil.copytree(packages["mobile"], mobile)
    save_router(fixed, mobile / "router.json", load_cost_model(tiny_run))
    manifest = read_manifest(mobile, verify=False)
    manifest.pop("files")
    write_manifest(mobile, manifest)
    with MobileClient(mobile, servers["edge"].url, servers["cloud"].url, TOKEN, routing="dynamic") as client:
        before = client.online.counts.copy()
        answers = client.classify(TEXTS * 2)
        assert client.online.counts.sum() == before.sum() + len(answers)
        assert not client.router.prerouter_.online and client.router.prerouter_.counts.sum() == before.sum()
    assert len({a.id for a in answers}) == 2 * len(TEXTS) and not any(a.fallback for a in answers)
    from dimec.routing import make_router

    save_router(make_router("cloud-only").fit(split_outputs(tiny_run, "validation"), load_cost_model(tiny_run)),
                mobile / "router.json", load_cost_model(tiny_run))  # no pool means to move
    write_manifest(mobile, manifest)
    with pytest.raises(ConfigError, match="pool means"):
        MobileClient(mobile, routing="dynamic")


def test_client_rejects_bad_input(models, servers):
    with client_for(models, servers) as client:
        for texts, kw in (([], {}), (["ok", " "], {}), ("a string", {}), (["a", "b"], {"ids": ["x", "x"]}),
                          (["a"], {"pairs": ["b", "c"]})):
            with pytest.raises(DataError):
                client.classify(texts, **kw)


def test_fallbacks_edge_down_cloud_down_both_down(models, servers):
    """Stop a tier mid-run: answers come from the other tier (edge<->cloud), then the mobile exit."""
    with client_for(models, servers, routing="edge-only", retries=1, cooldown_s=0.2) as client:
        before = client.classify(TEXTS[:3])
        assert {a.tier for a in before} == {"edge"}
        servers["edge"].stop()
        try:
            moved = client.classify(TEXTS[:3])
            assert {a.tier for a in moved} == {"cloud"} and all(a.fallback and not a.degraded for a in moved)
            assert "edge" in moved[0].errors[0]
            servers["cloud"].stop()
            degraded = client.classify(TEXTS[:3])
            assert all(a.tier == "mobile" and a.degraded for a in degraded)
            assert len(degraded[0].errors) == 2
        finally:
            servers["edge"].start()
            servers["cloud"].start()
        time.sleep(0.25)  # past the cooldown: the edge is tried again
        back = client.classify(TEXTS[:3])
        assert {a.tier for a in back} == {"edge"}
        stats = client.stats()
    assert stats["answers"] == 12 and stats["fallbacks"] == 6 and stats["degraded"] == 3
    with client_for(models, servers, routing="cloud-only", retries=0) as client:
        servers["cloud"].stop()
        try:
            assert {a.tier for a in client.classify(TEXTS[:2])} == {"edge"}  # cloud down -> edge
        finally:
            servers["cloud"].start()


def test_edge_killed_under_concurrent_load_loses_nothing(models, servers):
    """Concurrent clients while the edge goes down and comes back: each request answered exactly once,
    each fallback counted."""
    sent: list[str] = []
    answers: list[Answer] = []
    lock = threading.Lock()

    def wait_for(count: int) -> None:  # bounded: the workers make progress or the test fails
        deadline = time.monotonic() + 30
        while len(answers) < count and time.monotonic() < deadline:
            time.sleep(0.005)

    with client_for(models, servers, routing="edge-only", retries=1, cooldown_s=0.05) as client:
        def worker(w: int) -> None:
            for i in range(40):
                rid = f"w{w}-{i}"
                with lock:
                    sent.append(rid)
                got = client.classify([TEXTS[i % len(TEXTS)]], ids=[rid])
                with lock:
                    answers.extend(got)

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        wait_for(20)
        servers["edge"].stop()
        down_at = len(answers)
        wait_for(down_at + 30)
        servers["edge"].start()
        back_at = len(answers)
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        stats = client.stats()
    assert sorted(a.id for a in answers) == sorted(sent) and len(sent) == 160
    fallbacks = sum(a.fallback for a in answers)
    assert stats["fallbacks"] == fallbacks > 0 and stats["answers"] == 160
    assert all(a.tier in ("edge", "cloud") for a in answers)
    assert any(a.tier == "edge" for a in answers[back_at + 8 :]) or back_at > 150  # the edge is used again


def test_lossy_link_retries_and_never_loses(models, servers):
    links = {"edge": LinkProfile(latency_ms=2, loss=0.3), "cloud": LinkProfile(latency_ms=2, loss=0.3)}
    with client_for(models, servers, routing="edge-only", retries=3, links=links, cooldown_s=0.0) as client:
        answers = [a for i in range(30) for a in client.classify([TEXTS[i % 10]], ids=[str(i)])]
        stats = client.stats()
    assert [a.id for a in answers] == [str(i) for i in range(30)]
    assert stats["retries"] > 0
    assert stats["fallbacks"] == sum(a.fallback for a in answers)


def test_client_refuses_to_hide_a_wrong_token(models, servers):
    """A 401 is a misconfiguration, not an outage: an error, never a silent degraded answer."""
    client = MobileClient(models["mobile"], servers["edge"].url, servers["cloud"].url, "wrong", routing="edge-only")
    with client, pytest.raises(TierAuthError, match="refused this client's token.*401"):
        client.classify(["good"])
    assert client.stats().get("degraded", 0) == 0


def test_request_refused_by_the_servers_is_answered_on_the_mobile(models, servers):
    with client_for(models, servers, routing="edge-only", cooldown_s=30) as client:
        long = client.classify(["good " * 5000])[0]  # over the servers' 20,000 characters
        assert long.degraded and "refused" in long.errors[0] and "refused" in long.errors[1]
        assert client.classify(["good"])[0].tier == "edge"  # the tier was not put on cooldown


def test_client_refuses_a_tier_serving_another_model(models):
    class OtherModel:  # any Remote works (Ray handles, test doubles)
        name = "edge"

        def available(self) -> bool:
            return True

        def classify(self, texts, pairs, ids) -> RemoteResult:
            return RemoteResult(np.full((len(texts), 2), 0.5, np.float32), ["x", "y"], ["edge"] * len(texts),
                                [1] * len(texts))

    with MobileClient(models["mobile"], routing="edge-only", remotes={"edge": OtherModel()}) as client:
        answer = client.classify(["good"])[0]
    assert answer.degraded and "another model" in answer.errors[0]


# ---- profile and CLI --------------------------------------------------------------------------------------------
def test_profile_writes_the_cost_model_file(tiny_run, servers, tmp_path, packages):
    from dimec.costs import CostModel
    from dimec.serving.ops.profile import PROFILE_KEYS, profile_run

    out = tmp_path / "profile.json"
    root = packages["mobile"].parent  # an export folder works as well as a run directory
    profile = profile_run(root, servers["edge"].url, servers["cloud"].url, TOKEN, samples=5, out=out,
                          texts=TEXTS, links={"edge": LinkProfile(latency_ms=10)}, log=lambda _: None)
    assert set(json.loads(out.read_text())) == set(PROFILE_KEYS) == set(profile)
    assert all(v > 0 for v in profile.values())
    assert profile["o_e_ms"] >= 10  # the emulated link's round trip is offload time
    details = json.loads((tmp_path / "profile_details.json").read_text())
    assert details["edge"]["throughput_mbit"] > 0 and details["mobile"]["backend"] == "onnx-int8"
    cost = CostModel.from_profile(out, (1, 2, 2))
    assert cost.o_e > 0 and cost.cloud_fee > 0
    # the hidden state after layer m against the raw text, on the same links: bytes and time
    for tier in ("edge", "cloud"):
        assert details[tier]["hidden"]["request_bytes"] > details[tier]["request_bytes"]
        assert details[tier]["hidden_state_factor"] > 0
    assert profile["hidden_state_factor"] == pytest.approx(
        (details["edge"]["hidden_state_factor"] + details["cloud"]["hidden_state_factor"]) / 2, abs=1e-3)
    assert cost.hidden_state_factor == profile["hidden_state_factor"]


def test_cli_export_and_client(tiny_run, servers, tmp_path, capsys, monkeypatch):
    from dimec.cli import main

    assert main(["export", str(tiny_run), "--out", str(tmp_path / "pk"), "--no-onnx"]) == 0
    assert (tmp_path / "pk" / "cloud" / MANIFEST).is_file() and "cloud  package" in capsys.readouterr().out
    monkeypatch.setenv("DIMEC_TOKEN", TOKEN)
    code = main(["client", str(tmp_path / "pk" / "mobile"), "good movie", "boring film", "--edge-url",
                 servers["edge"].url, "--cloud-url", servers["cloud"].url, "--backend", "torch"])
    out = capsys.readouterr()
    lines = [json.loads(line) for line in out.out.strip().splitlines()]
    assert code == 0 and [x["text"] for x in lines] == ["good movie", "boring film"] and '"answers": 2' in out.err
    monkeypatch.delenv("DIMEC_TOKEN")
    assert main(["serve", "edge", str(tmp_path / "pk" / "edge")]) == 2
    assert "no bearer token" in capsys.readouterr().err
    assert main(["client", str(tmp_path / "pk" / "mobile"), "good"]) == 2  # no remote tier given
    assert main(["client", str(tmp_path / "pk" / "edge"), "x", "--cloud-url", "http://127.0.0.1:9"]) == 2


def test_cli_serve_builds_the_app_on_loopback(packages, monkeypatch, capsys):
    import dimec.serving.cli as serving_cli
    from dimec.cli import main

    seen = {}
    monkeypatch.setattr(serving_cli, "run_server",
                        lambda app, sock, log_level: seen.update(app=app, address=sock.getsockname()))
    with pytest.raises(SystemExit) as stop:  # argparse: one line, exit 2
        main(["serve", "cloud", str(packages["cloud"]), "--token", TOKEN, "--port", "0"])
    assert stop.value.code == 2 and "out of range" in capsys.readouterr().err  # port 0 would bind a random port, not the one printed
    port = free_port()
    assert main(["serve", "cloud", str(packages["cloud"]), "--token", TOKEN, "--max-batch", "3",
                 "--port", str(port)]) == 0
    assert seen["address"] == ("127.0.0.1", port)
    assert f"http://127.0.0.1:{port}" in capsys.readouterr().out
    r = TestClient(seen["app"]).post("/v1/classify", json={"texts": ["a"] * 4}, headers=AUTH)
    assert r.status_code == 422 and "limit of 3" in r.json()["error"]
    assert main(["serve", "edge", str(packages["cloud"]), "--token", TOKEN]) == 2  # wrong package for the tier
    assert "is the cloud package" in capsys.readouterr().err


# ---- what the phone loads ----------------------------------------------------------------------------------------
PHONE_MODULES = {"dimec", "dimec.atomic", "dimec.config", "dimec.costs", "dimec.errors", "dimec.rundir",
                 "dimec.textinput", "dimec.tiers", "dimec.serving", "dimec.serving.phone", "dimec.serving.phone.client",
                 "dimec.serving.phone.constraints", "dimec.serving.phone.links", "dimec.serving.phone.remote"}


def test_the_phone_client_loads_only_the_runtime_and_plan_data(packages):
    """Importing the client, loading the int8 mobile package with its calibrated policy and answering a text
    (no tier reachable: answered on the device) pulls in the runtime and the plan data of dimec, never a
    router, the model code or training. (torch itself still comes in through transformers' AutoTokenizer,
    which imports it whenever it is installed; the import alone does not.)"""
    import subprocess
    import sys

    code = ("import sys, json; from dimec.serving.phone.client import MobileClient; "
            f"c = MobileClient({str(packages['mobile'])!r}, backend='onnx-int8'); c.classify(['good movie']); "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('dimec'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    extra = [m for m in loaded if m not in PHONE_MODULES and not m.startswith("dimec.runtime")]
    assert not extra, f"the phone client loads {extra}"
