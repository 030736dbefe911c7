"""User-space link emulation for the mobile->edge and mobile->cloud links (no root, no tc netem).

A `LinkProfile` delays each HTTP exchange inside the client's httpx transport: half the round-trip latency
plus jitter plus size/bandwidth on the way up, the same on the way down; with probability `loss` the
exchange is dropped (on the way up or, as often, after the server answered) and the client's bounded
retries take over. Kernel shaping with `tbf` in network namespaces is described in docs/serving.md.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import asdict, dataclass

import httpx

from dimec.errors import ConfigError

# Typical figures (round trip, jitter, Mbit/s, loss) for quick experiments; any can be given explicitly.
PRESETS: dict[str, dict[str, float]] = {
    "loopback": {},
    "lan": {"latency_ms": 1, "jitter_ms": 0.2, "bandwidth_mbit": 1000},
    "wifi": {"latency_ms": 5, "jitter_ms": 2, "bandwidth_mbit": 100, "loss": 0.001},
    "5g": {"latency_ms": 20, "jitter_ms": 5, "bandwidth_mbit": 100, "loss": 0.001},
    "4g": {"latency_ms": 50, "jitter_ms": 10, "bandwidth_mbit": 20, "loss": 0.005},
    "wan": {"latency_ms": 80, "jitter_ms": 10, "bandwidth_mbit": 50, "loss": 0.001},
}
_ALIASES = {"latency": "latency_ms", "rtt": "latency_ms", "jitter": "jitter_ms", "bandwidth": "bandwidth_mbit",
            "bw": "bandwidth_mbit", "loss": "loss"}


@dataclass(frozen=True)
class LinkProfile:
    latency_ms: float = 0.0  # added round-trip time, half each way
    jitter_ms: float = 0.0  # std of a normal added to each direction's delay (clipped at 0)
    bandwidth_mbit: float | None = None  # None: unlimited
    loss: float = 0.0  # probability that an exchange is dropped

    def __post_init__(self) -> None:
        if self.latency_ms < 0 or self.jitter_ms < 0:
            raise ConfigError(f"link latency and jitter must be >= 0, got {self}")
        if self.bandwidth_mbit is not None and self.bandwidth_mbit <= 0:
            raise ConfigError(f"link bandwidth must be > 0 Mbit/s, got {self.bandwidth_mbit}")
        if not 0 <= self.loss < 1:
            raise ConfigError(f"link loss must be in [0, 1), got {self.loss}")

    @property
    def is_ideal(self) -> bool:
        return self == LinkProfile()

    @classmethod
    def parse(cls, spec: str | None) -> LinkProfile:
        """'4g', or 'latency=20,jitter=5,bandwidth=50,loss=0.01' (ms, ms, Mbit/s, probability), or both:
        '4g,loss=0.05'."""
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in (spec or "").split(","))):
            if "=" not in part:
                if part not in PRESETS:
                    raise ConfigError(f"unknown link preset {part!r}", f"presets: {', '.join(PRESETS)}")
                values.update(PRESETS[part])
                continue
            key, _, value = part.partition("=")
            key = _ALIASES.get(key.strip(), key.strip())
            if key not in ("latency_ms", "jitter_ms", "bandwidth_mbit", "loss"):
                raise ConfigError(f"unknown link setting {key!r} in {spec!r}",
                                  "use latency=MS,jitter=MS,bandwidth=MBIT,loss=P")
            try:
                values[key] = float(value)
            except ValueError:
                raise ConfigError(f"link setting {key}={value!r} is not a number") from None
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def one_way_s(self, nbytes: int, rng: random.Random) -> float:
        delay = self.latency_ms / 2 + (rng.gauss(0, self.jitter_ms) if self.jitter_ms else 0.0)
        seconds = max(0.0, delay) / 1e3
        if self.bandwidth_mbit:
            seconds += nbytes * 8 / (self.bandwidth_mbit * 1e6)
        return seconds


class LinkDropped(httpx.TransportError):
    """An exchange the emulated link lost (retried by the client like any transport error)."""


class LinkTransport(httpx.BaseTransport):
    """Wraps a real transport; sleeps and drops per the profile. Thread-safe (one RNG under a lock)."""

    def __init__(self, profile: LinkProfile, inner: httpx.BaseTransport | None = None, seed: int = 0) -> None:
        self.profile = profile
        self.inner = inner or httpx.HTTPTransport()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def _draw(self, nbytes: int) -> tuple[float, bool]:
        with self._lock:
            return self.profile.one_way_s(nbytes, self._rng), self._rng.random() < self.profile.loss / 2

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        up, lost = self._draw(len(request.read()) + 200)  # ~200 bytes of headers
        time.sleep(up)
        if lost:
            raise LinkDropped("request lost on the emulated link", request=request)
        response = self.inner.handle_request(request)
        body = response.read()
        down, lost = self._draw(len(body) + 200)
        time.sleep(down)
        if lost:
            response.close()
            raise LinkDropped("answer lost on the emulated link", request=request)
        return response

    def close(self) -> None:
        self.inner.close()
