"""The three tiers on Ray Serve, on a local Ray cluster bound to loopback (skipped without ray[serve])."""

from __future__ import annotations

import signal
from contextlib import contextmanager

import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")

import httpx  # noqa: E402

from dimec.serving.deploy.export import export_packages  # noqa: E402
from dimec.serving.deploy.local import free_port  # noqa: E402
from dimec.serving.phone.client import MobileClient  # noqa: E402

TOKEN = "ray-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TEXTS = ["good movie", "the film was very boring", "a lovely plot", "dull", "great fun", "poor acting"]


@contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging) if Ray does not come up in time."""
    def expire(*_):
        raise TimeoutError(f"Ray Serve test exceeded {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_three_tiers_on_ray_serve(tiny_run, tmp_path_factory):
    from dimec.serving.deploy.ray_app import deploy_three_tiers, shutdown, start_ray

    root = tmp_path_factory.mktemp("ray_packages")
    export_packages(tiny_run, root, onnx=False)
    port = free_port()
    with deadline(240):
        start_ray(num_cpus=2, http_port=port)
        try:
            urls = deploy_three_tiers(root, TOKEN, port, num_cpus=0.25)
            edge = httpx.post(f"{urls['edge']}/v1/classify", json={"texts": TEXTS}, headers=AUTH, timeout=30)
            assert edge.status_code == 200 and edge.json()["tier"] == "edge"
            assert httpx.post(f"{urls['cloud']}/v1/classify", json={"text": "good"}, timeout=30).status_code == 401
            assert httpx.post(f"{urls['cloud']}/v1/classify", json={"texts": []}, headers=AUTH,
                              timeout=30).status_code == 422
            ids = [f"r{i}" for i in range(len(TEXTS))]
            gateway = httpx.post(f"{urls['mobile']}/v1/classify", json={"texts": TEXTS, "ids": ids}, headers=AUTH,
                                 timeout=60)
            assert gateway.status_code == 200
            answers = gateway.json()["answers"]
            assert [a["id"] for a in answers] == ids and not any(a["degraded"] for a in answers)
            with MobileClient(root / "mobile", urls["edge"], urls["cloud"], TOKEN, backend="torch",
                              routing="cloud-only") as client:  # a phone talking to the Ray-served tiers
                assert {a.tier for a in client.classify(TEXTS)} == {"cloud"}
            metrics = httpx.get(f"{urls['edge']}/metrics", timeout=30).text
            assert 'dimec_requests_total{path="/v1/classify",status="200"}' in metrics
        finally:
            with deadline(60):  # shutting down is bounded too
                shutdown()
