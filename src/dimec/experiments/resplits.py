"""Does a stated loss hold on new data? The check a doubtful user would run.

The validation and test outputs of a run are pooled and split at random into two halves, many times. Each
time the policy is calibrated on one half and its loss against cloud-only measured on the other; the share
of splits where that loss exceeds the stated maximum is the violation share. With a guarantee (--delta) it
must stay at or below delta (up to the noise of the held-out half); for a point estimate it is large, and
the report says so.

Only policies whose calibration needs no cartography of the samples they are calibrated on can be
re-calibrated on a half that mixes validation and test rows: the cascades, the learned hybrid (its
pre-router learns from the training split) and the single tiers. DIMEC-DC's pools need validation dynamics,
which test rows do not have, so `auto` runs here without the pool-based families (`RESPLIT_FAMILIES`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from dimec.config import CalibrationConfig
from dimec.costs import CostModel
from dimec.errors import DimecError
from dimec.evaluation import answers
from dimec.outputs import ExitOutputs
from dimec.routing.auto import AutoRouter
from dimec.routing.base import TrainingSignal
from dimec.routing.targets import sample_losses
from dimec.tiers import CLOUD

RESPLIT_FAMILIES = ("cascade", "edge-cascade", "cloud-early-exit", "hybrid-learned", "mobile-only", "edge-only",
                    "cloud-only")


@dataclass
class ResplitResult:
    splits: int
    max_loss: float  # points
    delta: float | None
    losses_pt: list[float]  # held-out loss of each split
    cost_changes_pct: list[float]
    winners: list[str]

    @property
    def violation_share(self) -> float:
        return float(np.mean(np.asarray(self.losses_pt) > self.max_loss + 1e-9))

    def to_dict(self) -> dict:
        return {"splits": self.splits, "max_loss": self.max_loss, "delta": self.delta,
                "violation_share": self.violation_share,
                "median_loss_pt": float(np.median(self.losses_pt)),
                "median_cost_change_pct": float(np.median(self.cost_changes_pct)),
                "winners": {w: self.winners.count(w) for w in sorted(set(self.winners))},
                "losses_pt": self.losses_pt, "cost_changes_pct": self.cost_changes_pct}


def resplit_check(val: ExitOutputs, test: ExitOutputs, cost_model: CostModel, calibration: CalibrationConfig,
                  train: TrainingSignal | None = None, splits: int = 50, seed: int = 0,
                  families: tuple[str, ...] = RESPLIT_FAMILIES) -> ResplitResult:
    """Calibrate `auto` (with the calibration section's target) on one random half of validation + test,
    measure the loss on the other half; `splits` times."""
    pooled = ExitOutputs.concat([val, test])
    n = len(pooled)
    rng = np.random.default_rng(seed)
    losses, costs, winners = [], [], []
    for s in range(splits):
        perm = rng.permutation(n)
        fit_rows, held_rows = np.sort(perm[: n // 2]), np.sort(perm[n // 2:])
        cal = replace(calibration, seed=calibration.seed + s)  # a fresh ordering split for each guarantee
        try:
            router = AutoRouter.from_config(cal, families=families).fit(pooled.subset(fit_rows), cost_model, None,
                                                                        train)
        except DimecError:
            router = AutoRouter.from_config(cal, families=("cloud-only",)).fit(pooled.subset(fit_rows), cost_model)
        held = pooled.subset(held_rows)
        d = router.route(held, cost_model)
        loss = sample_losses(answers(d, held), held.predictions[:, CLOUD], held.labels, calibration.loss)
        losses.append(float(100 * loss.mean()))
        costs.append(cost_model.relative_change(float(d.cost.mean())))
        winners.append(router.winner_)
    return ResplitResult(splits, calibration.max_loss, calibration.delta, losses, costs, winners)


def prerouter_diagnostics(val: ExitOutputs, val_carto, train: TrainingSignal | None, cost_model: CostModel,
                          calibration: CalibrationConfig) -> dict:
    """How well can a sample's difficulty be told before any layer runs? On validation (labels from its own
    cartography, the learned pre-router trained on the training split):
      AUC        of a score for "the mobile exit is right": the learned P(mobile adequate), DIMEC-DC's
                 centroid margin (distance to the hard mean - distance to the easy mean), and, for
                 reference, the mobile exit's own max-probability (known only after the mobile layers ran)
      pool acc   share of samples whose predicted cheapest adequate tier is their own (learned), and whose
                 nearest DIMEC-DC centroid is their own pool (centroid rule, in-sample), beside always
                 guessing the largest class"""
    from sklearn.metrics import roc_auc_score

    from dimec.routing.dimec import DimecFixedRouter
    from dimec.runtime.prerouters import LearnedPreRouter, cheapest_adequate
    from dimec.tiers import EASY, HARD, MOBILE

    right = val.correct[:, MOBILE]

    def auc(score: np.ndarray) -> float | None:
        return float(roc_auc_score(right, score)) if 0 < right.mean() < 1 else None

    fixed = DimecFixedRouter.from_config(calibration).fit(val, cost_model, val_carto)
    d = ((val.embeddings[:, None, :].astype(np.float64) - fixed.centroids_[None]) ** 2).sum(-1)  # (N, 3)
    margin = np.nan_to_num(d[:, HARD], nan=0.0) - np.nan_to_num(d[:, EASY], nan=0.0)
    adequate = cheapest_adequate(val_carto.correctness, calibration.prerouter_adequate)
    out = {"mobile_max_prob_auc": auc(val.max_probs[:, MOBILE]),
           "centroid": {"auc": auc(margin), "pool_accuracy": float((fixed.predict_tiers(val.embeddings)
                                                                   == fixed.pools_).mean()),
                        "largest_pool_share": float(np.bincount(fixed.pools_, minlength=3).max() / len(val))},
           "learned": None}
    if train is not None:
        try:
            pre = LearnedPreRouter.fit(train.embeddings, train.lengths, train.cartography.correctness,
                                       calibration.prerouter_adequate, seed=calibration.seed)
        except DimecError as exc:
            out["learned"] = {"skipped": exc.message}
            return out
        p = pre.probabilities(val.embeddings, val.lengths)
        out["learned"] = {"auc": auc(p[:, MOBILE]), "pool_accuracy": float((p.argmax(1) == adequate).mean()),
                          "largest_class_share": float(np.bincount(adequate, minlength=3).max() / len(val)),
                          "training_rows": int(len(train.lengths))}
    return out
