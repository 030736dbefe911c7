"""One abstract Router and a registry of named routers (as in RouteLLM).

Every method (DIMEC-DC and each baseline) sees the same cached exit outputs and the same cost model,
and goes through the same evaluation loop (`dimec.evaluation`). Each exit's predictions are computed
once per split; routers only decide which exit answers and what that costs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Self

import numpy as np

from dimec.costs import CostModel
from dimec.errors import ConfigError, NotFittedError
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


class Router(ABC):
    """`__init__` only stores parameters; `fit` learns state ending in `_`; `route` decides."""

    name: ClassVar[str]
    online: ClassVar[bool] = False  # online routers see the test stream once, in order, with a seed

    def fit(
        self, val: ExitOutputs, cost_model: CostModel, cartography: Cartography | None = None
    ) -> Self:
        """Learn from validation outputs. Routers with nothing to learn keep this default."""
        self.fitted_ = True
        return self

    @abstractmethod
    def route(self, outputs: ExitOutputs, cost_model: CostModel) -> Decisions:
        """Decide, for each sample in order, which exit answers and at what cost."""

    def get_params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.endswith("_")}

    def check_fitted(self) -> None:
        if not any(k.endswith("_") for k in vars(self)):
            raise NotFittedError(f"router {self.name!r} is used before fit", "call fit(...) first")


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
