"""Live control over loopback on the tiny run: calibration records the path, the cloud answers shadows and
feedback, clients follow the policy by ETag, and the bad inputs of issue 18 (feedback flood, contradictions,
another version, shadows that time out, a cloud that is down) are handled with no 5xx and nothing lost."""

from __future__ import annotations

import json
import random
import shutil
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")

from fastapi.testclient import TestClient  # noqa: E402

from dimec.runtime.tier import TierModel  # noqa: E402
from dimec.serving.deploy.export import export_packages  # noqa: E402
from dimec.serving.deploy.local import ThreadServer, free_port  # noqa: E402
from dimec.serving.live.controller import LiveControl, LiveSettings  # noqa: E402
from dimec.serving.live.http import PolicyFollower, ShadowSender, apply_policy, live_lines  # noqa: E402
from dimec.serving.phone.client import MobileClient, Timeouts  # noqa: E402
from dimec.serving.servers.server import create_app  # noqa: E402

TOKEN = "live-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TEXTS = ["good movie", "the film was very boring", "a lovely plot and acting", "dull", "great fun", "poor acting",
         "the movie was quite weak and the plot dull", "superb", "the acting was fine", "awful and boring film"]


@pytest.fixture(scope="module")
def run(unscaled_tiny_run, tmp_path_factory):
    """A copy of the tiny run (the controller writes its router.json) with a path of at least two steps."""
    run_dir = tmp_path_factory.mktemp("live") / "run"
    shutil.copytree(unscaled_tiny_run, run_dir, ignore=shutil.ignore_patterns("packages"))
    raw = json.loads((run_dir / "router.json").read_text())
    path = raw["state"]["path"]
    if len(path) < 2:  # the tiny model may admit only its choice: add cloud-only in front, as calibration would
        cloud = {"family": "cloud-only", "describe": "cloud@l", "val_disagreement_pt": 0.0,
                 "val_accuracy_loss_pt": 0.0, "val_cost": 1.0,
                 "state": {"plans": [[["cloud", 2, None]]], "confidence": "max_prob", "prerouter": None}}
        raw["state"]["path"] = [cloud, *path]
        (run_dir / "router.json").write_text(json.dumps(raw))
    return run_dir


@pytest.fixture(scope="module")
def models(run, tmp_path_factory):
    packages = export_packages(run, tmp_path_factory.mktemp("packages"), full=True, check_texts=TEXTS * 5)
    return {"edge": TierModel(packages["edge"]), "cloud": TierModel(packages["cloud"]),
            "mobile": TierModel(packages["mobile"], "onnx-int8")}


def live_for(run, models, **settings) -> LiveControl:
    return LiveControl.from_router_file(run / "router.json", len(models["cloud"].label_names),
                                        LiveSettings(**settings))


@pytest.fixture()
def cloud(run, models):
    live = live_for(run, models, shadow_rate=1.0, min_evidence=5, feedback_rate=100, feedback_burst=200)
    app = create_app(None, "cloud", TOKEN, model=models["cloud"], live=live)
    return app, live


def test_calibration_records_the_path(unscaled_tiny_run):
    raw = json.loads((unscaled_tiny_run / "router.json").read_text())
    path = raw["state"]["path"]
    assert path and path[-1]["state"]["plans"] == raw["state"]["plans"]  # it ends at the calibrated choice
    if len(path) > 1:
        assert path[0]["family"] == "cloud-only"
        costs = [e["val_cost"] for e in path]
        assert costs == sorted(costs, reverse=True)  # safest (dearest) first
    for e in path:
        assert e["val_accuracy_loss_pt"] <= raw["params"]["calibration"]["max_loss"] + 1e-9


