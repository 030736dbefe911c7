"""Issue 17: the operator's inputs (a sources file, `dimec monitor`, `dimec route`, `dimec plan`) checked like
everything else: every problem at once, exit 2, never a traceback, never a wrong answer with exit 0."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import FakeTier

from dimec.cli import main


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    """`dimec ARGV` in this process: exit code, stdout, stderr; a traceback fails the test."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    return code, out.out, out.err


# ---- 7. the sources file: one checked schema ------------------------------------------------------------------------
GOOD_SOURCES = {"classes": [{"name": "high"}, {"name": "low"}],
                "sources": [{"name": "a", "token": "token-aaaa-1", "priority": "high"},
                            {"name": "b", "token": "token-bbbb-1", "priority": "low"}]}


@pytest.mark.parametrize("change, expected", [
    ({"scheduling": {"retry_after_s": float("inf")}}, ["retry_after_s"]),
    ({"allocation": {"valid_s": float("inf")}}, ["valid_s"]),
    ({"scheduling": {"queue_capacity": 10**12}}, ["queue_capacity"]),
    ({"sources": ["not a mapping", {"name": 5, "priority": "low", "token": "token-cccc-1"},
                  {"name": None, "priority": "low", "token": "token-dddd-1"}]},
     ["sources[0] must be a mapping", "sources[1].name", "sources[2]: 'name' is required"]),
    ({"classes": [{"name": "high", "weight": float("nan")}, 7], "scheduling": {"retry_after_s": "soon"},
      "allocation": {"enabled": "yes", "horizon_s": -1}},
     ["classes[0].weight", "classes[1] must be a mapping", "retry_after_s", "enabled", "horizon_s"]),
    ({"scheduling": [1, 2]}, ["scheduling must be a mapping"]),
    ({"scheduling": {"retry_after_s": 10**400}}, ["retry_after_s"]),  # a huge YAML integer: no OverflowError
    ({"scheduling": {"queue_capacity": 10**400}}, ["queue_capacity"]),  # ... in an integer setting too
    ({"scheduling": {"queue_capacity": 10**400}, "allocation": {"valid_s": 10**400}}, ["queue_capacity", "valid_s"]),
])
def test_sources_file_problems_are_all_reported_with_exit_2(capsys, tmp_path, change, expected):
    import yaml

    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({**GOOD_SOURCES, **change}))
    code, _, err = run_cli(capsys, ["serve", "edge", str(tmp_path / "no-package"), "--sources", str(path)])
    assert code == 2, err
    for text in expected:
        assert text in err, (text, err)


def test_a_good_sources_file_still_loads(tmp_path):
    from dimec.serving.servers.sources import SourceTable

    path = tmp_path / "fleet.json"
    path.write_text(json.dumps({**GOOD_SOURCES, "scheduling": {"retry_after_s": 2, "queue_capacity": 64}}))
    table = SourceTable.load(path)
    assert table.scheduled and [s.name for s in table.sources] == ["a", "b"]


# ---- 10. `dimec monitor`: never a traceback -------------------------------------------------------------------------
REFERENCE = {"format_version": 2, "model": "m0", "samples": 100, "router": "fixed", "anchors": [[0.0, 0.0]],
             "routing_distance": {"edges": [0.5, 1.0], "counts": [30, 40, 30]},
             "routed": {"counts": [50, 30, 20]},
             "confidence": {"edges": [0.6, 0.9], "counts": {"m": [10, 20, 30], "n": [5, 5, 5], "l": [1, 2, 3]}}}
GOOD_METRICS = """# TYPE dimec_drift_routed_total counter
dimec_drift_routed_total{model="m0",tier="mobile"} 5.0
# TYPE dimec_drift_confidence histogram
dimec_drift_confidence_bucket{model="m0",exit="m",le="0.6"} 1.0
dimec_drift_confidence_bucket{model="m0",exit="m",le="0.9"} 2.0
dimec_drift_confidence_bucket{model="m0",exit="m",le="+Inf"} 3.0
"""


@pytest.fixture()
def fake_tier():
    tier = FakeTier()
    yield tier
    tier.close()


def _deep(n: int) -> str:
    return "[" * n + "]" * n


