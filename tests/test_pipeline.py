"""End to end on the tiny model: stages, artifacts, resume, routing texts, CLI errors."""

import json
import shutil

import numpy as np
import pytest
from conftest import tiny_run_config

from dimec.cli import main
from dimec.config import RunConfig
from dimec.outputs import ExitOutputs
from dimec.pipeline import calibrate_stage, route_texts, split_outputs, train_stage
from dimec.training.cartography import read_dynamics


def test_run_writes_every_artifact(tiny_run):
    for name in ("config.json", "data.json", "model/model.safetensors", "model/dimec_model.json",
                 "model/tokenizer.json", "router.json", "calibration.json", "metrics.json", "data_map.png",
                 "outputs/validation.safetensors", "outputs/test.safetensors", "train_log.jsonl"):
        assert (tiny_run / name).is_file(), name
    report = json.loads((tiny_run / "metrics.json").read_text())
    methods = [r["method"] for r in report["results"]]
    assert methods == ["cloud-only", "dimec-fixed", "dimec-dynamic"]
    cloud = report["results"][0]
    assert cloud["tier_shares"] == [0.0, 0.0, 1.0] and cloud["cost_change_pct"] == pytest.approx(0.0)
    for r in report["results"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and sum(r["tier_shares"]) == pytest.approx(1.0)
    assert RunConfig.load(tiny_run / "config.json").data.task == "file"
    assert not list(tiny_run.rglob("*.pt")) and not list(tiny_run.rglob("*.pkl"))  # no pickle anywhere


def test_dynamics_one_file_per_epoch_with_every_exit(tiny_run):
    probs, correct = read_dynamics(tiny_run)
    val = split_outputs(tiny_run, "validation")
    assert probs.shape == (3, len(val), 3) and correct.shape == probs.shape
    assert ((probs >= 0) & (probs <= 1)).all()
    lines = (tiny_run / "dynamics" / "epoch_001.jsonl").read_text().splitlines()
    assert set(json.loads(lines[0])) == {"epoch", "index", "true_label_prob", "correct"}


def test_the_tiny_task_is_learnt(tiny_run):
    test = split_outputs(tiny_run, "test")
    assert isinstance(test, ExitOutputs)
    assert test.correct[:, 2].mean() > 0.8  # separable toy data: the model really trains


def test_cached_outputs_are_reused(tiny_run):
    a = split_outputs(tiny_run, "test")
    b = split_outputs(tiny_run, "test")
    np.testing.assert_array_equal(a.probs, b.probs)


def test_recalibrate_with_other_costs(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cfg = RunConfig.load(run / "config.json")
    cfg.cost.mobile_layer = 100.0  # the mobile tier becomes ruinous: nothing should be sent there
    summary = calibrate_stage(run, cfg)
    assert summary["pool_counts"]["easy"] == 0


def test_resume_after_crash(tmp_path, tiny_encoder, tiny_task_csv):
    cfg = tiny_run_config(tiny_encoder, tiny_task_csv, epochs=2)
    run = tmp_path / "run"
    train_stage(cfg, run)
    log = (run / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 2
    # pretend the process died after epoch 1: drop epoch 2's traces and ask for 3 epochs
    (run / "dynamics" / "epoch_002.jsonl").unlink()
    cfg3 = tiny_run_config(tiny_encoder, tiny_task_csv, epochs=3)
    with pytest.raises(Exception, match="other train settings"):
        train_stage(cfg3, run)  # a changed config is refused, not silently mixed
    (run / "config.json").unlink()
    result = train_stage(cfg3, run)  # resumes after epoch 2 from the checkpoint
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3] and result.epochs_run == 3


def test_route_texts(tiny_run):
    answers = route_texts(tiny_run, ["the film was great", "awful plot"], mode="dynamic")
    assert [a["label"] for a in answers] == ["pos", "neg"]
    assert all(a["tier"] in ("mobile", "edge", "cloud") for a in answers)


def _error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    return err


def test_cli_errors_are_one_clear_message(capsys, tmp_path, tiny_run, tiny_encoder, tiny_task_csv):
    assert "unknown task" in _error(capsys, ["train", "--run-dir", str(tmp_path / "r"), "--task", "nope"])
    assert "not a dimec run directory" in _error(capsys, ["evaluate", str(tmp_path)])
    assert "unknown config key" in _error(capsys, ["train", "--run-dir", str(tmp_path / "r"), "--set", "train.epoch=1"])
    assert "bad override" in _error(capsys, ["train", "--run-dir", str(tmp_path / "r"), "--set", "epochs"])
    assert "config file not found" in _error(capsys, ["run", "--config", str(tmp_path / "missing.yaml")])
    base = ["train", "--run-dir", str(tmp_path / "r2"), "--set", "data.task=file",
            "--set", f"data.path={tiny_task_csv}", "--model", str(tiny_encoder)]
    assert "beyond the model's depth" in _error(capsys, [*base, "--set", "model.exit_layers=[1,2,7]"])
    assert "m < n" in _error(capsys, [*base, "--set", "model.exit_layers=[2,2,2]"])
    assert "model path not found" in _error(capsys, [*base[:-1], str(tmp_path / "no-model")])
    # a run directory missing a stage's artifacts
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tiny_run / "config.json", partial / "config.json")
    assert "no training dynamics" in _error(capsys, ["calibrate", str(partial)])
    assert "router file not found" in _error(capsys, ["evaluate", str(partial)])
    assert "file not found" in _error(capsys, ["route", str(tiny_run), "--file", str(tmp_path / "none.txt")])


def test_cli_route_prints_json_lines(capsys, tiny_run):
    assert main(["route", str(tiny_run), "good fun", "dull"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and {"text", "tier", "label", "confidence"} <= set(lines[0])
