"""Cross-fitted calibration rows (issue 16, part 1): K fold models over the training split, their
out-of-fold outputs cached with a fingerprint, spare rows, the calibration rows calibrate reads, and the bad
inputs: K = 1 or above the row count, a fold whose training fails, a cache of another run, a resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_run_config

from dimec.cli import main
from dimec.config import RunConfig
from dimec.errors import ArtifactError
from dimec.pipeline import calibration_outputs, load_saved_config, run_all, split_outputs, task_data
from dimec.rundir import OOF, SPARE, RunDir
from dimec.training import crossfit
from dimec.training.crossfit import CrossFit, assign_folds


def crossfit_config(encoder: Path, task_csv: Path, k: int = 2, **data) -> RunConfig:
    raw = tiny_run_config(encoder, task_csv, epochs=2, cross_fit=k, num_threads=1).to_dict()
    raw["data"] |= data
    return RunConfig.from_dict(raw)


@pytest.fixture(scope="module")
def crossfit_run(tmp_path_factory, tiny_encoder, tiny_task_csv) -> Path:
    """A tiny run trained with train.cross_fit = 2, spare rows on, calibrated and evaluated."""
    run_dir = tmp_path_factory.mktemp("crossfit") / "run"
    cfg = crossfit_config(tiny_encoder, tiny_task_csv, max_train_samples=200)
    raw = cfg.to_dict()
    raw["calibration"]["spare_rows"] = True
    run_all(RunConfig.from_dict(raw), run_dir)
    return run_dir


def test_folds_are_stratified_seeded_and_cover_every_row():
    labels = np.array([0] * 30 + [1] * 10)
    folds = assign_folds(labels, 5, seed=3)
    assert np.array_equal(folds, assign_folds(labels, 5, seed=3))
    assert not np.array_equal(folds, assign_folds(labels, 5, seed=4))
    for f in range(5):  # every fold holds 6 of the 0s and 2 of the 1s
        assert np.bincount(labels[folds == f]).tolist() == [6, 2]


def test_a_cross_fit_run_caches_out_of_fold_rows_and_calibrates_on_them(crossfit_run):
    rd = RunDir(crossfit_run)
    cfg = load_saved_config(crossfit_run)
    data = task_data(cfg)
    oof = CrossFit.load(rd.outputs(OOF))
    assert len(oof.outputs) == len(data.train) == 200
    assert sorted(np.unique(oof.folds).tolist()) == [0, 1] and oof.fold_temperatures.shape == (2, 3)
    np.testing.assert_array_equal(oof.outputs.labels, [e.label for e in data.train])  # original order
    assert oof.dynamics.shape == (2, 200, 3) and oof.dynamics_correct.dtype == bool
    assert oof.fingerprint["k"] == 2 and oof.fingerprint["rows"] == 200
    assert not rd.crossfit.exists()  # the fold models and work files are gone once oof is written
    val = split_outputs(crossfit_run, "validation")
    rows = calibration_outputs(crossfit_run, cfg)
    n_val, n_spare = len(val), len(data.spare)
    assert n_spare == 120 and rd.outputs(SPARE).is_file()  # 400 * 0.8 - 200 rows the cap dropped
    assert rows.source.tolist() == ["validation"] * n_val + ["spare"] * n_spare + ["oof"] * 200
    assert rows.n_validation == n_val and (rows.fold[:n_val + n_spare] == -1).all()
    np.testing.assert_array_equal(rows.fold[n_val + n_spare:], oof.folds)
    # validation first and in order, each model's temperatures already applied (read at T = 1)
    np.testing.assert_allclose(rows.outputs.probs[:n_val], val.probs, atol=1e-6)
    np.testing.assert_allclose(rows.outputs.probs[n_val + n_spare:], oof.outputs.with_temperatures(val.temperatures).probs,
                               atol=1e-6)  # read at the deployed model's temperatures
    assert (rows.outputs.temperatures == 1).all()
    report = json.loads(rd.calibration.read_text())
    assert report["calibration_rows"] == {"validation": n_val, "spare": n_spare, "oof": 200}
    assert report["validation"]["samples"] == n_val + n_spare + 200
    result = json.loads(rd.train_result.read_text())["calibration"]
    assert result["cross_fit"]["k"] == 2 and result["with_spare_rows"]["rows"] == n_val + n_spare
    temps = json.loads((rd.model / "dimec_model.json").read_text())["temperatures"]
    assert temps == pytest.approx(result["with_spare_rows"]["temperatures"], abs=1e-4)


def test_calibration_rows_put_validation_first_so_its_cartography_covers_their_prefix(crossfit_run):
    from dimec.pipeline import load_cartography

    cfg = load_saved_config(crossfit_run)
    carto = load_cartography(crossfit_run, cfg.calibration)
    rows = calibration_outputs(crossfit_run, cfg)
    assert list(dict.fromkeys(rows.source)) == ["validation", "spare", "oof"]
    assert len(carto) == rows.n_validation < len(rows.source)
    prefix = carto.rows_of(rows.outputs)  # what DIMEC-DC's pools are fitted on
    np.testing.assert_array_equal(prefix.labels, rows.outputs.labels[: rows.n_validation])


@pytest.mark.parametrize("k", ["1", "321", "-2"])
def test_cross_fit_of_one_fold_or_more_folds_than_rows_is_one_error_and_writes_nothing(capsys, tmp_path,
                                                                                     tiny_encoder, tiny_task_csv, k):
    run_dir = tmp_path / "run"
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(tiny_run_config(tiny_encoder, tiny_task_csv).to_dict()))
    code = main(["train", "--config", str(cfg), "--run-dir", str(run_dir), "--cross-fit", k])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1
    assert ("there are 320" in err) if k == "321" else ("train.cross_fit" in err)
    assert not run_dir.exists()


def test_a_fold_that_fails_is_one_error_and_the_cross_fit_resumes_at_it(capsys, monkeypatch, tmp_path,
                                                                        tiny_encoder, tiny_task_csv):
    from dimec.pipeline import train_stage
    from dimec.training import trainer

    cfg = crossfit_config(tiny_encoder, tiny_task_csv, k=3)
    run_dir = tmp_path / "run"
    real_epoch, calls = trainer.train_epoch, {"n": 0}

    def failing_epoch(model, enc, *args, **kwargs):  # the deployed model's 2 epochs, fold 1's 2, then fold 2's
        calls["n"] += 1
        if calls["n"] == 6:  # fold 2's second epoch: its first is committed in its own checkpoint
            raise RuntimeError("out of memory (simulated)")
        return real_epoch(model, enc, *args, **kwargs)

    monkeypatch.setattr(trainer, "train_epoch", failing_epoch)
    with pytest.raises(ArtifactError, match="cross-fit fold 2 failed") as info:
        train_stage(cfg, run_dir)
    assert "resume at fold 2" in info.value.hint
    rd = RunDir(run_dir)
    assert not rd.outputs(OOF).exists()  # nothing half-written
    assert (rd.crossfit / "fold_0.safetensors").is_file() and not (rd.crossfit / "fold_1.safetensors").exists()
    assert (rd.crossfit / "fold_1" / "checkpoint" / "state.json").is_file()
    monkeypatch.setattr(trainer, "train_epoch", real_epoch)
    capsys.readouterr()
    seen: list[str] = []
    monkeypatch.setattr(crossfit, "train", _spy_train(seen))
    train_stage(cfg, run_dir)
    assert seen == ["fold_1", "fold_2"]  # fold 1 (index 0) was read back, not trained again
    out = capsys.readouterr().out
    assert "resuming after epoch 1" in out  # fold 2 resumed from its own checkpoint
    oof = CrossFit.load(rd.outputs(OOF))
    assert len(oof.outputs) == 320 and not rd.crossfit.exists()


def _spy_train(seen: list[str]):
    real = crossfit.train

    def spy(model, train_enc, val_enc, cfg, run_dir, *args):
        seen.append(Path(run_dir).name)
        return real(model, train_enc, val_enc, cfg, run_dir, *args)
    return spy


def test_out_of_fold_rows_of_another_model_or_split_are_refused(capsys, crossfit_run, tmp_path, tiny_encoder,
                                                                tiny_task_csv):
    other = tmp_path / "other"
    shutil.copytree(crossfit_run, other)
    oof_path = RunDir(other).outputs(OOF)
    cached = CrossFit.load(oof_path)
    cached.fingerprint = cached.fingerprint | {"rows_hash": "0" * 32, "model": "another-model"}
    cached.save(oof_path)
    code = main(["calibrate", str(other)])
    err = capsys.readouterr().err
    assert code == 2 and "another model or other rows" in err and "model, rows_hash" in err
    assert (RunDir(other).router.read_bytes() == RunDir(crossfit_run).router.read_bytes())  # unchanged
    oof_path.unlink()
    code = main(["calibrate", str(other)])
    assert code == 2 and "--cross-fit 2" in capsys.readouterr().err


def test_a_work_folder_of_another_cross_fit_is_refused(tmp_path, tiny_encoder, tiny_task_csv):
    from dimec.pipeline import model_config

    cfg = crossfit_config(tiny_encoder, tiny_task_csv)
    data = task_data(cfg)
    work = tmp_path / "work"
    work.mkdir()
    (work / crossfit.FINGERPRINT).write_text(json.dumps({"k": 7}))
    with pytest.raises(ArtifactError, match="another model or other rows"):
        crossfit.cross_fit(data.train, model_config(cfg, data), cfg.train, 2, work)
