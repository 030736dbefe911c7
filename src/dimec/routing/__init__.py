"""Routers: DIMEC-DC and every baseline behind one interface (`Router`) and one registry."""

from dimec.routing import dimec as _dimec  # noqa: F401  (registers dimec-fixed, dimec-dynamic)
from dimec.routing.base import ROUTERS, Decisions, Router, make_router, register

try:  # baselines live in their own module; registered when present
    from dimec.routing import baselines as _baselines  # noqa: F401
except ImportError:  # pragma: no cover
    pass

__all__ = ["ROUTERS", "Decisions", "Router", "make_router", "register"]
