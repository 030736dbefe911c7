"""The explicit cost model shared by calibration, every router and every report.

All costs are in *reward units*: the same units as a probability, so that a reward is an exit's
max-probability minus the cost of getting it (paper, Eq. 5/6). See docs/cost-model.md.

Tiers (exit layers m < n <= l):
- mobile: runs layers 1..m on the phone                 cost = lambda_m * m
- edge:   the sample is offloaded, edge runs 1..n        cost = o_e + lambda_e * n
- cloud:  the sample is offloaded, cloud runs 1..l       cost = o_c + cloud_fee * (layers / l)

Model-distributed paths (a tier continues from another tier's hidden state) add hops: a hidden-state
transfer from tier a to tier b costs `hidden_state_factor * (raw(b) - raw(a))`, where raw() is the raw-text
offload price of a tier (0 for the mobile, o_e, o_c): the edge-to-cloud distance is what the cloud's offload
price adds to the edge's. docs/cost-model.md gives every path's formula.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dimec.config import CostConfig
from dimec.errors import ConfigError


@dataclass(frozen=True)
class CostModel:
    lambda_m: float  # per-layer processing cost on the mobile
    lambda_e: float  # per-layer processing cost on the edge
    o_e: float  # offloading a sample from mobile to edge
    o_c: float  # offloading a sample from mobile to cloud
    cloud_fee: float  # fee for one sample through all l layers on the cloud
    exit_layers: tuple[int, int, int]  # (m, n, l)
    hidden_state_factor: float = 1.25  # a hidden-state hop costs this many raw offloads over the same hop

    @property
    def num_layers(self) -> int:
        return self.exit_layers[2]

    # ---- elementary costs, for routers whose path is not one of the three tiers -------------------
    def mobile(self, layers: int | np.ndarray) -> float | np.ndarray:
        return self.lambda_m * layers

    def edge(self, layers: int | np.ndarray, offloaded: bool = True) -> float | np.ndarray:
        return (self.o_e if offloaded else 0.0) + self.lambda_e * layers

    def cloud(self, layers: int | np.ndarray | None = None) -> float | np.ndarray:
        layers = self.num_layers if layers is None else layers
        return self.o_c + self.cloud_fee * np.asarray(layers) / self.num_layers

    # ---- model-distributed paths: per-tier rates and hops -----------------------------------------
    def layer_rate(self, tier: int) -> float:
        """Cost of one transformer layer run on `tier` (the cloud bills its fee pro rata)."""
        return (self.lambda_m, self.lambda_e, self.cloud_fee / self.num_layers)[tier]

    def raw_offload(self, tier: int) -> float:
        """Cost of sending the raw input from the mobile to `tier` (nothing for the mobile itself)."""
        return (0.0, self.o_e, self.o_c)[tier]

    def hop(self, source: int, target: int) -> float:
        """Cost of moving a hidden state from tier `source` to tier `target` (farther up the hierarchy)."""
        return self.hidden_state_factor * max(0.0, self.raw_offload(target) - self.raw_offload(source))

    # ---- the three tiers ------------------------------------------------------------------------
    @property
    def tier_costs(self) -> np.ndarray:
        """(3,) cost of answering a sample on mobile, edge, cloud."""
        m, n, l = self.exit_layers
        return np.array([self.mobile(m), self.edge(n), self.cloud(l)], dtype=np.float64)

    @property
    def cloud_only(self) -> float:
        return float(self.tier_costs[2])

    def relative_change(self, mean_cost: float) -> float:
        """Cost change vs cloud-only inference, in percent (negative = cheaper)."""
        return 100.0 * (mean_cost - self.cloud_only) / self.cloud_only

    # ---- construction and persistence -----------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: CostConfig, exit_layers: tuple[int, int, int]) -> CostModel:
        m, n, l = exit_layers
        if cfg.profile:
            return cls.from_profile(cfg.profile, exit_layers, cfg.full_model_reward, cfg.hidden_state_offload)
        lam = cfg.lambda_ if cfg.lambda_ is not None else cfg.full_model_reward / l
        if lam <= 0:
            raise ConfigError(f"cost.lambda_ must be > 0, got {lam}")
        for name in ("mobile_layer", "edge_layer", "offload_edge", "offload_cloud", "hidden_state_offload"):
            if getattr(cfg, name) < 0:
                raise ConfigError(f"cost.{name} must be >= 0, got {getattr(cfg, name)}")
        fee = cfg.cloud_fee if cfg.cloud_fee is not None else float(l)
        return cls(
            lambda_m=cfg.mobile_layer * lam,
            lambda_e=cfg.edge_layer * lam,
            o_e=cfg.offload_edge * lam,
            o_c=cfg.offload_cloud * lam,
            cloud_fee=fee * lam,
            exit_layers=(m, n, l),
            hidden_state_factor=cfg.hidden_state_offload,
        )

    @classmethod
    def from_profile(
        cls, path: str | Path, exit_layers: tuple[int, int, int], full_model_reward: float = 0.1,
        hidden_state_offload: float = 1.25,
    ) -> CostModel:
        """A measured profile in milliseconds (from `dimec profile`), scaled by the same rule as lambda:
        running all l layers at the edge's per-layer time is worth `full_model_reward`. The profile's
        measured `hidden_state_factor` (hidden-state transfer time / raw offload time), when it has one,
        replaces the setting."""
        ms = read_profile(path)
        l = exit_layers[2]
        scale = full_model_reward / (l * ms["lambda_e_ms"])  # reward units per millisecond
        return cls(
            lambda_m=ms["lambda_m_ms"] * scale,
            lambda_e=ms["lambda_e_ms"] * scale,
            o_e=ms["o_e_ms"] * scale,
            o_c=ms["o_c_ms"] * scale,
            cloud_fee=ms["cloud_layer_ms"] * l * scale,
            exit_layers=tuple(exit_layers),
            hidden_state_factor=ms.get("hidden_state_factor", hidden_state_offload),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> CostModel:
        return cls(**{**raw, "exit_layers": tuple(raw["exit_layers"])})


PROFILE_TIMES = ("lambda_m_ms", "lambda_e_ms", "o_e_ms", "o_c_ms", "cloud_layer_ms")


def read_profile(path: str | Path, what: str = "cost profile") -> dict[str, float]:
    """The one reader of profile.json (`dimec profile`): the five times in milliseconds and, when measured,
    `hidden_state_factor`; a missing, damaged or impossible file is one clear error (naming it `what`: the
    cost model's "cost profile", the planner's and the client's "latency profile")."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}", "run `dimec profile RUN_DIR` first")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
        ms = {k: float(raw[k]) for k in PROFILE_TIMES}
        if "hidden_state_factor" in raw:
            ms["hidden_state_factor"] = float(raw["hidden_state_factor"])
    except KeyError as exc:
        raise ConfigError(f"{what} {path} lacks {exc.args[0]}", "run `dimec profile RUN_DIR` again") from None
    except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError, RecursionError, OverflowError) as exc:
        raise ConfigError(f"{what} {path} is damaged ({type(exc).__name__}: {str(exc)[:200]})",
                          "run `dimec profile RUN_DIR` again") from None
    if not all(math.isfinite(v) and v >= 0 for v in ms.values()) or ms["lambda_e_ms"] <= 0:
        raise ConfigError(f"{what} {path} holds negative or zero times: {ms}", "run `dimec profile` again")
    return ms
