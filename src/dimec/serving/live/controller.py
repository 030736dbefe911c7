"""The controller: keeps the served policy on its calibrated path, one step at a time, on live evidence.

The calibrated path (router.json `state.path`, written by calibration: routing/path.py) is the ordered list of
configurations calibration admitted, safest first (cloud-only) and ending at the one it chose. The controller
serves one step of it; it starts at the last (the calibrated choice) and can only move to a neighbour, so
nothing (no shadow answer, no flood of feedback) can make it serve a configuration calibration did not admit,
or one cheaper than the calibrated choice.

Each step j has a live disagreement budget: with a disagreement promise, eps itself; with an accuracy promise,
`d_j + (eps - a_j)`, its validation disagreement plus the accuracy loss it had left (every disagreement beyond
calibration's counted as an added error: the worst case, since L_acc <= L_dis per text). Rules, read after
every observation of the current version's confidence sequence (bound.py, restarted at each change):

    one step safer  when the sequence's LOWER end passes the step's budget (the loss is over it, at level
                    1 - alpha), or that of the latest epoch of `window` shadow answers does (a drift that the
                    version's whole history would dilute: bound.RecentSequence), or the accuracy loss's lower
                    end (feedback) passes eps
    one step back   when its UPPER end has stayed at or below d_j + back_fraction (budget_j - d_j) (the drift has
                    passed) for `patience` consecutive shadow answers, and feedback does not say otherwise

A safer step needs fresh evidence against the new step (the sequence restarts), and a step back needs a long
quiet run, so the policy does not flap (hysteresis). Every change gets a new version, a log entry with its
evidence, and is written atomically into the run directory's router.json (its plans, and `live`: version,
step, log), so a restarted server and `dimec export` continue from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dimec.config import above, at_least, between, raise_problems, section_problems, setting
from dimec.errors import ConfigError
from dimec.serving.live.bound import RECENT_WINDOW
from dimec.serving.live.ledger import DEFAULT_RATE, Evidence, Ledger

log = logging.getLogger("dimec.serving.live")
MAX_LOG = 100  # change-log entries kept in router.json


LIVE_SECTION = "live"  # its name in `dimec settings` and in saved settings (serving/settings.py)


@dataclass(frozen=True)
class LiveSettings:
    """Live control's settings: the cloud's controller and feedback (`dimec serve cloud --live`), the client's
    shadow sample and policy poll (`dimec client`). Checked by `check()`, which every user of them calls."""

    shadow_rate: float = setting(DEFAULT_RATE, "share of texts the cloud also answers, off the critical path, for "
                                               "the live loss bound (0: off; a cloud without --live turns it off)",
                                 between(0, 1))
    alpha: float = setting(0.05, "the confidence sequence covers the live loss with probability >= 1 - alpha",
                           between(0, 1, low_open=True, high_open=True))
    back_fraction: float = setting(0.5, "step back once the upper end is this far from the step's validation level "
                                        "to its budget", between(0, 1, high_open=True))
    patience: int = setting(400, "consecutive shadow answers below that level before stepping back", at_least(1))
    min_evidence: int = setting(20, "shadow answers on a version (or in the recent epoch) before it may step safer",
                                at_least(1))
    window: int = setting(RECENT_WINDOW, "shadow answers per epoch of the recent sequence, the drift detector (bound.py: "
                               "RecentSequence)", at_least(1))
    feedback_rate: float = setting(50.0, "feedback labels per second per token (--feedback-rate also sets the "
                                         "burst to 10x)", above(0))
    feedback_burst: float = setting(500.0, "feedback labels one token may send at once", above(0))
    shadow_timeout_s: float = setting(2.0, "a shadow answer later than this many seconds is missing", above(0))
    shadow_queue: int = setting(256, "shadow texts waiting in the client; more are shed (counted)", at_least(1))
    poll_s: float = setting(5.0, "the client's policy poll interval, seconds (doubling on failure up to 16x)",
                            above(0))
    enabled: bool = setting(True, "False: observe and report only, never change the policy "
                                  "(--live-observe-only)")

    def check(self) -> LiveSettings:
        raise_problems(section_problems(self, f"{LIVE_SECTION}."))
        return self


@dataclass(frozen=True)
class Step:
    describe: str
    state: dict  # the plan-router state: plans, confidence, prerouter
    val_disagreement_pt: float
    val_accuracy_loss_pt: float
    val_cost: float
    budget: float = 0.0  # live disagreement budget (a fraction)


def path_steps(raw_router: dict, eps: float, loss: str) -> list[Step]:
    """The steps of the calibrated path in a router.json (safest first), with their live budgets. A router
    without a recorded path (calibrated by an older dimec) has one step: the controller then only reports."""
    state = raw_router.get("state") or {}
    entries = state.get("path") or [{"describe": "calibrated policy", "state": state, "val_disagreement_pt": 0.0,
                                     "val_accuracy_loss_pt": 0.0, "val_cost": 0.0}]
    steps = []
    for e in entries:
        d, a = e["val_disagreement_pt"] / 100, e["val_accuracy_loss_pt"] / 100
        budget = eps if loss == "disagreement" else d + max(0.0, eps - a)
        plan_state = {k: e["state"][k] for k in ("plans", "confidence", "prerouter") if k in e["state"]}
        steps.append(Step(e["describe"], plan_state, 100 * d, 100 * a, float(e["val_cost"]), budget))
    return steps


class Controller:
    """Serves one step of the path, moves it on evidence, versions and persists every change."""

    def __init__(self, steps: list[Step], eps: float, settings: LiveSettings = LiveSettings(),
                 router_path: str | Path | None = None, start: int | None = None, version: int = 1,
                 history: list[dict] | None = None) -> None:
        if not steps:
            raise ConfigError("the calibrated path is empty", "calibrate the run again")
        self.steps, self.eps, self.settings = steps, eps, settings.check()
        self.router_path = Path(router_path) if router_path else None
        self.step = len(steps) - 1 if start is None else min(max(0, start), len(steps) - 1)
        self.version, self.history = version, list(history or [])
        self.quiet = 0  # consecutive shadow answers below the step-back level
        self._lock = threading.Lock()

    @classmethod
    def from_router(cls, raw_router: dict, settings: LiveSettings = LiveSettings(),
                    router_path: str | Path | None = None) -> Controller:
        """From router.json: the path, the promise (calibration max_loss and loss) and any earlier live state."""
        cal = (raw_router.get("params") or {}).get("calibration") or {}
        if cal.get("max_loss") is None:
            raise ConfigError("live control needs a policy calibrated for a loss (--max-loss), not a budget")
        eps, loss = float(cal["max_loss"]) / 100, str(cal.get("loss", "accuracy"))
        live = raw_router.get("live") or {}
        steps = path_steps(raw_router, eps, loss)
        ctl = cls(steps, eps, settings, router_path, live.get("step"), int(live.get("version", 1)), live.get("log"))
        ctl.loss = loss
        return ctl

    loss = "accuracy"

    # ---- deciding ----------------------------------------------------------------------------------------
    def observe(self, evidence: Evidence) -> dict | None:
        """Read the current version's evidence after an observation; a change (its log entry) or None."""
        if evidence.version != self.version or not self.settings.enabled:
            return None  # evidence about an older version informs nothing about the one served now
        with self._lock:
            step = self.steps[self.step]
            dis, acc = evidence.disagreement.interval(), evidence.accuracy.interval()
            back_level = step.val_disagreement_pt / 100 + self.settings.back_fraction * (
                step.budget - step.val_disagreement_pt / 100)
            self.quiet = self.quiet + 1 if dis.n and dis.high <= back_level else 0
            if self.step > 0 and dis.n >= self.settings.min_evidence and dis.low > step.budget:
                return self._move(-1, f"live disagreement lower bound {100 * dis.low:.2f}% over the step's budget "
                                      f"{100 * step.budget:.2f}%", evidence)
            recent = evidence.recent.interval()
            if self.step > 0 and recent.n >= self.settings.min_evidence and recent.low > step.budget:
                return self._move(-1, f"recent disagreement lower bound {100 * recent.low:.2f}% (the last {recent.n} "
                                      f"shadow answers) over the step's budget {100 * step.budget:.2f}%", evidence)
            if self.step > 0 and acc.n >= self.settings.min_evidence and acc.low > self.eps:
                return self._move(-1, f"live accuracy loss lower bound {100 * acc.low:.2f} pt (feedback) over the "
                                      f"promised {100 * self.eps:.2f} pt", evidence)
            if self.step < len(self.steps) - 1 and self.quiet >= self.settings.patience and \
                    not (acc.n >= self.settings.min_evidence and acc.high > self.eps):
                return self._move(+1, f"live disagreement upper bound at or below {100 * back_level:.2f}% for "
                                      f"{self.quiet} shadow answers", evidence)
            return None

    def _move(self, direction: int, reason: str, evidence: Evidence) -> dict:
        before = self.step
        self.step = before + direction  # one step, within the path by construction
        self.version += 1
        self.quiet = 0
        entry = {"version": self.version, "at": time.time(), "from_step": before, "to_step": self.step,
                 "direction": "safer" if direction < 0 else "back", "reason": reason,
                 "describe": self.steps[self.step].describe, "evidence": evidence.summary()}
        self.history = [*self.history, entry][-MAX_LOG:]
        log.warning("policy v%d: step %d -> %d (%s): %s", self.version, before, self.step, entry["direction"], reason)
        self._persist()
        return entry

    def _persist(self) -> None:
        """router.json with the served step's plans and the live state (atomic: readers see old or new)."""
        if self.router_path is None:
            return
        from dimec.atomic import read_json, write_json

        raw = read_json(self.router_path, "calibrate the run again")
        raw["state"] = {**raw["state"], **self.steps[self.step].state}
        raw["live"] = {"version": self.version, "step": self.step, "steps": len(self.steps), "log": self.history}
        write_json(self.router_path, raw)

    # ---- what clients read -------------------------------------------------------------------------------
    def policy(self) -> dict[str, Any]:
        with self._lock:
            step = self.steps[self.step]
            body = {"version": self.version, "step": self.step, "steps": len(self.steps), "describe": step.describe,
                    "state": step.state, "budget": step.budget, "eps": self.eps, "loss": self.loss}
        body["etag"] = etag(body)
        return body

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"version": self.version, "step": self.step, "steps": len(self.steps), "eps": self.eps,
                    "loss": self.loss, "budget": self.steps[self.step].budget, "quiet": self.quiet,
                    "path": [asdict(s) | {"state": None} for s in self.steps], "log": self.history[-10:]}


