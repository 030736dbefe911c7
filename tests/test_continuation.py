"""Model-distributed paths across processes on the tiny run: the hidden-state wire format, /v1/continue and
plans on /v1/classify (bad input: a clear 4xx, the server stays healthy), the mobile client running any
PlanRouter (cascade, raw offload with the rest of a plan, edge -> cloud forwarding) with fallbacks, the
client's imports, and `dimec serve --cloud-url`. Loopback only; every loop bounded."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")

from conftest import edge_and_cloud, mobile_package_with_router, tier_models  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from dimec.routing.base import ROUTERS, register  # noqa: E402
from dimec.routing.plan import PlanRouter, Stage, check_plan, confidence  # noqa: E402
from dimec.runtime import wire  # noqa: E402
from dimec.runtime.prerouters import PREROUTERS  # noqa: E402
from dimec.serving.deploy.export import export_packages  # noqa: E402
from dimec.serving.phone.client import MobileClient, substitute_tier  # noqa: E402
from dimec.serving.phone.remote import Timeouts  # noqa: E402
from dimec.serving.servers.server import Limits, create_app  # noqa: E402
from dimec.tiers import CLOUD, EDGE, MOBILE  # noqa: E402

TOKEN = "test-token-continue"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HIDDEN = {**AUTH, "Content-Type": wire.CONTENT_TYPE}
TEXTS = ["good movie", "the film was very boring", "a lovely plot and acting", "dull", "great fun", "poor acting",
         "the movie was quite weak and the plot dull", "superb", "the acting was fine", "awful and boring film",
         "fun", "the plot was bad but the acting was lovely", "very very good", "a weak film and a dull plot"]
CASCADE = check_plan((Stage(MOBILE, 0, 0.0), Stage(EDGE, 1, 0.0), Stage(CLOUD, 2)))  # thresholds set below


# ---- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packages(unscaled_tiny_run, tmp_path_factory):
    return export_packages(unscaled_tiny_run, tmp_path_factory.mktemp("cont_packages"), full=True, check_texts=TEXTS)


@pytest.fixture(scope="module")
def models(packages):
    return tier_models(packages)


@pytest.fixture(scope="module")
def servers(models):
    with edge_and_cloud(models, TOKEN) as servers:
        yield servers


@pytest.fixture(scope="module")
def edge_http(models):
    """An edge app with small limits and no cloud behind it, in-process."""
    limits = Limits(max_body_bytes=4000, max_text_chars=200, max_batch=4, max_hidden_bytes=60_000)
    return TestClient(create_app(None, "edge", TOKEN, limits, model=models["edge"]))


@pytest.fixture(scope="module")
def reference(unscaled_tiny_run, models):
    """Every exit's probabilities for TEXTS from the run's full PyTorch model, one text at a time."""
    import torch

    from dimec.pipeline import load_model

    full = load_model(unscaled_tiny_run)
    probs = []
    for text in TEXTS:
        batch = models["cloud"].encode([text])
        with torch.no_grad():
            logits = full(**{k: torch.from_numpy(v) for k, v in batch.arrays().items()})
        probs.append([models["cloud"].exit_probs(x.numpy(), i)[0] for i, x in enumerate(logits)])
    return np.asarray(probs)  # (N, 3, C)


class _ByLength:
    """A test-only pre-router: plan = token count modulo the number of plans. (The phone serves a plan router
    as its plans and its pre-router, runtime/policy.py; a pre-router kind is registered in PREROUTERS.)"""

    kind = "test-by-length"

    def __init__(self, plans: int) -> None:
        self.plans = plans

    def choose(self, embeddings, lengths):
        return np.asarray(lengths) % self.plans

    def describe(self) -> str:
        return "token count modulo the number of plans"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "plans": self.plans}

    @classmethod
    def from_dict(cls, raw: dict) -> _ByLength:
        return cls(int(raw["plans"]))


class _ByLengthRouter(PlanRouter):
    """A test-only plan router: its plans, chosen by _ByLength."""


@pytest.fixture(scope="module")
def router_name():
    name = "test-by-length"
    register(name)(_ByLengthRouter)
    PREROUTERS[_ByLength.kind] = _ByLength
    yield name
    ROUTERS.pop(name, None)
    PREROUTERS.pop(_ByLength.kind, None)


def mobile_with(packages, tmp_path, router_name, plans, kind="max_prob"):
    """A copy of the mobile package whose router.json holds `plans` (manifest rewritten to match)."""
    router = _ByLengthRouter()
    router.plans_, router.confidence_ = [check_plan(p) for p in plans], kind
    router.prerouter_ = _ByLength(len(plans))
    return mobile_package_with_router(packages["mobile"], tmp_path / "mobile", router)


def thresholds(reference, kind="max_prob"):
    """Mobile and edge thresholds that split the samples near the middle, in the widest gap between
    confidences there (so float rounding and fp16 on the wire cannot move a sample across)."""
    out = []
    for exit_index in (0, 1):
        c = np.sort(confidence(reference[:, exit_index], kind))
        lo, hi = len(c) // 4, 3 * len(c) // 4
        i = lo + int(np.argmax(np.diff(c[lo : hi + 1])))
        out.append(float((c[i] + c[i + 1]) / 2))
    return tuple(out)


def expected_cascade(reference, plan, kind="max_prob"):
    """(tier, exit, margin) per sample when `plan` runs on exact probabilities; margin: the smallest distance
    between a confidence and the threshold it was compared with."""
    out = []
    for probs in reference:
        margin = np.inf
        for stage in plan:
            conf = float(confidence(probs[stage.exit], kind))
            if stage.threshold is not None:
                margin = min(margin, abs(conf - stage.threshold))
            if stage.threshold is None or conf >= stage.threshold:
                out.append((stage.tier, stage.exit, margin))
                break
    return out


# ---- the wire format ---------------------------------------------------------------------------------------------
def test_wire_round_trip_and_bytes():
    rng = np.random.default_rng(0)
    rows = [rng.normal(size=(n, 8)).astype(np.float32) for n in (3, 5)]
    plan = check_plan((Stage(EDGE, 1, 0.7), Stage(CLOUD, 2)))
    body = wire.encode(rows, 1, "abc", ["a", "b"], plan, "entropy")
    state = wire.decode(body)
    assert state.hidden.shape == (2, 5, 8) and state.hidden.dtype == np.float16
    assert state.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert np.allclose(state.hidden[0, :3], rows[0], atol=2e-3) and not state.hidden[0, 3:].any()
    assert (state.layer, state.model_id, state.ids, state.plan, state.confidence) == (1, "abc", ["a", "b"], plan,
                                                                                       "entropy")
    assert len(body) < 2 * 5 * 8 * 2 + 600  # fp16 tensors plus a small header
    assert wire.decode(wire.encode(rows, 0, "m", ["x", "y"])).plan is None


def _body(hidden=None, mask=None, meta=None, drop=()):
    from safetensors.numpy import save

    hidden = np.zeros((1, 2, 8), np.float16) if hidden is None else hidden
    mask = np.ones(hidden.shape[:2], np.uint8) if mask is None else mask
    metadata = {"dimec": "1", "model": "m", "layer": "1", "ids": '["a"]', **(meta or {})}
    for key in drop:
        metadata.pop(key)
    return save({"hidden": hidden, "attention_mask": mask}, metadata=metadata)


@pytest.mark.parametrize("body, message", [
    (b"", "shorter than"),
    (b"\xff" * 40, "header claims"),
    (struct.pack("<Q", 4) + b"{not", "not valid JSON"),
    (_body(hidden=np.zeros((1, 2, 8), np.int32)), "F16 or F32"),
    (_body(hidden=np.zeros((2, 8), np.float16), mask=np.ones((2, 8), np.uint8)), "(B, T, H)"),
    (_body(mask=np.ones((1, 3), np.uint8)), "(B, T, H)"),
    (_body(mask=np.ones((1, 2), np.int32)), "U8, I8 or BOOL"),
    (_body(hidden=np.full((1, 2, 8), np.nan, np.float16)), "NaN"),
    (_body(mask=np.array([[1, 2]], np.uint8)), "only 0 and 1"),
    (_body(mask=np.zeros((1, 2), np.uint8)), "at least one real token"),
    (_body(drop=("dimec",)), "wire format version"),
    (_body(drop=("model",)), "model identity"),
    (_body(meta={"layer": "one"}), "integer"),
    (_body(meta={"ids": '["a", "b"]'}), "list of 1 strings"),
    (_body(meta={"ids": '[""]'}), "unique"),
    (_body(meta={"plan": '[{"tier": "moon", "exit": 1}]'}), "unknown tier"),
    (_body(meta={"plan": '[{"tier": "cloud", "exit": 2, "threshold": 0.5}, {"tier": "edge", "exit": 1}]'}),
     "move up"),
    (_body(meta={"plan": '[{"tier": "edge", "exit": 2}]'}), "does not hold exit"),
    (_body(meta={"confidence": "vibes"}), "confidence"),
])
def test_wire_refuses_malformed_bodies(body, message):
    with pytest.raises(wire.WireError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        wire.decode(body)
    assert info.value.status == 422


def test_substitute_tier_runs_the_same_stages_where_it_can():
    rest = check_plan((Stage(EDGE, 1, 0.8), Stage(CLOUD, 2)))
    assert substitute_tier(rest, CLOUD) == (Stage(CLOUD, 1, 0.8), Stage(CLOUD, 2))  # edge down: cloud runs both
    assert substitute_tier((Stage(CLOUD, 2),), EDGE) == (Stage(EDGE, 1),)  # cloud down: the edge's own exit
    assert substitute_tier((Stage(CLOUD, 1, 0.9), Stage(CLOUD, 2)), EDGE) == (Stage(EDGE, 1),)


# ---- /v1/continue: answers and bad input -------------------------------------------------------------------------
def _state_for(models, texts, plan=None, model_id=None, layer=None, dtype=np.float16):
    mobile = models["mobile"]
    _, hidden = mobile.mobile_stage(mobile.encode(texts))
    return wire.encode(hidden, mobile.exit_layer if layer is None else layer, model_id or mobile.model_id,
                       [f"id{i}" for i in range(len(texts))], plan, dtype=dtype)


def test_continue_answers_like_the_tier_itself(edge_http, models):
    texts = TEXTS[:4]
    r = edge_http.post("/v1/continue", content=_state_for(models, texts), headers=HIDDEN)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ids"] == [f"id{i}" for i in range(4)] and body["tiers"] == ["edge"] * 4
    assert body["exits"] == [1] * 4 and body["exit_layers"] == [models["edge"].exit_layer] * 4
    direct = models["edge"].classify(texts)
    assert np.abs(np.asarray(body["probs"]) - direct.probs).max() < 5e-3  # fp16 on the wire
    assert body["labels"] == direct.labels and not any(body["fallback"])
    fp32 = edge_http.post("/v1/continue", content=_state_for(models, texts, dtype=np.float32), headers=HIDDEN)
    assert np.abs(np.asarray(fp32.json()["probs"]) - direct.probs).max() < 1e-4


def test_continue_refuses_bad_input_and_stays_healthy(edge_http, models):
    good = _state_for(models, TEXTS[:2])
    other_tier_plan = check_plan((Stage(CLOUD, 2),))
    cases = [
        (_state_for(models, TEXTS[:2], model_id="f" * 64), HIDDEN, 409, "from model"),
        (_body(hidden=np.zeros((1, 2, 5), np.float16), meta={"model": models["edge"].model_id}), HIDDEN, 422,
         "hidden size 5"),
        (_body(hidden=np.zeros((1, 40, 32), np.float16), meta={"model": models["edge"].model_id}), HIDDEN, 422,
         "maximum length"),
        (_state_for(models, TEXTS[:5]), HIDDEN, 422, "limit of 4"),
        (_state_for(models, TEXTS[:1], layer=7), HIDDEN, 422, "cannot continue from layer 7"),
        (_state_for(models, TEXTS[:1], layer=-1), HIDDEN, 422, "cannot continue from layer -1"),
        (_state_for(models, TEXTS[:1], layer=2, plan=((Stage(EDGE, 0, 0.5), Stage(EDGE, 1)))), HIDDEN, 422,
         "above the plan's first exit"),
        (_state_for(models, TEXTS[:1], plan=other_tier_plan), HIDDEN, 422, "runs on the cloud, not on this edge"),
        (b"\x00" * 70_000, HIDDEN, 413, "60000 bytes"),
        (good, {**AUTH, "Content-Type": "application/json"}, 415, wire.CONTENT_TYPE),
        (good, {"Content-Type": wire.CONTENT_TYPE}, 401, "token"),
        (b"garbage", HIDDEN, 422, "safetensors"),
    ]
    for body, headers, status, message in cases:
        r = edge_http.post("/v1/continue", content=body, headers=headers)
        assert r.status_code == status, (message, r.text)
        assert message in r.json()["error"], r.json()
        assert edge_http.post("/v1/continue", content=good, headers=HIDDEN).status_code == 200  # still healthy
    metrics = edge_http.get("/metrics").text
    assert 'dimec_requests_total{path="/v1/continue",status="409"}' in metrics
    assert "/v1/continue" in edge_http.get("/openapi.json").json()["paths"]


def test_classify_takes_the_rest_of_a_plan(edge_http, models):
    plan = [{"tier": "edge", "exit": 0, "threshold": 2.0}, {"tier": "edge", "exit": 1, "threshold": None}]
    r = edge_http.post("/v1/classify", json={"texts": TEXTS[:3], "ids": ["a", "b", "c"], "plan": plan}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tiers"] == ["edge"] * 3 and body["exits"] == [1] * 3  # nobody clears 2.0 at exit m
    assert np.allclose(body["probs"], models["edge"].classify(TEXTS[:3]).probs, atol=1e-5)
    for bad, message in ((plan[:1], "needs a threshold"), ([{"tier": "cloud", "exit": 2}], "not on this edge"),
                         ([{"tier": "edge", "exit": 5}], "less than or equal"), ("x", "valid list")):
        r = edge_http.post("/v1/classify", json={"texts": ["good"], "plan": bad}, headers=AUTH)
        assert r.status_code == 422 and message in json.dumps(r.json()), r.text
    # the edge has no cloud behind it: a plan going on to the cloud is answered at the edge, flagged
    on = [{"tier": "edge", "exit": 1, "threshold": 2.0}, {"tier": "cloud", "exit": 2}]
    body = edge_http.post("/v1/classify", json={"texts": ["good"], "ids": ["z"], "plan": on}, headers=AUTH).json()
    assert body["tiers"] == ["edge"] and body["fallback"] == [True] and "no cloud tier" in body["errors"][0]


# ---- the mobile client running plans -------------------------------------------------------------------------------
def _client(mobile_dir, servers, **kw):
    kw.setdefault("timeouts", Timeouts(connect_s=0.5, read_s=5))
    kw.setdefault("hidden_dtype", "float32")  # exact decisions; fp16 (the default) is checked separately
    return MobileClient(mobile_dir, servers["edge"].url, servers["cloud"].url, TOKEN, backend="torch", **kw)


def _check_against(answers, expected, layers):
    tiers = ("mobile", "edge", "cloud")
    close = 0
    for a, (tier, exit_index, margin) in zip(answers, expected, strict=True):
        if margin < 1e-5:  # float rounding (batch vs one sample) may move a confidence across a threshold
            close += 1
            continue
        assert (a.tier, a.exit_layer) == (tiers[tier], layers[exit_index]), a
    assert close <= len(answers) // 4, close


def test_cascade_runs_across_three_processes(packages, servers, tmp_path, router_name, reference, models):
    t_m, t_n = thresholds(reference)
    plan = check_plan((Stage(MOBILE, 0, t_m), Stage(EDGE, 1, t_n), Stage(CLOUD, 2)))
    mobile = mobile_with(packages, tmp_path, router_name, [plan])
    with _client(mobile, servers) as client:
        answers = client.classify(TEXTS, ids=[f"c{i}" for i in range(len(TEXTS))])
        stats = client.stats()
    assert [a.id for a in answers] == [f"c{i}" for i in range(len(TEXTS))]
    expected = expected_cascade(reference, plan)
    _check_against(answers, expected, models["cloud"].exit_layers)
    assert {a.tier for a in answers} == {"mobile", "edge", "cloud"}  # every stage answered something
    assert all(a.routed == "mobile" and not a.fallback and not a.degraded for a in answers)
    assert all(a.plan.startswith("mobile@m>=") for a in answers)
    labels = [int(np.argmax(reference[i, e])) for i, (_, e, _) in enumerate(expected)]
    assert sum(a.label_id == y for a, y in zip(answers, labels, strict=True)) >= len(TEXTS) - 1
    assert stats["escalated"] == sum(a.tier != "mobile" for a in answers)
    assert stats["bytes_sent_hidden"] > 0 and stats.get("bytes_sent_raw", 0) == 0
    with _client(mobile, servers, hidden_dtype="float16") as client:  # half the bytes, nearly the same answers
        half = client.classify(TEXTS)
        assert client.stats()["bytes_sent_hidden"] < 0.6 * stats["bytes_sent_hidden"]
    assert sum((a.tier, a.label) == (b.tier, b.label) for a, b in zip(half, answers, strict=True)) >= len(TEXTS) - 3


def test_plans_starting_off_the_device_and_entropy(packages, servers, tmp_path, router_name, reference, models):
    """Three plans chosen by token count: the cascade, raw text to the cloud, raw text to the edge with the rest
    of a plan (the edge forwards the unconfident ones to the cloud); thresholds read the entropy."""
    t_m, t_n = thresholds(reference, "entropy")
    plans = [(Stage(MOBILE, 0, t_m), Stage(EDGE, 1, t_n), Stage(CLOUD, 2)), (Stage(CLOUD, 2),),
             (Stage(EDGE, 1, t_n), Stage(CLOUD, 2))]
    mobile = mobile_with(packages, tmp_path, router_name, plans, kind="entropy")
    with _client(mobile, servers) as client:
        answers = client.classify(TEXTS)
        lengths = client.mobile.encode(TEXTS).attention_mask.sum(1)
        stats = client.stats()
    choice = lengths % 3
    assert set(choice.tolist()) == {0, 1, 2}
    expected = [expected_cascade(reference[i : i + 1], check_plan(plans[c]), "entropy")[0]
                for i, c in enumerate(choice)]
    _check_against(answers, expected, models["cloud"].exit_layers)
    assert [a.routed for a in answers] == [("mobile", "cloud", "edge")[c] for c in choice]
    assert stats["bytes_sent_raw"] > 0 and not stats.get("fallbacks")


def test_plan_fallbacks_lose_nothing(packages, servers, tmp_path, router_name, reference):
    """Edge down: the cloud runs the edge's stages; cloud down: the edge answers at n (flagged by the edge);
    both down: the mobile exit, degraded. Every sample answered once, every fallback counted."""
    plan = check_plan((Stage(MOBILE, 0, 2.0), Stage(EDGE, 1, 2.0), Stage(CLOUD, 2)))  # nobody stops early
    mobile = mobile_with(packages, tmp_path, router_name, [plan])
    with _client(mobile, servers, retries=0, cooldown_s=0.0) as client:
        servers["edge"].stop()
        try:
            moved = client.classify(TEXTS[:4])
            assert all(a.tier == "cloud" and a.fallback and not a.degraded for a in moved)
            assert "edge" in moved[0].errors[0]
            servers["cloud"].stop()
            degraded = client.classify(TEXTS[:4])
            assert all(a.tier == "mobile" and a.degraded and a.fallback for a in degraded)
            servers["edge"].start()
            cut = client.classify(TEXTS[:4])  # the edge runs, its cloud is down
            assert all(a.tier == "edge" and a.fallback and not a.degraded for a in cut)
            assert any("cloud" in e for e in cut[0].errors)
        finally:
            servers["cloud"].start()
            if servers["edge"].server is None:
                servers["edge"].start()
        back = client.classify(TEXTS[:4])
        stats = client.stats()
    assert all(a.tier == "cloud" and not a.fallback for a in back)
    assert stats["answers"] == 16 and stats["fallbacks"] == 12 and stats["degraded"] == 4


def test_cli_serve_edge_forwards_to_the_cloud(packages, monkeypatch, capsys):
    import dimec.serving.cli as serving_cli
    from dimec.cli import main
    from dimec.serving.deploy.local import free_port

    seen = {}
    monkeypatch.setattr(serving_cli, "run_server", lambda app, sock, log_level: seen.update(app=app))
    assert main(["serve", "edge", str(packages["edge"]), "--token", TOKEN, "--cloud-url", "http://127.0.0.1:9",
                 "--max-hidden-bytes", "2000", "--port", str(free_port())]) == 0
    runner = seen["app"].state.service.plans
    assert runner.forward is not None and runner.forward.url == "http://127.0.0.1:9"
    r = TestClient(seen["app"]).post("/v1/continue", content=b"x" * 3000, headers=HIDDEN)
    assert r.status_code == 413 and "2000 bytes" in r.json()["error"]
    assert main(["serve", "cloud", str(packages["cloud"]), "--token", TOKEN, "--cloud-url", "http://x",
                 "--port", str(free_port())]) == 2
    assert "for the edge" in capsys.readouterr().err


def test_private_texts_hidden_states_stay_on_the_device(packages, servers, tmp_path, router_name):
    """Privacy covers hidden states: a private text whose cascade escalates is answered by the mobile exit,
    flagged, and nothing leaves the device; with the edge trusted, its hidden state goes to the edge only."""
    from dimec.serving.phone.constraints import Constraints, FleetPolicy

    plan = check_plan((Stage(MOBILE, 0, 2.0), Stage(EDGE, 1, 2.0), Stage(CLOUD, 2)))  # everyone escalates
    mobile = mobile_with(packages, tmp_path, router_name, [plan])
    with _client(mobile, servers, fleet=FleetPolicy(Constraints(private=True))) as client:
        answers = client.classify(TEXTS[:3])
        stats = client.stats()
    assert all(a.tier == "mobile" and "private" in a.flags and not a.degraded for a in answers)
    assert stats["bytes_sent_hidden"] == 0 and stats["bytes_sent_raw"] == 0
    with _client(mobile, servers, fleet=FleetPolicy(Constraints(private=True), trusted=("edge",))) as client:
        trusted = client.classify(TEXTS[:2])  # the plan is cut at the edge: it does not forward to the cloud
        assert all(a.tier == "edge" and not a.fallback and not a.errors for a in trusted)
        servers["edge"].stop()
        try:  # the edge is down: its stages may not move to the untrusted cloud
            down = client.classify(TEXTS[:2])
        finally:
            servers["edge"].start()
    assert all(a.tier == "mobile" and a.degraded for a in down)
