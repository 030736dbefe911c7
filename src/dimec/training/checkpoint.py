"""Resume state after every finished epoch: the one commit point of training.

    checkpoint/state.json                     the committed epoch: its number, the best epoch and score so
                                              far, the log rows, optimiser and scheduler scalars, and the
                                              names of the two tensor files below
    checkpoint/model-epoch_NNN.safetensors    the weights after epoch NNN
    checkpoint/optimizer-epoch_NNN.safetensors  AdamW moments and the torch RNG state after epoch NNN

An epoch's two tensor files are written first, each to a temporary name and renamed (never in place, and
under names of their own, so they never overwrite the committed epoch's files); then state.json is replaced
atomically. That rename is the commit; the older epoch's files are deleted after it. A kill at any moment
leaves the last committed epoch whole. Everything else training writes (model/, train_log.jsonl) is derived
from the committed state after the commit, and rewritten from it when a run resumes (`trainer.publish`), so
it is never ahead of the checkpoint. Safetensors and JSON only, no pickle.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dimec.atomic import write_json, write_with
from dimec.errors import ArtifactError

STATE = "state.json"
DAMAGED_HINT = ("restore the file, or delete the checkpoint/ folder to train from the start "
                "(model/ keeps the best finished epoch until a new epoch beats it)")


@dataclass
class TrainState:
    """Where training stands after the last committed epoch (epoch 0: nothing trained yet)."""

    epoch: int = 0
    best_epoch: int = 0
    best_score: float = -1.0
    seconds: float = 0.0  # training time summed over the committed epochs
    samples: int = 0  # training samples seen over the committed epochs
    log: list[dict] = field(default_factory=list)  # one row per committed epoch: train_log.jsonl


def save_checkpoint(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, state: TrainState) -> None:
    """Write the tensors of `state.epoch`, then commit them with state.json, then drop older files."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {"model": f"model-epoch_{state.epoch:03d}.safetensors",
             "optimizer": f"optimizer-epoch_{state.epoch:03d}.safetensors"}
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}  # .cpu(): from any device
    write_with(directory / files["model"], lambda p: save_file(weights, str(p)))
    opt_state = optimizer.state_dict()
    tensors, steps = {}, {}
    for pid, s in opt_state["state"].items():
        for name, value in s.items():
            if name == "step":
                steps[str(pid)] = float(value)
            else:
                tensors[f"{pid}.{name}"] = value.cpu().contiguous()
    tensors["torch_rng_state"] = torch.get_rng_state()
    write_with(directory / files["optimizer"], lambda p: save_file(tensors, str(p)))
    meta = {"state": asdict(state), "files": files, "steps": steps, "param_groups": opt_state["param_groups"],
            "scheduler": {"last_epoch": scheduler.last_epoch}}
    write_json(directory / STATE, meta)  # the commit
    for stale in directory.iterdir():  # older epochs' files, and temporary files a kill left behind
        if stale.is_file() and stale.name not in (STATE, *files.values()):
            stale.unlink(missing_ok=True)


def load_checkpoint(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler) -> TrainState | None:
    """Restore the committed epoch into model, optimizer and scheduler; None when there is none. A damaged
    checkpoint is one ArtifactError naming the file (nothing is changed on disk)."""
    path = directory / STATE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
        raw_state = meta["state"]
        files = meta.get("files", {"model": "model.safetensors", "optimizer": "optimizer.safetensors"})  # older layout
        known = {f.name for f in fields(TrainState)}
        state = TrainState(**{k: v for k, v in raw_state.items() if k in known})
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{path} is damaged ({exc})", DAMAGED_HINT) from None
    weights = _read_tensors(directory / files["model"])
    tensors = _read_tensors(directory / files["optimizer"])
    try:
        model.load_state_dict(weights)
        rng = tensors.pop("torch_rng_state")
        opt_state: dict = {"state": {}, "param_groups": meta["param_groups"]}
        for key, value in tensors.items():
            pid, name = key.split(".", 1)
            opt_state["state"].setdefault(int(pid), {})[name] = value
        for pid, step in meta["steps"].items():
            opt_state["state"].setdefault(int(pid), {})["step"] = torch.tensor(step)
        optimizer.load_state_dict(opt_state)
        torch.set_rng_state(rng)
        scheduler.last_epoch = meta["scheduler"]["last_epoch"]
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"the checkpoint in {directory} does not fit this model and optimiser "
                            f"({str(exc).splitlines()[0][:200]})", DAMAGED_HINT) from None
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    if not state.log:  # written by an older version: the log lived only in train_log.jsonl
        state.log = _older_log(directory.parent / "train_log.jsonl", state.epoch)
    return state


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ArtifactError(f"checkpoint file {path} is missing", DAMAGED_HINT)
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise ArtifactError(f"checkpoint file {path} is damaged ({exc})", DAMAGED_HINT) from None


def _older_log(path: Path, upto: int) -> list[dict]:
    """The rows of epochs 1..upto from a train_log.jsonl written before the log was checkpointed."""
    rows: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("epoch"), int) and row["epoch"] <= upto:
                rows[row["epoch"]] = row
    return [rows[e] for e in sorted(rows)]
