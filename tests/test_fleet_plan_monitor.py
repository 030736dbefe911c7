"""`dimec plan` (every policy's accuracy, latency, money, exposure; the Pareto front; the pick) and drift
monitoring (the reference written at export, live histograms, PSI, `dimec monitor` on shifted traffic)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

pytest.importorskip("fastapi")

from dimec.errors import ConfigError, DimecError  # noqa: E402
from dimec.serving.ops.planning import PlanConstraints, pareto_front, plan_run  # noqa: E402

PROFILE = {"lambda_m_ms": 3.0, "lambda_e_ms": 1.0, "o_e_ms": 8.0, "o_c_ms": 40.0, "cloud_layer_ms": 0.5}


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "profile.json"
    path.write_text(json.dumps(PROFILE))
    return path


# ---- plan -------------------------------------------------------------------------------------------------------
def test_plan_prices_every_policy_and_picks_within_the_constraints(tiny_run, profile, tmp_path):
    out = tmp_path / "plan"
    constraints = PlanConstraints(max_loss=5.0, max_latency_ms=30.0, max_exposure=0.5)
    result = plan_run(tiny_run, str(profile), constraints, "accuracy", out_dir=out, log=lambda _: None)
    assert (out / "plan.png").stat().st_size > 1000 and json.loads((out / "plan.json").read_text()) == result
    points = {p["name"]: p for p in result["policies"]}
    m, n, l = 1, 2, 2  # the tiny run's exit layers
    # single-tier policies: latency and money are the path formulas under the profile
    assert points["cloud-only"]["latency_ms"] == pytest.approx(PROFILE["o_c_ms"] + PROFILE["cloud_layer_ms"] * l)
    assert points["edge-only"]["latency_ms"] == pytest.approx(PROFILE["o_e_ms"] + PROFILE["lambda_e_ms"] * n)
    assert points["mobile-only"]["latency_ms"] == pytest.approx(PROFILE["lambda_m_ms"] * m)
    assert points["cloud-only"]["money"] == pytest.approx(1.0) and points["edge-only"]["money"] == 0
    assert points["cloud-only"]["exposure"] == 1 and points["mobile-only"]["exposure"] == 0
    assert {p["priced"] for p in result["policies"]} == {"exact"}
    names = list(points)  # what calibration chooses from: every family's configurations, and the baselines
    assert any(n.startswith("cascade") for n in names) and any(n.startswith("edge-cascade") for n in names)
    assert {"deebert", "adaee", "dimec-fixed"} <= set(names)
    # the front: nobody on it is dominated, everybody off it is
    front = set(result["pareto_front"])
    keys = {k: (-p["accuracy"], p["latency_ms"], p["money"], p["exposure"]) for k, p in points.items()}

    def dominated(k):
        return any(all(a <= b for a, b in zip(o, keys[k], strict=True)) and o != keys[k] for o in keys.values())

    assert front and all(not dominated(k) for k in front)
    # everybody off the front is dominated, or has the very figures of a point on it (listed once)
    assert all(dominated(k) or any(keys[k] == keys[f] for f in front) for k in set(points) - front)
    chosen = points[result["pick"]]
    assert chosen["latency_ms"] <= 30 and chosen["exposure"] <= 0.5
    assert 100 * (result["cloud_only_accuracy"] - chosen["accuracy"]) <= 5.0
    feasible = [p for p in points.values() if p["latency_ms"] <= 30 and p["exposure"] <= 0.5
                and 100 * (result["cloud_only_accuracy"] - p["accuracy"]) <= 5.0]
    assert chosen["accuracy"] == max(p["accuracy"] for p in feasible)


def test_plan_reports_test_figures_but_chooses_on_validation(tiny_run, profile):
    val = plan_run(tiny_run, str(profile), PlanConstraints(), "cost", log=lambda _: None)
    test = plan_run(tiny_run, str(profile), PlanConstraints(), "cost", split="test", log=lambda _: None)
    assert test["chosen_on"] == "validation" and test["split"] == "test" and test["pick"] == val["pick"]


def test_plan_bad_input(tiny_run, profile, tmp_path, capsys):
    for bad in ({"max_latency_ms": -1}, {"max_money": -0.5}, {"max_loss": -2}, {"max_exposure": 2}):
        with pytest.raises(ConfigError):
            PlanConstraints(**bad)
    with pytest.raises(DimecError, match="no policy meets"):  # nothing answers in 0.1 ms
        plan_run(tiny_run, str(profile), PlanConstraints(max_latency_ms=0.1), out_dir=tmp_path / "p",
                 log=lambda _: None)
    assert (tmp_path / "p" / "plan.json").is_file()  # the figures are still written
    with pytest.raises(ConfigError, match="latency profile not found"):
        plan_run(tiny_run, str(tmp_path / "nope.json"), PlanConstraints(), log=lambda _: None)
    from dimec.cli import main

    base = ["plan", str(tiny_run), "--profile", str(profile), "--out", str(tmp_path / "cli")]
    assert main(base + ["--max-latency-ms", "50", "--private"]) == 0
    assert "pick (cost" in capsys.readouterr().out
    for extra, message in ((["--max-latency-ms", "-3"], "--max-latency-ms must be >= 0"),
                           (["--max-money", "-1"], "--max-money must be >= 0"),
                           (["--cloud-price", "-1"], "prices must be >= 0"),
                           (["--trusted", "mars"], "--trusted"),
                           (["--max-latency-ms", "0.01"], "no policy meets")):
        assert main(base + extra) == 2, extra
        assert message in capsys.readouterr().err


def test_pareto_front_by_hand():
    pts = [{"accuracy": 0.9, "latency_ms": 10, "money": 1, "exposure": 1},
           {"accuracy": 0.8, "latency_ms": 5, "money": 0, "exposure": 0},
           {"accuracy": 0.8, "latency_ms": 6, "money": 0, "exposure": 0},   # dominated by 1
           {"accuracy": 0.95, "latency_ms": 20, "money": 2, "exposure": 1},
           {"accuracy": 0.8, "latency_ms": 5, "money": 0, "exposure": 0}]   # the same as 1: listed once
    assert pareto_front(pts) == [0, 1, 3]


# ---- drift ------------------------------------------------------------------------------------------------------
def shifted_texts(n: int, seed: int = 7) -> list[str]:
    """Another task's texts, as far as the tiny vocabulary goes: long, and no sentiment word at all."""
    from conftest import FILLER

    rng = random.Random(seed)
    return [" ".join(rng.choices(FILLER, k=rng.randint(18, 28))) for _ in range(n)]


