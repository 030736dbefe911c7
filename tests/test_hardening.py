"""Issue 11: no 5xx and no traceback on any input, crash-safe artifacts, configuration checked before
anything runs. One regression test per finding (finding 9, the trainer's checkpoint, is tested with the
trainer), plus property-based fuzzing of the HTTP inputs and of the `--set` parser (bounded examples)."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_sentiment_csv, tiny_run_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dimec.atomic import atomic_dir, read_json, write_json, write_text
from dimec.cli import main
from dimec.config import RunConfig, describe_settings, load_run_config
from dimec.data import load_task
from dimec.data.loaders import read_raw_task
from dimec.errors import ConfigError, DataError
from dimec.outputs import ExitOutputs
from dimec.textinput import check_args, decode_utf8, read_lines

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from dimec.runtime.tier import TierModel  # noqa: E402
from dimec.serving.deploy.export import export_packages  # noqa: E402
from dimec.serving.deploy.local import ThreadServer  # noqa: E402
from dimec.serving.phone.client import MobileClient  # noqa: E402
from dimec.serving.servers.server import Limits, create_app  # noqa: E402

TOKEN = "hardening-token"
AUTH = {"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    """`dimec ARGV` in this process: exit code (argparse's included), stdout, stderr; never a traceback."""
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse refuses a bad option value with exit 2
        code = stop.code
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return code, out.out, out.err


@pytest.fixture()
def run_copy(tiny_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    return run


@pytest.fixture(scope="module")
def packages(tiny_run, tmp_path_factory):
    return export_packages(tiny_run, tmp_path_factory.mktemp("packages"), onnx=False)


@pytest.fixture(scope="module")
def edge_model(packages) -> TierModel:
    return TierModel(packages["edge"])


@pytest.fixture(scope="module")
def http(edge_model) -> TestClient:
    return TestClient(create_app(None, "edge", TOKEN, model=edge_model))


@pytest.fixture(scope="module")
def documented(http) -> set[int]:
    """The statuses the OpenAPI schema lists for POST /v1/classify."""
    return {int(s) for s in http.get("/openapi.json").json()["paths"]["/v1/classify"]["post"]["responses"]}


# ---- 1. a lone surrogate is a 422 naming the field, and the connection survives ----------------------------
@pytest.mark.parametrize("body, field", [
    (b'{"text": "bad \\ud800 here"}', "text"),
    (b'{"text": "ok", "text_pair": "x \\udfff"}', "text_pair"),
    (b'{"texts": ["ok", "\\udcff"]}', "texts"),
    (b'{"texts": ["ok"], "text_pairs": ["\\ud800"]}', "text_pairs"),
    (b'{"texts": ["ok"], "ids": ["\\ud800"]}', "ids"),
])
def test_lone_surrogate_is_422_naming_the_field(http, body, field):
    r = http.post("/v1/classify", content=body, headers=AUTH)
    assert r.status_code == 422
    assert f"body.{field}" in r.json()["error"] and "lone surrogate" in r.json()["error"]


def test_lone_surrogate_keeps_the_keep_alive_connection(edge_model):
    import httpx

    with ThreadServer(create_app(None, "edge", TOKEN, model=edge_model)) as server, \
            httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as client:
        bad = [b'{"text": "bad \\ud800 here"}', b'{"text": "bad \xff"}', b"[" * 5000 + b"]" * 5000,
               b'{"text": ' + b"1" * 5000 + b"}", b'{"texts": ["a"], "\\ud800": 1}']
        for i in range(10):  # the original bug: the next good request on the connection was reset
            assert client.post("/v1/classify", content=bad[i % len(bad)]).status_code == 422
            assert client.post("/v1/classify", json={"text": "good"}).status_code == 200
        metrics = client.get("/metrics").text
    assert 'status="500"' not in metrics


# ---- 2. invalid UTF-8 on the command line, in --file and on stdin: exit 2, one line -------------------------
def test_invalid_utf8_arguments_file_and_stdin(capsys, monkeypatch, tiny_run, tmp_path, packages):
    code, _, err = run_cli(capsys, ["route", str(tiny_run), "bad \udcff text"])  # argv as Python decodes 0xff
    assert code == 2 and "text 1 is not valid UTF-8 (byte 0xff" in err
    bad_file = tmp_path / "texts.txt"
    bad_file.write_bytes(b"good\nbad \xff text\n")
    code, _, err = run_cli(capsys, ["route", str(tiny_run), "--file", str(bad_file)])
    assert code == 2 and f"{bad_file}:2 is not valid UTF-8" in err
    client = ["client", str(packages["mobile"]), "--routing", "mobile-only", "--backend", "torch"]
    code, _, err = run_cli(capsys, [*client[:2], "ok", "bad \udcff", *client[2:]])
    assert code == 2 and "text 2 is not valid UTF-8 (byte 0xff" in err
    code, _, err = run_cli(capsys, [*client, "--file", str(bad_file)])
    assert code == 2 and "is not valid UTF-8" in err
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"good film\nbad \xff text\n")))
    code, out, err = run_cli(capsys, client)
    assert code == 2 and "stdin:2 is not valid UTF-8" in err
    assert json.loads(out.splitlines()[0])["text"] == "good film"  # lines before the bad one were answered
    code, _, err = run_cli(capsys, ["export", str(tiny_run), "--out", str(tmp_path / "p"), "--texts-file",
                                    str(bad_file)])
    assert code == 2 and "is not valid UTF-8" in err


