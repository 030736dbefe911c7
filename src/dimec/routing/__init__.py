"""Routers: DIMEC-DC, every baseline and our policies behind one interface (`Router`) and one registry.

Importing this package registers them all: dimec-fixed, dimec-dynamic (dimec.py); cloud-only, edge-only,
mobile-only, random, oracle, deebert, adaee, isplitee, knn (baselines.py); cascade, edge-cascade,
cloud-early-exit (cascade.py); hybrid-centroid, hybrid-learned (hybrid.py); auto (auto.py).
"""

from dimec.routing import auto as _auto  # noqa: F401
from dimec.routing import baselines as _baselines  # noqa: F401
from dimec.routing import cascade as _cascade  # noqa: F401
from dimec.routing import dimec as _dimec  # noqa: F401
from dimec.routing import hybrid as _hybrid  # noqa: F401
from dimec.routing.base import ROUTERS, Decisions, Router, make_router, register

__all__ = ["ROUTERS", "Decisions", "Router", "make_router", "register"]
