"""Issue 17: the serving surface held to the standard of the rest of dimec. One regression test per finding
on /v1/continue and /v1/classify (the edge and the cloud over loopback), the mobile client against a
misbehaving edge, and the server's bounds. Loopback only; every loop and wait bounded."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

pytest.importorskip("fastapi")

from conftest import edge_and_cloud, mobile_package_with_router, tier_models  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from dimec.runtime import wire  # noqa: E402
from dimec.serving.deploy.export import export_packages  # noqa: E402
from dimec.serving.deploy.local import ThreadServer  # noqa: E402
from dimec.serving.phone.remote import HttpRemote, Timeouts  # noqa: E402
from dimec.serving.servers.server import create_app  # noqa: E402

TOKEN = "hardening-17-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HIDDEN = {**AUTH, "Content-Type": wire.CONTENT_TYPE}
TEXTS = ["good movie", "the film was very boring", "a lovely plot and acting", "dull", "great fun"]


@pytest.fixture(scope="module")
def packages(unscaled_tiny_run, tmp_path_factory):
    return export_packages(unscaled_tiny_run, tmp_path_factory.mktemp("h17_packages"), onnx=False)


@pytest.fixture(scope="module")
def models(packages):
    return tier_models(packages)


@pytest.fixture(scope="module")
def servers(models):
    with edge_and_cloud(models, TOKEN) as servers:
        yield servers


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
    cases = [raw_body(header, data).replace(b'"dimec"', b'"x": ' + b"9" * 5000 + b', "dimec"', 1)]  # 5000 digits
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
    from dimec.serving.phone.client import MobileClient

    with MobileClient(models["mobile"], servers["edge"].url, servers["cloud"].url, TOKEN,
                      routing="cloud-only") as client:
        for ids in (["café-1"], ["a\nb"], ["d", "d"]):
            with pytest.raises(DataError, match="id"):
                client.classify(["good movie"] * len(ids), ids=ids)
        assert client.classify(["good movie"], ids=["fine-1"])[0].tier == "cloud"


# ---- 8. a misbehaving edge costs a fallback, never an exception or a wrong answer ------------------------------------
class FakeEdge:
    """A loopback HTTP server answering POST /v1/classify with `self.answer(ids)` (a dict, or bytes to drip)."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.answer = None
        self.drip_s = 0.0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                import time

                ids = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["ids"]
                body = json.dumps(owner.answer(ids)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    if owner.drip_s:
                        for i in range(len(body)):
                            self.wfile.write(body[i : i + 1])
                            self.wfile.flush()
                            time.sleep(owner.drip_s)
                    else:
                        self.wfile.write(body)
                except OSError:  # the client gave up: what it should do
                    pass

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _edge_answer(ids, **change):
    n = len(ids)  # the one answer shape of every tier (a PlanAnswer)
    answer = {"tier": "edge", "label_names": ["neg", "pos"], "ids": ids, "labels": ["pos"] * n,
              "label_ids": [1] * n, "probs": [[0.25, 0.75]] * n, "tiers": ["edge"] * n, "exits": [1] * n,
              "exit_layers": [2] * n, "fallback": [False] * n, "errors": [], "compute_ms": 1.0, "forward_ms": 0.0,
              "queue_ms": 0.0,
              "advice": {"class": "default", "keep_fraction": 0.0, "valid_s": 2.0, "capacity_texts_per_s": None,
                         "expected_wait_ms": 0.0}}
    for key, value in change.items():
        if key.startswith("advice."):
            answer["advice"][key[7:]] = value
        else:
            answer[key] = value
    return answer


BAD_EDGE_ANSWERS = {
    "keep_fraction 5": {"advice.keep_fraction": 5},
    "valid_s soon": {"advice.valid_s": "soon"},
    "valid_s inf": {"advice.valid_s": 1e309},
    "expected_wait_ms x": {"advice.expected_wait_ms": "x"},
    "advice a list": {"advice": [1]},
    "queue_ms x": {"queue_ms": "x"},
    "tiers moon": {"tiers": ["moon"]},
    "exits 7": {"tiers": ["edge"], "exits": [7], "exit_layers": [2], "fallback": [False]},
    "exit_layers x": {"tiers": ["edge"], "exits": [1], "exit_layers": ["x"], "fallback": [False]},
    "fallback 3": {"tiers": ["edge"], "exits": [1], "exit_layers": [2], "fallback": [3]},
    "null probs": {"probs": [[None, None]]},
    "negative probs": {"probs": [[-0.5, 1.5]]},
    "probs not summing to 1": {"probs": [[0.9, 0.9]]},
    "label_names numbers": {"label_names": [1, 2]},
    "errors a string": {"errors": "x"},
}


@pytest.fixture()
def fake_edge():
    edge = FakeEdge()
    yield edge
    edge.close()


@pytest.mark.parametrize("name", list(BAD_EDGE_ANSWERS))
def test_a_misbehaving_edge_costs_a_fallback(models, servers, fake_edge, name):
    from dimec.serving.phone.client import MobileClient

    fake_edge.answer = lambda ids: _edge_answer(ids, **BAD_EDGE_ANSWERS[name])
    with MobileClient(models["mobile"], fake_edge.url, servers["cloud"].url, TOKEN, Timeouts(1.0, 5.0), retries=0,
                      routing="edge-only") as client:
        answer = client.classify(["good movie"], ids=["e1"])[0]
        assert answer.tier == "cloud" and answer.fallback, answer
        assert all(0 <= p <= 1 for p in answer.probs) and abs(sum(answer.probs) - 1) < 1e-3
        answer = client.classify(["dull"], ids=["e2"])[0]  # the advice (if any was taken) broke nothing
        assert answer.tier in ("cloud", "mobile", "edge")


def test_a_good_fake_edge_answers(models, servers, fake_edge):
    from dimec.serving.phone.client import MobileClient

    fake_edge.answer = lambda ids: _edge_answer(ids)
    with MobileClient(models["mobile"], fake_edge.url, servers["cloud"].url, TOKEN, retries=0,
                      routing="edge-only") as client:
        answer = client.classify(["good movie"], ids=["g1"])[0]
    assert answer.tier == "edge" and not answer.fallback and answer.probs == [0.25, 0.75]


def test_a_dripping_edge_cannot_hold_a_call_past_its_deadline(models, servers, fake_edge):
    import time

    from dimec.serving.phone.client import MobileClient

    fake_edge.answer, fake_edge.drip_s = (lambda ids: _edge_answer(ids)), 0.3  # ~300 bytes: 90 s in all
    with MobileClient(models["mobile"], fake_edge.url, servers["cloud"].url, TOKEN, Timeouts(1.0, 2.0, total_s=3.0),
                      retries=1, routing="edge-only") as client:
        start = time.monotonic()
        answer = client.classify(["good movie"], ids=["d1"])[0]
        took = time.monotonic() - start
    assert took < 8.0, took  # the deadline (3 s) plus the cloud's answer, not 60 s of drip
    assert answer.fallback


# ---- 4. the cloud budget: every cloud stage booked, wherever it is reached from ---------------------------------------
def mobile_with_plan(packages, tmp_path, plan_json):
    """A copy of the mobile package whose router.json serves one plan (a cascade router)."""
    from dimec.routing.base import make_router

    router = make_router("cascade")
    router.load_state({"plans": [plan_json], "confidence": "max_prob", "prerouter": None})
    return mobile_package_with_router(packages["mobile"], tmp_path / "mobile", router)


@pytest.mark.parametrize("plan", [
    [["edge", 1, 1.01], ["cloud", 2, None]],  # raw text to the edge, which forwards to the cloud
    [["mobile", 0, 1.01], ["edge", 1, 1.01], ["cloud", 2, None]],  # a hidden state via the edge
])
def test_a_zero_cloud_budget_keeps_every_text_off_the_cloud(packages, servers, tmp_path, plan):
    from dimec.serving.phone.client import MobileClient
    from dimec.serving.phone.constraints import CloudBudget, FleetPolicy

    budget = CloudBudget(0.0, 3600.0, 0.001)
    with MobileClient(mobile_with_plan(packages, tmp_path, plan), servers["edge"].url, servers["cloud"].url, TOKEN,
                      backend="torch", fleet=FleetPolicy(budget=budget)) as client:
        answers = client.classify(TEXTS, ids=[f"b{i}" for i in range(len(TEXTS))])
    assert [a.tier for a in answers] == ["edge"] * len(TEXTS), [a.to_dict() for a in answers]
    assert all("budget" in a.flags for a in answers)
    assert budget.spent() == 0.0


def test_a_budget_allows_the_cloud_via_the_edge_and_books_it(packages, servers, tmp_path):
    from dimec.serving.phone.client import MobileClient
    from dimec.serving.phone.constraints import CloudBudget, FleetPolicy

    budget = CloudBudget(0.003, 3600.0, 0.001)  # three texts
    with MobileClient(mobile_with_plan(packages, tmp_path, [["edge", 1, 1.01], ["cloud", 2, None]]),
                      servers["edge"].url, servers["cloud"].url, TOKEN, backend="torch",
                      fleet=FleetPolicy(budget=budget)) as client:
        answers = [client.classify([t], ids=[f"c{i}"])[0] for i, t in enumerate(TEXTS)]
    assert [a.tier for a in answers].count("cloud") == 3
    assert abs(budget.spent() - 0.003) < 1e-9


def test_a_refund_never_outlives_its_charge():
    import time

    from dimec.serving.phone.constraints import CloudBudget

    budget = CloudBudget(0.001, 0.3, 0.001)  # one text per 0.3 s
    booked = budget.reserve(1)
    assert booked is not None and budget.reserve(1) is None
    time.sleep(0.2)  # a slow exchange
    budget.refund(booked)
    time.sleep(0.15)  # the charge left the window; its refund must have left with it
    assert budget.spent() == 0.0
    assert budget.reserve(1) is not None and budget.reserve(1) is None


# ---- 5. edge misconfiguration: a fallback with a reason, never a 500; checked at start-up -----------------------------
def test_a_wrong_cloud_token_is_a_fallback_with_a_reason_not_a_500(models, servers):
    forward = HttpRemote("cloud", servers["cloud"].url, "not-the-cloud-token", Timeouts(0.5, 5), retries=0,
                         cooldown_s=0.0)
    edge = TestClient(create_app(None, "edge", TOKEN, model=models["edge"], forward=forward))
    r = edge.post("/v1/classify", json={"texts": ["dull", "fun"], "ids": ["t1", "t2"], "plan": TO_CLOUD}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["fallback"] == [True, True] and body["tiers"] == ["edge", "edge"]
    assert "token" in body["errors"][0] and servers["cloud"].url not in r.text
    state = wire.encode(state_of(models, ["dull"]), 0, models["edge"].model_id, ["t3"], wire.plan_from_json(TO_CLOUD))
    r = edge.post("/v1/continue", content=state, headers=HIDDEN)
    assert r.status_code == 200 and r.json()["fallback"] == [True], r.text


def test_serve_checks_the_cloud_link_at_start_up(servers, tmp_path, capsys):
    from dimec.cli import main
    from dimec.serving.deploy.local import free_port

    sources = tmp_path / "fleet.json"
    sources.write_text(json.dumps({"classes": [{"name": "high"}],
                                   "sources": [{"name": "a", "token": "token-aaaa-1", "priority": "high"}]}))
    cases = [  # (argv, what the error names)
        (["--sources", str(sources), "--cloud-url", servers["cloud"].url], "--cloud-token"),
        (["--token", TOKEN, "--cloud-url", servers["cloud"].url, "--cloud-token", "wrong-token-1"], "refused"),
    ]
    for extra, expected in cases:
        code = main(["serve", "edge", str(tmp_path / "no-package"), "--port", str(free_port()), *extra])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and "Traceback" not in err, err


# ---- 3. memory: authenticate before reading a body; bounded in-flight bytes per server and per source -------------
def _open_post(url: str, path: str, token: str, length: int, sent: int = 1000):
    """A raw POST whose headers announce `length` body bytes, of which only `sent` are sent (the connection
    stays open, as a slow or hostile client's would)."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: {wire.CONTENT_TYPE}\r\nContent-Length: {length}\r\n\r\n")
    sock.sendall(head.encode() + b"\0" * sent)
    return sock


def _status(sock, timeout: float = 5.0) -> int | None:
    """The status of the answer on `sock`, or None if none came within `timeout` (the server is still reading)."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(200)
    except TimeoutError:
        return None
    return int(data.split()[1]) if data.startswith(b"HTTP/1.1") else None


@pytest.fixture()
def bounded_server(models):
    from dimec.serving.servers.server import Limits

    limits = Limits(max_hidden_bytes=1_000_000, max_inflight_bytes=3_000_000, max_source_inflight_bytes=2_000_000)
    server = ThreadServer(create_app(None, "cloud", TOKEN, limits, model=models["cloud"])).start()
    yield server
    server.stop()


def test_a_body_is_never_read_before_the_token_is_checked(bounded_server):
    sock = _open_post(bounded_server.url, "/v1/continue", "wrong-token", 900_000)
    try:
        assert _status(sock, 5.0) == 401  # at once, without waiting for the 900 kB it announced
    finally:
        sock.close()


def test_in_flight_bytes_are_bounded_per_source(bounded_server, models):
    import httpx

    held = [_open_post(bounded_server.url, "/v1/continue", TOKEN, 900_000) for _ in range(2)]  # 1.8 of 2 MB
    try:
        third = _open_post(bounded_server.url, "/v1/continue", TOKEN, 900_000)
        try:
            assert _status(third, 5.0) == 429
        finally:
            third.close()
    finally:
        for sock in held:
            sock.close()
    ok = wire.encode(state_of(models, ["good movie"]), 0, models["edge"].model_id, ["after-1"])
    for _ in range(50):  # the held bytes are released once their connections close (bounded wait)
        r = httpx.post(f"{bounded_server.url}/v1/continue", content=ok, headers=HIDDEN, timeout=10)
        if r.status_code == 200:
            break
        import time

        time.sleep(0.1)
    assert r.status_code == 200, r.text


def test_limits_state_a_consistent_bound():
    from dimec.errors import ConfigError
    from dimec.serving.servers.server import Limits

    with pytest.raises(ConfigError):
        Limits(max_hidden_bytes=8_000_000, max_source_inflight_bytes=4_000_000)  # one body could never fit
    with pytest.raises(ConfigError):
        Limits(max_inflight_bytes=10_000_000, max_source_inflight_bytes=20_000_000)


# ---- 13. a client that goes away while queued is dropped and counted as abandoned -------------------------------------
class CountingSlowModel:
    """A tier model that takes `delay_s` per call and counts its calls."""

    def __init__(self, model, delay_s: float) -> None:
        self._model, self.delay_s, self.calls = model, delay_s, 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def start(self, batch):  # every request runs as a plan: its forward pass begins here
        import time

        self.calls += 1
        time.sleep(self.delay_s)
        return self._model.start(batch)


def test_a_request_whose_client_left_while_queued_is_not_run(models):
    import socket
    import threading
    import time

    import httpx

    from dimec.config import build_config
    from dimec.serving.servers.sources import FleetConfig, SourceTable

    table = SourceTable.from_config(build_config(FleetConfig, {
        "classes": [{"name": "high"}], "sources": [{"name": "a", "token": TOKEN, "priority": "high"}],
        "scheduling": {"queue_capacity": 8, "workers": 1}}))
    model = CountingSlowModel(models["edge"], 1.0)
    server = ThreadServer(create_app(None, "edge", None, model=model, sources=table)).start()
    try:
        first = threading.Thread(target=lambda: httpx.post(f"{server.url}/v1/classify", json={"texts": ["fun"]},
                                                           headers=AUTH, timeout=20))
        first.start()
        time.sleep(0.3)  # the first request runs; the next one waits in the queue
        body = json.dumps({"texts": ["dull"]}).encode()
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: "
                     f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.2)
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()  # the client goes away while its request waits
        first.join(20)
        time.sleep(1.5)  # long enough for the queued request to have run, had it been kept
        metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
    finally:
        server.stop()
        server.app.state.fleet.close()
    assert model.calls == 1
    assert 'dimec_source_requests_total{class="high",outcome="abandoned",source="a"} 1.0' in metrics, metrics
    assert 'dimec_source_requests_total{class="high",outcome="answered",source="a"} 1.0' in metrics


# ---- 14. exposure: decided, documented (docs/serving.md), tested -----------------------------------------------------
def test_metrics_and_drift_reference_need_the_metrics_token_when_one_is_set(models):
    app = TestClient(create_app(None, "edge", TOKEN, model=models["edge"], metrics_token="metrics-secret-1"))
    for path in ("/metrics", "/v1/drift/reference"):
        assert app.get(path).status_code == 401
        assert app.get(path, headers=AUTH).status_code == 401  # a client's token is not the metrics token
        assert app.get(path, headers={"Authorization": "Bearer metrics-secret-1"}).status_code in (200, 404)
    assert app.get("/healthz").status_code == 200  # liveness stays open: it names the tier and model only
    open_app = TestClient(create_app(None, "edge", TOKEN, model=models["edge"]))
    assert open_app.get("/metrics").status_code == 200  # unset (the loopback default): open, as documented


def test_tokens_can_come_from_a_file_and_help_says_why(tmp_path, capsys):
    from dimec.cli import build_parser, main

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    assert "ps" in serve.format_help() and "--token-file" in serve.format_help()
    empty = tmp_path / "empty"
    empty.write_text("")
    assert main(["serve", "edge", str(tmp_path / "no-package"), "--token-file", str(empty)]) == 2
    assert "empty" in capsys.readouterr().err
    good = tmp_path / "token"
    good.write_text("file-token-123\n")
    assert main(["serve", "edge", str(tmp_path / "no-package"), "--token-file", str(good)]) == 2
    err = capsys.readouterr().err
    assert "no bearer token" not in err and "file-token-123" not in err and "no-package" in err  # read, not shown


def test_edge_errors_do_not_show_clients_the_clouds_url(models, servers):
    forward = HttpRemote("cloud", "http://127.0.0.1:9", TOKEN, Timeouts(0.2, 1), retries=0, cooldown_s=0.0)
    edge = TestClient(create_app(None, "edge", TOKEN, model=models["edge"], forward=forward))
    r = edge.post("/v1/classify", json={"texts": ["dull"], "ids": ["u1"], "plan": TO_CLOUD}, headers=AUTH)
    assert r.status_code == 200 and r.json()["fallback"] == [True]
    assert "127.0.0.1:9" not in r.text and r.json()["errors"]
