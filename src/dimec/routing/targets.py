"""What the user states, and how a policy's thresholds are chosen on validation to meet it.

    --max-loss 0.5              the cheapest configuration whose validation loss is at most 0.5 points
                                (a point estimate: on new data the loss may well exceed it)
    --max-loss 0.5 --delta 0.1  the cheapest configuration whose loss is at most 0.5 points with probability
                                at least 0.9 (Learn-then-Test: Angelopoulos et al. 2021; Pareto testing:
                                Laufer-Goldshtein et al. 2023)
    --budget 0.08 | --budget 45%  the most accurate configuration whose mean cost is at most that

The loss is measured against cloud-only inference on the same samples, per sample:
    accuracy      L_i = 1[cloud right] - 1[answer right]         in {-1, 0, 1}; mean = accuracy points lost
    disagreement  L_i = 1[answer != cloud exit's answer]          in {0, 1}; needs no labels, and bounds the
                                                                  accuracy loss from above (L_acc <= L_dis)

The guarantee (docs/routing.md): validation is split once, at random, into an ordering part
and a testing part. On the ordering part the candidates' (loss, cost) points give a Pareto front, sorted
from safest to most aggressive; on the testing part each hypothesis H_j: "E[L_j] > eps" is tested in that
order, at level delta, stopping at the first that is not rejected (fixed-sequence testing controls the
family-wise error at delta without a multiplicity correction). Every rejected configuration then has
E[L] <= eps with probability >= 1 - delta simultaneously, and the cheapest of them is kept. p-values:
    binomial  exact binomial tail of the errors the policy adds (L+ = 1[cloud right, answer wrong]): since
              E[L_acc] <= E[L+], bounding E[L+] bounds the loss. Exact for any n; ignores the errors the
              policy fixes, so conservative. For the disagreement loss it is exact and tight.
    betting   a test martingale on L in [-1, 1] (Waudby-Smith & Ramdas 2023): wealth prod(1 + lam_i (eps - L_i))
              with predictable bets; p = 1 / max wealth (Ville). Uses the fixes too, adapts to the variance.
Cloud-only (L = 0) is always admissible: when nothing is certified, the policy falls back to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dimec.config import GUARANTEE_TESTS as TESTS
from dimec.config import LOSSES
from dimec.errors import ConfigError


@dataclass(frozen=True)
class Target:
    max_loss: float | None = 0.5  # points (of accuracy, or of disagreement with the cloud exit)
    delta: float | None = None  # None: point estimate; else the loss bound holds with probability 1 - delta
    budget: float | None = None  # mean cost in reward units
    budget_cut: float | None = None  # percent cut against cloud-only
    loss: str = "accuracy"
    test: str = "binomial"
    order_share: float = 0.5  # guarantee: share of validation used to order the candidates
    seed: int = 0
    point_margin: float = 0.0  # point estimate: loss + margin * its standard error <= max_loss

    def check(self) -> Target:
        """One clear ConfigError per bad value (the CLI turns it into exit 2)."""
        if self.budget is not None and self.budget_cut is not None:
            raise ConfigError("give a budget as mean cost or as a % cut, not both")
        budgeted = self.budget is not None or self.budget_cut is not None
        if budgeted and self.delta is not None:
            raise ConfigError("--delta goes with --max-loss (a guaranteed loss), not with --budget")
        if not budgeted and self.max_loss is None:
            raise ConfigError("no target: give --max-loss POINTS or --budget COST")
        if self.max_loss is not None and not 0 <= self.max_loss < 100:
            raise ConfigError(f"--max-loss must be in [0, 100) points of accuracy, got {self.max_loss}",
                              "e.g. --max-loss 0.5 (half a point below cloud-only)")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"--delta must be in (0, 1), got {self.delta}", "e.g. --delta 0.1 (90% confidence)")
        if self.budget is not None and not self.budget > 0:
            raise ConfigError(f"--budget must be a positive mean cost, got {self.budget}")
        if self.budget_cut is not None and not 0 <= self.budget_cut < 100:
            raise ConfigError(f"--budget as a cut must be in [0%, 100%), got {self.budget_cut}%")
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}", f"use one of {', '.join(LOSSES)}")
        if self.test not in TESTS:
            raise ConfigError(f"unknown guarantee test {self.test!r}", f"use one of {', '.join(TESTS)}")
        if self.point_margin < 0:
            raise ConfigError(f"calibration.point_margin must be >= 0 standard errors, got {self.point_margin}")
        if not 0 < self.order_share < 1:
            raise ConfigError(f"the ordering share must be in (0, 1), got {self.order_share}")
        return self

    @property
    def budgeted(self) -> bool:
        return self.budget is not None or self.budget_cut is not None

    @property
    def guaranteed(self) -> bool:
        return self.delta is not None and not self.budgeted

    def describe(self) -> str:
        if self.budgeted:
            return f"mean cost <= {self.budget:.4g}" if self.budget is not None else f"cost cut >= {self.budget_cut:g}%"
        what = "accuracy points lost" if self.loss == "accuracy" else "points of disagreement with the cloud exit"
        text = f"{what} <= {self.max_loss:g}"
        if self.guaranteed:
            return text + f" with probability >= {1 - self.delta:g} ({self.test} test)"
        margin = f" + {self.point_margin:g} standard errors" if self.point_margin else ""
        return text + f" on validation (point estimate{margin})"

    def cost_cap(self, cloud_only: float) -> float:
        """The mean cost a budgeted target allows, in reward units."""
        return self.budget if self.budget is not None else cloud_only * (1 - self.budget_cut / 100)


def sample_losses(answer: np.ndarray, cloud: np.ndarray, labels: np.ndarray, loss: str) -> np.ndarray:
    """(N,) per-sample loss against cloud-only (see the module docstring). answer, cloud: (N,) predictions."""
    if loss == "accuracy":
        return (cloud == labels).astype(np.int8) - (answer == labels).astype(np.int8)
    return (answer != cloud).astype(np.int8)


# ---- point estimate and budget ---------------------------------------------------------------------------
def select_point(loss_pt: np.ndarray, cost: np.ndarray, max_loss: float) -> int | None:
    """Index of the cheapest candidate whose loss (points) is at most max_loss; ties: smaller loss."""
    ok = np.flatnonzero(loss_pt <= max_loss + 1e-9)
    if not len(ok):
        return None
    return int(ok[np.lexsort((loss_pt[ok], cost[ok]))[0]])


def select_budget(loss_pt: np.ndarray, cost: np.ndarray, cap: float) -> int | None:
    """Index of the candidate with the smallest loss whose mean cost is at most cap; ties: cheaper."""
    ok = np.flatnonzero(cost <= cap + 1e-12)
    if not len(ok):
        return None
    return int(ok[np.lexsort((cost[ok], loss_pt[ok]))[0]])


# ---- the guarantee -----------------------------------------------------------------------------------------
def binomial_p_value(added_errors: np.ndarray, eps: float) -> float:
    """H0: P(error added) > eps, from (n,) 0/1 indicators; exact lower binomial tail P(Bin(n, eps) <= k)."""
    from scipy.stats import binom

    n, k = len(added_errors), int(np.sum(added_errors))
    return float(binom.cdf(k, n, eps)) if n else 1.0


def betting_p_value(losses: np.ndarray, eps: float, seed: int = 0) -> float:
    """H0: E[L] >= eps for L in [-1, 1], via the wealth prod(1 + lam_i (eps - L_i)) in a random order with a
    predictable, capped Kelly-type bet lam_i = (eps - mu) / (var + (eps - mu)^2) from the samples before i.
    Under H0 the wealth is a nonnegative supermartingale, so P(max wealth >= 1/delta) <= delta (Ville)."""
    x = np.asarray(losses, dtype=np.float64)[np.random.default_rng(seed).permutation(len(losses))]
    cap = 0.5 / (1 - eps) if eps < 1 else 0.5
    wealth, best, total, total_sq = 1.0, 1.0, 0.0, 0.0
    for i, xi in enumerate(x):
        mu = (total + 0.0) / (i + 1)  # a zero-loss prior sample keeps the first bets small but non-zero
        var = max((total_sq + 0.25) / (i + 1) - mu * mu, 1e-4)
        gap = eps - mu
        lam = min(cap, max(0.0, gap / (var + gap * gap)))
        wealth *= 1 + lam * (eps - xi)
        best = max(best, wealth)
        total, total_sq = total + xi, total_sq + xi * xi
    return float(min(1.0, 1.0 / best))


def pareto_order(loss: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Indices of the candidates on the (loss, cost) Pareto front, safest (smallest loss) first."""
    order = np.lexsort((cost, loss))  # by loss, then cost
    front, best_cost = [], np.inf
    for i in order:
        if cost[i] < best_cost - 1e-12:
            front.append(i)
            best_cost = cost[i]
    return np.asarray(front, dtype=np.int64)