def test_invalid_utf8_argument_in_a_real_process(tiny_run):
    """The real path: the shell passes bytes, Python decodes them with surrogateescape."""
    done = subprocess.run([sys.executable, "-m", "dimec", "route", str(tiny_run), b"bad \xff text"],
                          capture_output=True, timeout=120, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert done.returncode == 2 and b"Traceback" not in done.stderr
    assert b"not valid UTF-8 (byte 0xff" in done.stderr


@given(st.lists(st.text(max_size=12) | st.builds(lambda a, s: a + s, st.text(max_size=5), st.sampled_from(
    ["\ud800", "\udcff", "\udfff"])), max_size=4))
@FUZZ
def test_text_checks_accept_text_or_say_why(texts):
    try:
        assert check_args(texts) == texts
    except DataError as exc:
        assert "text " in exc.message and "\n" not in exc.message
        assert any(not _encodes(t) for t in texts)
    else:
        assert all(_encodes(t) for t in texts)


@given(st.binary(max_size=64))
@FUZZ
def test_decoding_bytes_is_text_or_a_clear_error(data):
    try:
        text = decode_utf8(data, "f")
    except DataError as exc:
        assert exc.message.startswith("f:") and "is not valid UTF-8" in exc.message
    else:
        assert text.encode("utf-8") == data.removeprefix(b"\xef\xbb\xbf")


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def test_read_lines_drops_a_bom_and_blank_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"\xef\xbb\xbfone\n\n  \ntwo\r\n")
    assert read_lines(path) == ["one", "two"]


