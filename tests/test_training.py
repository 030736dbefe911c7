"""Issue 9 training on the tiny model: the joint loss with self-distillation and exit weighting, training-split
dynamics, temperature scaling and ECE, one model configuration, seeding, frozen embeddings, and (issue 11,
finding 9) a checkpoint that survives a kill at any point and a damaged file that is one clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_run_config
from safetensors.torch import load_file

from dimec.cli import main
from dimec.config import TrainConfig, section_problems
from dimec.errors import ArtifactError, ConfigError
from dimec.metrics import ece_noise_floor, expected_calibration_error, reliability_bins
from dimec.modeling.multi_exit import MODEL_CONFIG, MultiExitConfig, MultiExitModel
from dimec.outputs import ExitOutputs, softmax
from dimec.pipeline import split_outputs, task_data, train_stage
from dimec.training import checkpoint as checkpoint_module
from dimec.training import trainer
from dimec.training.batching import encode
from dimec.training.cartography import dynamics_rows, dynamics_sample, read_dynamics
from dimec.training.loss import exit_weights, joint_loss
from dimec.training.temperature import calibration_report, fit_temperature, fit_temperatures


# ---- the loss -----------------------------------------------------------------------------------------------
def _logits(seed=0, b=8, c=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, generator=g, requires_grad=True) for _ in range(3)], torch.randint(0, c, (b,),
                                                                                                  generator=g)


def test_without_distillation_the_loss_is_the_papers_sum():
    logits, y = _logits()
    expected = sum(torch.nn.functional.cross_entropy(z, y) for z in logits)
    torch.testing.assert_close(joint_loss(logits, y, torch.ones(3)), expected)


def test_distillation_formula_and_teachers():
    logits, y = _logits(1)
    a, tau = 0.3, 2.5
    ce = [torch.nn.functional.cross_entropy(z, y) for z in logits]

    def kl(student, teacher):
        p = torch.softmax(teacher / tau, -1)
        return (p * (p.log() - torch.log_softmax(student / tau, -1))).sum(-1).mean()

    last = (1 - a) * ce[0] + a * tau**2 * kl(logits[0], logits[2]) + (1 - a) * ce[1] + \
        a * tau**2 * kl(logits[1], logits[2]) + ce[2]
    torch.testing.assert_close(joint_loss(logits, y, torch.ones(3), a, tau, "last"), last)
    nxt = (1 - a) * ce[0] + a * tau**2 * kl(logits[0], logits[1]) + (1 - a) * ce[1] + \
        a * tau**2 * kl(logits[1], logits[2]) + ce[2]
    torch.testing.assert_close(joint_loss(logits, y, torch.ones(3), a, tau, "next"), nxt)


def test_the_teacher_learns_from_the_labels_only():
    logits, y = _logits(2)
    joint_loss(logits, y, torch.tensor([1.0, 1.0, 0.0]), distill_weight=1.0).backward()  # no CE on the cloud
    assert logits[2].grad is None or float(logits[2].grad.abs().max()) == 0.0
    assert float(logits[0].grad.abs().max()) > 0


def test_depth_weighting_weighs_deeper_exits_more():
    cfg = TrainConfig(exit_loss_weighting="depth")
    torch.testing.assert_close(exit_weights(cfg, (2, 3, 6)), torch.tensor([2 / 6, 3 / 6, 1.0]))
    torch.testing.assert_close(exit_weights(TrainConfig(), (2, 3, 6)), torch.ones(3))


@pytest.mark.parametrize("setting, message", [
    ({"distill_temperature": 0.0}, "distill_temperature must be"),
    ({"distill_temperature": -1.0}, "distill_temperature must be"),
    ({"distill_weight": -0.1}, "distill_weight must be in [0, 1]"),
    ({"distill_weight": 1.5}, "distill_weight must be in [0, 1]"),
    ({"exit_loss_weights": (1.0, -1.0, 1.0)}, "at least 0"),
    ({"exit_loss_weights": (0.0, 0.0, 0.0)}, "not all be 0"),
    ({"distill_teacher": "first"}, "distill_teacher"),
    ({"exit_loss_weighting": "log"}, "exit_loss_weighting"),
    ({"select_metric": "f1"}, "select_metric"),
    ({"train_dynamics_pass": "both"}, "train_dynamics_pass"),
])
def test_bad_loss_settings_are_named(setting, message):
    problems = section_problems(TrainConfig(**setting), "train.")
    assert len(problems) == 1 and message in problems[0]


def test_bad_settings_stop_train_before_anything_is_written(tmp_path, tiny_encoder, tiny_task_csv, capsys):
    for setting in ("train.distill_temperature=0", "train.exit_loss_weights=[1,-1,1]",
                    "train.train_dynamics_samples=100000", "train.train_dynamics_samples=-3"):
        run = tmp_path / setting.split("=")[0]
        code = main(["train", "--run-dir", str(run), "--set", "data.task=file", "--set", f"data.path={tiny_task_csv}",
                     "--model", str(tiny_encoder), "--set", "model.exit_layers=[1,2,2]", "--set", setting])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and setting.split("=")[0] in err, err
        assert not run.exists()  # nothing half-written


# ---- one configuration, seeding, frozen embeddings ------------------------------------------------------------
def test_one_model_configuration_round_trips_and_reads_older_files(tmp_path, tiny_encoder, capsys):
    config = MultiExitConfig(name_or_path=str(tiny_encoder), exit_layers=[1, 2, 2], label_names=["neg", "pos"],
                             task="t", max_length=16)
    model = MultiExitModel.from_encoder(config)
    assert model.config.exit_layers == (1, 2, 2) and model.config.num_labels == 2
    model.save_pretrained(tmp_path / "m")
    assert MultiExitConfig.load(tmp_path / "m") == model.config
    older = {"exit_layers": [1, 2, 2], "num_labels": 2, "label_names": ["neg", "pos"], "exit_pooling": "mean",
             "classifier_dropout": 0.1, "num_exits": 3, "task": "t", "metric": "accuracy", "max_length": 16}
    (tmp_path / "m" / MODEL_CONFIG).write_text(json.dumps(older))
    loaded = MultiExitConfig.load(tmp_path / "m")
    assert loaded.temperatures is None and loaded.exit_layers == (1, 2, 2)
    np.testing.assert_array_equal(loaded.exit_temperatures("older-model"), np.ones(3))
    np.testing.assert_array_equal(loaded.exit_temperatures("older-model"), np.ones(3))
    assert capsys.readouterr().err.count("no fitted exit temperatures") == 1  # one notice, not one per call


def test_frozen_word_embeddings_do_not_move_and_training_is_seeded(tmp_path, tiny_encoder, tiny_task_csv):
    cfg = tiny_run_config(tiny_encoder, tiny_task_csv, epochs=1, freeze_word_embeddings=True,
                          train_dynamics_samples=0)
    a, b = tmp_path / "a", tmp_path / "b"
    train_stage(cfg, a)
    train_stage(cfg, b)
    wa, wb = (load_file(str(r / "model" / "model.safetensors")) for r in (a, b))
    for key in wa:  # seeded once, in one place: two runs are identical
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0)
    original = MultiExitModel.from_encoder(MultiExitConfig(name_or_path=str(tiny_encoder), exit_layers=(1, 2, 2),
                                                           label_names=["neg", "pos"]))
    key = "encoder.embeddings.word_embeddings.weight"
    torch.testing.assert_close(wa[key], original.state_dict()[key], rtol=0, atol=0)
    pos = "encoder.embeddings.position_embeddings.weight"
    assert not torch.equal(wa[pos], original.state_dict()[pos])  # the rest of the embedding layer trains


# ---- training-split dynamics ----------------------------------------------------------------------------------
def test_dynamics_sample_is_stratified_seeded_and_checked():
    labels = np.array([0] * 80 + [1] * 20)
    assert dynamics_sample(labels, 0, 0) is None
    np.testing.assert_array_equal(dynamics_sample(labels, None, 0), np.arange(100))
    rows = dynamics_sample(labels, 10, 0)
    assert len(rows) == 10 and (np.diff(rows) > 0).all() and (labels[rows] == 1).sum() == 2
    np.testing.assert_array_equal(rows, dynamics_sample(labels, 10, 0))
    for bad in (101, 1, -1):
        with pytest.raises(ConfigError, match="train_dynamics_samples"):
            dynamics_sample(labels, bad, 0)


def test_training_split_dynamics_point_into_the_training_split(tmp_path, tiny_encoder, tiny_task_csv):
    cfg = tiny_run_config(tiny_encoder, tiny_task_csv, epochs=1, train_dynamics_samples=40,
                          train_dynamics_pass="evaluation")
    run = tmp_path / "run"
    train_stage(cfg, run)
    data = task_data(cfg)
    rows = dynamics_rows(run, "train")
    probs, correct = read_dynamics(run, "train")
    assert probs.shape == (1, 40, 3) and correct.shape == (1, 40, 3) and rows.max() < len(data.train)
    np.testing.assert_array_equal(dynamics_rows(run, "validation"), np.arange(len(data.validation)))
    # one epoch: the kept model is that epoch's; its raw probabilities on data.train[rows] are the dynamics
    model = MultiExitModel.from_pretrained(run / "model")
    model.config.temperatures = None
    enc = encode(model.tokenizer, [data.train[i] for i in rows], cfg.data.max_length)
    out = trainer.predict_exit_outputs(model, enc)
    np.testing.assert_allclose(probs[0], out.probs[np.arange(40), :, out.labels], atol=1e-5)
    np.testing.assert_array_equal(correct[0], out.correct)


def test_training_pass_dynamics_are_read_off_the_training_batches(tmp_path, tiny_encoder, tiny_task_csv,
                                                                  monkeypatch):
    seen: dict[int, tuple[np.ndarray, int]] = {}  # row -> (its logits (3, C) in the last epoch, label)
    real = trainer.TrainingPassDynamics.record

    def record(self, index, logits, labels):
        z = torch.stack(logits, 1).detach().numpy()  # (B, 3, C)
        for j, i in enumerate(index):
            seen[int(i)] = (z[j], int(labels[j]))
        real(self, index, logits, labels)

    monkeypatch.setattr(trainer.TrainingPassDynamics, "record", record)
    cfg = tiny_run_config(tiny_encoder, tiny_task_csv, epochs=2, train_dynamics_samples=30)
    run = tmp_path / "run"
    train_stage(cfg, run)
    rows = dynamics_rows(run, "train")
    probs, correct = read_dynamics(run, "train")
    assert probs.shape == (2, 30, 3) and len(rows) == 30
    for r, (p, c) in zip(rows, zip(probs[-1], correct[-1], strict=True), strict=True):
        z, y = seen[int(r)]
        np.testing.assert_allclose(p, softmax(z.astype(np.float64))[:, y], atol=1e-5)
        np.testing.assert_array_equal(c, z.argmax(-1) == y)
    assert not np.allclose(probs[0], probs[1])  # each epoch its own


def test_training_split_dynamics_default_all_rows_and_off(tiny_run, tmp_path, tiny_encoder, tiny_task_csv):
    n_train = json.loads((tiny_run / "data.json").read_text())["sizes"]["train"]
    assert read_dynamics(tiny_run, "train")[0].shape == (3, n_train, 3)  # default: every training row
    run = tmp_path / "off"
    train_stage(tiny_run_config(tiny_encoder, tiny_task_csv, epochs=1, train_dynamics_samples=0), run)
    assert not (run / "dynamics" / "train").exists()
    with pytest.raises(ArtifactError, match="train split"):
        read_dynamics(run, "train")


# ---- temperatures and ECE ---------------------------------------------------------------------------------------
def test_ece_by_hand():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
    labels = np.array([0, 1, 1, 1])
    # bins of width 1/15: 0.9 -> bin 13 (right), 0.8 -> bin 11 (wrong), 0.7 -> bin 10 (right), 0.55 -> bin 8
    expected = (abs(1 - 0.9) + abs(0 - 0.8) + abs(1 - 0.7) + abs(1 - 0.55)) / 4
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)
    b = reliability_bins(probs, labels)
    assert b["count"].sum() == 4 and b["count"][13] == 1 and len(b["edges"]) == 16
    assert expected_calibration_error(np.array([[1.0, 0.0]] * 5), np.zeros(5)) == 0.0


def test_ece_noise_floor_is_what_a_calibrated_exit_shows():
    rng = np.random.default_rng(1)
    conf = rng.uniform(0.5, 1.0, 400)
    probs = np.stack([conf, 1 - conf], 1)
    floor = ece_noise_floor(probs)
    labels = np.where(rng.random(400) < conf, 0, 1)  # calibrated by construction
    assert 0.01 < floor < 0.1 and abs(expected_calibration_error(probs, labels) - floor) < 0.04
    assert ece_noise_floor(np.tile(probs, (25, 1))) < floor / 3  # shrinks like 1/sqrt(N)


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, (4000, 3))
    labels = np.array([rng.choice(3, p=p) for p in softmax(true_logits)])
    overconfident = 2.5 * true_logits  # what a network that needs T = 2.5 outputs
    assert fit_temperature(overconfident, labels) == pytest.approx(2.5, rel=0.08)
    outputs = ExitOutputs(np.stack([overconfident, true_logits, 0.5 * true_logits], 1), labels,
                          np.zeros((4000, 2)))
    temps = fit_temperatures(outputs)
    np.testing.assert_allclose(temps, [2.5, 1.0, 0.5], rtol=0.08)
    report = calibration_report(outputs, temps)
    assert report["ece_after"][0] < 0.03 < report["ece_before"][0] and report["nll_after"][0] < report["nll_before"][0]


def test_training_fits_saves_and_applies_temperatures(tiny_run, tmp_path):
    config = MultiExitConfig.load(tiny_run / "model")
    assert config.temperatures is not None and all(t > 0 for t in config.temperatures)
    result = json.loads((tiny_run / "train_result.json").read_text())
    cal = result["calibration"]
    assert cal["split"] == "validation" and cal["temperatures"] == pytest.approx(list(config.temperatures), abs=1e-4)
    assert all(a <= b + 1e-9 for a, b in zip(cal["nll_after"], cal["nll_before"], strict=True))
    val = split_outputs(tiny_run, "validation")
    np.testing.assert_allclose(val.temperatures, config.temperatures)
    # a cache written at other temperatures is read at the model's (logits are cached: no recompute)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    val.with_temperatures([1.0, 1.0, 1.0]).save(run / "outputs" / "validation.safetensors")
    again = split_outputs(run, "validation")
    np.testing.assert_allclose(again.temperatures, config.temperatures)
    np.testing.assert_allclose(again.probs, val.probs, atol=1e-6)


def test_an_older_run_without_temperatures_falls_back_to_one(tiny_run, tmp_path, capsys):
    run = tmp_path / "old"
    shutil.copytree(tiny_run, run)
    raw = json.loads((run / "model" / MODEL_CONFIG).read_text())
    raw.pop("temperatures")
    (run / "model" / MODEL_CONFIG).write_text(json.dumps(raw))
    (run / "outputs" / "test.safetensors").unlink(missing_ok=True)
    test = split_outputs(run, "test")
    np.testing.assert_array_equal(test.temperatures, np.ones(3))
    assert "no fitted exit temperatures" in capsys.readouterr().err


# ---- crash safety of the checkpoint (issue 11, finding 9) --------------------------------------------------------
class Killed(BaseException):
    """What a SIGKILL looks like to the code under test: nothing after it runs."""


def _reference(tmp_path_factory, tiny_encoder, tiny_task_csv):
    cfg = tiny_run_config(tiny_encoder, tiny_task_csv, epochs=2, train_dynamics_samples=0)
    run = tmp_path_factory.mktemp("uninterrupted")
    train_stage(cfg, run)
    return cfg, run


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_encoder, tiny_task_csv):
    return _reference(tmp_path_factory, tiny_encoder, tiny_task_csv)


def _log(run):
    return [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]


def _same_weights(a, b):
    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("kill_at", ["tensor file", "before commit", "after commit"])
def test_a_kill_at_any_point_resumes_to_the_uninterrupted_result(kill_at, uninterrupted, tmp_path, monkeypatch):
    cfg, reference = uninterrupted
    run = tmp_path / "run"
    real_save_file, real_write_json, real_publish = (checkpoint_module.save_file, checkpoint_module.write_json,
                                                     trainer.publish)

    def save_file(tensors, path, metadata=None):  # the kill lands halfway through epoch 2's optimiser file
        real_save_file(tensors, path, metadata)
        if "optimizer-epoch_002" in str(path):
            Path(path).write_bytes(Path(path).read_bytes()[:100])
            raise Killed

    def write_json(path, obj):  # ... or after both tensor files, just before the commit
        if obj["state"]["epoch"] == 2:
            raise Killed
        real_write_json(path, obj)

    def publish(run_dir, model, state):  # ... or just after the commit
        if state.epoch == 2:
            raise Killed
        real_publish(run_dir, model, state)

    patch = {"tensor file": ("save_file", save_file, checkpoint_module),
             "before commit": ("write_json", write_json, checkpoint_module),
             "after commit": ("publish", publish, trainer)}[kill_at]
    monkeypatch.setattr(patch[2], patch[0], patch[1])
    with pytest.raises(Killed):
        train_stage(cfg, run)
    monkeypatch.undo()
    committed = 2 if kill_at == "after commit" else 1  # the kill lands in the last epoch, 2
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["state"]["epoch"] == committed
    # nothing derived from the checkpoint is ahead of it (after the commit it may lag; the resume catches up)
    assert [r["epoch"] for r in _log(run)] == [1]
    if committed == 1 and state["state"]["best_epoch"] == 1:
        assert _same_weights(run / "model" / "model.safetensors", run / "checkpoint" / "model-epoch_001.safetensors")

    result = train_stage(cfg, run)  # resume
    assert [r["epoch"] for r in _log(run)] == [1, 2]  # one row per epoch: none duplicated
    ref_log = _log(reference)
    for a, b in zip(_log(run), ref_log, strict=True):
        assert a["val_exit_accuracy"] == pytest.approx(b["val_exit_accuracy"], abs=1e-9)
        assert a["kept"] == b["kept"]
    assert _same_weights(run / "model" / "model.safetensors", reference / "model" / "model.safetensors")
    assert result.best_epoch == json.loads((reference / "train_result.json").read_text())["best_epoch"]
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == \
        ["model-epoch_002.safetensors", "optimizer-epoch_002.safetensors", "state.json"]
    assert not list(run.rglob("*.tmp*")) and not list(run.rglob(".*tmp*"))


def test_stale_epoch_files_from_a_kill_are_removed_on_resume(uninterrupted, tmp_path):
    cfg, reference = uninterrupted
    one = tmp_path / "one"
    train_stage(tiny_run_config(cfg.model.name_or_path, cfg.data.path, epochs=1, train_dynamics_samples=0), one)
    # what a kill during epoch 2 could leave beside an epoch-1 checkpoint (and an older version's log row)
    (one / "dynamics" / "epoch_002.jsonl").write_text((reference / "dynamics" / "epoch_002.jsonl").read_text())
    with (one / "train_log.jsonl").open("a") as f:
        f.write(json.dumps({"epoch": 2, "stale": True}) + "\n")
    (one / "config.json").unlink()
    train_stage(cfg, one)  # 2 epochs: resumes after epoch 1
    log = _log(one)
    assert [r["epoch"] for r in log] == [1, 2] and not any("stale" in r for r in log)
    assert read_dynamics(one)[0].shape[0] == 2


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "missing"])
def test_a_damaged_checkpoint_is_one_clear_error(damage, uninterrupted, tmp_path, capsys):
    cfg, reference = uninterrupted
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    target = run / "checkpoint" / "model-epoch_002.safetensors"
    data = target.read_bytes()
    if damage == "truncated":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        target.write_bytes(b"")
    elif damage == "garbage":
        target.write_bytes(np.random.default_rng(0).bytes(5000))
    else:
        target.unlink()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code = main(["train", "--run-dir", str(run), "--config", str(run / "config.json")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "model-epoch_002.safetensors" in err, err
    assert "hint:" in err and len(err.strip().splitlines()) == 2
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing changed


def test_a_damaged_state_file_is_one_clear_error(uninterrupted, tmp_path, capsys):
    cfg, reference = uninterrupted
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "checkpoint" / "state.json").write_text('{"state": {"epo')
    with pytest.raises(ArtifactError, match="state.json is damaged"):
        train_stage(cfg, run)


def test_a_run_of_an_older_version_is_completed_without_retraining(uninterrupted, tmp_path):
    """Older layout: checkpoint/model.safetensors + optimizer.safetensors, no log in state.json, no temperatures.
    Training it again with the same settings trains nothing and only fits the temperatures."""
    cfg, reference = uninterrupted
    run = tmp_path / "older"
    shutil.copytree(reference, run)
    ckpt = run / "checkpoint"
    (ckpt / "model-epoch_002.safetensors").rename(ckpt / "model.safetensors")
    (ckpt / "optimizer-epoch_002.safetensors").rename(ckpt / "optimizer.safetensors")
    meta = json.loads((ckpt / "state.json").read_text())
    del meta["files"], meta["state"]["log"]
    (ckpt / "state.json").write_text(json.dumps(meta))
    raw = json.loads((run / "model" / MODEL_CONFIG).read_text())
    raw.pop("temperatures")
    (run / "model" / MODEL_CONFIG).write_text(json.dumps(raw))
    log_before = (run / "train_log.jsonl").read_text()
    result = train_stage(cfg, run)
    assert result.epochs_run == 2 and (run / "train_log.jsonl").read_text() == log_before
    assert MultiExitConfig.load(run / "model").temperatures == pytest.approx(
        MultiExitConfig.load(reference / "model").temperatures)
