"""The one tier vocabulary: three devices, their exits, and the DIMEC-DC pools that route to them.

Index k is the same thing everywhere: tier k (mobile, edge, cloud), the exit after layer m, n or l that
answers on it, and the cartography pool (easy, medium, hard) routed to it.
"""

from __future__ import annotations

from dimec.errors import ConfigError

TIERS: tuple[str, str, str] = ("mobile", "edge", "cloud")
MOBILE, EDGE, CLOUD = 0, 1, 2
POOLS: tuple[str, str, str] = ("easy", "medium", "hard")  # pool k goes to tier k
EASY, MEDIUM, HARD = MOBILE, EDGE, CLOUD


def tier_index(name: str) -> int:
    """"edge" -> 1; an unknown name is a ConfigError listing the tiers."""
    if name not in TIERS:
        raise ConfigError(f"unknown tier {name!r}", f"use one of {', '.join(TIERS)}")
    return TIERS.index(name)
