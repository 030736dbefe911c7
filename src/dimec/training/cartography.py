"""Data cartography (Swayamdipta et al., 2020) over training dynamics, as DIMEC-DC uses it.

After every epoch each validation sample's probability of its true label is recorded at every exit
(`dynamics/epoch_NNN.jsonl`), and, with `train.train_dynamics_samples`, the same for the training split or
a stratified sample of it (`dynamics/train/epoch_NNN.jsonl`, each row's "index" pointing into the training
split). Across epochs: confidence = mean, variability = variance (the paper's definition; `std` is a setting).
The probabilities are the raw softmax (T = 1): exit temperatures are fitted only after the last epoch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dimec.atomic import write_text, write_with
from dimec.errors import ArtifactError, ConfigError
from dimec.outputs import ExitOutputs
from dimec.rundir import RunDir
from dimec.tiers import TIERS

DYNAMICS_SPLITS = ("validation", "train")


def write_epoch_dynamics(path: Path, epoch: int, true_label_probs: np.ndarray, correct: np.ndarray,
                         index: np.ndarray | None = None) -> None:
    """true_label_probs, correct: (N, 3) for one epoch; index (N,): each row's index into its split (default
    0..N-1). One JSON line per sample, written atomically: never half an epoch behind after a crash."""
    index = np.arange(len(true_label_probs)) if index is None else np.asarray(index)
    if len(index) != len(true_label_probs) or len(correct) != len(true_label_probs):
        raise ValueError(f"{len(index)} indices, {len(true_label_probs)} probability rows, {len(correct)} "
                         "correctness rows: one each per sample")
    lines = [json.dumps({"epoch": epoch, "index": int(i), "true_label_prob": p, "correct": c})
             for i, p, c in zip(index.tolist(), true_label_probs.tolist(), correct.tolist(), strict=True)]
    write_text(path, "".join(line + "\n" for line in lines))


def _epoch_files(run_dir: Path, split: str) -> list[Path]:
    if split not in DYNAMICS_SPLITS:
        raise ConfigError(f"unknown dynamics split {split!r}", f"use one of {', '.join(DYNAMICS_SPLITS)}")
    return sorted(RunDir(run_dir).dynamics_dir(split).glob("epoch_*.jsonl"))


def _read_epoch(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One epoch file: (index (N,), true-label probability (N, 3), correct (N, 3)), rows by index."""
    try:
        rows = sorted((json.loads(line) for line in path.read_text().splitlines() if line.strip()),
                      key=lambda r: r["index"])
        index = np.asarray([r["index"] for r in rows], dtype=np.int64)
        probs = np.asarray([r["true_label_prob"] for r in rows], dtype=np.float64)
        correct = np.asarray([r["correct"] for r in rows], dtype=bool)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{path} is damaged ({exc})", "train the run again in a fresh --run-dir") from None
    return index, probs, correct


def read_dynamics(run_dir: Path, split: str = "validation") -> tuple[np.ndarray, np.ndarray]:
    """Returns (probs, correct), each (E, N, 3) over the E recorded epochs of `split` ("validation" or
    "train"), rows in the order of `dynamics_rows(run_dir, split)` (ascending index into the split)."""
    files = _epoch_files(run_dir, split)
    if not files:
        folder = RunDir(run_dir).dynamics_dir(split)
        hint = ("train with train.train_dynamics_samples unset (all rows) or > 0 to record them"
                if split == "train" else "run `dimec train RUN_DIR` first")
        raise ArtifactError(f"no training dynamics of the {split} split in {folder}", hint)
    epochs = [_read_epoch(f) for f in files]
    for f, (index, _, _) in zip(files[1:], epochs[1:], strict=True):
        if not np.array_equal(index, epochs[0][0]):
            raise ArtifactError(f"{f} covers other samples than {files[0].name}",
                                "the dynamics mix two runs: train again in a fresh --run-dir")
    return np.stack([p for _, p, _ in epochs]), np.stack([c for _, _, c in epochs])


def dynamics_rows(run_dir: Path, split: str = "validation") -> np.ndarray:
    """(N,) the index into `split` of each row `read_dynamics` returns (0..N-1 for validation; the sampled
    rows of the training split, ascending, for train)."""
    files = _epoch_files(run_dir, split)
    if not files:
        raise ArtifactError(f"no training dynamics of the {split} split in {RunDir(run_dir).dynamics_dir(split)}",
                            "run `dimec train RUN_DIR` first")
    return _read_epoch(files[0])[0]


def dynamics_sample(labels: np.ndarray, samples: int | None, seed: int) -> np.ndarray | None:
    """Which training rows get dynamics: None -> all (0..N-1); 0 -> none (returns None); n -> a seeded,
    label-stratified sample of n rows, ascending. Bad values are a ConfigError (checked before training)."""
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    n = len(labels)
    if samples is None or samples == n:
        return np.arange(n)
    if samples == 0:
        return None
    classes = len(np.unique(labels))
    if not classes <= samples < n:
        raise ConfigError(f"train.train_dynamics_samples={samples} does not fit the training split ({n} rows, "
                          f"{classes} labels)", f"use 0 (off), null (all rows) or a number in [{classes}, {n}]")
    keep, _ = train_test_split(np.arange(n), train_size=samples, stratify=labels, random_state=seed)
    return np.sort(keep)


def prune_dynamics(run_dir: Path, after_epoch: int) -> None:
    """Delete the epoch files of every split beyond `after_epoch` (an epoch that never committed)."""
    for split in DYNAMICS_SPLITS:
        for f in RunDir(run_dir).dynamics_dir(split).glob("epoch_*.jsonl"):
            try:
                epoch = int(f.stem.split("_")[1])
            except (IndexError, ValueError):
                continue
            if epoch > after_epoch:
                f.unlink(missing_ok=True)


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

    def __len__(self) -> int:
        return len(self.confidence)

    def rows_of(self, outputs: ExitOutputs) -> ExitOutputs:
        """The rows of `outputs` this cartography describes. Calibration rows may extend validation with rows
        that have no training dynamics (spare or cross-fitted rows, docs/routing.md); they always come after
        the validation rows, so the cartography covers a prefix."""
        if len(self) > len(outputs):
            raise ArtifactError(f"the cartography covers {len(self)} samples but the outputs have {len(outputs)}",
                                "the run directory mixes two runs: train again in a fresh --run-dir")
        return outputs if len(self) == len(outputs) else outputs.subset(np.arange(len(self)))

    def exit(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in TIERS:
            raise ConfigError(f"unknown exit {name!r}", f"use one of {', '.join(TIERS)}")
        k = TIERS.index(name)
        return self.confidence[:, k], self.variability[:, k]


def plot_data_map(carto: Cartography, path: Path, exit_name: str = "mobile", title: str = "",
                  split: str = "validation") -> None:
    """Variability vs confidence, coloured by correctness (the paper's Fig. 1), for the dynamics of either
    split (`Cartography.from_dynamics(*read_dynamics(run_dir, split))`)."""
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
    ax.set_title(title or f"Data map at the {exit_name} exit ({len(conf)} {split} samples)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
