"""Who may call a tier, and how much they matter: the server's table of sources and priority classes.

`dimec serve edge RUN --sources fleet.yaml` reads a file like this (YAML or JSON; docs/fleet.md):

    classes:                      # highest priority first; weights are the shares of weighted fair queuing
      - {name: high, weight: 6}
      - {name: medium, weight: 3}
      - {name: low, weight: 1, max_queue: 8}
    sources:                      # each bearer token is one source in one class
      - {name: ambulance-1, token_env: AMBULANCE_1_TOKEN, priority: high}
      - {name: phone-17, token_sha256: 9f86d0..., priority: low}
    scheduling: {policy: strict, queue_capacity: 32, workers: 1, retry_after_s: 1.0}
    allocation: {enabled: true, target_utilization: 0.9, horizon_s: 5.0}

A request's source, and so its class, comes only from its token: nothing in the body can raise it. Without
a file the tier runs in single-token mode: one token (--token / DIMEC_TOKEN), one source "default" in one
class "default", and no queue in front of the model (exactly the behaviour before sources existed).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dimec.config import (
    between,
    build_config,
    one_of,
    read_config_file,
    section_from_raw,
    section_problems,
    setting,
)
from dimec.errors import ConfigError

POLICIES = ("strict", "wfq", "fifo")
DEFAULT = "default"
MAX_QUEUE_CAPACITY = 10_000  # requests waiting at one tier; each holds its body (server.Limits bounds those)
MAX_WORKERS = 64
MAX_SECONDS = 3600.0  # retry_after_s, horizon_s, valid_s: an hour at most (a client must come back, advice expire)


@dataclass(frozen=True)
class ClassConfig:
    name: str
    weight: float = 1.0  # share of the edge under weighted fair queuing
    max_queue: int | None = None  # waiting requests of this class at most (None: the whole queue)


@dataclass(frozen=True)
class SourceConfig:
    name: str
    priority: str  # a class name
    token: str | None = None  # the bearer token itself, or
    token_env: str | None = None  # the environment variable that holds it, or
    token_sha256: str | None = None  # its sha256 in hex (the file then holds no secret)


@dataclass(frozen=True)
class SchedulingConfig:
    """The sources file's `scheduling:` (section sources.scheduling of `dimec settings`)."""

    policy: str = setting("strict", "'strict' priority, 'wfq' (self-clocked weighted fair queuing) or 'fifo' (one "
                                    "queue)", one_of(*POLICIES))
    queue_capacity: int = setting(32, "requests waiting for the model, all classes together",
                                  between(1, MAX_QUEUE_CAPACITY))
    workers: int = setting(1, "requests the model runs at once (threads); 1 suits a CPU with intra-op threads",
                           between(1, MAX_WORKERS))
    reserved_workers: int = setting(0, "of the workers, how many only the highest class may use (strict and wfq)",
                                    between(0, MAX_WORKERS - 1))
    retry_after_s: float = setting(1.0, "the Retry-After of a 429, seconds", between(1e-3, MAX_SECONDS))

    def cross_checks(self) -> list[str]:
        if self.reserved_workers >= max(1, self.workers):
            return [f"scheduling.reserved_workers must be in 0..workers-1, got {self.reserved_workers}"]
        return []


@dataclass(frozen=True)
class AllocationConfig:
    """PA-MDI's allocation (docs/fleet.md): the edge's capacity goes to the classes in priority order, and
    a class that does not fit is told which share of its edge-bound work to keep on the device. The sources
    file's `allocation:` (section sources.allocation of `dimec settings`)."""

    enabled: bool = setting(True, "send PA-MDI allocation advice to the sources")
    target_utilization: float = setting(0.9, "plan for this share of the measured capacity",
                                        between(0, 1, low_open=True))
    horizon_s: float = setting(5.0, "time constant of the rate estimates (exponential decay), seconds",
                               between(1e-3, MAX_SECONDS))
    smoothing: float = setting(0.3, "each update moves the advice this far towards its new target",
                               between(0, 1, low_open=True))
    valid_s: float = setting(2.0, "a client applies an advice for this long after it got it, seconds",
                             between(1e-3, MAX_SECONDS))


@dataclass(frozen=True)
class FleetConfig:
    classes: tuple[ClassConfig, ...] = (ClassConfig(DEFAULT),)
    sources: tuple[SourceConfig, ...] = ()
    scheduling: SchedulingConfig = field(default_factory=SchedulingConfig)
    allocation: AllocationConfig = field(default_factory=AllocationConfig)