def etag(policy: dict) -> str:
    digest = hashlib.sha256(json.dumps({k: policy[k] for k in ("version", "step", "state")}, sort_keys=True,
                                       default=str).encode()).hexdigest()[:16]
    return f'"v{policy["version"]}-{digest}"'


class LiveControl:
    """The cloud's side: the ledger, the controller, and what the endpoints and gauges read."""

    def __init__(self, controller: Controller, n_labels: int, settings: LiveSettings = LiveSettings(),
                 shadow_cost: float = 0.0) -> None:
        self.controller, self.settings, self.shadow_cost = controller, settings.check(), shadow_cost
        self.ledger = Ledger(n_labels, settings.alpha, feedback_rate=settings.feedback_rate,
                             feedback_burst=settings.feedback_burst, window=settings.window)
        self.counts = {"shadowed": 0, "free": 0, "missing_reported": 0, "texts_reported": 0, "duplicates": 0}
        self.cost = 0.0  # cost-model units spent on shadow answers
        self._lock = threading.Lock()

    @classmethod
    def from_router_file(cls, path: str | Path, n_labels: int, settings: LiveSettings = LiveSettings()) -> LiveControl:
        from dimec.atomic import read_json

        raw = read_json(path, "calibrate the run again")
        costs = raw.get("cost_model") or {}
        # a shadow answer ships the text to the cloud and runs every layer there (cheaper than the hidden
        # state under the cost model: hidden_state_factor > 1): the cloud-only cost of one text
        from dimec.costs import CostModel

        shadow_cost = float(CostModel.from_dict(costs).cloud_only) if costs else 0.0
        return cls(Controller.from_router(raw, settings, path), n_labels, settings, shadow_cost)

    def record(self, items: list[dict], cloud_labels: dict[str, int], missed: list[dict] | None = None,
               texts: int = 0) -> dict:
        """Shadow results: items {id, version, label_id, free}, the cloud's label per id that has one (ids
        without: missing). `missed`: items whose shadow the client lost (recorded missing unless recorded
        already: an id counts once); `texts`: texts the client answered since its last report."""
        changes = []
        recorded = 0
        for item in missed or []:
            if self.ledger.shadow(item["id"], int(item["version"]), int(item["label_id"]), None):
                with self._lock:
                    self.counts["missing_reported"] += 1
        for item in items:
            rid, version, answer = item["id"], int(item["version"]), int(item["label_id"])
            if item.get("free"):
                ok = self.ledger.free(rid, version, answer)
            else:
                ok = self.ledger.shadow(rid, version, answer, cloud_labels.get(rid))
            with self._lock:
                if not ok:
                    self.counts["duplicates"] += 1
                    continue
                recorded += 1
                self.counts["free" if item.get("free") else "shadowed"] += 1
                if not item.get("free"):
                    self.cost += self.shadow_cost
            change = self.controller.observe(self.ledger.of(version))
            if change:
                changes.append(change)
        with self._lock:
            self.counts["texts_reported"] += texts
        return {"recorded": recorded, "policy_version": self.controller.version, "changes": len(changes)}

    def feedback(self, key: str, items: list[tuple[str, int]]) -> dict:
        out = self.ledger.feedback(key, items)
        for version in out["counted"]:
            self.controller.observe(self.ledger.of(int(version)))
        return out | {"policy_version": self.controller.version}

    def status(self) -> dict[str, Any]:
        ctl = self.controller.status()
        with self._lock:
            counts, cost = dict(self.counts), self.cost
        texts = max(counts["texts_reported"], 1)
        return {**ctl, "evidence": self.ledger.summary(ctl["version"]), "counts": counts,
                "feedback": dict(self.ledger.counts), "shadow_cost": cost,
                "shadow_share": counts["shadowed"] / texts if counts["texts_reported"] else 0.0,
                "now": time.time()}


