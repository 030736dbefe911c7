"""Serving settings: declared once (serving/settings.py), listed by `dimec settings`, checked by one path, saved
beside the package they configure and read back with --settings. Tiny packages; no server keeps running."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from dimec.cli import main  # noqa: E402
from dimec.runtime.package import read_manifest  # noqa: E402
from dimec.serving import cli as serving_cli  # noqa: E402
from dimec.serving import settings as st  # noqa: E402
from dimec.serving.deploy.export import export_packages  # noqa: E402
from dimec.serving.deploy.local import free_port  # noqa: E402

TOKEN = "settings-test-token-1234"


@pytest.fixture(scope="module")
def packages(tiny_run, tmp_path_factory):
    return export_packages(tiny_run, tmp_path_factory.mktemp("packages"), onnx=False)


@pytest.fixture
def served(monkeypatch):
    """`dimec serve` up to the point it would serve: the app it built, instead of a running server."""
    apps = []
    monkeypatch.setattr(serving_cli, "run_server", lambda app, sock, log_level: apps.append(app))
    return apps


def serve(packages, *extra: str) -> int:
    return main(["serve", "cloud", str(packages["cloud"]), "--token", TOKEN, "--port", str(free_port()), *extra])


def test_dimec_settings_lists_the_serving_sections(capsys):
    assert main(["settings", "--json"]) == 0
    rows = {r["key"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["server.limits.max_batch"]["type"] == "int" and rows["server.limits.max_batch"]["default"] == 64
    assert "texts" in rows["server.limits.max_batch"]["help"]
    assert rows["client.timeouts.read_s"]["type"] == "float" and rows["client.timeouts.read_s"]["default"] == 10.0
    assert "read" in rows["client.timeouts.read_s"]["help"]
    for key in ("server.batching.max_wait_ms", "live.shadow_rate", "client.mobile.retries", "demo.token_ttl_s",
                "sources.scheduling.policy", "server.device", "train.epochs"):
        assert key in rows, key
    assert main(["settings", "server.limits"]) == 0
    out = capsys.readouterr().out
    assert "server.limits.max_body_bytes" in out and "client." not in out and "server.batching" not in out


@pytest.mark.parametrize("argv, message", [
    (["serve", "edge", "{missing}", "--max-batch", "0"], "server.limits.max_batch must be at least 1, got 0"),
    (["client", "{missing}", "x", "--edge-url", "http://127.0.0.1:9", "--timeout", "-1"],
     "client.timeouts.read_s must be in [0.001, 3600], got -1.0"),
    (["client", "{missing}", "x", "--edge-url", "http://127.0.0.1:9", "--shadow-rate", "2"],
     "live.shadow_rate must be in [0, 1], got 2.0"),
    (["client", "{missing}", "x", "--edge-url", "http://127.0.0.1:9", "--retries", "11"],
     "client.mobile.retries must be in [0, 10], got 11"),
])
def test_a_bad_setting_is_one_error_naming_it_before_anything_loads(tmp_path, capsys, argv, message):
    argv = [a.replace("{missing}", str(tmp_path / "no-package")) for a in argv]  # loading it would fail otherwise
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "package" not in err.split("hint")[0], err


def test_serve_saves_its_settings_beside_the_package_and_reads_them_back(packages, served, capsys):
    assert serve(packages, "--max-batch", "7", "--batching", "--batch-max", "5", "--max-text-chars", "500") == 0
    saved = packages["cloud"].parent / "cloud.settings.json"
    text = saved.read_text()
    body = json.loads(text)
    assert body["command"] == "serve" and body["schema"] == st.SCHEMA
    sections = body["sections"]
    assert sections["server.limits"]["max_batch"] == 7 and sections["server.batching"]["max_batch"] == 5
    assert sections["server"]["dynamic_batching"] is True and sections["live"]["shadow_rate"] == 0.02
    assert TOKEN not in text and "token" not in text.lower()  # no secret, not even the name of one
    read_manifest(packages["cloud"])  # beside the package, not in it: the manifest still verifies
    health = TestClient(served[-1]).get("/healthz").json()
    assert health["settings"]["server.limits"]["max_batch"] == 7

    # read back: the file's values stand, an option given on the command line wins
    assert serve(packages, "--settings", str(saved), "--max-text-chars", "300") == 0
    limits = served[-1].state.service.limits
    assert (limits.max_batch, limits.max_text_chars) == (7, 300)
    assert json.loads(saved.read_text())["sections"]["server.batching"]["max_batch"] == 5
    assert "settings saved to" in capsys.readouterr().err


def test_a_settings_file_with_an_unknown_key_or_section_or_bad_value_is_refused(packages, served, tmp_path, capsys):
    path = tmp_path / "serve.yaml"
    for raw, message in [({"sections": {"server.limits": {"max_bach": 3}}}, "unknown config key(s) server.limits.max_bach"),
                         ({"client": {"private": True}}, "unknown settings section(s) client for dimec serve"),
                         ({"server.limits": {"max_batch": 0}, "live": {"alpha": 2}},
                          "server.limits.max_batch must be at least 1"),
                         ({"server": {"threads": "four"}}, "server.threads must be of type int")]:
        path.write_text(json.dumps(raw))
        assert serve(packages, "--settings", str(path)) == 2, raw
        assert message in capsys.readouterr().err
    assert not served  # nothing got as far as serving


def test_the_client_round_trips_its_settings_and_warns_when_it_cannot_save(packages, tmp_path, capsys, monkeypatch):
    mobile = str(packages["mobile"])
    assert main(["client", mobile, "good movie", "--routing", "mobile-only", "--backend", "torch", "--retries", "4",
                 "--token", TOKEN, "--trusted", "edge", "--timeout", "3"]) == 0
    saved = packages["mobile"].parent / "mobile.settings.json"
    text = saved.read_text()
    sections = json.loads(text)["sections"]
    assert sections["client.mobile"] == {"backend": "torch", "routing": "mobile-only", "retries": 4}
    assert sections["client"]["trusted"] == ["edge"] and sections["client.timeouts"]["read_s"] == 3.0
    assert TOKEN not in text
    capsys.readouterr()

    # no --routing here: without the file's mobile-only this would be "no remote tier" (exit 2)
    assert main(["client", mobile, "good movie", "--settings", str(saved), "--retries", "1"]) == 0
    again = json.loads(saved.read_text())["sections"]
    assert again["client.mobile"] == {"backend": "torch", "routing": "mobile-only", "retries": 1}
    assert again["client"]["trusted"] == ["edge"]
    assert json.loads(capsys.readouterr().out.splitlines()[0])["tier"] == "mobile"

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(st, "settings_path", lambda package: blocker / "mobile.settings.json")  # cannot be written
    assert main(["client", mobile, "good movie", "--settings", str(saved)]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: cannot save the settings") == 1 and "Traceback" not in err