@dataclass
class GuaranteeResult:
    certified: list[int]  # candidate indices whose loss bound is certified (in test order)
    tested: list[tuple[int, float]]  # (candidate, p-value) in the order tested, up to the first failure
    order_rows: np.ndarray  # validation rows used to order
    test_rows: np.ndarray  # validation rows used to test


def split_rows(n: int, order_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    k = int(round(order_share * n))
    return np.sort(perm[:k]), np.sort(perm[k:])


def learn_then_test(order_loss: np.ndarray, order_cost: np.ndarray, test_losses: Sequence[np.ndarray],
                    target: Target, front: np.ndarray | None = None) -> GuaranteeResult:
    """Fixed-sequence testing of the candidates' hypotheses "E[L] > eps" (eps = max_loss / 100).

    order_loss, order_cost: (K,) estimates on the ordering rows; test_losses[j]: (n_test,) per-sample losses
    of candidate j on the testing rows (only the front's are read). Returns the certified candidates."""
    eps = target.max_loss / 100
    front = pareto_order(order_loss, order_cost) if front is None else front
    certified, tested = [], []
    for j in front:
        losses = test_losses[j]
        if target.test == "betting" and target.loss == "accuracy":
            p = betting_p_value(losses, eps, target.seed)
        else:  # the binomial test reads the errors a policy adds (= the loss itself when it is disagreement)
            p = binomial_p_value(losses > 0, eps)
        tested.append((int(j), p))
        if p > target.delta:
            break
        certified.append(int(j))
    return GuaranteeResult(certified, tested, np.empty(0, np.int64), np.empty(0, np.int64))