@dataclass(frozen=True)
class Source:
    """Who sent a request: its name, its class and the class's rank (0 = the highest priority)."""

    name: str
    priority: str
    rank: int


class SourceTable:
    """Bearer token -> Source. Tokens are kept as sha256 digests and compared in constant time against
    every entry, so neither the file nor the timing tells a caller how close a guess was."""

    def __init__(self, config: FleetConfig, digests: dict[bytes, Source], scheduled: bool) -> None:
        self.config = config
        self._digests = digests
        self.scheduled = scheduled  # False: single-token mode, no queue
        self.classes = {c.name: c for c in config.classes}
        self.ranks = {c.name: i for i, c in enumerate(config.classes)}
        self.sources = sorted({s for s in digests.values()}, key=lambda s: (s.rank, s.name))

    @classmethod
    def single(cls, token: str | None) -> SourceTable:
        if not token:
            raise ConfigError("a bearer token is required between tiers",
                              "pass --token T or set DIMEC_TOKEN (the same on every tier), or --sources FILE")
        return cls(FleetConfig(), {_digest(token): Source(DEFAULT, DEFAULT, 0)}, scheduled=False)

    @classmethod
    def from_config(cls, config: FleetConfig, where: str = "sources") -> SourceTable:
        check_fleet_config(config, where)
        ranks = {c.name: i for i, c in enumerate(config.classes)}
        digests: dict[bytes, Source] = {}
        for s in config.sources:
            digest = _source_digest(s, where)
            if digest in digests:
                raise ConfigError(f"{where}: sources {digests[digest].name!r} and {s.name!r} share a token",
                                  "give every source its own token: the token is what identifies it")
            digests[digest] = Source(s.name, s.priority, ranks[s.priority])
        return cls(config, digests, scheduled=True)

    @classmethod
    def load(cls, path: str | Path) -> SourceTable:
        """The table of a sources file: its shape checked first (SCHEMA), then its meaning; every problem of
        the file is reported at once, as one ConfigError (exit 2 on the command line)."""
        try:
            raw = read_config_file(path)
        except ValueError as exc:  # a number of 5000 digits in a JSON file
            raise ConfigError(f"cannot parse {path}: {str(exc)[:200]}") from None
        problems = sources_file_problems(raw)
        if not problems:
            config = build_config(FleetConfig, raw, "")
            problems = fleet_problems(config)
        if problems:
            raise ConfigError(f"{path}: " + "; ".join(problems[:50]), "see docs/fleet.md for the sources file")
        return cls.from_config(config, str(path))

    def lookup(self, token: str) -> Source | None:
        given = _digest(token)
        found = None
        for digest, source in self._digests.items():  # no early exit: the same work for every token
            if hmac.compare_digest(given, digest):
                found = source
        return found


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _source_digest(s: SourceConfig, where: str) -> bytes:
    given = [k for k in ("token", "token_env", "token_sha256") if getattr(s, k)]
    if len(given) != 1:
        raise ConfigError(f"{where}: source {s.name!r} needs exactly one of token, token_env, token_sha256",
                          "token_env (an environment variable) keeps the secret out of the file")
    if s.token_env:
        value = os.environ.get(s.token_env)
        if not value:
            raise ConfigError(f"{where}: source {s.name!r}: environment variable {s.token_env} is not set")
        return _digest(value)
    if s.token_sha256:
        try:
            digest = bytes.fromhex(s.token_sha256)
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise ConfigError(f"{where}: source {s.name!r}: token_sha256 must be 64 hex digits",
                              "python -c \"import hashlib; print(hashlib.sha256(b'TOKEN').hexdigest())\"")
        return digest
    return _digest(s.token or "")


# ---- the sources file's schema (checked before anything is built) ---------------------------------------------
# The lists of classes and sources: each entry's keys, type and range. `scheduling` and `allocation` are
# declared sections (their fields' own checks, through config.section_problems, as everywhere else).
_NUMBER, _INT, _STR, _BOOL = "number", "integer", "string", "true or false"
SCHEMA: dict[str, dict[str, tuple[str, float | None, float | None]]] = {  # list -> key -> (type, low, high)
    "classes": {"name": (_STR, None, None), "weight": (_NUMBER, 1e-6, 1e6), "max_queue": (_INT, 1, MAX_QUEUE_CAPACITY)},
    "sources": {"name": (_STR, None, None), "priority": (_STR, None, None), "token": (_STR, None, None),
                "token_env": (_STR, None, None), "token_sha256": (_STR, None, None)},
}
SECTIONS = {"scheduling": SchedulingConfig, "allocation": AllocationConfig}
_REQUIRED = {"classes": ("name",), "sources": ("name", "priority")}


