"""End to end on the tiny model: stages, artifacts, resume, routing texts, CLI errors."""

import json
import shutil

import numpy as np
import pytest
from conftest import tiny_run_config

from dimec.cli import main
from dimec.config import RunConfig
from dimec.errors import ConfigError
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
    assert methods == ["cloud-only", "auto", "dimec-fixed", "dimec-dynamic", "oracle"]
    cloud = report["results"][0]
    assert cloud["tier_shares"] == [0.0, 0.0, 1.0] and cloud["cost_change_pct"] == pytest.approx(0.0)
    assert cloud["accuracy_change_pt"] == {"estimate": 0.0, "low": 0.0, "high": 0.0}
    for r in report["results"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and sum(r["tier_shares"]) == pytest.approx(1.0)
        ci = r["cost_change"]
        assert ci["low"] <= ci["estimate"] <= ci["high"] and ci["estimate"] == pytest.approx(r["cost_change_pct"])
    assert report["results"][-1]["oracle_share"] == pytest.approx(1.0)
    assert RunConfig.load(tiny_run / "config.json").data.task == "file"
    assert report["task"] == "sentiment"  # the data's own name (the file's), not the loader's "file"
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


def test_cached_outputs_are_reused(tiny_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cached = split_outputs(run, "test")
    marked = ExitOutputs(cached.logits + 1.0, cached.labels, cached.embeddings, cached.lengths)
    marked.save(run / "outputs" / "test.safetensors")  # the model would never give these logits

    def no_model(_run_dir):
        raise AssertionError("the model was loaded although the cache is valid")

    monkeypatch.setattr("dimec.pipeline.load_model", no_model)
    np.testing.assert_array_equal(split_outputs(run, "test").logits, marked.logits)


def test_a_damaged_outputs_cache_is_recomputed(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cache = run / "outputs" / "validation.safetensors"
    good = split_outputs(run, "validation")
    for damage in (cache.read_bytes()[:100], b"", b"\x00garbage" * 50):
        cache.write_bytes(damage)
        np.testing.assert_allclose(split_outputs(run, "validation").logits, good.logits, atol=1e-5)
        assert ExitOutputs.load(cache).logits.shape == good.logits.shape  # rewritten, valid again


def test_recalibrate_with_other_costs(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    cfg = RunConfig.load(run / "config.json")
    cfg.cost.mobile_layer = 100.0  # the mobile tier becomes ruinous: nothing should be sent there
    summary = calibrate_stage(run, cfg)
    assert summary["dimec"]["pool_counts"]["easy"] == 0
    assert summary["validation"]["tier_shares"][0] == 0.0  # the served policy keeps off the mobile too
    assert RunConfig.load(run / "config.json").cost.mobile_layer == 100.0  # saved once calibrate succeeded


def test_a_policy_is_never_evaluated_silently_under_other_costs(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    err = _error(capsys, ["evaluate", str(run), "--set", "cost.offload_cloud=9"])
    assert "calibrated under other costs" in err and "--other-costs" in err
    assert main(["evaluate", str(run), "--set", "cost.offload_cloud=9", "--other-costs"]) == 0
    assert "calibrated under other costs" in capsys.readouterr().out
    assert json.loads((run / "metrics.json").read_text())["calibrated_under_other_costs"] is True


def test_a_failed_calibrate_leaves_the_run_as_it_was(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = {f: (run / f).read_bytes() for f in ("config.json", "router.json", "calibration.json")}
    for argv in (["--set", "calibration.medium_rule=bogus", "--set", "cost.offload_cloud=7"],
                 ["--max-loss", "-1"], ["--max-loss", "100"], ["--max-loss", "0.5", "--delta", "1.5"],
                 ["--delta", "0"], ["--budget", "0.001"], ["--budget", "cheap"], ["--policy", "nope"]):
        _error(capsys, ["calibrate", str(run), *argv])
        assert {f: (run / f).read_bytes() for f in before} == before, argv
    (run / "router.json").write_text('{"router": "dimec-fixed", "params": {}, "alpha": 0.5}')  # dimec 0.1.0
    assert "older dimec" in _error(capsys, ["evaluate", str(run)])


def test_resume_after_crash(tmp_path, tiny_encoder, tiny_task_csv, monkeypatch):
    import dimec.training.trainer as trainer

    cfg = tiny_run_config(tiny_encoder, tiny_task_csv, epochs=3)
    run = tmp_path / "run"
    real_write = trainer.write_epoch_dynamics

    def killed_in_epoch_2(path, epoch, *args, **kwargs):
        if epoch == 2:
            raise KeyboardInterrupt  # the process dies after epoch 2's training steps
        return real_write(path, epoch, *args, **kwargs)

    monkeypatch.setattr(trainer, "write_epoch_dynamics", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train_stage(cfg, run)
    assert not (run / "dynamics" / "epoch_002.jsonl").exists()
    assert [json.loads(x)["epoch"] for x in (run / "train_log.jsonl").read_text().splitlines()] == [1]
    monkeypatch.setattr(trainer, "write_epoch_dynamics", real_write)
    with pytest.raises(ConfigError, match="other train settings"):
        train_stage(tiny_run_config(tiny_encoder, tiny_task_csv, epochs=4), run)  # refused, not mixed
    result = train_stage(cfg, run)  # resumes after epoch 1 from the checkpoint: epoch 2 runs again
    assert (run / "dynamics" / "epoch_002.jsonl").is_file() and (run / "dynamics" / "epoch_003.jsonl").is_file()
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3] and result.epochs_run == 3  # no row twice


def test_route_texts(tiny_run):
    for mode in ("policy", "dimec-fixed", "dimec-dynamic"):
        answers = route_texts(tiny_run, ["the film was great", "awful plot"], mode=mode)
        assert [a["label"] for a in answers] == ["pos", "neg"], mode
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
    assert "no trained model" in _error(capsys, ["calibrate", str(partial)])
    shutil.copytree(tiny_run / "model", partial / "model")
    assert "no training dynamics" in _error(capsys, ["calibrate", str(partial)])
    assert "router file not found" in _error(capsys, ["evaluate", str(partial)])
    assert "file not found" in _error(capsys, ["route", str(tiny_run), "--file", str(tmp_path / "none.txt")])


def test_cli_route_prints_json_lines(capsys, tiny_run):
    assert main(["route", str(tiny_run), "good fun", "dull"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and {"text", "tier", "label", "confidence"} <= set(lines[0])
