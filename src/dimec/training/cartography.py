"""Data cartography (Swayamdipta et al., 2020) over training dynamics, as DIMEC-DC uses it.

After every epoch each validation sample's probability of its true label is recorded at every exit.
Across epochs: confidence = mean, variability = variance (the paper's definition; `std` is a setting).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dimec.atomic import write_with
from dimec.errors import ArtifactError, ConfigError
from dimec.rundir import RunDir
from dimec.tiers import TIERS


def write_epoch_dynamics(path: Path, epoch: int, true_label_probs: np.ndarray, correct: np.ndarray) -> None:
    """true_label_probs, correct: (N, 3) for one epoch; one JSON line per validation sample."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for i, (p, c) in enumerate(zip(true_label_probs.tolist(), correct.tolist(), strict=True)):
            f.write(json.dumps({"epoch": epoch, "index": i, "true_label_prob": p, "correct": c}) + "\n")
    tmp.replace(path)  # never leave half an epoch behind after a crash


def read_dynamics(run_dir: Path, split: str = "validation") -> tuple[np.ndarray, np.ndarray]:
    """Returns (probs, correct), each (E, N, 3) over the E recorded epochs of `split`."""
    folder = RunDir(run_dir).dynamics_dir(split)
    files = sorted(folder.glob("epoch_*.jsonl"))
    if not files:
        raise ArtifactError(f"no training dynamics in {folder}", "run `dimec train RUN_DIR` first")
    probs, correct = [], []
    for f in files:
        try:
            rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            rows.sort(key=lambda r: r["index"])
            probs.append([r["true_label_prob"] for r in rows])
            correct.append([r["correct"] for r in rows])
        except (ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{f} is damaged ({type(exc).__name__}: {exc})",
                                "train again into a fresh --run-dir") from None
    try:
        return np.asarray(probs, dtype=np.float64), np.asarray(correct, dtype=bool)  # (E, N, 3) each
    except ValueError:  # ragged: epochs over different samples
        raise ArtifactError(f"the epochs in {folder} cover different samples",
                            "the run directory mixes two runs: train again in a fresh --run-dir") from None


@dataclass
class Cartography:
    confidence: np.ndarray  # (N, 3) mean true-label probability across epochs, per exit
    variability: np.ndarray  # (N, 3) variance (or std) of it across epochs, per exit
    correctness: np.ndarray  # (N, 3) fraction of epochs the exit was right

    @classmethod
    def from_dynamics(cls, probs: np.ndarray, correct: np.ndarray, variability: str = "variance") -> Cartography:
        """probs, correct: (E, N, 3)."""
        if variability not in ("variance", "std"):
            raise ConfigError(f"calibration.variability must be 'variance' or 'std', got {variability!r}")
        spread = probs.var(axis=0) if variability == "variance" else probs.std(axis=0)  # ddof=0 as in the paper
        return cls(confidence=probs.mean(axis=0), variability=spread, correctness=correct.mean(axis=0))

    def exit(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in TIERS:
            raise ConfigError(f"unknown exit {name!r}", f"use one of {', '.join(TIERS)}")
        k = TIERS.index(name)
        return self.confidence[:, k], self.variability[:, k]


def plot_data_map(carto: Cartography, path: Path, exit_name: str = "mobile", title: str = "") -> None:
    """Variability vs confidence, coloured by correctness (the paper's Fig. 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf, var = carto.exit(exit_name)
    k = TIERS.index(exit_name)
    fig, ax = plt.subplots(figsize=(6, 5))
    sc = ax.scatter(var, conf, c=carto.correctness[:, k], cmap="coolwarm_r", s=8, alpha=0.7, vmin=0, vmax=1)
    fig.colorbar(sc, ax=ax, label="correctness (fraction of epochs right)")
    ax.set_xlabel("variability (variance of true-label probability across epochs)")
    ax.set_ylabel("confidence (mean true-label probability)")
    ax.set_title(title or f"Data map at the {exit_name} exit ({len(conf)} validation samples)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