def status_line(status: dict[str, Any], stale_s: float = 60.0) -> str:
    """'live disagreement 0.9% [0.4, 1.6] over 3,212 shadowed texts; promised <= 0.5 pt: AT RISK'."""
    ev = status["evidence"]
    dis = ev["disagreement"]
    budget, eps = 100 * status["budget"], 100 * status["eps"]
    promise = (f"promised <= {eps:g} pt" if status["loss"] == "disagreement" else
               f"budget <= {budget:.2f}% (promised <= {eps:g} pt accuracy loss)")
    head = f"policy v{status['version']} (step {status['step'] + 1} of {status['steps']}): "
    if not dis["n"]:
        text = head + f"no shadow answers yet for this version; {promise}: NO EVIDENCE"
    else:
        verdict = ("BROKEN" if 100 * dis["low"] > budget else "AT RISK" if 100 * dis["high"] > budget else "OK")
        text = (head + f"live disagreement {100 * dis['estimate']:.1f}% [{100 * dis['low']:.1f}, "
                f"{100 * dis['high']:.1f}] over {dis['n']:,} shadowed texts; {promise}: {verdict}")
    acc = ev["accuracy_loss"]
    if acc["n"]:
        text += (f"; accuracy loss {100 * acc['estimate']:.1f} pt [{100 * acc['low']:.1f}, {100 * acc['high']:.1f}] "
                 f"over {acc['n']:,} labels")
    if ev["missing"]:
        text += f"; {ev['missing']:,} shadow answers missing (not counted)"
    last = ev.get("last_at")
    if dis["n"] and last is not None and status["now"] - last > stale_s:
        text += f"; no shadow answer for {status['now'] - last:.0f} s: shadowing paused (cloud down?), bound stale"
    return text
