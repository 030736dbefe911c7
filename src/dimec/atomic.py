"""Crash-safe writes and checked reads of run artifacts.

Every artifact goes to a temporary sibling first and is renamed into place, so a reader sees the old file
or the new one, never half of one (rename is atomic on POSIX file systems). Temporary siblings left by a
process that was killed are removed by the next write of the same path. Readers of JSON artifacts use
`read_json`, which turns a missing or damaged file into an ArtifactError naming it.
"""

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

from dimec.errors import ArtifactError


def _tmp_sibling(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


def remove_stale(path: Path) -> None:
    """Remove temporary siblings of `path` (.NAME.tmp-PID, .NAME.old-PID) whose process is gone."""
    if not path.parent.is_dir():
        return
    for sibling in path.parent.glob(f".{path.name}.*-*"):
        kind, _, pid = sibling.name[len(path.name) + 2:].rpartition("-")
        if kind in ("tmp", "old") and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            if sibling.is_dir() and not sibling.is_symlink():
                shutil.rmtree(sibling, ignore_errors=True)
            else:
                sibling.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path):
    """`with atomic_path(p) as tmp: write(tmp)` - tmp becomes p only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
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
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    """Strict JSON (NaN and infinities become null, tuples lists, paths strings), written atomically."""
    write_text(path, json.dumps(strict_json(obj), indent=2, allow_nan=False) + "\n")


def write_with(path: str | Path, writer: Callable[[Path], Any]) -> None:
    """`writer(tmp_path)` writes the file (e.g. safetensors' save_file); then it is renamed into place.
    The temporary name does not end in the final suffix: give writers that guess a format from it the
    format explicitly (e.g. `savefig(tmp, format="png")`)."""
    with atomic_path(path) as tmp:
        writer(tmp)


@contextmanager
def atomic_dir(path: str | Path):
    """`with atomic_dir(d) as tmp: fill(tmp)` - the finished folder replaces d in one swap; on failure d
    is left as it was. (Two renames: a crash between them leaves d missing and .d.old-PID holding the old
    folder, never a mix of old and new files.)"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp, old = _tmp_sibling(path), _tmp_sibling(path, "old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):  # the files are on disk before the folder's name points at them
            if f.is_file():
                with open(f, "rb+") as handle:
                    os.fsync(handle.fileno())
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


def read_json(path: str | Path, hint: str) -> Any:
    """A JSON artifact; a missing, unreadable or damaged file is an ArtifactError naming it, with `hint`."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} not found", hint)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ArtifactError(f"{path} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
                            hint) from None
