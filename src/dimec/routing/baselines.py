"""Baselines for Table I, each behind the same Router interface as DIMEC-DC.

Every method reads exit outputs only through `ExitOutputs` and prices its path only through `CostModel`,
so all of them are compared on the same cached predictions and the same costs. How each method was
adapted to the three tiers, and its cost formula, is in docs/baselines.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Self

import numpy as np

from dimec.costs import CostModel
from dimec.errors import ConfigError
from dimec.outputs import ExitOutputs
from dimec.routing.base import Decisions, Router, TrainingSignal, register
from dimec.routing.plan import Plan, PlanRouter, Stage
from dimec.routing.pools import PoolRouter
from dimec.tiers import CLOUD, EDGE, MOBILE

if TYPE_CHECKING:
    from dimec.training.cartography import Cartography

DEFAULT_ARMS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)


# ---- fixed tiers -----------------------------------------------------------------------------------------
class _ConstantTier(PlanRouter):
    """Every sample answered on one tier at its exit: one plan of one stage, nothing to learn."""

    tier: int
    confidence_ = "max_prob"
    prerouter_ = None

    @property
    def plans_(self) -> list[Plan]:
        return [(Stage(self.tier, self.tier),)]

    def check_fitted(self) -> None:
        """Nothing to learn: always ready."""

    def load_state(self, state: dict) -> None:
        """Nothing to restore."""

    def route(self, outputs: ExitOutputs, cost_model: CostModel) -> Decisions:
        return Decisions.from_tiers(np.full(len(outputs), self.tier), cost_model)


@register("cloud-only")
class CloudOnlyRouter(_ConstantTier):
    """The paper's "BERT" row: every sample through all l layers on the cloud."""

    tier = CLOUD


@register("edge-only")
class EdgeOnlyRouter(_ConstantTier):
    tier = EDGE


@register("mobile-only")
class MobileOnlyRouter(_ConstantTier):
    tier = MOBILE


@register("random")
class RandomRouter(Router):
    """Each sample to a tier drawn independently with probabilities `probs` (mobile, edge, cloud)."""

    def __init__(self, probs: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3), seed: int = 0) -> None:
        self.probs = tuple(probs)
        self.seed = seed

    @classmethod
    def from_config(cls, calibration, seed: int | None = None) -> RandomRouter:
        return cls(seed=0 if seed is None else seed)

    def fit(self, val: ExitOutputs, cost_model: CostModel, cartography: Cartography | None = None,
            train: TrainingSignal | None = None) -> Self:
        p = np.asarray(self.probs, dtype=np.float64)
        if p.shape != (3,) or (p < 0).any() or not np.isclose(p.sum(), 1.0):
            raise ConfigError(f"random router probs must be 3 non-negative shares summing to 1, got {self.probs}")
        self.shares_ = p
        return self

    def route(self, outputs: ExitOutputs, cost_model: CostModel) -> Decisions:
        self.check_fitted()
        rng = np.random.default_rng(self.seed)
        return Decisions.from_tiers(rng.choice(3, size=len(outputs), p=self.shares_), cost_model)


@register("oracle")
class OracleRouter(Router):
    """Uses the labels: each sample to the cheapest tier whose exit is right; cloud when none is.
    Its accuracy (some exit right) is the best any router can reach; at that accuracy no router pays less."""

    def route(self, outputs: ExitOutputs, cost_model: CostModel) -> Decisions:
        order = np.argsort(cost_model.tier_costs, kind="stable")  # (3,) tiers, cheapest first
        correct = outputs.correct[:, order]  # (N, 3) in cost order
        first = correct.argmax(1)  # first correct in cost order (0 when none: fixed below)
        tiers = np.where(correct.any(1), order[first], CLOUD)
        return Decisions.from_tiers(tiers, cost_model)


# ---- early exit on the cloud: DeeBERT ------------------------------------------------------------------
def entropy(probs: np.ndarray) -> np.ndarray:
    """(..., C) -> (...) Shannon entropy in nats."""
    p = np.clip(probs, 1e-12, 1.0)
    return -(probs * np.log(p)).sum(-1)


def deebert_decisions(outputs: ExitOutputs, cost_model: CostModel, threshold: float) -> Decisions:
    """Whole model on the cloud; exit at the first of m, n, l whose entropy < threshold (else l)."""
    below = entropy(outputs.probs) < threshold  # (N, 3)
    below[:, CLOUD] = True  # the last exit always answers
    exit_index = below.argmax(1)  # (N,) first exit under the threshold
    layers = np.asarray(cost_model.exit_layers)[exit_index]
    cost = np.asarray(cost_model.cloud(layers), dtype=np.float64)  # o_c + fee * layers / l
    return Decisions(exit_index=exit_index, tier=np.full(len(outputs), CLOUD), cost=cost)


