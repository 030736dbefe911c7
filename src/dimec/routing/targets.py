"""What the user states, and how a policy's thresholds are chosen on validation to meet it.

    --max-loss 0.5 --control point
                                the cheapest configuration whose validation loss is at most 0.5 points
                                (a point estimate: on new data the loss may well exceed it)
    --max-loss 0.5 --control expected
                                the cheapest configuration whose loss is at most 0.5 points on average over
                                calibration draws (conformal risk control: Angelopoulos et al. 2022)
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

Expected-loss control (conformal risk control, CRC) uses the same split. On the ordering part it builds a path
from cloud-only towards cheaper configurations (`monotone_path`); on the testing part it walks that path from
the safe end and keeps the last configuration j whose adjusted risk
(n R_n(j) + B) / (n + 1) is at most eps, where R_n is the mean of the *monotonised* loss
M_i(j) = max(0, L_i(path_0), ..., L_i(path_j)) (path_0 = cloud-only, L = 0) and B = 1 bounds it. M is
non-decreasing along the path, which is what CRC's exchangeability argument needs, and M >= L, so
E[L_{n+1}(j_hat)] <= E[M_{n+1}(j_hat)] <= eps (the expectation over calibration draws and the new sample,
given the ordering part: the search's winner's curse is paid for by ordering on data the control never sees).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dimec.config import CONTROLS, LOSSES
from dimec.config import GUARANTEE_TESTS as TESTS
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
    control: str = "point"  # without delta: 'point' (estimate) or 'expected' (conformal risk control)

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
        if self.control not in CONTROLS:
            raise ConfigError(f"unknown loss control {self.control!r}", f"use one of {', '.join(CONTROLS)}")
        if not 0 < self.order_share < 1:
            raise ConfigError(f"the ordering share must be in (0, 1), got {self.order_share}")
        return self

    @property
    def budgeted(self) -> bool:
        return self.budget is not None or self.budget_cut is not None

    @property
    def guaranteed(self) -> bool:
        """The loss holds with probability >= 1 - delta (Learn-then-Test)."""
        return self.delta is not None and not self.budgeted

    @property
    def expected(self) -> bool:
        """The loss holds on average over calibration draws (conformal risk control)."""
        return self.control == "expected" and self.delta is None and not self.budgeted

    @property
    def mode(self) -> str:
        """How the loss is kept: 'budget', 'probability' (Learn-then-Test), 'expected' (CRC) or 'point'."""
        if self.budgeted:
            return "budget"
        return "probability" if self.guaranteed else self.control

    def describe(self) -> str:
        if self.budgeted:
            return f"mean cost <= {self.budget:.4g}" if self.budget is not None else f"cost cut >= {self.budget_cut:g}%"
        what = "accuracy points lost" if self.loss == "accuracy" else "points of disagreement with the cloud exit"
        text = f"{what} <= {self.max_loss:g}"
        if self.guaranteed:
            return text + f" with probability >= {1 - self.delta:g} ({self.test} test)"
        if self.expected:
            return text + " on average over calibration draws (expected-loss control)"
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


def betting_moments(total, total_sq, seen):
    """The predictable mean and variance a bet reads: from the samples before it plus one zero-loss prior
    sample (`seen` = samples before + 1), which keeps the first bets small but non-zero. Arrays or floats."""
    mu = total / seen
    return mu, np.maximum((total_sq + 0.25) / seen - mu * mu, 1e-4)


def kelly_bet(gap, var, cap):
    """A capped Kelly-type bet on a mean `gap` away from the null (>= 0 only): gap / (var + gap^2)."""
    return np.clip(gap / (var + gap * gap), 0.0, cap)


def betting_p_value(losses: np.ndarray, eps: float, seed: int = 0) -> float:
    """H0: E[L] >= eps for L in [-1, 1], via the wealth prod(1 + lam_i (eps - L_i)) in a random order with a
    predictable, capped Kelly-type bet lam_i = (eps - mu) / (var + (eps - mu)^2) from the samples before i.
    Under H0 the wealth is a nonnegative supermartingale, so P(max wealth >= 1/delta) <= delta (Ville)."""
    x = np.asarray(losses, dtype=np.float64)[np.random.default_rng(seed).permutation(len(losses))]
    if not len(x):
        return 1.0
    cap = 0.5 / (1 - eps) if eps < 1 else 0.5
    seen = np.arange(1, len(x) + 1)  # bet i sees the samples before it, plus a zero-loss prior sample
    total = np.concatenate([[0.0], np.cumsum(x)[:-1]])
    total_sq = np.concatenate([[0.0], np.cumsum(x * x)[:-1]])
    mu, var = betting_moments(total, total_sq, seen)
    lam = kelly_bet(eps - mu, var, cap)
    log_wealth = np.cumsum(np.log1p(lam * (eps - x)))  # each factor >= 0.5: lam <= cap and eps - x >= eps - 1
    return float(min(1.0, np.exp(-max(0.0, log_wealth.max()))))


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


# ---- expected-loss control ---------------------------------------------------------------------------------
LOSS_BOUND = 1.0  # B: no per-sample loss (of either kind, monotonised) exceeds one


@dataclass
class ControlResult:
    admitted: list[int]  # candidate indices admitted along the path (in path order; cloud-only implicit)
    adjusted_risk: list[tuple[int, float]]  # (candidate, (n R_n + B) / (n + 1)) in path order, up to the first refusal


def monotone_path(order_losses: np.ndarray, cost: np.ndarray, safe: int, stop: float) -> list[int]:
    """The path expected-loss control walks, built on the ordering rows: from cloud-only (`safe`), each step
    goes to the cheaper candidate that raises the *monotonised* risk mean(max(M, L_j)) least per unit of
    cost saved, until that risk passes `stop`. order_losses: (n, K) per-sample losses, cost: (K,) mean costs.
    Ordering by the monotonised risk rather than by each candidate's own loss matters: a path whose steps
    err on different samples accumulates all their errors in M (measured in docs/routing.md)."""
    running = np.zeros(len(order_losses))
    current, risk, path = float(cost[safe]), 0.0, []
    while risk <= stop:
        cheaper = np.flatnonzero(cost < current - 1e-12)
        if not len(cheaper):
            break
        risks = np.maximum(running[:, None], order_losses[:, cheaper]).mean(0)  # (len(cheaper),)
        step = cheaper[np.argmin((risks - risk) / (current - cost[cheaper]))]
        path.append(int(step))
        running = np.maximum(running, order_losses[:, step])
        current, risk = float(cost[step]), float(running.mean())
    return path


def control_expected_loss(path: Sequence[int], test_losses, eps: float, bound: float = LOSS_BOUND) -> ControlResult:
    """Conformal risk control along `path` (candidate indices, safest first; cloud-only, L = 0, precedes it
    implicitly). test_losses[j]: (n,) per-sample losses of candidate j on the control rows. The monotonised
    loss max(0, L_path0, ..., L_pathj) makes the adjusted risk non-decreasing along the path, so the admitted
    candidates are a prefix of it; the last one admitted is the most aggressive."""
    admitted, risks, running = [], [], None
    for j in path:
        losses = np.asarray(test_losses[j], dtype=np.float64)
        running = np.maximum(losses, 0.0) if running is None else np.maximum(running, losses)
        n = len(running)
        risk = (running.sum() + bound) / (n + 1)
        risks.append((int(j), float(risk)))
        if risk > eps:
            break
        admitted.append(int(j))
    return ControlResult(admitted, risks)


def smallest_certifiable_loss(test_losses: np.ndarray, delta: float, test: str = "binomial",
                              loss: str = "accuracy", seed: int = 0) -> float:
    """The smallest eps (a fraction) at which Learn-then-Test would certify the configuration whose test-row
    losses these are, at level delta. Binomial: the Clopper-Pearson upper bound of its added-error rate (for
    k = 0 errors it is 1 - delta^(1/n): ~ln(1/delta)/n, what n rows can resolve at all); betting: bisection on
    the betting p-value."""
    x = np.asarray(test_losses)
    n = len(x)
    if n == 0:
        return 1.0
    if test == "betting" and loss == "accuracy":
        lo, hi = 0.0, 1.0
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if betting_p_value(x, mid, seed) <= delta else (mid, hi)
        return hi
    from scipy.stats import beta

    k = int(np.sum(x > 0))
    return float(beta.ppf(1 - delta, k + 1, n - k)) if k < n else 1.0
