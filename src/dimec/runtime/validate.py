"""Checks of what crosses a tier's boundary, each a small function that says what is wrong (or None).

Request ids are inert: they are echoed in answers, written into the next hop's X-Request-ID header and shown
in logs, so they are held to a charset every one of those places carries unchanged: 1..128 visible ASCII
characters (0x21..0x7E, no space, no control character, nothing non-ASCII), unique within one call. A caller
that wants a richer id (a name with accents) sends it as its own field and maps it back itself.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

MAX_ID_CHARS = 128
ID_RULE = f"1..{MAX_ID_CHARS} visible ASCII characters (0x21..0x7E), unique within a call"


def id_problem(value: Any) -> str | None:
    """What is wrong with one request id, or None."""
    if not isinstance(value, str):
        return f"a request id must be a string, got {type(value).__name__}"
    if not 1 <= len(value) <= MAX_ID_CHARS:
        return f"request ids are 1..{MAX_ID_CHARS} characters, got {len(value)} (ids are {ID_RULE})"
    bad = next((c for c in value if not 0x21 <= ord(c) <= 0x7E), None)
    if bad is not None:
        return f"request id {value.encode('ascii', 'backslashreplace').decode()[:40]!r} holds U+{ord(bad):04X}: " \
               f"ids are {ID_RULE}"
    return None


def ids_problem(ids: Any, count: int | None = None) -> str | None:
    """What is wrong with a list of request ids (charset, length, one per row, unique), or None."""
    if not isinstance(ids, list):
        return "request ids must be a list of strings"
    if count is not None and len(ids) != count:
        return f"must be a list of {count} strings, one per row (got {len(ids)})"
    for i, x in enumerate(ids):
        problem = id_problem(x)
        if problem:
            return f"id {i}: {problem}"
    if len(set(ids)) != len(ids):
        dup = next(x for x in ids if ids.count(x) > 1)
        return f"request id {dup!r} is given twice: ids must be unique within a call"
    return None


def finite_number(value: Any) -> bool:
    """A JSON number (not a bool) that is finite as a float: 1e400 and 10**400 are not."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def natural(value: Any) -> bool:
    """A JSON integer >= 0 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


NON_FINITE = ("the model's output for this input is not finite (NaN or infinity): a non-finite result is never "
              "an answer")


def probs_problem(probs: Any, classes: int | None = None) -> str | None:
    """What is wrong with a (N, C) array of answer probabilities (NaN, outside [0, 1], rows not summing to
    ~1, wrong width), or None. Used on what a tier computes and on what a client receives."""
    try:
        p = np.asarray(probs, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        return "probabilities are not a numeric (N, C) array"
    if p.ndim != 2 or (classes is not None and p.shape[1] != classes):
        return f"probabilities have shape {p.shape}, not (N, {classes or 'C'})"
    if not np.isfinite(p).all():
        return NON_FINITE
    if (p < 0).any() or (p > 1 + 1e-6).any() or (len(p) and np.abs(p.sum(1) - 1).max() > 1e-3):
        return "probabilities must lie in [0, 1] and sum to 1 per row"
    return None


MAX_ADVICE_S = 3600.0  # an advice or a queue estimate is valid an hour at most (sources.MAX_SECONDS)


def answer_problem(payload: Any, ids: list[str]) -> str | None:
    """What is wrong with a tier's 200 answer to a request for `ids` (every field a client reads: ids, labels,
    probabilities, per-sample tiers/exits/layers/flags, timings and the advice), or None. An answer with a
    problem is treated like a failed exchange: the client falls back, it never raises or passes it on."""
    from dimec.tiers import TIERS

    if not isinstance(payload, dict):
        return "the answer is not a JSON object"
    n = len(ids)
    if payload.get("ids") != ids:
        return "the answer is for other request ids"
    names = payload.get("label_names")
    if not isinstance(names, list) or not names or not all(isinstance(x, str) for x in names):
        return "'label_names' is not a list of strings"
    probs = payload.get("probs")
    if not isinstance(probs, list) or len(probs) != n:
        return f"'probs' does not have {n} rows"
    problem = probs_problem(probs, len(names))
    if problem:
        return f"'probs': {problem}"
    if "tiers" in payload:  # the answer to a plan: per sample, where it was answered
        for key, ok in (("tiers", lambda t: isinstance(t, str) and t in TIERS),
                        ("exits", lambda e: natural(e) and e <= 2), ("exit_layers", lambda k: natural(k) and k < 10_000),
                        ("fallback", lambda f: isinstance(f, bool))):
            values = payload.get(key)
            if not isinstance(values, list) or len(values) != n or not all(ok(v) for v in values):
                return f"'{key}' is not {n} valid values"
    elif not (natural(payload.get("exit_layer")) and payload["exit_layer"] < 10_000):
        return "'exit_layer' is not a layer number"
    errors = payload.get("errors", [])
    if not isinstance(errors, list) or not all(isinstance(e, str) for e in errors):
        return "'errors' is not a list of strings"
    for key in ("queue_ms", "compute_ms", "forward_ms"):
        value = payload.get(key)
        if value is not None and not (finite_number(value) and value >= 0):
            return f"'{key}' is not a time in ms"
    return advice_problem(payload.get("advice"))


def advice_problem(advice: Any) -> str | None:
    """What is wrong with the edge's PA-MDI advice (None is no advice), or None."""
    if advice is None:
        return None
    if not isinstance(advice, dict):
        return "'advice' is not an object"
    keep, valid = advice.get("keep_fraction", 0.0), advice.get("valid_s", 0.0)
    if not (finite_number(keep) and 0 <= keep <= 1):
        return "advice 'keep_fraction' is not a share in [0, 1]"
    if not (finite_number(valid) and 0 <= valid <= MAX_ADVICE_S):
        return f"advice 'valid_s' is not a number of seconds in [0, {MAX_ADVICE_S:g}]"
    for key in ("expected_wait_ms", "capacity_texts_per_s"):
        value = advice.get(key)
        if value is not None and not (finite_number(value) and value >= 0):
            return f"advice '{key}' is not a number >= 0"
    return None
