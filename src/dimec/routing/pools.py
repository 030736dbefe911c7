"""Algorithm 1 of the paper: sort validation samples into easy / medium / hard pools by their data-map
coordinates at the mobile exit, with thresholds (alpha, beta) chosen to maximise the expected reward.

Reward of a sample on a tier (Eq. 5/6): the tier exit's max-probability minus the tier's cost
(processing + offloading + cloud fee, see `dimec.costs`).

The paper's text and its Algorithm 1 disagree on the medium pool. We follow the text (and the reward):
    easy   = confidence >= alpha and variability <= beta   -> mobile
    medium = confidence >= alpha and variability >  beta   -> edge
    hard   = confidence <  alpha                           -> cloud
`medium_rule="algorithm1"` gives the listing's version instead:
    easy   = confidence >= alpha
    medium = confidence <  alpha and variability >  beta
    hard   = confidence <  alpha and variability <= beta
See docs/method.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Self

import numpy as np

from dimec.config import MEDIUM_RULES, CalibrationConfig
from dimec.costs import CostModel
from dimec.errors import ConfigError
from dimec.outputs import ExitOutputs
from dimec.routing.base import Router, TrainingSignal
from dimec.runtime.prerouters import nearest_centroid  # noqa: F401  (re-exported)
from dimec.tiers import EASY, HARD, MEDIUM
from dimec.training.cartography import Cartography


def assign_pools(
    confidence: np.ndarray, variability: np.ndarray, alpha: float, beta: float, medium_rule: str = "text"
) -> np.ndarray:
    """(N,), (N,) -> (N,) pool index in {EASY, MEDIUM, HARD}."""
    confident = confidence >= alpha
    variable = variability > beta
    if medium_rule == "text":
        return np.where(confident, np.where(variable, MEDIUM, EASY), HARD)
    if medium_rule == "algorithm1":
        return np.where(confident, EASY, np.where(variable, MEDIUM, HARD))
    raise ConfigError(f"calibration.medium_rule must be one of {MEDIUM_RULES}, got {medium_rule!r}")


def expected_reward(pools: np.ndarray, max_probs: np.ndarray, cost_model: CostModel) -> float:
    """Mean over samples of (max-probability at the pool's tier exit - that tier's cost).

    pools: (N,) tier per sample; max_probs: (N, 3) max softmax probability at exits m, n, l.
    """
    rewards = max_probs[np.arange(len(pools)), pools] - cost_model.tier_costs[pools]
    return float(rewards.mean())


@dataclass
class ThresholdSearch:
    alpha: float
    beta: float
    reward: float
    grid: np.ndarray  # (len(alpha_grid), len(beta_grid)) expected reward of every pair


def search_thresholds(
    confidence: np.ndarray,
    variability: np.ndarray,
    max_probs: np.ndarray,
    cost_model: CostModel,
    alpha_grid: tuple[float, ...],
    beta_grid: tuple[float, ...],
    medium_rule: str = "text",
) -> ThresholdSearch:
    """Grid search for the (alpha, beta) maximising expected reward on validation. Ties go to the first
    pair in grid order (smallest alpha, then smallest beta), so the result is deterministic."""
    if not alpha_grid or not beta_grid:
        raise ConfigError("calibration.alpha_grid and calibration.beta_grid must not be empty")
    grid = np.array(
        [[expected_reward(assign_pools(confidence, variability, a, b, medium_rule), max_probs, cost_model)
          for b in beta_grid] for a in alpha_grid]
    )
    i, j = np.unravel_index(np.argmax(grid), grid.shape)
    return ThresholdSearch(alpha=float(alpha_grid[i]), beta=float(beta_grid[j]), reward=float(grid[i, j]), grid=grid)


_DEFAULT = CalibrationConfig()


def pool_params_of(calibration: CalibrationConfig) -> dict:
    """The settings every pool router takes from a run's calibration section."""
    return {"alpha_grid": tuple(calibration.alpha_grid), "beta_grid": tuple(calibration.beta_grid),
            "medium_rule": calibration.medium_rule, "cartography_exit": calibration.cartography_exit}


class PoolRouter(Router):
    """Shared calibration: thresholds by reward search, pools of validation embeddings, their centroids."""

    def __init__(
        self,
        alpha_grid: tuple[float, ...] = _DEFAULT.alpha_grid,
        beta_grid: tuple[float, ...] = _DEFAULT.beta_grid,
        medium_rule: str = _DEFAULT.medium_rule,
        cartography_exit: str = _DEFAULT.cartography_exit,
    ) -> None:
        self.alpha_grid = tuple(alpha_grid)
        self.beta_grid = tuple(beta_grid)
        self.medium_rule = medium_rule
        self.cartography_exit = cartography_exit

    @classmethod
    def from_config(cls, calibration: CalibrationConfig, seed: int | None = None, **params) -> Self:
        return cls(**(pool_params_of(calibration) | params))

    def fit(self, val: ExitOutputs, cost_model: CostModel, cartography: Cartography | None = None,
            train: TrainingSignal | None = None) -> Self:
        if cartography is None:
            raise ConfigError(f"router {self.name!r} needs the validation cartography to fit")
        val = cartography.rows_of(val)  # the pools are the validation rows' (calibration rows may extend them)
        confidence, variability = cartography.exit(self.cartography_exit)
        search = search_thresholds(
            confidence, variability, val.max_probs, cost_model, self.alpha_grid, self.beta_grid, self.medium_rule
        )
        self.alpha_, self.beta_, self.expected_reward_ = search.alpha, search.beta, search.reward
        self.reward_grid_ = search.grid
        self.pools_ = assign_pools(confidence, variability, self.alpha_, self.beta_, self.medium_rule)  # (N,)
        self.pool_embeddings_ = val.embeddings.astype(np.float64)  # (N, H)
        self.counts_ = np.bincount(self.pools_, minlength=3).astype(np.int64)  # (3,)
        hidden = val.embeddings.shape[1]
        self.centroids_ = np.full((3, hidden), np.nan)  # an empty pool keeps NaN and is never chosen
        for k in range(3):
            if self.counts_[k]:
                self.centroids_[k] = self.pool_embeddings_[self.pools_ == k].mean(0)
        return self

    @property
    def pool_shares_(self) -> np.ndarray:
        return self.counts_ / max(1, self.counts_.sum())
