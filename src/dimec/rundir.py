"""The layout of a run directory, in one place: every stage, report and package reads its paths here.

    config.json                    the full configuration (every stage)
    data.json                      task, label names, metric, split sizes (train)
    model/                         encoder + exits (safetensors), tokenizer, dimec_model.json (train)
    dynamics/epoch_NNN.jsonl       validation samples' true-label probability per exit, per epoch (train)
    dynamics/train/epoch_NNN.jsonl the same for (a stratified sample of) the training split (train)
    train_log.jsonl, train_result.json, checkpoint/   progress, result and resume state (train)
    outputs/{split}.safetensors    every exit's logits, temperatures and the routing embeddings (train writes
                                   validation's; calibrate/evaluate compute what is missing)
    outputs/oof.safetensors        out-of-fold outputs of every training row, with fold ids and each fold
                                   model's temperatures (train, with train.cross_fit = K)
    outputs/spare.safetensors      the deployed model's outputs on the training rows data.max_train_samples
                                   dropped (train or calibrate, with calibration.spare_rows)
    crossfit/                      the cross-fit's resume state while it runs: fold_N.safetensors per finished
                                   fold, fold_N/ for the fold in training (removed once oof is written)
    router.json, calibration.json, data_map.png       the fitted routers and their report (calibrate)
    metrics.json                   test-split results (evaluate)
    packages/{tier}/               per-tier deployables (export)
    profile.json                   measured costs in milliseconds (profile)
    plan/plan.json, plan/plan.png  accuracy, latency, money, exposure of every policy; the pick (plan)
    drift_reference.json           validation distributions the drift monitor compares with (export; also
                                   copied into every package)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG = "config.json"
DATA = "data.json"
MODEL_DIR = "model"
MODEL_CONFIG = "dimec_model.json"  # in a model folder (model/, a package's model/): exit layers, labels, temperatures
DYNAMICS_DIR = "dynamics"
TRAIN_DYNAMICS_DIR = "dynamics/train"
CHECKPOINT_DIR = "checkpoint"
TRAIN_LOG = "train_log.jsonl"
TRAIN_RESULT = "train_result.json"
OUTPUTS_DIR = "outputs"
OOF = "oof"  # outputs/oof.safetensors: cross-fitted rows (not a split: RunDir.outputs(OOF))
SPARE = "spare"  # outputs/spare.safetensors: training rows the cap dropped
CROSSFIT_DIR = "crossfit"
ROUTER = "router.json"
CALIBRATION = "calibration.json"
DATA_MAP = "data_map.png"
METRICS = "metrics.json"
PACKAGES_DIR = "packages"
PROFILE = "profile.json"
DRIFT_REFERENCE = "drift_reference.json"
PLAN_DIR = "plan"
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory (nothing is created or read here)."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def data(self) -> Path:
        return self.root / DATA

    @property
    def model(self) -> Path:
        return self.root / MODEL_DIR

    @property
    def checkpoint(self) -> Path:
        return self.root / CHECKPOINT_DIR

    @property
    def train_log(self) -> Path:
        return self.root / TRAIN_LOG

    @property
    def train_result(self) -> Path:
        return self.root / TRAIN_RESULT

    def dynamics_dir(self, split: str = "validation") -> Path:
        """Where the per-epoch dynamics of `split` ("validation" or "train") live."""
        return self.root / (DYNAMICS_DIR if split == "validation" else TRAIN_DYNAMICS_DIR)

    def dynamics(self, epoch: int, split: str = "validation") -> Path:
        return self.dynamics_dir(split) / f"epoch_{epoch:03d}.jsonl"

    def outputs(self, split: str) -> Path:
        return self.root / OUTPUTS_DIR / f"{split}.safetensors"

    @property
    def crossfit(self) -> Path:
        return self.root / CROSSFIT_DIR

    @property
    def router(self) -> Path:
        return self.root / ROUTER

    @property
    def calibration(self) -> Path:
        return self.root / CALIBRATION

    @property
    def data_map(self) -> Path:
        return self.root / DATA_MAP

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def packages(self) -> Path:
        return self.root / PACKAGES_DIR

    @property
    def profile(self) -> Path:
        return self.root / PROFILE

    @property
    def drift_reference(self) -> Path:
        return self.root / DRIFT_REFERENCE

    @property
    def plan(self) -> Path:
        return self.root / PLAN_DIR
