"""`dimec reproduce`: tables, ablations and plots on synthetic outputs, then the whole flow on the tiny model."""

import csv
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from conftest import tiny_run_config
from test_baselines import CM, random_case

from dimec.cli import main
from dimec.config import CalibrationConfig, CostConfig, load_run_config
from dimec.costs import CostModel
from dimec.errors import ConfigError
from dimec.experiments import plots
from dimec.experiments.ablations import CSV_FIELDS as ABLATION_FIELDS
from dimec.experiments.ablations import FACTORS, cost_settings, run_ablations, write_ablations
from dimec.experiments.compare import METHODS, SWEPT, compare_methods, threshold_sweeps
from dimec.experiments.reproduce import (
    load_reproduce_config,
    reproduce,
    task_config,
    with_train_cap,
)
from dimec.experiments.tables import CSV_FIELDS, PAPER_HEADLINE, task_rows, write_table


@pytest.fixture(scope="module")
def synthetic():
    val, carto = random_case(n=200, seed=1)
    test, _ = random_case(n=150, seed=2)
    return val, test, carto


def test_table_I_has_a_row_per_method_and_task(synthetic, tmp_path):
    val, test, carto = synthetic
    tasks = {}
    for task, metric in (("sst2", "accuracy"), ("cola", "mcc")):
        compared = compare_methods(val, test, CM, carto, metric, CalibrationConfig(), METHODS, seeds=(0, 1))
        tasks[task] = {"metric": metric, "test_size": len(test), "rows": task_rows(task, metric, compared,
                                                                                   CM.cloud_only)}
    paths = write_table(tasks, {"seeds": [0, 1]}, tmp_path)
    with paths["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_FIELDS and len(rows) == 2 * len(METHODS)
    assert [r["method"] for r in rows[: len(METHODS)]] == list(METHODS)
    by = {(r["task"], r["method"]): r for r in rows}
    assert float(by["sst2", "oracle"]["oracle_saving_share"]) == pytest.approx(1.0)
    assert float(by["sst2", "cloud-only"]["oracle_saving_share"]) == pytest.approx(0.0)
    assert float(by["sst2", "cloud-only"]["cost_change_pct"]) == pytest.approx(0.0)
    assert float(by["sst2", "adaee"]["runs"]) == 2 and float(by["sst2", "knn"]["runs"]) == 1
    doc = json.loads(paths["json"].read_text())
    assert doc["paper"] == PAPER_HEADLINE and set(doc["tasks"]) == {"sst2", "cola"}
    md = paths["md"].read_text()
    assert PAPER_HEADLINE in md and "| MCC (%) |" in md and md.count("DIMEC-DC Fixed") == 3  # 2 tasks + summary
    assert "±" in md  # seeded methods carry their spread


def test_ablations_vary_one_factor_at_a_time(synthetic, tmp_path):
    val, test, carto = synthetic
    base = CostConfig()
    settings = cost_settings(base, 6, (0.5, 1, 2, 4))
    assert len(settings) == 4 * len(FACTORS)
    fee = [c.cloud_fee for f, _, c in settings if f == "cloud_fee"]
    assert fee == [3.0, 6.0, 12.0, 24.0]  # the default fee is l = 6 lambda
    for factor, mult, c in settings:
        changed = {k for k in ("mobile_layer", "edge_layer", "offload_cloud", "cloud_fee")
                   if getattr(c, k) != getattr(base, k)}
        expected = {FACTORS[factor]} if mult != 1 or factor == "cloud_fee" else set()  # fee: None -> 6.0
        assert changed == expected

    rows = run_ablations("sst2", val, test, carto, "accuracy", base, CalibrationConfig(),
                         lambda c: CostModel.from_config(c, (2, 3, 6)), (0.5, 4))
    assert len(rows) == len(FACTORS) * 2 * 2
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and sum(r[k] for k in ("mobile_share", "edge_share", "cloud_share")) == \
            pytest.approx(1)
    cheap, dear = (next(r for r in rows if r["factor"] == "o_c" and r["multiplier"] == m
                        and r["method"] == "dimec-fixed") for m in (0.5, 4))
    assert dear["cloud_only_cost"] > cheap["cloud_only_cost"]
    paths = write_ablations(rows, tmp_path)
    with paths["csv"].open() as f:
        assert tuple(next(csv.reader(f))) == ABLATION_FIELDS
    assert len(json.loads(paths["json"].read_text())) == len(rows)


def test_plots_are_written(synthetic, tmp_path):
    val, test, carto = synthetic
    shares = {"sst2": np.array([0.5, 0.2, 0.3]), "cola": np.array([0.1, 0.1, 0.8])}
    files = [plots.plot_pool_proportions(shares, tmp_path / "pools.png"),
             plots.plot_device_accuracy({"sst2": np.array([0.8, 0.85, 0.9])}, tmp_path / "acc.png"),
             plots.plot_pools_tsne(val.embeddings, np.arange(len(val)) % 3, tmp_path / "tsne.png", "t", 60)]
    compared = compare_methods(val, test, CM, carto, "accuracy", CalibrationConfig(), ("cloud-only", "oracle"))
    sweeps = threshold_sweeps(val, test, CM, carto, "accuracy", CalibrationConfig())
    assert set(sweeps) == {"deebert", "adaee", "dimec-fixed", *SWEPT}
    for name in SWEPT:  # each family's test Pareto front: cost and accuracy rise together
        costs, accs = [r["mean_cost"] for r in sweeps[name]], [r["accuracy"] for r in sweeps[name]]
        assert costs == sorted(costs) and accs == sorted(accs) and len(costs) >= 1
    assert len(sweeps["dimec-fixed"]) == len(CalibrationConfig().alpha_grid)
    files.append(plots.plot_pareto({r["method"]: r["mean"] for r in compared}, sweeps, tmp_path / "p.png", "t"))
    rows = run_ablations("t", val, test, carto, "accuracy", CostConfig(), CalibrationConfig(),
                         lambda c: CostModel.from_config(c, (2, 3, 6)), (0.5, 2))
    files.append(plots.plot_ablation(rows, tmp_path / "abl.png", "t"))
    for f in files:
        assert f.is_file() and f.read_bytes()[:4] == b"\x89PNG"


def test_train_cap_caps_the_training_split_only():
    cfg = with_train_cap(tiny_run_config("enc", "data.csv"), 100)
    assert cfg.data.max_train_samples == 100 and cfg.data.max_samples is None  # evaluation rows uncapped


def test_a_run_is_reused_only_with_the_same_training_settings(tiny_encoder, tiny_task_csv, tmp_path):
    from dimec.pipeline import prepare_run_dir, training_differences

    cfg = tiny_run_config(tiny_encoder, tiny_task_csv)
    assert not training_differences(cfg, replace(cfg, train=replace(cfg.train, progress=True)))
    assert training_differences(cfg, replace(cfg, train=replace(cfg.train, epochs=9))) == ["train"]
    assert training_differences(cfg, with_train_cap(cfg, 50)) == ["data"]
    assert not training_differences(cfg, replace(cfg, cost=replace(cfg.cost, offload_cloud=9.0)))  # no training
    # resuming (dimec train) gives the same answer: turning progress bars on does not block it
    prepare_run_dir(cfg, tmp_path / "run")
    prepare_run_dir(replace(cfg, train=replace(cfg.train, progress=True)), tmp_path / "run")
    with pytest.raises(ConfigError, match="other train settings"):
        prepare_run_dir(replace(cfg, train=replace(cfg.train, epochs=9)), tmp_path / "run")


def test_reproduce_end_to_end_on_the_tiny_model(tiny_run, tiny_encoder, tiny_task_csv, tmp_path):
    cfg = tiny_run_config(tiny_encoder, tiny_task_csv)
    out = tmp_path / "repro"
    shutil.copytree(tiny_run, out / "runs" / "sentiment")  # trained with the same settings: reused, not retrained
    result = reproduce(["file"], cfg, out, seeds=(0, 1), multipliers=(0.5, 2), tsne_points=60)
    for name in ("index.md", "table_I.md", "table_I.csv", "table_I.json", "ablations.md", "ablations.csv",
                 "plots/pool_proportions.png", "plots/device_accuracy.png", "plots/sentiment_tsne_pools.png",
                 "plots/sentiment_data_map.png", "plots/sentiment_pareto.png", "plots/sentiment_pareto.json",
                 "plots/sentiment_ablations.png", "plots/sentiment_reliability.png",
                 "runs/sentiment/outputs/test.safetensors"):
        assert (out / name).is_file(), name
    table = result["tables"]["sentiment"]
    assert [r["method"] for r in table["rows"]] == list(METHODS) and table["reused_run"]
    assert len(result["ablations"]) == len(FACTORS) * 2 * 2
    index = (out / "index.md").read_text()
    assert "table_I.md" in index and "plots/sentiment_pareto.png" in index and PAPER_HEADLINE in index
    assert "Exit calibration" in index and "plots/sentiment_reliability.png" in index
    calibration = table["exit_calibration"]
    assert len(calibration["ece_before"]) == 3 and len(calibration["ece_after"]) == 3 and calibration["split"] == "test"
    assert table["training"]["learning_rate"] == cfg.train.learning_rate

    # the CLI on the same output directory reuses the trained run
    config = tmp_path / "cfg.json"
    cfg.save(config)
    assert main(["reproduce", "--tasks", "file", "--out", str(out), "--config", str(config), "--seeds", "0",
                 "--methods", "dimec-fixed,adaee", "--multipliers", "1"]) == 0
    doc = json.loads((out / "table_I.json").read_text())
    rows = doc["tasks"]["sentiment"]["rows"]
    assert doc["tasks"]["sentiment"]["reused_run"] and [r["method"] for r in rows] == ["cloud-only", "dimec-fixed",
                                                                                   "adaee", "oracle"]
    assert main(["reproduce", "--tasks", "file", "--out", str(out), "--methods", "nope"]) == 2


def test_per_task_settings_win_over_the_base_and_are_checked_first(tmp_path):
    path = tmp_path / "reproduce.yaml"
    path.write_text("train:\n  epochs: 3\n  learning_rate: 1.0e-4\n"
                    "tasks:\n  cola:\n    train: {learning_rate: 2.0e-4, epochs: 5}\n    data: {max_length: 64}\n")
    base, settings = load_reproduce_config(str(path), [], epochs=2)
    assert base.train.epochs == 2 and base.train.learning_rate == 1e-4
    cola = task_config(base, "cola", settings)  # the task's own settings win over the base and --epochs
    assert (cola.data.task, cola.train.learning_rate, cola.train.epochs, cola.data.max_length) == ("cola", 2e-4, 5, 64)
    sst2 = task_config(base, "sst2", settings)
    assert (sst2.train.learning_rate, sst2.train.epochs) == (1e-4, 2)
    base, settings = load_reproduce_config(str(path), ["train.epochs=4"])  # ... and --set wins over everything
    assert task_config(base, "cola", settings).train.epochs == 4
    assert task_config(base, "cola", settings).train.learning_rate == 2e-4
    # `dimec train --config` applies the section of its own task too
    assert load_run_config(path, ["data.task=cola"]).train.epochs == 5
    assert load_run_config(path, ["data.task=cola", "train.epochs=2"]).train.epochs == 2
    assert load_run_config(path, ["data.task=sst2"]).train.epochs == 3
    for bad, message in (("tasks:\n  nope:\n    train: {epochs: 2}\n", "unknown task"),
                         ("tasks:\n  cola:\n    train: {epoch: 2}\n", "unknown config key"),
                         ("tasks:\n  cola:\n    train: 3\n", "must be a mapping")):
        path.write_text(bad)
        with pytest.raises(ConfigError, match=message):
            load_reproduce_config(str(path), [])


def test_reliability_diagram_is_written(synthetic, tmp_path):
    _, test, _ = synthetic
    path = plots.plot_reliability(test.with_temperatures([2.0, 1.0, 0.5]), tmp_path / "rel.png", "t")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_hybrid_learned_is_not_listed_as_seeded_and_noisy_rows_are_flagged():
    from dimec.experiments.compare import is_seeded
    from dimec.experiments.reproduce import noisy_estimates
    from dimec.experiments.tables import markdown_table

    assert not is_seeded("hybrid-learned")  # deterministic: every seed gives the same router
    assert is_seeded("random")
    row = {"method": "auto", "runs": 1, "accuracy": 0.8, "accuracy_std": 0.0, "accuracy_change_pt": -3.25,
           "accuracy_change_low": -5.0, "accuracy_change_high": -1.0, "metric": 0.8, "metric_std": 0.0,
           "cost_change_pct": -40.0, "cost_change_pct_std": 0.0, "cost_change_low": -42.0, "cost_change_high": -38.0,
           "oracle_saving_share": 0.7, "mobile_share": 0.5, "edge_share": 0.2, "cloud_share": 0.3,
           "val_loss_se_pt": 0.81, "noisy_estimate": True}
    tables = {"tiny": {"metric": "accuracy", "test_size": 277, "rows": [row]}}
    assert "⚠ (validation loss SE 0.81 pt)" in markdown_table(tables, {})
    assert any("auto (standard error 0.81 pt; test Δacc -3.25 pt)" in line for line in noisy_estimates(tables))