@pytest.mark.parametrize("metrics, reference, extra", [
    (GOOD_METRICS, REFERENCE, ["--interval", "inf"]),
    (GOOD_METRICS, REFERENCE, ["--interval", "nan"]),
    (GOOD_METRICS, REFERENCE, ["--threshold", "nan"]),
    (GOOD_METRICS, {k: v for k, v in REFERENCE.items() if k != "routed"}, []),
    (GOOD_METRICS, {**REFERENCE, "samples": "many"}, []),
    (GOOD_METRICS, {**REFERENCE, "confidence": {"edges": "x", "counts": []}}, []),
    (GOOD_METRICS, {**REFERENCE, "routed": {"counts": [1, 2]}}, []),
    (GOOD_METRICS, {**REFERENCE, "routing_distance": {"edges": [1.0, 0.5], "counts": [1, 2, 3]}}, []),
    (GOOD_METRICS, _deep(100_000), []),
    (GOOD_METRICS, "not json", []),
    ("this is { not prometheus", REFERENCE, []),
    (GOOD_METRICS.replace('tier="mobile"', 'tier="moon"'), REFERENCE, []),
    (GOOD_METRICS.replace(',tier="mobile"', ""), REFERENCE, []),
    (GOOD_METRICS.replace('le="0.6"', 'le="abc"'), REFERENCE, []),
    (GOOD_METRICS.replace("} 2.0", "} NaN"), REFERENCE, []),
    (GOOD_METRICS.replace("} 5.0", "} -5.0"), REFERENCE, []),
])
def test_monitor_bad_inputs_exit_2_without_traceback(capsys, fake_tier, metrics, reference, extra):
    fake_tier.metrics = metrics
    fake_tier.reference = reference if isinstance(reference, str) else json.dumps(reference)
    code, out, err = run_cli(capsys, ["monitor", fake_tier.url, *extra])
    assert code == 2, (out, err)
    assert "dimec: error:" in err


@pytest.mark.parametrize("url", ["http://[::1", "ftp://x", "http://", "::::", "http://127.0.0.1:99999"])
def test_monitor_bad_urls_exit_2(capsys, url):
    code, _, err = run_cli(capsys, ["monitor", url])
    assert code == 2 and "dimec: error:" in err


def test_monitor_bad_reference_file_exits_2(capsys, fake_tier, tmp_path):
    fake_tier.metrics = GOOD_METRICS
    for bad in ({**REFERENCE, "anchors": "x"}, {**REFERENCE, "model": 5}, {"format_version": 2}):
        path = tmp_path / "ref.json"
        path.write_text(json.dumps(bad))
        code, _, err = run_cli(capsys, ["monitor", fake_tier.url, "--reference", str(path)])
        assert code == 2, err


def test_monitor_good_inputs_still_work(capsys, fake_tier):
    fake_tier.metrics, fake_tier.reference = GOOD_METRICS, json.dumps(REFERENCE)
    code, out, _ = run_cli(capsys, ["monitor", fake_tier.url, "--min-samples", "1"])
    assert code in (0, 1) and "routed" in out


# ---- 11. `dimec route` on a tampered run directory -------------------------------------------------------------------
def _tamper_router(run: Path, change) -> None:
    path = run / "router.json"
    raw = json.loads(path.read_text())
    change(raw["state"])
    path.write_text(json.dumps(raw))  # NaN is written as NaN, as a careless editor would


def _tamper_temperatures(run: Path, value) -> None:
    from dimec.modeling.multi_exit import MODEL_CONFIG

    path = run / "model" / MODEL_CONFIG
    path.write_text(json.dumps(json.loads(path.read_text()) | {"temperatures": value}))


def _shorten_prerouter(state) -> None:
    """A learned pre-router one feature short of what the model's embedding gives (or, if the run has none,
    one for another model: 5 features)."""
    if not state.get("prerouter"):
        state["plans"] = [[["mobile", 0, 0.9], ["edge", 1, 0.9], ["cloud", 2, None]],
                          [["edge", 1, 0.9], ["cloud", 2, None]], [["cloud", 2, None]]]
        state["prerouter"] = {"kind": "learned", "mean": [0.0] * 5, "scale": [1.0] * 5, "coef": [[0.1] * 5] * 3,
                              "intercept": [0.0, 0.0, 0.0], "t_cloud": 0.5, "t_edge": 0.5}
        return
    pre = state["prerouter"]
    longest = max((k for k, v in pre.items() if isinstance(v, list)), key=lambda k: len(pre[k]))
    pre[longest] = pre[longest][:-1]


def _nan_threshold(state) -> None:
    for plan in state["plans"]:
        for stage in plan[:-1]:
            stage[2] = float("nan")
    state["plans"].append([["edge", 1, float("nan")], ["cloud", 2, None]])


ROUTE_TAMPERING = {
    "no plans": lambda run: _tamper_router(run, lambda s: s.update(plans=[])),
    "plans not a list": lambda run: _tamper_router(run, lambda s: s.update(plans="x")),
    "pre-router of the wrong length": lambda run: _tamper_router(run, _shorten_prerouter),
    "NaN threshold": lambda run: _tamper_router(run, _nan_threshold),
    "temperatures x": lambda run: _tamper_temperatures(run, ["x", 1, 1]),
    "temperatures NaN": lambda run: _tamper_temperatures(run, [float("nan")] * 3),
    "temperatures 0": lambda run: _tamper_temperatures(run, [0, 0, 0]),
    "temperatures -1": lambda run: _tamper_temperatures(run, [-1, -1, -1]),
    "temperatures inf": lambda run: _tamper_temperatures(run, [float("inf")] * 3),
    "temperatures short": lambda run: _tamper_temperatures(run, [1.0]),
    "temperatures huge": lambda run: _tamper_temperatures(run, [10**400] * 3),
    "threshold huge": lambda run: _tamper_router(run, lambda s: s.update(plans=[[["edge", 1, 10**400],
                                                                                   ["cloud", 2, None]]])),
}