def test_shadows_feedback_and_policy_end_to_end(cloud, models):
    app, live = cloud
    http = TestClient(app)
    ids = [f"t{i}" for i in range(len(TEXTS))]
    items = [{"id": rid, "version": 1, "label_id": 0, "text": t} for rid, t in zip(ids, TEXTS, strict=True)]
    r = http.post("/v1/shadow", json={"items": items, "texts": 20}, headers=AUTH)
    assert r.status_code == 200 and r.json()["recorded"] == len(TEXTS)
    cloud_labels = models["cloud"].classify(TEXTS).label_ids
    ev = live.ledger.of(1)
    assert ev.disagreement.n == len(TEXTS) and ev.disagreement.total == float((cloud_labels != 0).sum())
    # feedback: bad inputs are 4xx and count nothing
    assert http.post("/v1/feedback", json={"items": [{"id": "t0", "label": 0}]}).status_code == 401
    cases = [({"items": [{"id": "nope", "label": 0}]}, 404), ({"items": [{"id": "t0", "label": 9}]}, 422),
             ({"items": [{"id": "t0", "label": "maybe"}]}, 422), ({"items": []}, 422), ({"items": "x"}, 422),
             ({"items": [{"id": "t0", "label": 0}, {"id": "t0", "label": 0}]}, 422)]
    for body, status in cases:
        assert http.post("/v1/feedback", json=body, headers=AUTH).status_code == status, body
    assert ev.accuracy.n == 0
    name = models["cloud"].label_names[1]
    r = http.post("/v1/feedback", json={"items": [{"id": "t0", "label": 0}, {"id": "t1", "label": name}]},
                  headers=AUTH)
    assert r.status_code == 200 and r.json()["counted"] == {"1": 2}
    r = http.post("/v1/feedback", json={"items": [{"id": "t0", "label": 1}]}, headers=AUTH)  # contradicting
    assert r.status_code == 409 and "not counted" in r.json()["error"]
    assert http.post("/v1/feedback", json={"items": [{"id": "t1", "label": 1}]}, headers=AUTH).status_code == 409
    assert ev.accuracy.n == 2
    # the policy, with its ETag
    assert http.get("/v1/policy").status_code == 401
    r = http.get("/v1/policy", headers=AUTH)
    assert r.status_code == 200 and r.json()["version"] == 1 and r.headers["etag"] == r.json()["etag"]
    assert http.get("/v1/policy", headers={**AUTH, "If-None-Match": r.headers["etag"]}).status_code == 304
    metrics = http.get("/metrics").text
    for gauge in ("dimec_live_disagreement_high", "dimec_live_policy_version", "dimec_live_shadow_share",
                  "dimec_live_disagreement "):
        assert gauge in metrics
    status = http.get("/v1/live").json()
    assert status["counts"]["shadowed"] == len(TEXTS) and status["shadow_share"] == len(TEXTS) / 20


def test_feedback_flood_is_rate_limited_and_never_5xx(cloud):
    app, live = cloud
    http = TestClient(app)
    items = [{"id": f"f{i}", "version": 1, "label_id": 0, "free": True} for i in range(300)]
    assert http.post("/v1/shadow", json={"items": items}, headers=AUTH).status_code == 200
    statuses = []
    for start in range(0, 300, 50):
        body = {"items": [{"id": f"f{i}", "label": 1} for i in range(start, start + 50)]}
        statuses.append(http.post("/v1/feedback", json=body, headers=AUTH).status_code)
    assert statuses[:4] == [200] * 4 and 429 in statuses  # burst 200, then the token's rate
    assert sum(live.ledger.evidence[1].accuracy.n for _ in [0]) == 200
    assert live.controller.step <= len(live.controller.steps) - 1
    rng = random.Random(0)
    for _ in range(60):  # fuzzed bodies: never a 5xx
        body = rng.choice([b"{", b"[]", b"null", json.dumps({"items": [{"id": rng.random(), "label": [1]}]}).encode(),
                           json.dumps({"items": [{"id": "f1", "label": rng.randint(-5, 5)}] * rng.randint(1, 3)}).encode(),
                           json.dumps({"items": [{"id": "x" * 500, "label": 0}]}).encode(), "\udc80".encode("utf-8", "surrogatepass")])
        for path in ("/v1/feedback", "/v1/shadow"):
            r = http.post(path, content=body, headers={**AUTH, "Content-Type": "application/json"})
            assert r.status_code < 500, (path, body, r.text)


def test_shadow_items_need_text_and_ids_count_once(cloud):
    app, live = cloud
    http = TestClient(app)
    assert http.post("/v1/shadow", json={"items": [{"id": "a", "version": 1, "label_id": 0}]},
                     headers=AUTH).status_code == 422
    body = {"items": [{"id": "a", "version": 1, "label_id": 0, "text": "good"}]}
    http.post("/v1/shadow", json=body, headers=AUTH)
    http.post("/v1/shadow", json=body, headers=AUTH)
    assert live.ledger.of(1).disagreement.n == 1 and live.counts["duplicates"] == 1


def test_client_shadows_off_the_critical_path_and_follows_the_policy(run, models):
    live = live_for(run, models, shadow_rate=1.0, min_evidence=3, poll_s=0.05)
    edge = ThreadServer(create_app(None, "edge", TOKEN, model=models["edge"])).start()
    cloud = ThreadServer(create_app(None, "cloud", TOKEN, model=models["cloud"], live=live)).start()
    try:
        client = MobileClient(models["mobile"], edge.url, cloud.url, TOKEN, timeouts=Timeouts(0.5, 5))
        plain = MobileClient(models["mobile"], edge.url, cloud.url, TOKEN, timeouts=Timeouts(0.5, 5))
        client.live = ShadowSender(cloud.url, TOKEN, LiveSettings(shadow_rate=1.0), seed=0,
                                   cloud_exit_layer=models["mobile"].exit_layers[2])
        follower = PolicyFollower(cloud.url, TOKEN, lambda p: apply_policy(client, p), poll_s=0.05)
        assert not follower.poll() or follower.version == 1
        answers = client.classify(TEXTS * 3)
        expected = plain.classify(TEXTS * 3)
        assert [a.label_id for a in answers] == [a.label_id for a in expected]  # the user's answers unchanged
        assert all("shadowed" in a.flags for a in answers)
        client.live.flush()
        status = live.status()
        assert status["counts"]["shadowed"] + status["counts"]["free"] == len(answers)
        assert status["counts"]["texts_reported"] == len(answers)
        # force drift: every answer reported as disagreeing moves the policy one step safer ...
        start_step = live.controller.step
        wrong = [{"id": f"w{i}", "version": live.controller.version, "label_id": 1 - int(k), "text": t}
                 for i, (t, k) in enumerate(zip(TEXTS * 3, models["cloud"].classify(TEXTS * 3).label_ids, strict=True))]
        client.live.http.post("/v1/shadow", json={"items": wrong})
        assert live.controller.step == start_step - 1 and live.controller.version == 2
        # ... and the client picks it up without restart
        assert follower.poll() and follower.version == 2 and client.live.version == 2
        assert client.plans == [tuple(p) for p in client.router.plans_]
        assert not follower.poll()  # 304: nothing new
        stats = client.live.stats()
        assert stats["shadow_missing"] == 0 and stats["shadow_sampled"] == len(answers)
        line = live_lines([cloud.url])[0]
        assert "policy v2" in line and "NO EVIDENCE" in line  # the evidence restarts with each version
        client.close()
        plain.close()
        follower.close()
    finally:
        edge.stop()
        cloud.stop()


