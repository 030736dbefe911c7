"""The trained model's configuration, MultiExitConfig (dimec_model.json beside the weights), and the one reader
of its exit temperatures. Torch-free: the phone's tier package reads it without the model code.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from dimec.config import ModelConfig
from dimec.errors import ArtifactError
from dimec.rundir import MODEL_CONFIG


@dataclass
class MultiExitConfig(ModelConfig):
    """The model's one configuration: the user's `model` settings (ModelConfig: encoder, exit layers,
    pooling, dropout) plus what the task and training fixed. Saved as dimec_model.json beside the weights."""

    label_names: list[str] = field(default_factory=list)  # index = label id
    task: str = ""
    metric: str = "accuracy"  # the task metric beside accuracy: "accuracy", "mcc" or "f1"
    max_length: int = 128  # tokens, as trained
    num_exits: int = 3  # a tier package keeps exits 0..num_exits-1
    temperatures: tuple[float, float, float] | None = None  # per exit, fitted on validation; None: not fitted

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> MultiExitConfig:
        raw = json.loads(text)
        raw.pop("num_labels", None)  # written by older versions; derived from label_names now
        known = {f.name for f in fields(cls)}
        raw = {k: v for k, v in raw.items() if k in known}
        for key in ("exit_layers", "temperatures"):
            if raw.get(key) is not None:
                raw[key] = tuple(raw[key])
        return cls(**raw)

    @classmethod
    def load(cls, directory: str | Path) -> MultiExitConfig:
        """The config of a saved model folder, without loading its weights."""
        path = Path(directory) / MODEL_CONFIG
        if not path.is_file():
            raise ArtifactError(f"{directory} is not a dimec model folder (no {MODEL_CONFIG})",
                                "train one with `dimec train RUN_DIR` or `dimec run`")
        try:
            return cls.from_json(path.read_text())
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{path} is not a valid model config ({exc})",
                                "train the model again (`dimec train`)") from None

    def exit_temperatures(self, where: str = "") -> np.ndarray:
        """(3,) the temperature each exit's confidence is read at (the one reader: `dimec route`, evaluation and
        every tier package). A model trained before temperatures existed has none: T = 1 (the raw softmax),
        said once per model folder; three positive numbers, or one clear error."""
        if self.temperatures is not None:  # three finite numbers > 0: T <= 0 flips every confidence, NaN breaks it
            try:
                temperatures = np.asarray(self.temperatures, dtype=np.float64)
            except (TypeError, ValueError, OverflowError):
                temperatures = np.empty(0)
            if temperatures.shape != (3,) or not np.isfinite(temperatures).all() or not (temperatures > 0).all():
                raise ArtifactError(f"{where or 'this model'}: exit temperatures must be three finite numbers > 0, "
                                    f"got {ascii(self.temperatures)[:80]}", "train (or export) the model again")
            return temperatures
        if where not in _NOTICED:
            _NOTICED.add(where)
            print(f"dimec: notice: {where or 'this model'} has no fitted exit temperatures (trained by an older "
                  "dimec); confidences are the raw softmax (T = 1). Train again to calibrate them.",
                  file=sys.stderr, flush=True)
        return np.ones(3)


_NOTICED: set[str] = set()
