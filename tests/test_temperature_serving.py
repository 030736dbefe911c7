"""Exit temperatures in the serving tiers: TierModel's probabilities (PyTorch and the ONNX mobile package) are
softmax(logits / T) of the tier's exit, equal across backends, and `dimec route` reports the same confidence."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from dimec.modeling.multi_exit import MODEL_CONFIG  # noqa: E402
from dimec.outputs import softmax  # noqa: E402
from dimec.pipeline import route_texts  # noqa: E402
from dimec.runtime.tier import TierModel  # noqa: E402
from dimec.serving.deploy.export import export_packages  # noqa: E402

TEXTS = ["good movie", "the film was very boring", "a lovely plot and acting", "dull", "great fun", "poor acting",
         "the movie was quite weak and the plot dull", "superb", "the acting was fine", "awful and boring film"]
TEMPERATURES = [0.5, 2.0, 3.0]  # far from 1 on purpose: a missed temperature shows


@pytest.fixture(scope="module")
def hot_run(tiny_run, tmp_path_factory):
    """The tiny run with exit temperatures set by hand, exported (mobile with ONNX, edge, cloud)."""
    run = tmp_path_factory.mktemp("hot") / "run"
    shutil.copytree(tiny_run, run)
    path = run / "model" / MODEL_CONFIG
    raw = json.loads(path.read_text())
    raw["temperatures"] = TEMPERATURES
    path.write_text(json.dumps(raw))
    shutil.rmtree(run / "packages", ignore_errors=True)
    return run, export_packages(run, full=True, check_texts=TEXTS)  # full: the fp32 ONNX and PyTorch copies too


def probs(model: TierModel, batch) -> np.ndarray:
    return model.exit_probs(model.logits(batch), model.tier_index)


def test_every_backend_reads_its_exits_temperature(hot_run):
    run, packages = hot_run
    torch_mobile = TierModel(packages["mobile"], "torch")
    batch = torch_mobile.encode(TEXTS)
    reference = probs(torch_mobile, batch)
    np.testing.assert_allclose(reference, softmax(torch_mobile.logits(batch) / TEMPERATURES[0]), atol=1e-6)
    for backend, tol in (("onnx", 1e-4), ("onnx-int8", 0.1)):
        onnx_mobile = TierModel(packages["mobile"], backend)
        assert onnx_mobile.temperature == pytest.approx(TEMPERATURES[0])
        np.testing.assert_allclose(probs(onnx_mobile, onnx_mobile.encode(TEXTS)), reference, atol=tol)
    for k, tier in ((1, "edge"), (2, "cloud")):
        model = TierModel(packages[tier])
        assert model.temperature == pytest.approx(TEMPERATURES[k])
        b = model.encode(TEXTS)
        np.testing.assert_allclose(model.classify(TEXTS).probs, softmax(model.logits(b) / TEMPERATURES[k]),
                                   atol=1e-6)


def test_route_reports_the_calibrated_confidence(hot_run):
    run, packages = hot_run
    answers = route_texts(run, TEXTS[:4])
    for answer, text in zip(answers, TEXTS[:4], strict=True):
        k = ("mobile", "edge", "cloud").index(answer["tier"])
        model = TierModel(packages[answer["tier"]])
        expected = softmax(model.logits(model.encode([text]))[:, : len(model.label_names)] / TEMPERATURES[k]).max()
        assert answer["confidence"] == pytest.approx(float(expected), abs=1e-3)