def entropy_grid(outputs: ExitOutputs, size: int = 51) -> np.ndarray:
    """Candidate entropy thresholds: quantiles of the early exits' entropies, plus 0 (never exit early)
    and just above the largest (always exit at m). Ascending."""
    h = entropy(outputs.probs[:, :2]).ravel()
    q = np.quantile(h, np.linspace(0, 1, size)) if len(h) else np.zeros(0)
    return np.unique(np.concatenate([[0.0], q, [h.max() + 1e-9 if len(h) else 1.0]]))


@register("deebert")
class DeeBertRouter(Router):
    """DeeBERT (Xin et al., 2020): entropy-threshold early exit, the whole model deployed on the cloud.
    With `threshold=None`, fit picks the grid threshold maximising accuracy - mean cost on validation."""

    def __init__(self, threshold: float | None = None, grid_size: int = 51) -> None:
        self.threshold = threshold
        self.grid_size = grid_size

    def fit(self, val: ExitOutputs, cost_model: CostModel, cartography: Cartography | None = None,
            train: TrainingSignal | None = None) -> Self:
        if self.threshold is not None:
            self.threshold_ = float(self.threshold)
            return self
        grid = entropy_grid(val, self.grid_size)
        rewards = []
        for t in grid:
            d = deebert_decisions(val, cost_model, t)
            rewards.append(val.correct[np.arange(len(val)), d.exit_index].mean() - d.cost.mean())
        self.grid_, self.grid_rewards_ = grid, np.asarray(rewards)
        self.threshold_ = float(grid[int(np.argmax(rewards))])  # ties: the smallest (safest) threshold
        return self

    def route(self, outputs: ExitOutputs, cost_model: CostModel) -> Decisions:
        if self.threshold is None:
            self.check_fitted()
        return deebert_decisions(outputs, cost_model, getattr(self, "threshold_", self.threshold))


# ---- split computing with a bandit: AdaEE and I-SplitEE -----------------------------------------------
def split_decisions(outputs: ExitOutputs, cost_model: CostModel, split_exit: int, threshold: float) -> Decisions:
    """The mobile runs layers 1..layer(split_exit) and answers there if that exit's max-prob >= threshold;
    otherwise the hidden state goes to the cloud, which continues from that layer to l.
    Cost: mobile(split) [+ hop(mobile, cloud) + cloud_fee * (l - split) / l when offloaded]."""
    split = cost_model.exit_layers[split_exit]
    l = cost_model.num_layers
    stay = outputs.max_probs[:, split_exit] >= threshold  # (N,)
    offload_cost = (cost_model.mobile(split) + cost_model.hop(MOBILE, CLOUD)
                    + cost_model.layer_rate(CLOUD) * (l - split))
    return Decisions(
        exit_index=np.where(stay, split_exit, CLOUD),
        tier=np.where(stay, MOBILE, CLOUD),
        cost=np.where(stay, cost_model.mobile(split), offload_cost).astype(np.float64),
    )


def unsupervised_reward(outputs: ExitOutputs, d: Decisions) -> np.ndarray:
    """(N,) confidence of the answering exit minus the cost paid: no labels needed, usable online."""
    return outputs.max_probs[np.arange(len(outputs)), d.exit_index] - d.cost


def ucb_choices(rewards: np.ndarray, exploration: float, rng: np.random.Generator) -> np.ndarray:
    """UCB1 over a stream. rewards: (N, A), what each arm would earn on each sample; only the chosen
    arm's entry is ever read (bandit feedback). Each arm is played once first (seeded order), then
    argmax of mean + exploration * sqrt(ln t / pulls); ties broken at random. Returns (N,) arms."""
    n, a = rewards.shape
    pulls, sums = np.zeros(a), np.zeros(a)
    first = rng.permutation(a)
    choices = np.empty(n, dtype=np.int64)
    for t in range(n):
        if t < a:
            arm = int(first[t])
        else:
            ucb = sums / pulls + exploration * np.sqrt(np.log(t) / pulls)
            best = np.flatnonzero(ucb >= ucb.max() - 1e-12)
            arm = int(best[0]) if len(best) == 1 else int(rng.choice(best))
        pulls[arm] += 1
        sums[arm] += rewards[t, arm]
        choices[t] = arm
    return choices