def held_out_texts(n: int, seed: int = 99) -> list[str]:
    """The training task's distribution, but texts never seen (another seed of the same generator)."""
    import csv
    import tempfile
    from pathlib import Path

    from conftest import make_sentiment_csv

    with tempfile.TemporaryDirectory() as d:
        path = make_sentiment_csv(Path(d) / "held_out.csv", n=n, seed=seed)
        with path.open() as f:
            return [row["text"] for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def drift_run(tmp_path_factory, tiny_encoder):
    """A tiny run with a bigger validation split (200 texts) so the reference is not all noise."""
    from conftest import make_sentiment_csv, tiny_run_config

    from dimec.pipeline import run_all

    root = tmp_path_factory.mktemp("drift")
    run_dir = root / "run"
    cfg = tiny_run_config(tiny_encoder, make_sentiment_csv(root / "task.csv", n=2000, seed=3))
    cfg.calibration.policy = "dimec-fixed"  # the client routes by DIMEC-DC's centroids (its "fixed" routing)
    run_all(cfg, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def drift_packages(drift_run, tmp_path_factory):
    from dimec.serving.deploy.export import export_packages

    return export_packages(drift_run, tmp_path_factory.mktemp("drift_packages"), onnx=False)


def test_export_writes_one_reference_for_every_package(drift_packages, drift_run):
    from dimec.runtime.package import read_manifest
    from dimec.serving.ops.monitor import model_label, read_reference

    refs = [read_reference(drift_packages[t]) for t in ("mobile", "edge", "cloud")]
    assert refs[0] == refs[1] == refs[2] == read_reference(drift_run)
    ref = refs[0]
    assert ref["model"] == model_label(read_manifest(drift_packages["edge"]))
    assert ref["samples"] == 200 and sum(ref["routed"]["counts"]) == 200
    assert sum(ref["routing_distance"]["counts"]) == 200
    assert sum(sum(c) for c in ref["confidence"]["counts"].values()) == 200
    assert "drift_reference.json" in read_manifest(drift_packages["cloud"])["files"]


def test_psi_and_bins():
    from dimec.serving.ops.monitor import bin_counts, psi, quantile_edges

    x = np.linspace(0, 1, 1001)
    edges = quantile_edges(x, 10)
    assert len(edges) == 9 and bin_counts([0.0, 0.1, 0.1000001, 2.0], [0.1, 0.5]) == [2, 1, 1]
    assert psi([100] * 10, [50] * 10) == pytest.approx(0)
    assert psi([190, 10], [100, 100]) > 0.5


def _serve_phase(drift_packages, texts):
    """Fresh edge, cloud and gateway (fresh metrics), the texts sent through the gateway; returns the URLs
    and the servers to stop."""
    from fastapi.testclient import TestClient

    from dimec.runtime.tier import TierModel
    from dimec.serving.deploy.local import ThreadServer
    from dimec.serving.phone.client import MobileClient
    from dimec.serving.servers.server import create_app, create_gateway_app

    token = "drift-token-1"
    tiers = {t: ThreadServer(create_app(drift_packages[t], t, token)).start() for t in ("edge", "cloud")}
    client = MobileClient(TierModel(drift_packages["mobile"]), tiers["edge"].url, tiers["cloud"].url, token)
    gateway = ThreadServer(create_gateway_app(client, token)).start()
    http = TestClient(gateway.app)
    for i in range(0, len(texts), 25):
        r = http.post("/v1/classify", json={"texts": texts[i : i + 25]}, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200
    return [gateway.url, tiers["edge"].url, tiers["cloud"].url], [gateway, *tiers.values()], client


@pytest.mark.parametrize("stream, expected", [("held_out", 0), ("shifted", 1)])
def test_monitor_flags_shifted_traffic_and_stays_quiet_in_distribution(drift_packages, stream, expected, capsys):
    from dimec.cli import main

    texts = held_out_texts(300) if stream == "held_out" else shifted_texts(300)
    urls, servers, client = _serve_phase(drift_packages, texts)
    try:
        if expected:
            with pytest.raises(SystemExit) as exit_info:
                main(["monitor", *urls, "--min-samples", "50"])
            assert exit_info.value.code == 1
        else:
            assert main(["monitor", *urls, "--min-samples", "50"]) == 0
        out = capsys.readouterr().out
        assert "routing_distance" in out and "routed" in out and "confidence[" in out
        assert ("DRIFT" in out) == bool(expected), out
    finally:
        for s in servers:
            s.stop()
        client.close()


def test_monitor_bad_input(drift_packages, tmp_path, capsys):
    from dimec.cli import main
    from dimec.serving.ops.monitor import monitor, read_reference

    assert main(["monitor", "http://127.0.0.1:9"]) == 2  # nothing there: one clear line
    assert "drift reference" in capsys.readouterr().err
    assert main(["monitor", "http://127.0.0.1:9", "--reference", str(tmp_path)]) == 2
    assert "no drift reference" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="threshold"):
        monitor(["http://127.0.0.1:9"], read_reference(drift_packages["edge"]), threshold=-1)


def test_reference_counts_the_tier_a_plan_starts_on():
    """The live counter records the tier the policy chose (a plan's first stage), so the reference must too:
    a cascade starts every text on the phone, whichever tier then answers."""
    from test_policies import CM, synthetic

    from dimec.config import CalibrationConfig
    from dimec.routing import ROUTERS
    from dimec.serving.ops.monitor import build_reference

    outputs, _ = synthetic(n=1000)  # honest confidences: the confident 60% stay on the phone
    cascade = ROUTERS["cascade"].from_config(CalibrationConfig(control="point", max_loss=0.5)).fit(outputs, CM)
    assert len(set(cascade.route(outputs, CM).tier.tolist())) > 1  # it answers on several tiers
    ref = build_reference(outputs, cascade, CM, "model")
    assert ref["routed"]["counts"] == [len(outputs), 0, 0]
    assert sum(sum(c) for c in ref["confidence"]["counts"].values()) == len(outputs)