@pytest.mark.parametrize("name", list(ROUTE_TAMPERING))
def test_route_refuses_a_tampered_run_dir(capsys, tiny_run, tmp_path, name):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("packages", "outputs", "dynamics"))
    ROUTE_TAMPERING[name](run)
    code, out, err = run_cli(capsys, ["route", str(run), "a good movie", "a dull film"])
    assert code == 2, (out, err)
    assert "dimec: error:" in err and out == ""


def test_route_on_an_intact_run_dir_prints_json(capsys, tiny_run):
    code, out, err = run_cli(capsys, ["route", str(tiny_run), "a good movie"])
    assert code == 0, err
    answer = json.loads(out)  # strict JSON: no NaN
    assert 0.5 <= answer["confidence"] <= 1.0


# ---- 12. `dimec plan` inputs ------------------------------------------------------------------------------------------
PROFILE = {"lambda_m_ms": 2.0, "lambda_e_ms": 1.0, "o_e_ms": 5.0, "o_c_ms": 40.0, "cloud_layer_ms": 0.5}


def _policies(tiny_run) -> dict:
    raw = json.loads((tiny_run / "router.json").read_text())
    return {"policies": [{"name": "served", "router": raw["router"], "params": raw["params"], "state": raw["state"]},
                         {"name": "cloud", "router": "cascade", "params": {},
                          "state": {"plans": [[["cloud", 2, None]]], "confidence": "max_prob", "prerouter": None}}]}


def _nan_policy(tiny_run) -> dict:
    p = _policies(tiny_run)
    p["policies"][1]["state"]["plans"] = [[["edge", 1, float("nan")], ["cloud", 2, None]]]
    return p


PLAN_CASES = {
    "profile NaN": ({**PROFILE, "o_e_ms": float("nan")}, None, []),
    "profile negative": ({**PROFILE, "lambda_m_ms": -1.0}, None, []),
    "profile inf": ({**PROFILE, "o_c_ms": float("inf")}, None, []),
    "profile hidden factor NaN": ({**PROFILE, "hidden_state_factor": float("nan")}, None, []),
    "profile deep": ("[" * 100_000 + "]" * 100_000, None, []),
    "profile huge": ({**PROFILE, "o_c_ms": 10**400}, None, []),
    "cloud price inf": (PROFILE, None, ["--cloud-price", "inf"]),
    "edge price NaN": (PROFILE, None, ["--edge-price", "nan"]),
    "no policies": (PROFILE, {"policies": []}, []),
    "policies deep": (PROFILE, "[" * 100_000 + "]" * 100_000, []),
    "policies not a list": (PROFILE, {"policies": 5}, []),
    "policy NaN threshold": (PROFILE, "nan-policy", []),
}


@pytest.mark.parametrize("name", list(PLAN_CASES))
def test_plan_refuses_bad_inputs_with_exit_2(capsys, tiny_run, tmp_path, name):
    profile, policies, extra = PLAN_CASES[name]
    (tmp_path / "profile.json").write_text(profile if isinstance(profile, str) else json.dumps(profile))
    policies = _nan_policy(tiny_run) if policies == "nan-policy" else (policies or _policies(tiny_run))
    (tmp_path / "policies.json").write_text(policies if isinstance(policies, str) else json.dumps(policies))
    code, out, err = run_cli(capsys, ["plan", str(tiny_run), "--profile", str(tmp_path / "profile.json"),
                                      "--policies", str(tmp_path / "policies.json"), "--out", str(tmp_path / "o"),
                                      *extra])
    assert code == 2, (out, err)
    assert "dimec: error:" in err


def test_plan_help_and_code_agree_on_the_missing_profile(capsys, tiny_run, tmp_path):
    """Decision: no fallback. Latency is in milliseconds, which only a measured profile gives; --help says so
    and a run without profile.json exits 2 naming `dimec profile`."""
    from dimec.cli import build_parser

    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["plan"].format_help().split())
    assert "cost model's units" not in help_text and "dimec profile" in help_text
    (tmp_path / "policies.json").write_text(json.dumps(_policies(tiny_run)))
    code, _, err = run_cli(capsys, ["plan", str(tiny_run), "--policies", str(tmp_path / "policies.json"),
                                    "--out", str(tmp_path / "o")])
    assert code == 2 and "dimec profile" in err


def test_plan_with_good_inputs_works(capsys, tiny_run, tmp_path):
    (tmp_path / "profile.json").write_text(json.dumps(PROFILE))
    (tmp_path / "policies.json").write_text(json.dumps(_policies(tiny_run)))
    code, out, err = run_cli(capsys, ["plan", str(tiny_run), "--profile", str(tmp_path / "profile.json"),
                                      "--policies", str(tmp_path / "policies.json"), "--out", str(tmp_path / "o")])
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "plan.json").read_text())["pick"] in ("served", "cloud")
