"""An anytime-valid confidence sequence for the mean of a bounded live stream, by betting.

For each candidate mean m on a grid, two test martingales (Waudby-Smith & Ramdas 2023, "Estimating means of
bounded random variables by betting", JRSS-B):

    upper side  H0: mean >= m    wealth prod(1 + lam_i (m - x_i))     grows when the stream sits below m
    lower side  H0: mean <= m    wealth prod(1 + lam_i (x_i - m))     grows when it sits above m

with the predictable, capped Kelly-type bets of Learn-then-Test's betting p-value (routing/targets.py:
`betting_moments`, `kelly_bet`; each factor stays >= 0.5). By Ville's inequality a wealth passes 2/alpha with
probability at most alpha/2 under its null, at *any* time, so the set of m neither side has rejected *now*,
{m : W_up_t(m) < 2/alpha and W_lo_t(m) < 2/alpha}, covers the mean with probability >= 1 - alpha
simultaneously for every t: the bound can be read after every shadow answer and acted on, with no
multiple-looks correction. (We read the current wealth, not its running maximum: the running intersection is
tighter but can become empty once the stream drifts; the controller restarts the sequence at every policy
change anyway.)

A sequence covers the mean of everything since it started. Months of in-domain traffic then dilute a drift
that began yesterday: measured in bench_drift.py, a phase at 5% disagreement after 6,000 quiet texts moved the
version's lower end from 0 to only 0.7% in 2,000 texts. `RecentSequence` therefore also keeps a sequence over
the latest epoch of `window` observations (restarted when an epoch is full), the drift detector the controller
reads alongside the version's sequence.

Observations: disagreement in {0, 1} (low 0, high 1), accuracy loss in {-1, 0, 1} (low -1, high 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dimec.errors import ConfigError
from dimec.routing.targets import betting_moments, kelly_bet


def mean_grid(low: float, high: float) -> np.ndarray:
    """Candidate means: 0.01-point steps within 5 points of 0 (where promises live), coarser elsewhere."""
    fine = np.linspace(max(low, -0.05), min(high, 0.05), int(round((min(high, 0.05) - max(low, -0.05)) / 1e-4)) + 1)
    coarse = np.linspace(low, high, int(round((high - low) / 0.005)) + 1)
    return np.unique(np.concatenate([fine, coarse]).round(6))


@dataclass
class Interval:
    estimate: float | None  # the running mean (None before any observation)
    low: float
    high: float
    n: int


class ConfidenceSequence:
    """Running betting confidence sequence for the mean of observations in [low, high]."""

    def __init__(self, low: float = 0.0, high: float = 1.0, alpha: float = 0.05) -> None:
        if not 0 < alpha < 1:
            raise ConfigError(f"the confidence sequence's alpha must be in (0, 1), got {alpha}")
        if not low < high:
            raise ConfigError(f"the observations' range must have low < high, got [{low}, {high}]")
        self.low, self.high, self.alpha = low, high, alpha
        self.grid = mean_grid(low, high)  # (G,)
        self.threshold = math.log(2 / alpha)
        with np.errstate(divide="ignore"):
            self.cap_up = np.minimum(0.5 / (high - self.grid), 1e6)  # factor 1 + lam (m - x) >= 0.5
            self.cap_lo = np.minimum(0.5 / (self.grid - low), 1e6)  # factor 1 + lam (x - m) >= 0.5
        self.log_up = np.zeros(len(self.grid))
        self.log_lo = np.zeros(len(self.grid))
        self.n, self.total, self.total_sq = 0, 0.0, 0.0

    def update(self, x: float) -> None:
        x = float(x)
        if not self.low - 1e-9 <= x <= self.high + 1e-9:
            raise ValueError(f"observation {x} outside [{self.low}, {self.high}]")
        mu, var = betting_moments(self.total, self.total_sq, self.n + 1)
        self.log_up += np.log1p(kelly_bet(self.grid - mu, var, self.cap_up) * (self.grid - x))
        self.log_lo += np.log1p(kelly_bet(mu - self.grid, var, self.cap_lo) * (x - self.grid))
        self.n += 1
        self.total += x
        self.total_sq += x * x

    def extend(self, xs) -> None:
        for x in xs:
            self.update(x)

    def interval(self) -> Interval:
        """The set of means neither side rejects now, as [low, high] on the grid (the whole range before any
        observation)."""
        kept = np.flatnonzero((self.log_up < self.threshold) & (self.log_lo < self.threshold))
        estimate = self.total / self.n if self.n else None
        if not len(kept):  # every grid point rejected (only under extreme drift): the running mean alone
            m = estimate if estimate is not None else self.low
            return Interval(estimate, m, m, self.n)
        return Interval(estimate, float(self.grid[kept[0]]), float(self.grid[kept[-1]]), self.n)


RECENT_WINDOW = 200  # observations per epoch of the recent sequence (LiveSettings.window)


class RecentSequence:
    """The confidence sequence of the current epoch: restarted every `window` observations, so that its interval
    follows a mean that moves. Each epoch's sequence covers that epoch's mean with probability >= 1 - alpha at
    every time within it; over many epochs the chance that some epoch's lower end passes a level its mean is
    below is up to alpha per epoch, not alpha in all (the price of following drift). Acting on it is therefore
    kept to the safe direction (a step safer, which costs money, never the promise): docs/live-control.md."""

    def __init__(self, low: float = 0.0, high: float = 1.0, alpha: float = 0.05, window: int = RECENT_WINDOW) -> None:
        if window < 1:
            raise ConfigError(f"the recent window must be >= 1 observation, got {window}")
        self.low, self.high, self.alpha, self.window = low, high, alpha, window
        self.epoch = 1
        self.current = ConfidenceSequence(low, high, alpha)

    def update(self, x: float) -> None:
        if self.current.n >= self.window:  # this epoch is full: the next observation starts a new one
            self.epoch += 1
            self.current = ConfidenceSequence(self.low, self.high, self.alpha)
        self.current.update(x)

    def interval(self) -> Interval:
        return self.current.interval()
