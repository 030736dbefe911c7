"""Dynamic batching (serving/batcher.py, batched.py): the batcher alone with stub models (priorities,
deadlines, isolation of failures, out of memory split and retry, bad settings), then the tier servers with
batching on the tiny run over loopback: the same answers as one at a time, each request answered once."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")

from dimec.errors import ConfigError  # noqa: E402
from dimec.serving.servers.batcher import Batcher, BatchingConfig, BatchRefused, Item  # noqa: E402
from dimec.serving.servers.scheduling import Shed  # noqa: E402

TOKEN = "batch-token"
TEXTS = ["good movie", "the film was very boring", "a lovely plot and acting", "dull", "great fun", "poor acting",
         "the movie was quite weak and the plot dull", "superb", "the acting was fine", "awful and boring film"]


class Recorder:
    """A stub model: doubles numbers, remembers every batch it ran; optional delay and failures."""

    def __init__(self, delay_s: float = 0.0, fail=None) -> None:
        self.delay_s, self.fail, self.calls = delay_s, fail, []
        self.lock = threading.Lock()

    def __call__(self, key, payloads):
        with self.lock:
            self.calls.append(list(payloads))
        time.sleep(self.delay_s)
        if self.fail is not None:
            self.fail(payloads)
        return [p * 2 for p in payloads]


def run_all(batcher: Batcher, items: list[Item], stagger_s: float = 0.0):
    """Submit every item concurrently (from one event loop); each result or exception, in order."""
    async def main():
        async def one(i, item):
            await asyncio.sleep(i * stagger_s)
            return await batcher.submit(item)
        return await asyncio.gather(*(one(i, it) for i, it in enumerate(items)), return_exceptions=True)
    return asyncio.run(main())


def items(values, key="k", **kw) -> list[Item]:
    return [Item(key, v, 1, 1, **kw) for v in values]


# ---- the batcher alone -------------------------------------------------------------------------------------
def test_concurrent_requests_share_batches_and_each_gets_its_own_answer():
    model = Recorder(delay_s=0.01)
    batcher = Batcher(model, BatchingConfig(max_batch=16, max_wait_ms=50))
    done = run_all(batcher, items(range(100)))
    batcher.close()
    assert [d.value for d in done] == [2 * v for v in range(100)]
    ran = sorted(p for call in model.calls for p in call)
    assert ran == list(range(100))  # none lost, none run twice
    assert max(len(c) for c in model.calls) == 16 and len(model.calls) <= 10


def test_keys_never_share_a_batch():
    model = Recorder()
    batcher = Batcher(model, BatchingConfig(max_batch=64, max_wait_ms=30))
    done = run_all(batcher, items(range(10), key="a") + items(range(10, 20), key="b"))
    batcher.close()
    assert [d.value for d in done] == [2 * v for v in range(20)]
    assert all(len({p < 10 for p in call}) == 1 for call in model.calls)


def test_a_failing_request_does_not_fail_its_batch_mates():
    def fail(payloads):
        if 13 in payloads:
            raise ValueError("bad request 13")

    model = Recorder(fail=fail)
    batcher = Batcher(model, BatchingConfig(max_batch=32, max_wait_ms=30))
    done = run_all(batcher, items(range(20)))
    batcher.close()
    assert isinstance(done[13], ValueError)
    assert [d.value for i, d in enumerate(done) if i != 13] == [2 * v for v in range(20) if v != 13]


@pytest.mark.parametrize("oom", [lambda: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
                                 lambda: RuntimeError("CUDA error: out of memory")])
def test_out_of_memory_splits_the_batch_and_retries(oom):
    def fail(payloads):
        if len(payloads) > 4 or 99 in payloads:  # too big together; 99 does not fit even alone
            raise oom()

    model = Recorder(fail=fail)
    batcher = Batcher(model, BatchingConfig(max_batch=32, max_wait_ms=30))
    done = run_all(batcher, items([*range(19), 99]))
    batcher.close()
    assert [d.value for d in done[:19]] == [2 * v for v in range(19)]
    assert isinstance(done[19], BatchRefused) and done[19].status == 413 and "out of memory" in done[19].message
    assert len(model.calls) < 20  # split in halves, not one by one


def test_priority_classes_join_first():
    model = Recorder(delay_s=0.15)
    batcher = Batcher(model, BatchingConfig(max_batch=4, max_wait_ms=0))

    async def main():
        first = asyncio.ensure_future(batcher.submit(Item("k", -1, 1, 1)))  # occupies the model
        await asyncio.sleep(0.05)
        low = [asyncio.ensure_future(batcher.submit(it)) for it in items(range(100, 106), rank=1)]
        await asyncio.sleep(0.01)
        high = [asyncio.ensure_future(batcher.submit(it)) for it in items(range(4), rank=0)]
        return await asyncio.gather(first, *low, *high)

    asyncio.run(main())
    batcher.close()
    assert model.calls[1] == [0, 1, 2, 3]  # the high class, although the low one came first


def test_waiting_never_costs_a_request_its_deadline():
    model = Recorder()
    batcher = Batcher(model, BatchingConfig(max_batch=64, max_wait_ms=500))
    start = time.monotonic()
    done = run_all(batcher, [Item("k", 1, 1, 1, deadline=start + 0.05)])
    batcher.close()
    assert done[0].value == 2 and done[0].queue_ms < 50 and time.monotonic() - start < 0.3


def test_a_deadline_that_cannot_be_met_is_refused_at_once_and_the_queue_is_bounded():
    model = Recorder(delay_s=0.3)
    batcher = Batcher(model, BatchingConfig(max_batch=1, max_wait_ms=0, max_queue=2))
    run_all(batcher, items([1]))  # measures 0.3 s per text

    async def main():
        busy = [asyncio.ensure_future(batcher.submit(it)) for it in items([2, 3, 4])]
        await asyncio.sleep(0.02)
        late = Item("k", 5, 1, 1, deadline=time.monotonic() + 0.1)
        results = await asyncio.gather(batcher.submit(late), *busy, return_exceptions=True)
        return results

    late, *busy = asyncio.run(main())
    batcher.close()
    assert isinstance(late, Shed) and late.reason == "deadline"
    assert sum(isinstance(b, Shed) and b.reason == "full" for b in busy) == 1  # max_queue 2: the third waits


@pytest.mark.parametrize("values, message", [({"max_batch": 0}, "max_batch must be at least 1"),
                                             ({"max_wait_ms": -1}, r"max_wait_ms must be in \[0, 10000\]"),
                                             ({"max_queue": 0}, "max_queue must be at least 1")])
def test_bad_batching_settings_are_one_clear_error(values, message):
    with pytest.raises(ConfigError, match=message):
        BatchingConfig.checked(**values)


# ---- the tier servers with batching, on the tiny run --------------------------------------------------------
@pytest.fixture(scope="module")
def packages(tiny_run, tmp_path_factory):
    from dimec.serving.deploy.export import export_packages

    return export_packages(tiny_run, tmp_path_factory.mktemp("packages"), tiers=("edge", "cloud"), onnx=False)


@pytest.fixture(scope="module")
def served(packages):
    """A batching cloud and a batching edge that forwards plans to it, on loopback."""
    from dimec.runtime.tier import TierModel
    from dimec.serving.deploy.local import ThreadServer
    from dimec.serving.phone.remote import HttpRemote
    from dimec.serving.servers.server import create_app

    batching = BatchingConfig(max_batch=16, max_wait_ms=20)
    models = {t: TierModel(packages[t]) for t in ("edge", "cloud")}
    cloud = ThreadServer(create_app(None, "cloud", TOKEN, model=models["cloud"], batching=batching)).start()
    edge = ThreadServer(create_app(None, "edge", TOKEN, model=models["edge"], batching=batching,
                                   forward=HttpRemote("cloud", cloud.url, TOKEN))).start()
    yield {"models": models, "edge": edge, "cloud": cloud}
    for s in (edge, cloud):
        s.app.state.fleet.close()
        s.stop()


def post_concurrently(url: str, bodies: list, path: str = "/v1/classify", content_type=None) -> list:
    import httpx

    answers: list = [None] * len(bodies)
    headers = {"Authorization": f"Bearer {TOKEN}"}

    def one(i: int) -> None:
        with httpx.Client(timeout=30) as http:
            if content_type is None:
                r = http.post(url + path, json=bodies[i], headers=headers)
            else:
                r = http.post(url + path, content=bodies[i], headers={**headers, "content-type": content_type})
            answers[i] = (r.status_code, r.json())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return answers


def test_batched_answers_equal_one_at_a_time(served):
    cloud = served["models"]["cloud"]
    texts = [TEXTS[i % len(TEXTS)] + " " * (i % 3) + ("very " * (i % 5)) for i in range(40)]
    bodies = [{"text": t, "ids": [f"r{i}"]} if i % 2 else {"texts": [t, TEXTS[i % 7]], "ids": [f"r{i}", "same"]}
              for i, t in enumerate(texts)]
    answers = post_concurrently(served["cloud"].url, bodies)
    batcher = served["cloud"].app.state.fleet.batcher.batcher
    assert batcher.batches < batcher.texts  # requests did share forward passes
    import httpx

    metrics = httpx.get(served["cloud"].url + "/metrics").text
    assert f"dimec_batched_texts {float(batcher.texts)}" in metrics and "dimec_batches " in metrics
    for body, (status, answer) in zip(bodies, answers, strict=True):
        assert status == 200, answer
        alone = cloud.classify(body.get("texts") or [body["text"]])
        assert answer["ids"] == body["ids"]  # its own ids back, even when another request used the same id
        np.testing.assert_allclose(answer["probs"], alone.probs, atol=1e-5)
        assert answer["labels"] == alone.labels


def test_batched_plans_and_continuations_equal_one_at_a_time(served):
    from dimec.routing.plan import Stage
    from dimec.runtime import wire

    edge, cloud = served["models"]["edge"], served["models"]["cloud"]
    plan = [{"tier": "edge", "exit": 1, "threshold": 0.99}, {"tier": "cloud", "exit": 2, "threshold": None}]
    bodies = [{"text": TEXTS[i % 10], "plan": plan, "ids": [f"p{i}"]} for i in range(12)]
    answers = post_concurrently(served["edge"].url, bodies)
    for body, (status, answer) in zip(bodies, answers, strict=True):
        assert status == 200, answer
        alone = edge.classify([body["text"]]) if answer["tiers"] == ["edge"] else cloud.classify([body["text"]])
        np.testing.assert_allclose(answer["probs"], alone.probs, atol=1e-5)
        assert answer["ids"] == body["ids"]
    # hidden states after layer 0, of different lengths, to the cloud's /v1/continue
    states = []
    for i in range(12):
        batch = cloud.encode([TEXTS[i % 10]])
        states.append(wire.encode([cloud.start(batch)[0]], 0, cloud.model_id, [f"h{i}"],
                                  (Stage(2, 2),), "max_prob", np.float32))
    answers = post_concurrently(served["cloud"].url, states, "/v1/continue", wire.CONTENT_TYPE)
    for i, (status, answer) in enumerate(answers):
        assert status == 200, answer
        np.testing.assert_allclose(answer["probs"], cloud.classify([TEXTS[i % 10]]).probs, atol=1e-5)
        assert answer["ids"] == [f"h{i}"]


def test_batching_server_refuses_bad_requests_without_failing_others(served):
    bodies = [{"text": TEXTS[i % 10]} for i in range(8)] + [{"text": "fine", "plan": [{"tier": "mobile", "exit": 0,
                                                                                         "threshold": None}]}]
    answers = post_concurrently(served["edge"].url, bodies)
    assert all(status == 200 for status, _ in answers[:8])
    assert answers[8][0] == 422 and "plan" in answers[8][1]["error"]


def test_serve_cli_checks_the_batching_and_device_settings(packages, capsys):
    from dimec.cli import main

    for args, message in [(["--batch-max", "0"], "server.batching.max_batch must be at least 1"),
                          (["--batch-wait-ms", "-1"], "server.batching.max_wait_ms must be in [0, 10000]"),
                          (["--device", "cuda:x"], "server.device must be auto, cpu, cuda, cuda:N or mps")]:
        # checked by the declarations (serving/settings.py), one ConfigError: exit 2 before the model loads
        code = main(["serve", "cloud", str(packages["cloud"]), "--token", TOKEN, *args])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (args, err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_serve_on_a_missing_gpu_is_one_clear_error(packages, capsys):
    from dimec.cli import main

    assert main(["serve", "cloud", str(packages["cloud"]), "--token", TOKEN, "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert main(["serve", "cloud", str(packages["cloud"]), "--token", TOKEN, "--precision", "fp16",
                 "--device", "cpu"]) == 2
    assert "fp16 is for GPUs" in capsys.readouterr().err


def test_ray_serve_batching_answers_each_request_with_its_own_result(monkeypatch):
    serve = pytest.importorskip("ray.serve")
    from types import SimpleNamespace

    from dimec.serving.deploy.ray_app import RayBatcher

    # outside a replica: the one thing @serve.batch asks of its replica is max_ongoing_requests
    replica = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=64))
    monkeypatch.setattr(serve, "get_replica_context", lambda: replica)

    batcher = RayBatcher(None, BatchingConfig(max_batch=8, max_wait_ms=30))
    model = Recorder(fail=lambda payloads: (_ for _ in ()).throw(ValueError("bad")) if 5 in payloads else None)
    batcher.run = model
    done = run_all(batcher, items(range(20)))
    assert isinstance(done[5], ValueError)
    assert [d.value for i, d in enumerate(done) if i != 5] == [2 * v for v in range(20) if v != 5]
    assert max(len(c) for c in model.calls) > 1  # Ray's @serve.batch gathered them
    with pytest.raises(ConfigError, match="max_batch must be at least 1"):
        RayBatcher(None, BatchingConfig(max_batch=0))


def test_out_of_memory_in_a_batching_server_is_split_never_a_5xx(packages):
    from dimec.runtime.tier import TierModel
    from dimec.serving.deploy.local import ThreadServer
    from dimec.serving.servers.server import create_app

    model = TierModel(packages["cloud"])
    start, sizes = model.start, []

    def small_memory(batch):  # a device that fits 3 texts per forward pass (every request runs as a plan)
        sizes.append(len(batch.input_ids))
        if len(batch.input_ids) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return start(batch)

    model.start = small_memory
    server = ThreadServer(create_app(None, "cloud", TOKEN, model=model,
                                     batching=BatchingConfig(max_batch=32, max_wait_ms=50))).start()
    try:
        answers = post_concurrently(server.url, [{"text": TEXTS[i % 10]} for i in range(16)] + [{"texts": TEXTS[:5]}])
    finally:
        server.app.state.fleet.close()
        server.stop()
    assert all(status == 200 for status, _ in answers[:16]) and max(sizes) > 3  # batched, split, answered
    model.start = start
    for i, (_, answer) in enumerate(answers[:16]):
        np.testing.assert_allclose(answer["probs"], model.classify([TEXTS[i % 10]]).probs, atol=1e-5)
    assert answers[16][0] == 413 and "out of memory on this request alone" in answers[16][1]["error"]


def test_a_batching_server_lets_the_higher_class_join_first(packages):
    import httpx

    from dimec.config import build_config
    from dimec.runtime.tier import TierModel
    from dimec.serving.deploy.local import ThreadServer
    from dimec.serving.servers.server import create_app
    from dimec.serving.servers.sources import FleetConfig, SourceTable

    tokens = {"hi": "token-high-0123456789", "lo": "token-low-0123456789"}
    table = SourceTable.from_config(build_config(FleetConfig, {
        "classes": [{"name": "high"}, {"name": "low"}],
        "sources": [{"name": "hi", "token": tokens["hi"], "priority": "high"},
                    {"name": "lo", "token": tokens["lo"], "priority": "low"}]}))
    model = TierModel(packages["cloud"])
    encode, batches = model.encode, []

    gate = threading.Event()

    def slow(texts, pairs=None):  # the first batch holds the model until every other request waits
        batches.append(list(texts))
        gate.wait(30)
        return encode(texts, pairs)

    model.encode = slow
    server = ThreadServer(create_app(None, "cloud", None, model=model, sources=table,
                                     batching=BatchingConfig(max_batch=4, max_wait_ms=0))).start()
    answers: dict = {}

    def send(name: str, text: str) -> None:
        r = httpx.post(server.url + "/v1/classify", json={"text": text},
                       headers={"Authorization": f"Bearer {tokens[name]}"}, timeout=30)
        answers[text] = (r.status_code, r.json())

    threads = [threading.Thread(target=send, args=("lo", "first"))]
    threads += [threading.Thread(target=send, args=("lo", f"low {i}")) for i in range(6)]
    threads += [threading.Thread(target=send, args=("hi", f"high {i}")) for i in range(4)]
    pending = server.app.state.fleet.batcher.batcher._pending

    def wait_for(n: int) -> None:
        deadline = time.monotonic() + 30
        while len(pending) < n and time.monotonic() < deadline:
            time.sleep(0.01)

    try:
        threads[0].start()
        while not batches:  # "first" runs
            time.sleep(0.01)
        for t in threads[1:7]:
            t.start()
        wait_for(6)  # the low class waits first
        for t in threads[7:]:
            t.start()
        wait_for(10)
        gate.set()
        for t in threads:
            t.join(30)
    finally:
        server.app.state.fleet.close()
        server.stop()
    assert batches[0] == ["first"] and sorted(batches[1]) == [f"high {i}" for i in range(4)]
    assert len(answers) == 11 and all(status == 200 for status, _ in answers.values())
    assert answers["high 0"][1]["priority"] == "high" and answers["low 0"][1]["source"] == "lo"
