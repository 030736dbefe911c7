"""One abstract Router and a registry of named routers (as in RouteLLM).

Every method (DIMEC-DC and each baseline) sees the same cached exit outputs and the same cost model,
and goes through the same evaluation loop (`dimec.evaluation`). Each exit's predictions are computed
once per split; routers only decide which exit answers and what that costs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self

import numpy as np

from dimec.costs import CostModel
from dimec.errors import ArtifactError, ConfigError, NotFittedError
from dimec.outputs import ExitOutputs

if TYPE_CHECKING:
    from dimec.training.cartography import Cartography


@dataclass
class Decisions:
    """A router's answer for N samples."""

    exit_index: np.ndarray  # (N,) which exit's prediction is the answer: 0=m, 1=n, 2=l
    tier: np.ndarray  # (N,) which device answered: 0 mobile, 1 edge, 2 cloud
    cost: np.ndarray  # (N,) cost in reward units

    @classmethod
    def from_tiers(cls, tiers: np.ndarray, cost_model: CostModel) -> Decisions:
        """The common case: a sample answered on a tier uses that tier's exit and pays its cost."""
        tiers = np.asarray(tiers, dtype=np.int64)
        return cls(exit_index=tiers, tier=tiers, cost=cost_model.tier_costs[tiers])


@dataclass
class TrainingSignal:
    """What a learned pre-router may learn from: routing features of (a sample of) the training split and
    that split's cartography. Validation stays for calibration only."""

    embeddings: np.ndarray  # (M, H) embedding-layer output pooled over real tokens
    lengths: np.ndarray  # (M,) real tokens per sample
    cartography: Cartography  # (M, 3) per-exit confidence, variability and correctness over epochs


class Router(ABC):
    """`__init__` only stores parameters; `fit` learns state ending in `_`; `route` decides."""

    name: ClassVar[str]
    online: ClassVar[bool] = False  # online routers see the test stream once, in order, with a seed

    def fit(
        self, val: ExitOutputs, cost_model: CostModel, cartography: Cartography | None = None,
        train: TrainingSignal | None = None,
    ) -> Self:
        """Learn from validation outputs (and its cartography; a pre-router also from `train`). Routers
        with nothing to learn keep this default."""
        self.fitted_ = True
        return self

    @abstractmethod
    def route(self, outputs: ExitOutputs, cost_model: CostModel) -> Decisions:
        """Decide, for each sample in order, which exit answers and at what cost."""

    @classmethod
    def from_config(cls, calibration: Any, seed: int | None = None) -> Self:
        """The router with the run's calibration settings (`CalibrationConfig`) where it has any, and a
        seed where it takes one. Routers override this; the default takes no parameters."""
        return cls()

    def get_params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.endswith("_")}

    def check_fitted(self) -> None:
        if not any(k.endswith("_") for k in vars(self)):
            raise NotFittedError(f"router {self.name!r} is used before fit", "call fit(...) first")

    # ---- persistence: parameters and fitted state as JSON -------------------------------------------
    def state(self) -> dict[str, Any]:
        """The fitted state as JSON values (what `load_state` restores). Stateless routers: {}."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        self.fitted_ = True


ROUTERS: dict[str, type[Router]] = {}


def register(name: str):
    """Class decorator: `@register("dimec-fixed")` makes the router available by name."""

    def wrap(cls: type[Router]) -> type[Router]:
        cls.name = name
        ROUTERS[name] = cls
        return cls

    return wrap


def make_router(name: str, **params: Any) -> Router:
    import dimec.routing  # noqa: F401  (registers the built-in routers)

    if name not in ROUTERS:
        raise ConfigError(f"unknown router {name!r}", f"known routers: {', '.join(sorted(ROUTERS))}")
    return ROUTERS[name](**params)




def save_router(router: Router, path: str | Path, cost_model: CostModel, **extra: Any) -> None:
    """router.json: the router's name, parameters and fitted state, and the cost model it was fitted under."""
    from dimec.atomic import write_json

    router.check_fitted()
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in router.get_params().items()}
    from dimec.runtime.policy import ROUTER_FORMAT

    write_json(path, {"format_version": ROUTER_FORMAT, "router": router.name, "params": params,
                      "state": router.state(), "cost_model": cost_model.to_dict(), **extra})


def load_router(path: str | Path) -> tuple[Router, dict[str, Any]]:
    """(router, the whole file) from router.json; an older or damaged file is one clear error."""
    import dimec.routing  # noqa: F401  (registers the built-in routers)
    from dimec.runtime.policy import read_router_file

    raw = read_router_file(path)
    try:
        router = make_router(raw["router"], **raw["params"])
        router.load_state(raw["state"])
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise ArtifactError(f"{path} is damaged ({type(exc).__name__}: {exc})",
                            "run `dimec calibrate RUN_DIR` again") from None
    return router, raw