# ---- 3. settings checked before any work, every bad value reported, --set parsed safely ----------------------
@pytest.mark.parametrize("override, message", [
    ("train.epochs=-1", "train.epochs must be at least 1, got -1"),
    ("train.epochs=0", "train.epochs must be at least 1, got 0"),
    ("train.learning_rate=-1", "train.learning_rate must be a finite number > 0, got -1.0"),
    ("train.learning_rate=.nan", "train.learning_rate must be a finite number > 0, got nan"),
    ("train.batch_size=0", "train.batch_size must be at least 1, got 0"),
    ("data.max_length=0", "data.max_length must be at least 8, got 0"),
    ("data.max_length=100", "data.max_length=100 is over the encoder's 64 positions"),
    ("train.epochs=[1", "cannot parse the value of train.epochs"),
    ("train.epochs=!!python/object/apply:os.system ['touch PWNED']", "could not determine a constructor"),
    ("calibration.alpha_grid=[]", "calibration.alpha_grid must hold at least 1 value"),
    ("cost.offload_cloud=-2", "cost.offload_cloud must be at least 0, got -2.0"),
    ("model.exit_layers=[2,1,2]", "model.exit_layers must satisfy 1 <= m < n <= l"),
])
def test_bad_settings_fail_before_the_run_directory_is_touched(capsys, tmp_path, tiny_encoder, tiny_task_csv,
                                                                override, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    argv = ["train", "--run-dir", str(run), "--model", str(tiny_encoder), "--set", "data.task=file",
            "--set", f"data.path={tiny_task_csv}", "--set", "data.max_length=32", "--set", "model.exit_layers=[1,2,2]",
            "--set", override]
    code, _, err = run_cli(capsys, argv)
    assert code == 2 and message in err
    assert err.count("\n") == 2  # "dimec: error: ..." and its hint, one line each
    assert not run.exists() and not (tmp_path / "PWNED").exists()


def test_every_bad_value_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_run_config(None, ["train.epochs=0", "train.batch_size=x", "cost.mobile_layer=.inf",
                               "calibration.medium_rule=bogus", "data.nope=1", "model.exit_pooling=max"])
    lines = err.value.message.splitlines()
    assert lines[0] == "6 bad settings:" and len(lines) == 7
    for key in ("train.epochs", "train.batch_size", "cost.mobile_layer", "calibration.medium_rule", "data.nope",
                "model.exit_pooling"):
        assert any(key in line for line in lines[1:]), key


def test_programmatic_configs_are_checked_by_the_stages(tmp_path, tiny_encoder, tiny_task_csv):
    from dimec.pipeline import train_stage

    cfg = tiny_run_config(tiny_encoder, tiny_task_csv)
    cfg.train.learning_rate = float("nan")
    with pytest.raises(ConfigError, match="learning_rate"):
        train_stage(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="learning_rate"):
        cfg.save(tmp_path / "config.json")  # an invalid config is never written
    assert not (tmp_path / "config.json").exists()


def test_settings_are_listed_with_type_default_and_meaning(capsys):
    rows = describe_settings()
    defaults = RunConfig().to_dict()
    assert len(rows) == sum(len(section) for section in defaults.values())
    for row in rows:
        section, name = row["key"].split(".")
        assert row["help"] and row["type"], row
        expected = defaults[section][name]
        assert row["default"] == (list(expected) if isinstance(expected, tuple) else expected)
    code, out, _ = run_cli(capsys, ["settings"])
    assert code == 0 and all(row["key"] in out for row in rows)
    code, out, _ = run_cli(capsys, ["settings", "train", "--json"])
    listed = json.loads(out)
    assert code == 0 and {r["key"] for r in listed} == {r["key"] for r in rows if r["key"].startswith("train.")}
    assert {"key": "train.epochs", "type": "int", "default": 3, "help": "passes over the training split"} in listed


SETTING_KEYS = [row["key"] for row in describe_settings()]
YAMLISH = st.sampled_from(["[1", "]", "{", "!!python/object/apply:os.system ['x']", "!!binary AAAA", ".nan",
                           "-.inf", "1e999", "[]", "{}", "null", "~", "0x10", "2024-01-01", "&a [*a]", "'", '"',
                           "[1, 2, 3]", "[0.5]", "yes", "- a", "a: b", "*x", "%YAML 1.1", "\t", "[" * 300,
                           "\udcff", "\ud800", "1_000", "+1", "-0"])


@given(st.one_of(st.text(max_size=40),
                 st.builds(lambda k, v: f"{k}={v}", st.sampled_from(SETTING_KEYS),
                           st.one_of(YAMLISH, st.text(max_size=20), st.integers().map(str),
                                     st.floats(allow_nan=True).map(repr)))))
@FUZZ
def test_any_override_gives_a_valid_config_or_one_clear_line(item):
    try:
        cfg = load_run_config(None, [item])
    except ConfigError as exc:
        assert exc.message and "\n" not in exc.message and "Traceback" not in exc.message
        return
    assert cfg.problems() == []
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # saves and loads back


# ---- 4. a damaged outputs cache is recomputed ------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "empty", "random"])
def test_damaged_outputs_cache_is_recomputed_by_calibrate(capsys, run_copy, damage):
    cache = run_copy / "outputs" / "validation.safetensors"
    good = ExitOutputs.load(cache)
    data = cache.read_bytes()
    cache.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                       "random": np.random.default_rng(0).bytes(len(data))}[damage])
    code, out, _ = run_cli(capsys, ["calibrate", str(run_copy)])
    assert code == 0 and "recomputing it" in out
    again = ExitOutputs.load(cache)  # a valid cache again, equal to the one the model made before
    np.testing.assert_allclose(again.logits, good.logits, atol=1e-5)
    np.testing.assert_array_equal(again.labels, good.labels)


