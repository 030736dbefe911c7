"""Issue 17: the serving surface held to the standard of the rest of dimec. One regression test per finding
on /v1/continue and /v1/classify (the edge and the cloud over loopback), the mobile client against a
misbehaving edge, and the server's bounds. Loopback only; every loop and wait bounded."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from dimec.serving import wire  # noqa: E402
from dimec.serving.client import HttpRemote, Timeouts  # noqa: E402
from dimec.serving.export import export_packages  # noqa: E402
from dimec.serving.local import ThreadServer  # noqa: E402
from dimec.serving.server import create_app  # noqa: E402
from dimec.serving.tier import TierModel  # noqa: E402

TOKEN = "hardening-17-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HIDDEN = {**AUTH, "Content-Type": wire.CONTENT_TYPE}
TEXTS = ["good movie", "the film was very boring", "a lovely plot and acting", "dull", "great fun"]


@pytest.fixture(scope="module")
def packages(unscaled_tiny_run, tmp_path_factory):
    return export_packages(unscaled_tiny_run, tmp_path_factory.mktemp("h17_packages"), onnx=False)


@pytest.fixture(scope="module")
def models(packages):
    return {tier: TierModel(packages[tier]) for tier in ("mobile", "edge", "cloud")}


@pytest.fixture(scope="module")
def servers(models):
    """A cloud, and an edge forwarding to it; uvicorn threads on loopback."""
    cloud = ThreadServer(create_app(None, "cloud", TOKEN, model=models["cloud"])).start()
    forward = HttpRemote("cloud", cloud.url, TOKEN, Timeouts(0.5, 5), retries=0, cooldown_s=0.0)
    edge = ThreadServer(create_app(None, "edge", TOKEN, model=models["edge"], forward=forward)).start()
    yield {"edge": edge, "cloud": cloud}
    edge.stop()
    cloud.stop()


@pytest.fixture(scope="module")
def cloud_http(models):
    return TestClient(create_app(None, "cloud", TOKEN, model=models["cloud"]))


def state_of(models, texts=TEXTS):
    """Real hidden states after layer 0 of `texts`, one (T_i, H) array each."""
    m = models["edge"]
    batch = m.encode(texts)
    hidden = m.start(batch)
    return [h[: int(k.sum())] for h, k in zip(hidden, batch.attention_mask, strict=True)]


def raw_body(header: dict, data: bytes = b"") -> bytes:
    """A safetensors file from a header we write by hand (anything a hostile client could send)."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def good_header(models, ids=("a",), **meta) -> tuple[dict, bytes]:
    """The header and data of a valid one-row body, as dicts we can then break."""
    rows = state_of(models, ["good movie"] * len(ids))
    body = wire.encode(rows, 0, models["edge"].model_id, list(ids))
    (size,) = struct.unpack("<Q", body[:8])
    header = json.loads(body[8 : 8 + size])
    header["__metadata__"].update(meta)
    return header, body[8 + size :]


def assert_refused(response, status=422):
    assert response.status_code == status, response.text
    assert "error" in response.json()


# ---- 1. no 5xx on /v1/continue -----------------------------------------------------------------------------------
def test_continue_malformed_headers_and_metadata_are_4xx_on_both_tiers(models, servers):
    import httpx

    header, data = good_header(models)
    cases = []
    huge = dict(header)
    cases.append(raw_body(header, data).replace(b'"dimec"', b'"x":' + b"9" * 5000 + b',"dimec"', 1))
    for dtype in (["F16"], {"a": 1}):
        h = json.loads(json.dumps(header))
        h["hidden"]["dtype"] = dtype
        cases.append(raw_body(h, data))
        h = json.loads(json.dumps(header))
        h["attention_mask"]["dtype"] = dtype
        cases.append(raw_body(h, data))
    for shape in (["1", "2", "3"], [None, 1, 2], [1, 2], "abc", [True, 1, 32], [10**30, 1, 32]):
        h = json.loads(json.dumps(header))
        h["hidden"]["shape"] = shape
        cases.append(raw_body(h, data))
    for key, value in (("layer", ["0"]), ("layer", None), ("layer", {"a": 1}), ("ids", ["a"]), ("ids", 5),
                       ("plan", [1]), ("plan", None), ("model", 5), ("confidence", ["x"]), ("dimec", {"a": 1})):
        h = json.loads(json.dumps(header))
        h["__metadata__"][key] = value
        cases.append(raw_body(h, data))
    h = json.loads(json.dumps(header))
    h["__metadata__"]["plan"] = '[{"tier": "edge", "exit": 1, "threshold": ' + "9" * 400 + '}, ' \
                                '{"tier": "cloud", "exit": 2, "threshold": null}]'
    cases.append(raw_body(h, data))
    h = json.loads(json.dumps(header))
    h["__metadata__"]["ids"] = '["\\ud800"]'
    cases.append(raw_body(h, data))
    assert huge
    with httpx.Client(timeout=20) as http:
        for url in (servers["edge"].url, servers["cloud"].url):
            for body in cases:
                r = http.post(f"{url}/v1/continue", content=body, headers=HIDDEN)
                assert 400 <= r.status_code < 500, (body[:300], r.status_code, r.text)
                assert "error" in r.json()
            # the keep-alive connection is still good, and the server answers a valid body
            ok = wire.encode(state_of(models, ["good movie"]), 0, models["edge"].model_id, ["fine-1"])
            assert http.post(f"{url}/v1/continue", content=ok, headers=HIDDEN).status_code == 200


