"""Devices and precision (devices.py, train.device, train.mixed_precision, TierModel's device): the bad-input
refusals everywhere (CUDA is faked where a refusal needs a GPU that is not here), and the GPU paths themselves
where CUDA is present (skipped elsewhere)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_run_config

from dimec import devices
from dimec.config import RunConfig
from dimec.errors import ConfigError

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")


@pytest.fixture
def one_gpu(monkeypatch):
    """A machine with one CUDA device (cuda:0), bf16 capable, as torch would report it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake GPU")


def test_cpu_and_auto_resolve_here():
    assert devices.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "mps" if devices._mps_available() else "cpu"
    assert devices.resolve_device("auto").type == expected


@NO_GPU
def test_cuda_without_a_gpu_is_one_clear_error():
    with pytest.raises(ConfigError, match="train.device=cuda but this machine has no CUDA GPU") as exc:
        devices.resolve_device("cuda", "train.device")
    assert "train.device=auto" in exc.value.hint


def test_a_gpu_index_that_is_not_there_is_refused(one_gpu):
    assert devices.resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match=r"cuda:7 does not exist: this machine has 1 CUDA device\(s\)"):
        devices.resolve_device("cuda:7")


def test_precision_defaults_and_refusals(one_gpu):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert devices.resolve_training_precision("auto", cpu) == "no"
    assert devices.resolve_training_precision("auto", gpu) == "bf16"
    assert devices.resolve_training_precision("fp16", gpu) == "fp16"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        devices.resolve_training_precision("fp16", cpu)
    assert devices.resolve_serving_precision("auto", cpu) == "fp32"
    assert devices.resolve_serving_precision("auto", gpu) == "bf16"
    with pytest.raises(ConfigError, match="fp16 is for GPUs"):
        devices.resolve_serving_precision("fp16", cpu)
    torch.cuda.is_bf16_supported = lambda *a, **k: False  # an older GPU (monkeypatch restores it)
    assert devices.resolve_training_precision("auto", gpu) == "no"
    assert devices.resolve_serving_precision("auto", gpu) == "fp16"
    with pytest.raises(ConfigError, match="has no bf16"):
        devices.resolve_training_precision("bf16", gpu)


@pytest.mark.parametrize("key, value, message", [("device", "gpu", "train.device must be auto, cpu, cuda, cuda:N or mps"),
                                                 ("device", "cuda:-1", "train.device must be"),
                                                 ("mixed_precision", "fp8", "train.mixed_precision must be one of")])
def test_bad_device_settings_are_config_errors(key, value, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict({"train": {key: value}})


def test_out_of_memory_is_recognised():
    assert devices.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert devices.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not devices.is_out_of_memory(RuntimeError("shape mismatch"))


@NO_GPU
def test_training_on_a_missing_gpu_fails_before_training(tiny_encoder, tiny_task_csv, tmp_path):
    from dimec.pipeline import run_all

    cfg = tiny_run_config(tiny_encoder, tiny_task_csv, device="cuda")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        run_all(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint").exists()
    cfg = tiny_run_config(tiny_encoder, tiny_task_csv, device="cpu", mixed_precision="fp16")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        run_all(cfg, tmp_path / "run2")


def test_multi_process_launch_is_refused(monkeypatch):
    from dimec.training.trainer import refuse_multi_process

    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="multi-GPU training is not supported yet"):
        refuse_multi_process()


# ---- on a GPU ---------------------------------------------------------------------------------------------
@GPU
@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_training_on_the_gpu_keeps_the_artifacts_format(tiny_encoder, tiny_task_csv, tmp_path, precision):
    from dimec.outputs import ExitOutputs
    from dimec.pipeline import run_all
    from dimec.rundir import RunDir
    from dimec.training.checkpoint import STATE

    cfg = tiny_run_config(tiny_encoder, tiny_task_csv, device="cuda", mixed_precision=precision, epochs=2)
    run_all(cfg, tmp_path / "run")
    run = RunDir(tmp_path / "run")
    assert (run.checkpoint / STATE).is_file() and run.model.is_dir()
    val = ExitOutputs.load(run.outputs("validation"))
    assert val.logits.dtype == np.float32 and np.isfinite(val.logits).all()
    assert val.correct[:, 2].mean() > 0.6  # it learned the toy task


@GPU
def test_gpu_predictions_match_the_cpu(tiny_run):
    from dimec.data.examples import Example
    from dimec.pipeline import load_model
    from dimec.training.batching import encode
    from dimec.training.trainer import predict_exit_outputs

    model = load_model(tiny_run)
    enc = encode(model.tokenizer, [Example("good movie", None, 1), Example("the plot was dull", None, 0)], 32)
    cpu = predict_exit_outputs(model, enc)
    gpu = predict_exit_outputs(model.to("cuda"), enc)
    np.testing.assert_allclose(gpu.logits, cpu.logits, atol=1e-4)
    bf16 = predict_exit_outputs(model, enc, precision="bf16")
    np.testing.assert_allclose(bf16.logits, cpu.logits, atol=0.1)


@GPU
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_tier_model_on_the_gpu_matches_the_cpu(tiny_run, tmp_path, precision):
    from dimec.runtime.tier import TierModel
    from dimec.serving.deploy.export import export_packages

    packages = export_packages(tiny_run, tmp_path / "p", tiers=("cloud",), onnx=False)
    texts = ["good movie", "the film was very boring", "dull"]
    cpu = TierModel(packages["cloud"]).classify(texts).probs
    gpu = TierModel(packages["cloud"], device="cuda", precision=precision)
    assert next(gpu.model.parameters()).is_cuda
    np.testing.assert_allclose(gpu.classify(texts).probs, cpu, atol=1e-4 if precision == "fp32" else 3e-2)


def test_a_run_may_resume_on_another_device(tiny_encoder, tiny_task_csv, tmp_path):
    from dimec.pipeline import prepare_run_dir

    prepare_run_dir(tiny_run_config(tiny_encoder, tiny_task_csv, device="cpu"), tmp_path)
    prepare_run_dir(tiny_run_config(tiny_encoder, tiny_task_csv, device="auto", mixed_precision="no"), tmp_path)
    with pytest.raises(ConfigError, match="other train settings"):  # what is trained still may not change
        prepare_run_dir(tiny_run_config(tiny_encoder, tiny_task_csv, learning_rate=1e-3), tmp_path)