def sources_file_problems(raw: Any) -> list[str]:
    """Every problem with the shape of a sources file (unknown keys, wrong types, values out of range,
    lists of things that are not mappings), all of them; [] when the file can be built."""
    if not isinstance(raw, dict):
        return ["the file must hold a mapping with 'classes', 'sources', 'scheduling' and 'allocation'"]
    known = [*SCHEMA, *SECTIONS]
    problems = [f"unknown config key (section) {_show(k)} (known: {', '.join(known)})" for k in raw if k not in known]
    for section, keys in SCHEMA.items():
        if section not in raw:
            continue
        value = raw[section]
        if not isinstance(value, list):
            problems.append(f"'{section}' must be a list of mappings, got {_show(value)}")
            continue
        for i, item in enumerate(value):
            problems += _entry_problems(f"{section}[{i}]", item, keys, _REQUIRED[section])
    for section, cls in SECTIONS.items():
        if section in raw:
            problems += section_from_raw(cls, raw[section], f"{section}.")[1]
    return problems


def _entry_problems(where: str, item: Any, keys: dict, required: tuple[str, ...]) -> list[str]:
    if not isinstance(item, dict):
        return [f"{where} must be a mapping, got {_show(item)}"]
    problems = [f"{where}: unknown config key {_show(k)} (known: {', '.join(keys)})" for k in item if k not in keys]
    problems += [f"{where}: '{k}' is required" for k in required if item.get(k) is None]
    for key, (kind, low, high) in keys.items():
        value = item.get(key)
        if value is None:
            continue
        if kind == _STR:
            ok = isinstance(value, str) and value.strip() != "" and len(value) <= 256
        elif kind == _BOOL:
            ok = isinstance(value, bool)
        elif kind == _INT:
            ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
        else:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high \
                and math.isfinite(value)  # bounds first: a huge YAML integer overflows isfinite's float
        if not ok:
            bounds = f" in [{low:g}, {high:g}]" if low is not None else (" of 1..256 characters" if kind == _STR
                                                                          else "")
            problems.append(f"{where}.{key} must be a {kind}{bounds}, got {_show(value)}")
    return problems


def _show(value: Any) -> str:
    return ascii(value)[:60]


def check_fleet_config(config: FleetConfig, where: str = "sources") -> None:
    """Every value checked before a server starts; one message per problem, all of them at once."""
    problems = fleet_problems(config)
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems), "see docs/fleet.md for the sources file")


def fleet_problems(config: FleetConfig) -> list[str]:
    """What is wrong with a built FleetConfig (names, references, ranges), every problem."""
    problems: list[str] = []
    names = [c.name for c in config.classes]
    if not names:
        problems.append("'classes' is empty: give at least one priority class")
    if len(set(names)) != len(names):
        problems.append(f"class names repeat: {names}")
    for c in config.classes:
        if not c.name.strip():
            problems.append("a class has an empty name")
        if not c.weight > 0:
            problems.append(f"class {c.name!r}: weight must be > 0, got {c.weight}")
        if c.max_queue is not None and c.max_queue < 1:
            problems.append(f"class {c.name!r}: max_queue must be >= 1, got {c.max_queue}")
    if not config.sources:
        problems.append("'sources' is empty: map at least one token to a source")
    seen: set[str] = set()
    for s in config.sources:
        if not s.name.strip() or s.name in seen:
            problems.append(f"source names must be non-empty and unique, got {s.name!r} twice or empty")
        seen.add(s.name)
        if s.priority not in names:
            problems.append(f"source {s.name!r}: unknown class {s.priority!r} (classes: {', '.join(names)})")
        if s.token is not None and len(s.token) < 8:
            problems.append(f"source {s.name!r}: a token needs at least 8 characters")
    problems += section_problems(config.scheduling, "scheduling.") + section_problems(config.allocation, "allocation.")
    if any(not math.isfinite(c.weight) or c.weight > 1e6 for c in config.classes):
        problems.append("class weights must be finite and at most 1e6")
    return problems
