"""The phone client's settings, declared like config.py's: type, default, help and check in one place, with
config.py's machinery. `client`: the fleet settings (docs/fleet.md); `client.mobile`: how the device runs
and routes. `dimec client` and `dimec serve-all` generate their options from these declarations, check them
through config.py's one check path (`section_problems`), and `dimec settings client` lists them (with the
timeouts, remote.py). serving/settings.py registers every serving section.
"""

from __future__ import annotations

from dataclasses import dataclass

from dimec.config import (
    above,
    at_least,
    between,
    each,
    one_of,
    optional,
    raise_problems,
    section_problems,
    setting,
)
from dimec.runtime.tier import BACKENDS
from dimec.serving.phone.client import ROUTINGS
from dimec.serving.phone.remote import MAX_RETRIES

SECTION = "client"
MOBILE_SECTION = "client.mobile"


@dataclass
class FleetClientSettings:
    private: bool = setting(False, "texts may not leave the device (except to the trusted tiers)")
    trusted: tuple[str, ...] = setting((), "tiers a private text (and its hidden state) may go to: edge, cloud",
                                       each(one_of("edge", "cloud"), min_items=0))
    max_latency_ms: float | None = setting(None, "deadline per call: the cheapest tier whose measured latency fits "
                                                 "(else the fastest, flagged); null: none", optional(above(0)))
    latency_profile: str | None = setting(None, "profile.json from `dimec profile`: first latency estimates")
    cloud_budget: float | None = setting(None, "money units the cloud may bill per budget window; null: no budget",
                                         optional(at_least(0)))
    budget_window: float = setting(3600.0, "seconds the cloud budget covers", above(0))
    cloud_price: float = setting(0.001, "money units per text on the cloud", at_least(0))
    min_mobile_confidence: float = setting(0.6, "the edge's advice never keeps a text on the device below this "
                                                "max-probability (the bound on what the advice may cost)",
                                           between(0, 1))
    honour_advice: bool = setting(True, "honour the edge's PA-MDI advice (`--ignore-advice` turns it off)")

    def check(self) -> FleetClientSettings:
        raise_problems(section_problems(self, f"{SECTION}."))
        return self

    def policy(self):
        """The client's FleetPolicy under these settings (checked first)."""
        from dimec.serving.phone.constraints import CloudBudget, Constraints, FleetPolicy, LatencyTracker

        self.check()
        budget = None if self.cloud_budget is None else CloudBudget(self.cloud_budget, self.budget_window,
                                                                    self.cloud_price)
        latency = LatencyTracker.from_profile(self.latency_profile) if self.latency_profile else None
        return FleetPolicy(Constraints(self.private, self.max_latency_ms), self.trusted, budget, latency,
                           self.min_mobile_confidence, self.honour_advice)


@dataclass
class MobileSettings:
    """How the device runs its tier and routes (`dimec client --backend/--routing/--retries`)."""

    backend: str = setting("onnx-int8", "how the mobile tier runs: onnx-int8 (the int8 ONNX graph), onnx (fp32; "
                                        "needs an export with --full) or torch", one_of(*BACKENDS))
    routing: str = setting("router", "router: the package's calibrated router.json (any servable policy; 'fixed' "
                                     "is its older name); dynamic: the same with moving pool means (DIMEC-DC "
                                     "Dynamic); or one tier for all", one_of(*ROUTINGS))
    retries: int = setting(2, "extra attempts per remote tier and exchange", between(0, MAX_RETRIES))

    def check(self) -> MobileSettings:
        raise_problems(section_problems(self, f"{MOBILE_SECTION}."))
        return self