# ---- 5. a calibrate refused for its settings leaves the run directory as it was ---------------------------------
def test_refused_calibrate_changes_nothing(capsys, run_copy):
    before = {name: (run_copy / name).read_bytes() for name in ("config.json", "router.json")}
    code, _, err = run_cli(capsys, ["calibrate", str(run_copy), "--set", "calibration.medium_rule=bogus",
                                    "--set", "cost.offload_cloud=7"])
    assert code == 2 and "calibration.medium_rule must be one of" in err
    assert {name: (run_copy / name).read_bytes() for name in before} == before
    assert run_cli(capsys, ["calibrate", str(run_copy)])[0] == 0


# ---- 6. "NaN" is a missing label, not a class ------------------------------------------------------------------
def test_nan_labels_are_refused_like_blank_ones(tmp_path):
    path = make_sentiment_csv(tmp_path / "t.csv", n=60)
    lines = path.read_text().splitlines()
    lines[5] = lines[5].rsplit(",", 1)[0] + ",NaN"
    path.write_text("\n".join(lines) + "\n")
    cfg = load_run_config(None, ["data.task=file", f"data.path={path}"]).data
    with pytest.raises(DataError, match=r"t\.csv:6: label 'NaN' in column 'label' marks a missing value"):
        load_task(cfg)
    cfg.missing_labels = ()  # "NaN" declared a real class
    assert read_raw_task(cfg).label_names == ["NaN", "neg", "pos"]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": NaN}\n{"text": "x", "label": "neg"}\n')
    with pytest.raises(DataError, match=r"t\.jsonl:2: label 'nan'.*missing value"):
        load_task(load_run_config(None, ["data.task=file", f"data.path={jsonl}"]).data)


# ---- 7. a wrong token or URL is an error, not a degraded answer ------------------------------------------------
def test_client_misconfiguration_is_an_error(capsys, edge_model, packages):
    client = ["client", str(packages["mobile"]), "good", "--backend", "torch", "--routing", "edge-only"]
    with ThreadServer(create_app(None, "edge", TOKEN, model=edge_model)) as server:
        code, out, err = run_cli(capsys, [*client, "--edge-url", server.url, "--token", "WRONG"])
        assert code == 2 and out == "" and "refused this client's token" in err and "401" in err
        code, out, _ = run_cli(capsys, [*client, "--edge-url", server.url, "--token", TOKEN])
        assert code == 0 and json.loads(out)["tier"] == "edge"
    for url in ("ftp://127.0.0.1:21", "notaurl", "http://", "127.0.0.1:8101"):
        code, out, err = run_cli(capsys, [*client, "--edge-url", url, "--token", TOKEN])
        assert code == 2 and out == "" and "URL" in err, url
    with pytest.raises(ConfigError, match="not an http"):
        MobileClient(TierModel(packages["mobile"]), "ftp://x", None, TOKEN)