def test_cloud_down_pauses_shadowing_and_timeouts_are_missing(models):
    """No cloud at all: users still get answers at once (from the edge or the mobile), the shadows are
    counted missing, never as agreement, and the sender pauses instead of retrying each text."""
    dead = f"http://127.0.0.1:{free_port()}"
    edge = ThreadServer(create_app(None, "edge", TOKEN, model=models["edge"])).start()
    try:
        client = MobileClient(models["mobile"], edge.url, dead, TOKEN, timeouts=Timeouts(0.2, 1), retries=0)
        client.live = ShadowSender(dead, TOKEN, LiveSettings(shadow_rate=1.0, shadow_timeout_s=0.3), seed=0,
                                   cloud_exit_layer=models["mobile"].exit_layers[2])
        start = time.perf_counter()
        answers = client.classify(TEXTS)
        assert len(answers) == len(TEXTS) and time.perf_counter() - start < 5
        client.live.flush(timeout_s=5)
        more = client.classify(TEXTS)  # during the pause: not queued, counted
        assert len(more) == len(TEXTS)
        stats = client.live.stats()
        assert stats["shadow_failures"] >= 1 and stats["shadow_paused"] >= 1
        assert stats["shadow_missing"] == stats["shadow_sampled"] - stats["shadow_sent"] - stats["shadow_free"]
        client.close()
    finally:
        edge.stop()


def test_private_texts_are_never_shadowed_to_an_untrusted_cloud(run, models):
    from dimec.serving.phone.constraints import Constraints, FleetPolicy

    live = live_for(run, models, shadow_rate=1.0)
    cloud = ThreadServer(create_app(None, "cloud", TOKEN, model=models["cloud"], live=live)).start()
    try:
        client = MobileClient(models["mobile"], None, cloud.url, TOKEN, fleet=FleetPolicy(trusted=()))
        client.live = ShadowSender(cloud.url, TOKEN, LiveSettings(shadow_rate=1.0))
        client.classify(TEXTS, constraints=Constraints(private=True))
        client.live.flush()
        assert client.live.stats()["shadow_private"] == len(TEXTS)
        assert live.counts["shadowed"] == 0 and live.counts["free"] == 0
        client.classify(TEXTS[:3])  # not private: shadowed
        client.live.flush()
        assert live.counts["shadowed"] + live.counts["free"] == 3
        client.close()
    finally:
        cloud.stop()


def test_a_slow_shadow_is_missing_not_agreement(run, models):
    """A cloud that takes longer than the shadow timeout: the client counts the shadow missing and reports it."""
    live = live_for(run, models, shadow_rate=1.0)
    slow = models["cloud"]
    app = create_app(None, "cloud", TOKEN, model=slow, live=live)
    original = slow.classify

    def sleepy(texts, pairs=None):
        time.sleep(0.6)
        return original(texts, pairs)

    cloud = ThreadServer(app).start()
    try:
        sender = ShadowSender(cloud.url, TOKEN, LiveSettings(shadow_rate=1.0, shadow_timeout_s=0.2))
        answers = MobileClient(models["mobile"], None, cloud.url, TOKEN, routing="mobile-only").classify(TEXTS[:4])
        slow.classify = sleepy
        sender.after(TEXTS[:4], None, answers)
        sender.flush(timeout_s=5)
        assert sender.stats()["shadow_missing"] == 4
        slow.classify = original
        time.sleep(1.1)  # the pause after a failure
        sender.after(TEXTS[4:5], None, [answers[0].__class__(**{**answers[0].to_dict(), "id": "later", "flags": []})])
        sender.flush(timeout_s=5)
        assert live.ledger.of(1).missing >= 4  # the client reported what it lost
        sender.close()
    finally:
        slow.classify = original
        cloud.stop()
    assert np.isfinite(live.status()["shadow_cost"])
