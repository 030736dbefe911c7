"""Crash-safe writes: every artifact goes to a temporary sibling first and is renamed into place, so a
reader sees the old file or the new one, never half of one (rename is atomic on POSIX file systems)."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(path: str | Path):
    """`with atomic_path(p) as tmp: write(tmp)` - tmp becomes p only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the bytes are on disk before the name points at them
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    """Strict JSON (NaN and infinities become null, tuples lists, paths strings), written atomically."""
    write_text(path, json.dumps(strict_json(obj), indent=2, allow_nan=False) + "\n")


def write_with(path: str | Path, writer: Callable[[Path], Any]) -> None:
    """`writer(tmp_path)` writes the file (e.g. safetensors' save_file); then it is renamed into place."""
    with atomic_path(path) as tmp:
        writer(tmp)


@contextmanager
def atomic_dir(path: str | Path):
    """`with atomic_dir(d) as tmp: fill(tmp)` - the finished folder replaces d in one swap; on failure d
    is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            path.rename(old)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def strict_json(obj: Any) -> Any:
    """NaN/inf (e.g. an undefined oracle share) -> null, tuples and arrays -> lists, numpy scalars -> Python
    numbers, paths -> strings."""
    if isinstance(obj, np.ndarray):
        return strict_json(obj.tolist())
    if isinstance(obj, np.generic):
        return strict_json(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