# ---- 8. unparsable bodies are 422; the schema lists every status and the bearer scheme -------------------------
@pytest.mark.parametrize("body, message", [
    (b'{"text": "bad \xff"}', "not valid UTF-8 (byte 0xff"),
    (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    (b'{"text": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (bytes(range(256)), "invalid request body"),
])
def test_unparsable_bodies_are_422(http, body, message):
    r = http.post("/v1/classify", content=body, headers=AUTH)
    assert r.status_code == 422 and message in r.json()["error"]


def test_openapi_documents_statuses_and_bearer_auth(http):
    schema = http.get("/openapi.json").json()
    classify = schema["paths"]["/v1/classify"]["post"]
    assert {"200", "401", "413", "422", "500"} <= set(classify["responses"]) and "400" not in classify["responses"]
    assert classify["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    bearer = schema["components"]["securitySchemes"]["HTTPBearer"]
    assert bearer["type"] == "http" and bearer["scheme"] == "bearer"
    assert classify["security"] == [{"HTTPBearer": []}]
    assert schema["paths"]["/v1/ping"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]


LONE_SURROGATE = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udcff", "\udfff"])
# any text, and text with a lone surrogate inside (st.text alone only makes valid surrogate pairs)
TEXT = st.text(max_size=12) | st.builds(lambda a, s, b: a + s + b, st.text(max_size=5), LONE_SURROGATE,
                                        st.text(max_size=5))
JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), TEXT)
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.sampled_from(["text", "texts", "text_pair", "text_pairs", "ids", "x"]) | st.text(max_size=4), inner,
    max_size=4), max_leaves=12)
TEXTS = st.lists(TEXT, max_size=5)
NEAR_VALID = st.fixed_dictionaries({}, optional={"text": JSON_LEAF, "text_pair": JSON_LEAF, "texts": TEXTS,
                                                 "text_pairs": TEXTS, "ids": TEXTS})
WELL_FORMED = st.one_of(  # right fields and types, any text: what reaches the model
    st.builds(lambda t: {"text": t}, TEXT),
    st.builds(lambda t, p: {"text": t, "text_pair": p}, TEXT, TEXT),
    st.lists(TEXT, min_size=1, max_size=4).flatmap(lambda ts: st.fixed_dictionaries(
        {"texts": st.just(ts)}, optional={"text_pairs": st.lists(TEXT, min_size=len(ts), max_size=len(ts)),
                                          "ids": st.lists(TEXT, min_size=len(ts), max_size=len(ts))})),
)


@given(body=st.one_of(WELL_FORMED, NEAR_VALID, JSON_VALUE))
@FUZZ
def test_fuzzed_json_bodies_get_a_documented_status_never_5xx(http, documented, body):
    raw = json.dumps(body, allow_nan=True).encode()  # ensure_ascii: surrogates travel as \\udXXX escapes
    _check_answer(http.post("/v1/classify", content=raw, headers=AUTH), documented, raw)


