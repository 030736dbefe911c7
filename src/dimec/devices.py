"""Where tensors run and in what precision: one vocabulary for training (`train.device`,
`train.mixed_precision`) and serving (`dimec serve --device/--precision`).

    device     auto (CUDA if present, else Apple MPS, else CPU) | cpu | cuda | cuda:N | mps
    training   auto (bf16 on a GPU that supports it, else no) | no | bf16 | fp16 (CUDA only, loss scaling)
    serving    auto (bf16 on a GPU that supports it, fp16 on an older GPU, fp32 elsewhere) | fp32 | bf16 | fp16

Plain torch (`torch.autocast`, `torch.amp.GradScaler`), not Hugging Face Accelerate: for one process this
is all Accelerate does, and keeping it in our hands keeps the trainer's RNG use, the checkpoint's tensors
and the CPU numbers exactly as they were (docs/devices.md says more, and what multi-GPU needs).

A device that is not there, `cuda:7` on a one-GPU machine, fp16 on a CPU or bf16 on a GPU without it is one
ConfigError, raised before any work starts.
"""

from __future__ import annotations

import contextlib

import torch

from dimec.config import SERVE_PRECISIONS, TRAIN_PRECISIONS, device_problem
from dimec.errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "no": torch.float32}


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(spec: str, where: str = "device") -> torch.device:
    """'auto' -> the best device here; anything else checked against this machine (one ConfigError)."""
    problem = device_problem(spec)
    if problem:
        raise ConfigError(f"{where} {problem}")
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not _mps_available():
            raise ConfigError(f"{where}=mps but Apple's MPS backend is not available here",
                              f"use {where}=auto or cpu")
        return torch.device("mps")
    if not torch.cuda.is_available():
        built = "a CPU-only torch build" if torch.version.cuda is None else "no visible CUDA device"
        raise ConfigError(f"{where}={spec} but this machine has no CUDA GPU ({built}, torch {torch.__version__})",
                          f"use {where}=auto (falls back to the CPU) or {where}=cpu")
    count = torch.cuda.device_count()
    index = int(spec.split(":")[1]) if ":" in spec else torch.cuda.current_device()
    if index >= count:
        raise ConfigError(f"{where}={spec} does not exist: this machine has {count} CUDA device(s) "
                          f"(cuda:0..cuda:{count - 1})", "pick one of them, or check CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", index)


def _bf16_ok(device: torch.device) -> bool:
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type in ("cpu", "mps")


def resolve_training_precision(setting: str, device: torch.device, where: str = "train.mixed_precision") -> str:
    """'auto' -> bf16 on a GPU that supports it, else 'no'; fp16 needs CUDA (its loss scaler does)."""
    if setting not in TRAIN_PRECISIONS:
        raise ConfigError(f"{where} must be one of {', '.join(TRAIN_PRECISIONS)}; got {setting!r}")
    if setting == "auto":
        return "bf16" if device.type == "cuda" and _bf16_ok(device) else "no"
    if setting == "fp16" and device.type != "cuda":
        raise ConfigError(f"{where}=fp16 needs a CUDA GPU (loss scaling is CUDA's), the device is {device}",
                          f"use {where}=no (or bf16) on {device.type}")
    if setting == "bf16" and not _bf16_ok(device):
        raise ConfigError(f"{where}=bf16 but {torch.cuda.get_device_name(device)} has no bf16",
                          f"use {where}=fp16 on this GPU")
    return setting


def resolve_serving_precision(setting: str, device: torch.device, where: str = "--precision") -> str:
    """'auto' -> bf16 on a GPU that supports it, fp16 on an older GPU, fp32 on CPU and MPS."""
    if setting not in SERVE_PRECISIONS:
        raise ConfigError(f"{where} must be one of {', '.join(SERVE_PRECISIONS)}; got {setting!r}")
    if setting == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if _bf16_ok(device) else "fp16"
    if setting == "fp16" and device.type == "cpu":
        raise ConfigError(f"{where} fp16 is for GPUs (a CPU has no fast fp16 kernels)",
                          "use fp32 (or bf16) on the CPU")
    if setting == "bf16" and not _bf16_ok(device):
        raise ConfigError(f"{where} bf16 but {torch.cuda.get_device_name(device)} has no bf16", "use fp16")
    return setting


def autocast(device: torch.device, precision: str):
    """The forward pass's mixed-precision context; nothing at all (not even a no-op autocast) for 'no'."""
    if precision in ("no", "fp32"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """fp16 training's loss scaler (bf16 has fp32's range and needs none)."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def is_out_of_memory(exc: BaseException) -> bool:
    """A device (or host) allocation failure: the one error worth splitting a batch for."""
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError | MemoryError) and ("out of memory" in str(exc).lower()
                                                             or isinstance(exc, MemoryError))


def describe(device: torch.device) -> str:
    """'cuda:0 (NVIDIA H200)' or 'cpu': what results files name."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