class _BanditRouter(Router):
    """One arm = one fixed split policy; UCB picks an arm per sample over the test stream, once, in order."""

    online = True

    @classmethod
    def from_config(cls, calibration, seed: int | None = None):
        return cls(seed=0 if seed is None else seed)

    def arm_decisions(self, outputs: ExitOutputs, cost_model: CostModel) -> list[Decisions]:
        raise NotImplementedError

    def play(self, outputs: ExitOutputs, cost_model: CostModel) -> tuple[np.ndarray, list[Decisions]]:
        """The arm UCB plays on each sample of the stream (N,), and every arm's decisions. Nothing learnt
        on one stream is kept: routing the same stream again plays the same arms."""
        per_arm = self.arm_decisions(outputs, cost_model)
        rewards = np.stack([unsupervised_reward(outputs, d) for d in per_arm], 1)  # (N, A)
        return ucb_choices(rewards, self.exploration, np.random.default_rng(self.seed)), per_arm

    def route(self, outputs: ExitOutputs, cost_model: CostModel) -> Decisions:
        arms, per_arm = self.play(outputs, cost_model)
        rows = np.arange(len(arms))

        def pick(field: str) -> np.ndarray:  # (N,) the chosen arm's value per sample
            return np.stack([getattr(d, field) for d in per_arm], 1)[rows, arms]

        return Decisions(exit_index=pick("exit_index"), tier=pick("tier"), cost=pick("cost"))


@register("adaee")
class AdaEERouter(_BanditRouter):
    """AdaEE (Pacheco et al., 2023): the mobile exit's confidence threshold is learnt online by UCB over
    `arms`; below it the sample is offloaded to the cloud, which continues from layer m to l."""

    def __init__(self, arms: tuple[float, ...] = DEFAULT_ARMS, exploration: float = 1.0, seed: int = 0) -> None:
        self.arms = tuple(arms)
        self.exploration = exploration
        self.seed = seed

    def arm_decisions(self, outputs: ExitOutputs, cost_model: CostModel) -> list[Decisions]:
        return [split_decisions(outputs, cost_model, MOBILE, t) for t in self.arms]


@register("isplitee")
class ISplitEERouter(_BanditRouter):
    """I-SplitEE (Bajpai et al., 2024): the split layer (an arm: exit m or n) is learnt online by UCB; the
    mobile runs up to the split, exits if confident, else offloads to the cloud for the remaining layers."""

    def __init__(self, threshold: float = 0.8, exploration: float = 1.0, seed: int = 0) -> None:
        self.threshold = threshold
        self.exploration = exploration
        self.seed = seed

    def arm_decisions(self, outputs: ExitOutputs, cost_model: CostModel) -> list[Decisions]:
        return [split_decisions(outputs, cost_model, k, self.threshold) for k in (MOBILE, EDGE)]


# ---- nearest neighbours over the DIMEC pools -------------------------------------------------------------
@register("knn")
class KnnRouter(PoolRouter):
    """DIMEC calibration (pools from cartography), then each test sample goes to the majority pool of
    its k nearest validation embeddings (Euclidean); a tie goes to the cheaper tier."""

    def __init__(self, k: int = 15, chunk: int = 1024, **pool_params) -> None:
        super().__init__(**pool_params)
        self.k = k
        self.chunk = chunk

    def predict_tiers(self, embeddings: np.ndarray, tier_costs: np.ndarray) -> np.ndarray:
        self.check_fitted()
        ref = self.pool_embeddings_  # (M, H)
        k = min(self.k, len(ref))
        ref_sq = (ref**2).sum(1)  # (M,)
        order = np.argsort(tier_costs, kind="stable")  # cheapest first: argmax then breaks ties to it
        x = np.asarray(embeddings, dtype=np.float64)
        tiers = np.empty(len(x), dtype=np.int64)
        for s in range(0, len(x), self.chunk):  # bounds the (chunk, M) distance matrix
            xb = x[s : s + self.chunk]
            d = (xb**2).sum(1)[:, None] - 2 * xb @ ref.T + ref_sq[None]  # (B, M) squared distances
            near = np.argpartition(d, k - 1, axis=1)[:, :k]  # (B, k)
            votes = np.stack([(self.pools_[near] == t).sum(1) for t in range(3)], 1)  # (B, 3)
            tiers[s : s + self.chunk] = order[votes[:, order].argmax(1)]
        return tiers

    def route(self, outputs: ExitOutputs, cost_model: CostModel) -> Decisions:
        return Decisions.from_tiers(self.predict_tiers(outputs.embeddings, cost_model.tier_costs), cost_model)