# ---- 2. a non-finite result is never an answer -------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1e20, 3e38])
def test_huge_finite_hidden_states_are_refused_not_answered_with_null(models, servers, scale):
    import httpx

    rows = [np.full_like(r, scale, dtype=np.float32) for r in state_of(models, ["good movie", "dull"])]
    plan = wire.plan_from_json([{"tier": "edge", "exit": 1, "threshold": 1.0},
                                {"tier": "cloud", "exit": 2, "threshold": None}])
    for url, p in ((servers["cloud"].url, None), (servers["edge"].url, plan)):
        body = wire.encode(rows, 0, models["edge"].model_id, ["x1", "x2"], p, dtype=np.float32)
        r = httpx.post(f"{url}/v1/continue", content=body, headers=HIDDEN, timeout=20)
        assert_refused(r)
        assert "null" not in r.text


def test_non_finite_model_output_is_a_422_never_null_probabilities(models, servers, monkeypatch):
    """Whatever the cause (a state inside the fp16 range that still overflows a layer), NaN is not an answer."""
    import httpx

    edge = servers["edge"].app.state.service.model
    original = type(edge).exit_probs
    monkeypatch.setattr(type(edge), "exit_probs", lambda self, logits, k: original(self, logits, k) * np.nan)
    body = wire.encode(state_of(models, ["good movie"]), 0, models["edge"].model_id, ["n1"])
    r = httpx.post(f"{servers['edge'].url}/v1/continue", content=body, headers=HIDDEN, timeout=20)
    assert r.status_code == 422 and "null" not in r.text, r.text
    r = httpx.post(f"{servers['edge'].url}/v1/classify", json={"texts": ["good movie"]}, headers=AUTH, timeout=20)
    assert r.status_code == 422 and "null" not in r.text, r.text


# ---- 9. an attention mask with holes --------------------------------------------------------------------------------
def test_attention_mask_with_holes_is_refused(models, cloud_http):
    from safetensors.numpy import save

    rows = state_of(models, ["the film was very boring"])
    hidden = rows[0][None].astype(np.float16)  # (1, T, H)
    mask = (np.arange(hidden.shape[1]) % 2 == 0).astype(np.uint8)[None]  # 1,0,1,0,1
    meta = {"dimec": "1", "model": models["edge"].model_id, "layer": "0", "ids": '["h1"]'}
    r = cloud_http.post("/v1/continue", content=save({"hidden": hidden, "attention_mask": mask}, metadata=meta),
                        headers=HIDDEN)
    assert_refused(r)
    assert "padding" in r.json()["error"]


# ---- 6. request ids are inert --------------------------------------------------------------------------------------
TO_CLOUD = [{"tier": "edge", "exit": 1, "threshold": 1.01}, {"tier": "cloud", "exit": 2, "threshold": None}]


@pytest.fixture()
def edge_with_slow_cooldown(models, servers):
    """An edge (in-process) whose cloud link cools down for a minute after a failure."""
    forward = HttpRemote("cloud", servers["cloud"].url, TOKEN, Timeouts(0.5, 5), retries=2, cooldown_s=60.0)
    return TestClient(create_app(None, "edge", TOKEN, model=models["edge"], forward=forward))


@pytest.mark.parametrize("ids", [["café-1"], ["a\nb"], ["a b"], ["x" * 129], ["\x00"], ["dup", "dup"], [""]])
def test_bad_request_ids_are_refused_at_the_boundary(edge_with_slow_cooldown, ids):
    texts = ["good movie"] * len(ids)
    for body in ({"texts": texts, "ids": ids}, {"texts": texts, "ids": ids, "plan": TO_CLOUD}):
        r = edge_with_slow_cooldown.post("/v1/classify", json=body, headers=AUTH)
        assert_refused(r)
        assert "id" in r.json()["error"]


def test_one_callers_ids_never_change_another_callers_answer(edge_with_slow_cooldown):
    for ids in (["café-1"], ["a\nb"], ["x\r\nX-Evil: 1"]):
        edge_with_slow_cooldown.post("/v1/classify", json={"texts": ["dull"], "ids": ids, "plan": TO_CLOUD},
                                     headers=AUTH)
    r = edge_with_slow_cooldown.post("/v1/classify", json={"texts": ["dull"], "ids": ["ok-1"], "plan": TO_CLOUD},
                                     headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["tiers"] == ["cloud"] and r.json()["fallback"] == [False], r.json()


def test_mobile_client_refuses_bad_ids_clearly(models, servers):
    from dimec.errors import DataError
    from dimec.serving.client import MobileClient

    with MobileClient(models["mobile"], servers["edge"].url, servers["cloud"].url, TOKEN,
                      routing="cloud-only") as client:
        for ids in (["café-1"], ["a\nb"], ["d", "d"]):
            with pytest.raises(DataError, match="id"):
                client.classify(["good movie"] * len(ids), ids=ids)
        assert client.classify(["good movie"], ids=["fine-1"])[0].tier == "cloud"
