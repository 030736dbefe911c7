"""The phone client's fleet settings (docs/fleet.md), declared like config.py's: type, default, help and check
in one place, with config.py's machinery. `dimec client` and `dimec serve-all` take their options' defaults
and help from here, check them through config.py's one check path (`section_problems`), and `dimec settings
client` lists them. (Only this group is declared so far: the servers' limits, links and the other client
options are still argparse options; see docs/fleet.md.)
"""

from __future__ import annotations

from dataclasses import dataclass, fields

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

SECTION = "client"


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


def default(name: str):
    return next(f.default for f in fields(FleetClientSettings) if f.name == name)


def help_of(name: str) -> str:
    return next(f.metadata["help"] for f in fields(FleetClientSettings) if f.name == name)


def describe() -> list[dict]:
    """`dimec settings client`: this group's rows, in config.describe_settings' shape."""
    from dimec.config import describe_section

    return describe_section(SECTION, FleetClientSettings)
