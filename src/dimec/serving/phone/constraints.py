"""The client side of many sources: constraints beyond cost, the edge's advice, and the cloud bill.

`MobileClient` asks its `FleetPolicy` (one per client) at three points of every call:

    adjust(...)        after routing: where each text may go (privacy, budget, deadline) and which edge-bound
                       texts stay on the device because the edge advised it (PA-MDI)
    before_send(...)   before an exchange with a tier: may this tier get these texts now (privacy, budget)?
    after_send(...)    after it: latency estimates, the edge's advice, the bill, a 429 counted

Rules (docs/fleet.md):
- `private`: the text may not leave the device, except to tiers listed in `trusted` (e.g. an edge in the
  same building). A private text routed to an untrusted tier goes to the most capable allowed tier below it;
  fallbacks never go to an untrusted tier.
- `max_latency_ms`: if the routed tier's estimated latency (link + queue + compute, measured on the last
  exchanges) misses the deadline, the cheapest allowed tier (by the cost model) whose estimate fits; if
  none fits, the fastest, flagged "deadline-unmet". Answers that arrive later than the deadline anyway are
  flagged "deadline-missed". The edge is told the deadline and refuses at once (429) if its queue cannot
  meet it, so the text is answered elsewhere without waiting.
- cloud budget: at most `limit` money units per `window_s` seconds, `price_per_text` per text sent to the
  cloud. When the next text would overspend, cloud-bound work goes to the edge (if allowed) or stays on the
  device, flagged "budget".
- advice: a 200 from the edge may carry {"keep_fraction": f, "valid_s": s}. For the next s seconds this
  client runs its mobile exit on edge-bound texts first and keeps those whose confidence clears the
  (1 - f)-quantile of its recent edge-bound confidences, never below `min_mobile_confidence` (the bound on
  how much accuracy the advice may cost), flagged "advice".
- a 429 from the edge (queue full, or the deadline cannot be met): the text goes to the cloud (if allowed)
  right away, flagged "shed" and counted; the edge is skipped for its Retry-After.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dimec.errors import ConfigError, TierBusyError
from dimec.tiers import CLOUD, EDGE, MOBILE, TIERS

ANSWERED = -1  # a row answered by the policy itself (kept on the device)


@dataclass(frozen=True)
class Constraints:
    """Per request (MobileClient.classify(..., constraints=)) or per client (the FleetPolicy's default)."""

    private: bool = False
    max_latency_ms: float | None = None

    def __post_init__(self) -> None:
        if self.max_latency_ms is not None and not self.max_latency_ms > 0:
            raise ConfigError(f"max_latency_ms must be > 0, got {self.max_latency_ms}",
                              "give the deadline in milliseconds, e.g. --max-latency-ms 200")


@dataclass(eq=False)
class Booking:
    """One charge on the cloud budget; a refund lowers it in place, so it leaves the window with the charge."""

    at: float
    amount: float


class CloudBudget:
    """At most `limit` money units spent on the cloud in any `window_s` seconds (a sliding window). Every
    text that may reach a cloud stage is booked before it is sent, whichever tier it is sent to (the edge
    forwards plans to the cloud); what did not reach the cloud is refunded on the booking itself."""

    def __init__(self, limit: float, window_s: float = 3600.0, price_per_text: float = 0.001) -> None:
        if not limit >= 0 or not window_s > 0 or not price_per_text >= 0:
            raise ConfigError(f"cloud budget: limit must be >= 0, window > 0 and price >= 0; got limit={limit}, "
                              f"window={window_s}, price={price_per_text}")
        self.limit, self.window_s, self.price = limit, window_s, price_per_text
        self._spent: deque[Booking] = deque()
        self._lock = threading.Lock()

    def spent(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._spent and self._spent[0].at <= now - self.window_s:
                self._spent.popleft()
            return sum(b.amount for b in self._spent)

    def affordable(self, texts: int) -> bool:
        return self.spent() + texts * self.price <= self.limit + 1e-12

    def reserve(self, texts: int) -> Booking | None:
        """Book the cloud's price for `texts`; None if it would overspend the window."""
        amount = texts * self.price
        with self._lock:
            now = time.monotonic()
            while self._spent and self._spent[0].at <= now - self.window_s:
                self._spent.popleft()
            if sum(b.amount for b in self._spent) + amount > self.limit + 1e-12:
                return None
            booking = Booking(now, amount)
            self._spent.append(booking)
        return booking

    def refund(self, booking: Booking, amount: float | None = None) -> None:
        """The cloud did not bill (all or `amount` of) a booking: lowered in place, never below zero."""
        with self._lock:
            booking.amount = max(0.0, booking.amount - (booking.amount if amount is None else amount))


class LatencyTracker:
    """Estimated milliseconds for one request per tier: an exponential average of the measured round trip
    minus the server's queueing, plus the queueing the edge last announced (while its advice is valid).
    Seeded from a cost profile (`dimec profile`) when given; a tier never measured is assumed to fit."""

    def __init__(self, seed_ms: dict[str, float] | None = None, alpha: float = 0.2,
                 profile: dict[str, float] | None = None) -> None:
        self.base = dict(seed_ms or {})
        self.alpha = alpha
        self.profile = profile  # per-layer figures, turned into seeds once the exit layers are known
        self.queue_ms: dict[str, tuple[float, float]] = {}  # tier -> (ms, valid until)
        self._lock = threading.Lock()

    @classmethod
    def from_profile(cls, path: str | Path) -> LatencyTracker:
        from dimec.costs import PROFILE_TIMES, read_profile

        ms = read_profile(path, "latency profile")
        return cls(profile={k: ms[k] for k in PROFILE_TIMES})

    def seed(self, exit_layers: tuple[int, int, int]) -> None:
        """Turn the profile into first estimates for this model's exits (tiers measured already keep theirs)."""
        p, (m, n, l) = self.profile, exit_layers
        if p is None:
            return
        seeds = {"mobile": p["lambda_m_ms"] * m, "edge": p["o_e_ms"] + p["lambda_e_ms"] * n,
                 "cloud": p["o_c_ms"] + p["cloud_layer_ms"] * l}
        with self._lock:
            for tier, ms in seeds.items():
                self.base.setdefault(tier, ms)
            self.profile = None

    def observe(self, tier: str, ms: float, queue_ms: float = 0.0) -> None:
        with self._lock:
            old = self.base.get(tier)
            value = max(0.0, ms - queue_ms)
            self.base[tier] = value if old is None else (1 - self.alpha) * old + self.alpha * value

    def announce_queue(self, tier: str, ms: float, valid_s: float) -> None:
        with self._lock:
            self.queue_ms[tier] = (ms, time.monotonic() + valid_s)

    def estimate(self, tier: str) -> float | None:
        with self._lock:
            base = self.base.get(tier)
            queue, until = self.queue_ms.get(tier, (0.0, 0.0))
        if base is None:
            return None
        return base + (queue if time.monotonic() < until else 0.0)


class FleetPolicy:
    """One per client: constraints, trusted tiers, the cloud budget, latency estimates, the edge's advice."""

    def __init__(self, constraints: Constraints = Constraints(), trusted: tuple[str, ...] = (),
                 budget: CloudBudget | None = None, latency: LatencyTracker | None = None,
                 min_mobile_confidence: float = 0.6, honour_advice: bool = True, window: int = 256) -> None:
        for t in trusted:
            if t not in ("edge", "cloud"):
                raise ConfigError(f"trusted tiers are 'edge' and/or 'cloud', got {t!r}")
        if not 0 <= min_mobile_confidence <= 1:
            raise ConfigError(f"min_mobile_confidence must be in [0, 1], got {min_mobile_confidence}")
        self.constraints, self.trusted, self.budget = constraints, tuple(trusted), budget
        self.latency = latency or LatencyTracker()
        self.min_mobile_confidence, self.honour_advice = min_mobile_confidence, honour_advice
        self._advice: tuple[float, float] = (0.0, 0.0)  # (keep fraction, valid until)
        self._confidences: deque[float] = deque(maxlen=window)  # recent edge-bound mobile confidences
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.drift = None  # a monitor.DriftRecorder when the client serves as a gateway

    # ---- after routing ------------------------------------------------------------------------------------------
    def allowed(self, constraints: Constraints) -> set[int]:
        if not constraints.private:
            return {MOBILE, EDGE, CLOUD}
        return {MOBILE, *(TIERS.index(t) for t in self.trusted)}

    def adjust(self, client, call, tiers: np.ndarray, constraints: Constraints | None) -> np.ndarray:
        """(N,) routed tiers -> the tiers to use; rows kept on the device by advice are answered here and
        come back as ANSWERED."""
        c = call.constraints = constraints or self.constraints
        call.started = time.monotonic()
        self.latency.seed(tuple(client.mobile.exit_layers))
        if self.drift is not None:  # the routing side of drift: what the router saw and chose
            self.drift.observe_routing(client.mobile.embed(call.batch(client.mobile)), tiers)
        tiers = np.asarray(tiers, dtype=np.int64).copy()
        allowed = self.allowed(c)
        costs = self._tier_costs(client)
        for i, routed in enumerate(tiers):
            tier = int(routed)
            if tier not in allowed:  # private: the most capable allowed tier below it
                tier = max(t for t in allowed if t <= tier)
                call.flags[i].append("private")
            if tier == CLOUD and self.budget is not None and self.budget.spent() + self.budget.price > self.budget.limit:
                tier = EDGE if EDGE in allowed else MOBILE
                call.flags[i].append("budget")
            if c.max_latency_ms is not None:
                tier = self._fit_deadline(tier, allowed, costs, c.max_latency_ms, call.flags[i])
            tiers[i] = tier
        if self.honour_advice:
            self._keep_on_device(client, call, tiers)
        return tiers

    def _tier_costs(self, client) -> np.ndarray:
        """(3,) the price of each tier under the cost model the router was fitted with (client.cost_model)."""
        if getattr(self, "_costs", None) is None:
            self._costs = client.cost_model().tier_costs
        return self._costs

    def _fit_deadline(self, tier: int, allowed: set[int], costs: np.ndarray, deadline: float, flags: list[str]) -> int:
        estimate = {t: self.latency.estimate(TIERS[t]) for t in allowed}
        fits = [t for t in allowed if estimate[t] is None or estimate[t] <= deadline]
        if tier in fits:
            return tier
        if fits:
            flags.append("deadline")
            return min(fits, key=lambda t: (costs[t], t))
        flags.append("deadline-unmet")
        return min(allowed, key=lambda t: estimate[t])

    def _keep_on_device(self, client, call, tiers: np.ndarray) -> None:
        rows = np.flatnonzero(tiers == EDGE)
        keep = self.keep_fraction()
        if not len(rows) or keep <= 0:
            return
        probs = client.mobile_probs(call, rows)  # (R, C) the mobile exit on the edge-bound rows (keeps more
        # layers on the device: the mobile package holds layers 1..m, so "more" is all of them)
        confidence = probs.max(-1)
        with self._lock:
            self._confidences.extend(float(x) for x in confidence)
            history = np.asarray(self._confidences)
        threshold = max(self.min_mobile_confidence, float(np.quantile(history, 1 - keep)))
        for j, i in enumerate(rows):
            if confidence[j] >= threshold:
                call.flags[i].append("advice")
                call.answers[i] = client._answer(call.ids[i], probs[j], "mobile", "edge", client.mobile.exit_layer)
                tiers[i] = ANSWERED

    def advised(self, probs: np.ndarray) -> np.ndarray:
        """For a plan's mobile stage: (R,) bool, the samples the device answers because the edge advised it.
        `probs` (R, C): the mobile exit's probabilities of the texts now at that stage, whose max-probabilities
        are recorded as the recent history (the scale `_keep_on_device` records and `min_mobile_confidence`
        bounds, whatever the plan's own thresholds read: max_prob or minus the entropy). Without advice none;
        with keep fraction f those at or above the (1 - f)-quantile of the history, never below
        `min_mobile_confidence`. The plan's own stop rule still stops the others it clears."""
        conf = np.asarray(probs).max(-1)
        with self._lock:
            self._confidences.extend(float(x) for x in conf)
            history = np.asarray(self._confidences)
        keep = self.keep_fraction()
        if keep <= 0 or not len(history):
            return np.zeros(len(conf), dtype=bool)
        return conf >= max(self.min_mobile_confidence, float(np.quantile(history, 1 - keep)))

    def keep_fraction(self) -> float:
        keep, until = self._advice
        return keep if time.monotonic() < until else 0.0

    # ---- around each exchange ---------------------------------------------------------------------------------
    def targets(self, call, routed: int) -> list[str]:
        """Where texts routed to `routed` may be sent, in order: the routed tier, then the other remote."""
        allowed = self.allowed(call.constraints)
        order = (routed, CLOUD if routed == EDGE else EDGE)
        return [TIERS[t] for t in order if t in allowed]

    def cloud_affordable(self, call, rows: np.ndarray) -> bool:
        """Whether the budget can pay for `rows` on the cloud now; if not, they are flagged "budget"."""
        if self.budget is None or self.budget.affordable(len(rows)):
            return True
        for i in rows:
            if "budget" not in call.flags[i]:
                call.flags[i].append("budget")
        return False

    def before_send(self, call, rows: np.ndarray, target: str, plan=None) -> tuple[str | None, Booking | None]:
        """(why not, booking): a refusal reason, or None and what was booked on the budget: the cloud's price
        for every text sent to the cloud, or sent to the edge with a plan that goes on to the cloud."""
        reaches_cloud = target == "cloud" or any(s.tier == CLOUD for s in plan or ())
        if reaches_cloud and self.budget is not None:
            amount = self.budget.reserve(len(rows))
            if amount is None:
                for i in rows:
                    if "budget" not in call.flags[i]:
                        call.flags[i].append("budget")
                return f"cloud budget spent ({self.budget.limit:g} per {self.budget.window_s:g} s)", None
            return None, amount
        return None, None

    def after_send(self, call, rows: np.ndarray, target: str, reserved: Booking | None, elapsed_ms: float,
                   result=None, error: Exception | None = None) -> None:
        if reserved is not None and self.budget is not None:  # bill only the texts the cloud answered
            tiers = None if error is not None else getattr(result, "tiers", None)
            if error is not None or tiers is not None:
                on_cloud = 0 if tiers is None else sum(t == "cloud" for t in tiers)
                self.budget.refund(reserved, self.budget.price * (len(rows) - on_cloud))
        if error is not None:
            if isinstance(error, TierBusyError):
                for i in rows:
                    call.flags[i].append("shed")
                with self._lock:
                    self.counts[f"shed_texts_{target}"] += len(rows)
            return
        meta = getattr(result, "meta", None) or {}
        self.latency.observe(target, elapsed_ms, float(meta.get("queue_ms") or 0.0))
        advice = meta.get("advice")
        if target == "edge" and isinstance(advice, dict):
            valid = float(advice.get("valid_s", 0.0))
            with self._lock:
                self._advice = (float(advice.get("keep_fraction", 0.0)), time.monotonic() + valid)
            if advice.get("expected_wait_ms") is not None:
                self.latency.announce_queue("edge", float(advice["expected_wait_ms"]), valid)

    def remote_options(self, call, target: str, remote=None) -> dict:
        """Extra arguments for the exchange: the time left before the deadline (the edge refuses at once if
        its queue cannot meet it), for remotes that take one."""
        deadline = call.constraints.max_latency_ms
        if deadline is None or target != "edge":
            return {}
        if remote is not None and "deadline_ms" not in inspect.signature(remote.classify).parameters:
            return {}
        return {"deadline_ms": max(0.0, deadline - (time.monotonic() - call.started) * 1e3)}

    def observe_mobile(self, ms: float) -> None:
        self.latency.observe("mobile", ms)

    # ---- when the call is done ---------------------------------------------------------------------------------
    def finish(self, call, answers: list) -> None:
        deadline = call.constraints.max_latency_ms
        late = deadline is not None and (time.monotonic() - call.started) * 1e3 > deadline
        with self._lock:
            for i, a in enumerate(answers):
                a.flags = list(call.flags[i]) + (["deadline-missed"] if late else [])
                for flag in a.flags:
                    self.counts[f"flag_{flag}"] += 1
        mobile = [a.probs for a in answers if a.tier == "mobile"]
        if self.drift is not None and mobile:  # the edge and cloud servers record their own exits
            self.drift.observe_confidence(MOBILE, np.asarray(mobile))

    def stats(self) -> dict[str, float]:
        with self._lock:
            out: dict[str, float] = dict(self.counts)
        if self.budget is not None:
            out["cloud_spent"] = round(self.budget.spent(), 6)
        return out