@given(body=st.one_of(WELL_FORMED, JSON_VALUE), cut=st.integers(0, 200), flip=st.integers(0, 200),
       garbage=st.binary(max_size=40), form=st.sampled_from(["truncated", "flipped", "bytes"]),
       ctype=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded"]))
@FUZZ
def test_fuzzed_raw_bodies_get_a_documented_status_never_5xx(http, documented, body, cut, flip, garbage, form,
                                                             ctype):
    raw = json.dumps(body, allow_nan=True).encode()
    if form == "flipped" and raw:  # one byte changed: often invalid UTF-8 or JSON
        raw = raw[: flip % len(raw)] + bytes([raw[flip % len(raw)] ^ 0x80]) + raw[flip % len(raw) + 1:]
    raw = {"truncated": raw[:cut], "flipped": raw, "bytes": garbage}[form]
    _check_answer(http.post("/v1/classify", content=raw, headers={**AUTH, "content-type": ctype}), documented, raw)


def _check_answer(r, documented: set[int], raw: bytes) -> None:
    assert r.status_code in documented and r.status_code < 500, (raw, r.text)
    if r.status_code != 200:
        assert r.json()["error"]


# ---- 10. serve: port range, port in use and limits checked before "serving on" --------------------------------
def test_serve_checks_port_and_limits_before_announcing(capsys, packages, monkeypatch):
    import dimec.serving.cli as serving_cli

    monkeypatch.setattr(serving_cli, "run_server", lambda *a: pytest.fail("must not serve"))
    serve = ["serve", "edge", str(packages["edge"]), "--token", TOKEN]
    for bad in (["--port", "99999"], ["--port", "-1"], ["--max-batch", "-1"], ["--max-body-bytes", "0"],
                ["--max-text-chars", "0"], ["--threads", "0"], ["--port", "http"]):
        code, out, err = run_cli(capsys, [*serve, *bad])
        assert code == 2 and out == "" and "error" in err, bad
    code, out, err = run_cli(capsys, [*serve, "--max-body-bytes", "100"])
    assert code == 2 and "server.limits.max_body_bytes must be at least 1024, got 100" in err and "tier on" not in out
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = run_cli(capsys, [*serve, "--port", str(port)])
    assert code == 2 and f"port {port} on 127.0.0.1 is already in use" in err and out == ""
    with pytest.raises(ConfigError, match="max_batch"):
        Limits(max_batch=0)


# ---- artifacts: crash-safe writes, checked reads ------------------------------------------------------------------
def test_atomic_writes_leave_the_old_file_on_failure(tmp_path):
    path = tmp_path / "a.json"
    write_json(path, {"v": 1})
    with pytest.raises(TypeError):
        write_json(path, {"v": object()})  # fails while writing: the old file stays
    assert read_json(path, "") == {"v": 1} and [p.name for p in tmp_path.iterdir()] == ["a.json"]
    folder = tmp_path / "model"
    with atomic_dir(folder) as tmp:
        (tmp / "w").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(folder) as tmp:
        (tmp / "w").write_text("new, half")
        raise RuntimeError("killed")
    assert (folder / "w").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "model"]


def test_temporary_files_of_a_killed_writer_are_cleaned_up(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    (tmp_path / f".a.json.tmp-{pid}").write_text("half")
    (tmp_path / f".model.tmp-{pid}").mkdir()
    (tmp_path / f".model.old-{pid}").mkdir()
    write_text(tmp_path / "a.json", "{}")
    with atomic_dir(tmp_path / "model"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "model"]


def test_model_folder_is_swapped_whole(run_copy, monkeypatch):
    from dimec.modeling import multi_exit
    from dimec.pipeline import load_model

    model = load_model(run_copy)
    before = (run_copy / "model" / "model.safetensors").read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies while the weights are written

    monkeypatch.setattr(multi_exit, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(run_copy / "model")
    assert (run_copy / "model" / "model.safetensors").read_bytes() == before
    assert not [p for p in run_copy.iterdir() if p.name.startswith(".model")]


@pytest.mark.parametrize("name, damage, command, message", [
    ("router.json", b'{"router": "dimec-fixed", "par', "evaluate", "router.json is damaged"),
    ("router.json", b'{"router": "nope"}', "evaluate", "older dimec"),
    ("router.json", b'{"format_version": 2, "router": "nope", "params": {}, "state": {}}', "evaluate",
     "unknown router"),
    ("router.json", b'{"format_version": 2, "router": "cascade", "params": {}, "state": {}}', "evaluate",
     "router.json is damaged"),
    ("model/model.safetensors", b"\x00" * 10, "route", "is damaged"),
    ("config.json", b"{not json", "evaluate", "cannot parse config file"),
    ("data.json", b"", "evaluate", "data.json"),
    ("dynamics/epoch_002.jsonl", b'{"epoch": 2, "ind', "calibrate", "epoch_002.jsonl is damaged"),
])
def test_damaged_artifacts_are_named_errors(capsys, run_copy, name, damage, command, message):
    (run_copy / name).write_bytes(damage)
    argv = [command, str(run_copy)] + (["good film"] if command == "route" else [])
    code, _, err = run_cli(capsys, argv)
    assert code == 2 and message in err
