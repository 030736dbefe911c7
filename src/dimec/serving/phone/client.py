"""The mobile side: route each sample to a plan, run the plan's mobile stage, answer or ship the rest.

The router (any calibrated `PlanRouter` from the package's router.json: DIMEC-DC's Fixed or Dynamic, a
cascade, a hybrid...) picks a plan per sample from the routing embedding and the token count before any
transformer layer runs. A plan that starts on the mobile runs layers 1..m here; the sample is answered here
if the exit's confidence clears the stage's threshold, otherwise its hidden state after layer m goes to the
next stage's tier (POST /v1/continue, wire.py), which runs on (and the edge may forward to the cloud). A plan
that starts on the edge or cloud offloads the raw text with the rest of the plan (POST /v1/classify).

Fallback order: work for the edge goes to the cloud if the edge fails (the cloud runs the same exits), work
for the cloud goes to the edge (which answers at its own exit n); if both fail the sample is answered from
the mobile exit and marked `degraded`. Every sample gets exactly one answer (checked before returning, by
request id); a tier that failed is skipped for `cooldown_s` so a dead tier costs one failed exchange, not one
per request; each fallback is counted.

The client's `FleetPolicy` (constraints.py) sits on top: privacy (a private text, and its hidden state, goes
only to trusted tiers), the cloud budget, deadlines, the edge's advice (a cascade's mobile threshold drops
while the edge asks sources to keep work on the device) and 429s (the text goes to the other tier at once).

A misconfiguration is not an outage: a URL that is not http(s) is a ConfigError when the client is made,
and a tier that refuses the token (401/403) raises TierAuthError from `classify` instead of falling back.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dimec.costs import CostModel
from dimec.errors import (
    ConfigError,
    DataError,
    DimecError,
    TierBusyError,
    TierUnavailableError,
)
from dimec.runtime.executor import Outcome, run_plan
from dimec.runtime.package import ROUTER_FILE
from dimec.runtime.plans import Plan, Stage, check_plan, own_plan, plan_text
from dimec.runtime.policy import ServedPolicy, read_cost_model
from dimec.runtime.tier import TierModel
from dimec.runtime.validate import ID_RULE, ids_problem
from dimec.serving.phone.constraints import ANSWERED, Constraints, FleetPolicy
from dimec.serving.phone.links import LinkProfile
from dimec.serving.phone.remote import CALL_DEADLINE, HttpRemote, Remote, RemoteResult, Timeouts
from dimec.textinput import check_batch
from dimec.tiers import CLOUD, EDGE, MOBILE, TIERS

# "router": the package's calibrated router.json, whatever policy it holds ("fixed" is its older name);
# "dynamic": the same with its pool means moving along the stream (DIMEC-DC's Algorithm 2; needs a centroid
# pre-router: DIMEC-DC or hybrid-centroid); the rest: one tier for every sample.
ROUTINGS = ("router", "fixed", "dynamic", "cloud-only", "edge-only", "mobile-only")
SINGLE_TIER = {"cloud-only": CLOUD, "edge-only": EDGE, "mobile-only": MOBILE}


@dataclass
class Answer:
    id: str
    label: str
    label_id: int
    probs: list[float]
    tier: str  # the tier that answered
    routed: str  # the tier the router chose
    exit_layer: int
    degraded: bool = False  # both remote tiers failed: answered from the mobile exit instead
    errors: list[str] = field(default_factory=list)
    fallback: bool = False  # a tier failed and another one (or the mobile) took over its stages
    plan: str = ""  # the plan the router chose, e.g. "mobile@m>=0.9 -> edge@n>=0.8 -> cloud@l"
    flags: list[str] = field(default_factory=list)  # why the path changed: private, budget, deadline, advice, shed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MobileClient:
    """The mobile device: its tier package (tokenizer, embedding layer, layers 1..m, router) and two remotes."""

    def __init__(self, mobile_package: str | Path | TierModel, edge_url: str | None = None,
                 cloud_url: str | None = None, token: str | None = None, timeouts: Timeouts = Timeouts(),
                 retries: int = 2, links: dict[str, LinkProfile] | None = None, backend: str = "onnx-int8",
                 routing: str = "router", cooldown_s: float = 1.0, remotes: dict[str, Remote] | None = None,
                 seed: int = 0, hidden_dtype: str = "float16", fleet: FleetPolicy | None = None) -> None:
        if routing not in ROUTINGS:
            raise ConfigError(f"unknown routing {routing!r}", f"use one of {', '.join(ROUTINGS)}")
        self.mobile = mobile_package if isinstance(mobile_package, TierModel) else TierModel(mobile_package, backend)
        if self.mobile.tier != "mobile":
            raise ConfigError(f"{self.mobile.directory} is the {self.mobile.tier} package, not the mobile one")
        if hidden_dtype not in ("float16", "float32"):
            raise ConfigError(f"hidden_dtype must be float16 or float32, got {hidden_dtype!r}")
        self.hidden_dtype = np.dtype(hidden_dtype)  # of hidden states on the wire: fp16 halves the bytes
        self.timeouts = timeouts
        self.routing = routing
        self.router, self.plans, self.confidence = self._load_router(routing)
        self.online = self._online_prerouter(routing)  # serving an online pre-router moves its means
        if self.mobile.model_id is None and any(p[0].tier == MOBILE and len(p) > 1 for p in self.plans):
            raise ConfigError(f"the mobile package {self.mobile.directory} has no model identity, which its "
                              "plans need to ship hidden states", "run `dimec export RUN_DIR` again")
        links = links or {}
        self.remotes: dict[str, Remote] = dict(remotes or {})
        for name, url, offset in (("edge", edge_url, 1), ("cloud", cloud_url, 2)):
            if url and name not in self.remotes:
                self.remotes[name] = HttpRemote(name, url, token, timeouts, retries, links.get(name), cooldown_s,
                                                seed=seed + offset)
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.fleet = fleet or FleetPolicy()  # constraints, budget, the edge's advice (constraints.py)
        self.live = None  # a serving.live ShadowSender: the shadow sample of live control (docs/live-control.md)

    def _load_router(self, routing: str) -> tuple[ServedPolicy | None, list[Plan], str]:
        if routing in SINGLE_TIER:
            return None, [own_plan(SINGLE_TIER[routing])], "max_prob"
        policy = ServedPolicy.read(self.mobile.directory / ROUTER_FILE)
        return policy, list(policy.plans_), policy.confidence_

    def cost_model(self) -> CostModel:
        """The prices of the tiers (the FleetPolicy's deadline rule picks the cheapest tier that fits): the
        cost model the served policy was fitted under. A single-tier routing reads it from the package's
        router.json too; only a package without one (exported without a calibrated run) uses the documented
        default costs. A damaged file is an error, never a silent fallback."""
        if self.router is not None:
            return self.router.cost_model
        path = self.mobile.directory / ROUTER_FILE
        if path.is_file():
            return read_cost_model(path)
        from dimec.config import CostConfig

        return CostModel.from_config(CostConfig(), tuple(self.mobile.exit_layers))

    def _online_prerouter(self, routing: str):
        """The pre-router whose means move with the stream (DIMEC-DC Dynamic), or None."""
        from dimec.runtime.prerouters import CentroidPreRouter

        pre = getattr(self.router, "prerouter_", None)
        if routing == "dynamic":
            if not isinstance(pre, CentroidPreRouter):
                raise ConfigError(f"--routing dynamic needs pool means to move (DIMEC-DC or hybrid-centroid); "
                                  f"{self.mobile.directory} serves {self.router.describe()}", "use --routing router")
            return CentroidPreRouter(pre.centroids.copy(), pre.counts.copy(), tuple(pre.plan_of_pool), online=True)
        return pre if getattr(pre, "online", False) else None

    # ---- the one entry point --------------------------------------------------------------------------
    def classify(self, texts: list[str], pairs: list[str] | None = None, ids: list[str] | None = None,
                 constraints: Constraints | None = None) -> list[Answer]:
        texts, pairs, ids = check_batch(texts, pairs, ids)
        ids = [uuid.uuid4().hex for _ in texts] if ids is None else [str(x) for x in ids]
        problem = ids_problem(ids, len(texts))
        if problem:  # the tiers refuse the same ids (422): say so before anything is sent
            raise DataError(f"request ids: {problem}", f"ids are {ID_RULE}")
        call = _Call(texts, pairs, ids)
        deadline = CALL_DEADLINE.set(time.monotonic() + self.timeouts.total_s)  # every exchange of this call
        try:
            return self._classify(call, constraints)
        finally:
            CALL_DEADLINE.reset(deadline)

    def _classify(self, call: _Call, constraints: Constraints | None) -> list[Answer]:
        choice = self._route(call)
        routed = np.array([self.plans[c][0].tier for c in choice], dtype=np.int64)
        tiers = self.fleet.adjust(self, call, routed, constraints)  # privacy, budget, deadline, advice
        plans = list(self.plans) + [own_plan(t) for t in range(len(TIERS))]  # + one-tier plans for moved texts
        effective = np.where(tiers == routed, choice, len(self.plans) + np.maximum(tiers, 0))
        for p, plan in enumerate(plans):
            rows = np.flatnonzero((effective == p) & (tiers != ANSWERED))  # ANSWERED: kept on the device by advice
            if len(rows):
                self._run(call, rows, plan)
        answers = call.answers
        missing = [call.ids[i] for i, a in enumerate(answers) if a is None]
        if missing or len({a.id for a in answers}) != len(call.ids):  # a bug, never expected: say so loudly
            raise DimecError(f"internal error: request ids {missing[:5]} got no answer or were answered twice")
        self.fleet.finish(call, answers)
        if self.live is not None:  # after the answers are final; the shadows leave from a background thread
            self.live.after(call.texts, call.pairs, answers, call.constraints.private and "cloud" not in self.fleet.trusted)
        with self._lock:
            self.counts["answers"] += len(answers)
            for a in answers:
                self.counts[f"routed_{a.routed}"] += 1
                self.counts[f"answered_{a.tier}"] += 1
                self.counts["fallbacks"] += a.fallback
                self.counts["degraded"] += a.degraded
        return answers  # type: ignore[return-value]

    def route(self, batch) -> np.ndarray:
        """(N,) index into `self.plans` for a tokenised batch: the routing decision, before any layer runs
        (the routing embedding from the package's graph, then the router). What `classify` runs."""
        if len(self.plans) == 1 and self.online is None:  # one plan (a cascade): nothing to decide, no embedding
            return np.zeros(len(batch), dtype=np.int64)
        lengths = batch.attention_mask.sum(1)
        emb = self.mobile.embed(batch)  # (N, H): the embedding layer only
        if self.online is not None:
            with self._lock:  # the moving means are shared state
                return np.array([self.online.update(e) for e in emb], dtype=np.int64)
        return np.asarray(self.router.choose_plans(emb, lengths), dtype=np.int64)

    def _route(self, call: _Call) -> np.ndarray:
        if self.router is None:  # one tier for everyone: no tokens needed (a cloud-only client never tokenises)
            return np.zeros(len(call.texts), dtype=np.int64)
        return self.route(call.batch(self.mobile))

    # ---- running a plan ----------------------------------------------------------------------------------
    def _run(self, call: _Call, rows: np.ndarray, plan: Plan) -> None:
        """Run `plan` on the chosen rows of a call through the one executor: its mobile stage here (if it has
        one), the rest on the edge or cloud (`_handoff`); one answer per row."""
        stages = _MobileStages(self, call, rows)

        def handoff(rest: Plan, open_rows: np.ndarray) -> Outcome:
            if stages.hidden is None:  # nothing ran here: the raw text goes to the plan's first tier
                return self._offload(call, rows[open_rows], rest)
            with self._lock:
                self.counts["escalated"] += len(open_rows)
            return self._ship(call, rows[open_rows], [stages.hidden[j] for j in open_rows], rest,
                              stages.probs[open_rows])

        out = run_plan(plan, len(rows), len(self.mobile.label_names), {MOBILE}, stages.run, self.confidence,
                       handoff, self._advised)
        text, routed, layers = plan_text(plan), TIERS[plan[0].tier], self.mobile.exit_layers
        for j, i in enumerate(rows):
            call.answers[i] = self._answer(call.ids[i], out.probs[j], TIERS[out.tiers[j]], routed,
                                           layers[out.exits[j]], bool(out.degraded[j]), out.errors[j],
                                           bool(out.fallback[j]), text)

    def _advised(self, stage: Stage, probs: np.ndarray) -> np.ndarray:
        """(R,) bool: samples the mobile answers at its stage because the edge advised keeping work on the
        device (FleetPolicy, on the max-probability scale whatever the plan's thresholds read)."""
        if stage.tier != MOBILE or stage.threshold is None:
            return np.zeros(len(probs), dtype=bool)
        return self.fleet.advised(probs)

    def _ship(self, call: _Call, rows: np.ndarray, hidden: list[np.ndarray], stages: Plan,
              mobile_probs: np.ndarray) -> Outcome:
        """Send hidden states after layer m to the next stage's tier (or its substitute); else answer here."""
        ids = [call.ids[i] for i in rows]
        errors: list[str] = []
        attempts = self._allowed(call, stages, rows)
        if not attempts:  # private: the hidden state may not leave the device either
            for i in rows:
                call.flags[i].append("private")
            return self._on_device(mobile_probs, degraded=False, errors=[])
        for tier, substitute in attempts:
            target = TIERS[tier]
            result = self._exchange(call, rows, target, errors, lambda remote, s=substitute: remote.continue_hidden(
                hidden, self.mobile.exit_layer, self.mobile.model_id, ids, s, self.confidence, self.hidden_dtype),
                substitute)
            if result is not None:
                return self._remote_outcome(result, tier != stages[0].tier, errors)
        return self._on_device(mobile_probs, degraded=True, errors=errors)

    def _offload(self, call: _Call, rows: np.ndarray, stages: Plan) -> Outcome:
        """Raw text to the plan's first tier (or its substitute), with the rest of the plan when it has one."""
        sub_texts = [call.texts[i] for i in rows]
        sub_pairs = None if call.pairs is None else [call.pairs[i] for i in rows]
        sub_ids = [call.ids[i] for i in rows]
        errors: list[str] = []
        for tier, substitute in self._allowed(call, stages, rows):
            target = TIERS[tier]

            def send(remote, s=substitute, tier=tier, target=target):
                options = self.fleet.remote_options(call, target, remote)  # the deadline, for remotes taking one
                if s == own_plan(tier):  # the tier's own exit: the plain request any server takes
                    return remote.classify(sub_texts, sub_pairs, sub_ids, **options)
                return remote.classify(sub_texts, sub_pairs, sub_ids, plan=s, confidence=self.confidence, **options)

            result = self._exchange(call, rows, target, errors, send, substitute)
            if result is not None:
                return self._remote_outcome(result, tier != stages[0].tier, errors)
        return self._on_device(self.mobile_probs(call, rows), degraded=True, errors=errors)

    def _allowed(self, call: _Call, stages: Plan, rows: np.ndarray) -> list[tuple[int, Plan]]:
        """Where the rest of a plan may run, in order, among the tiers the fleet policy allows (privacy, and
        the cloud budget: a cloud stage the budget cannot pay for is cut even when the edge would reach it):
        a plan is cut before any stage on a tier it may not reach (the edge would forward it there)."""
        allowed = set(self.fleet.targets(call, stages[0].tier))
        if stages[0].tier != CLOUD and any(s.tier == CLOUD for s in stages) and \
                not self.fleet.cloud_affordable(call, rows):
            allowed.discard("cloud")
        out = []
        for tier, plan in _attempts(stages):
            kept = [s for s in plan if TIERS[s.tier] in allowed]
            if TIERS[tier] in allowed and kept:
                out.append((tier, (*kept[:-1], Stage(kept[-1].tier, kept[-1].exit, None))))
        return out

    def _exchange(self, call: _Call, rows: np.ndarray, target: str, errors: list[str], send,
                  plan: Plan | None = None) -> RemoteResult | None:
        """One exchange with `target` under the fleet policy (budget, latency, advice, 429s); None if it failed
        (the reason appended to `errors`). `plan`: the stages sent (a cloud stage in it is booked)."""
        remote = self.remotes.get(target)
        if remote is None:
            errors.append(f"no {target} tier configured")
            return None
        refused, reserved = self.fleet.before_send(call, rows, target, plan)
        if refused:
            errors.append(refused)
            return None
        start = time.perf_counter()
        try:
            result = send(remote)
            self._check_same_model(target, result, len(rows))
        except TierUnavailableError as exc:
            self.fleet.after_send(call, rows, target, reserved, 0.0, error=exc)
            errors.append(exc.message)
            with self._lock:
                self.counts[f"{'shed' if isinstance(exc, TierBusyError) else 'failed'}_{target}"] += 1
            return None
        self.fleet.after_send(call, rows, target, reserved, (time.perf_counter() - start) * 1e3, result)
        return result

    @staticmethod
    def _remote_outcome(result: RemoteResult, substituted: bool, errors: list[str]) -> Outcome:
        """A remote tier's answers; `substituted`: another tier ran the stages (the planned one failed)."""
        out = result.outcome()
        out.fallback |= substituted
        out.errors = [list(errors) + (list(result.errors) if f else []) for f in out.fallback]
        return out

    def _on_device(self, probs: np.ndarray, degraded: bool, errors: list[str]) -> Outcome:
        """Answers from the mobile exit: for private texts, or `degraded` when every remote tier failed."""
        n = len(probs)
        return Outcome(np.asarray(probs, dtype=np.float64), np.full(n, MOBILE), np.full(n, MOBILE),
                       np.full(n, degraded), np.full(n, degraded), [list(errors) for _ in range(n)])

    def mobile_probs(self, call: _Call, rows: np.ndarray) -> np.ndarray:
        """(R, C) the mobile exit's probabilities (at its temperature) for the chosen rows of a call."""
        start = time.perf_counter()
        probs = self.mobile.exit_probs(self.mobile.logits(call.batch(self.mobile).rows(rows)), MOBILE)
        self.fleet.observe_mobile((time.perf_counter() - start) * 1e3)
        return probs

    def _check_same_model(self, target: str, result: RemoteResult, n: int) -> None:
        """A tier serving another model (other labels or exit layers) must not answer for this one."""
        expected = [self.mobile.exit_layers[e] for e in result.exits]
        got = expected if result.exit_layers is None else list(result.exit_layers)
        if list(result.label_names) != self.mobile.label_names or got != expected or len(result.exits) != n:
            raise TierUnavailableError(
                f"{target} serves another model (labels {result.label_names}, exit layers {sorted(set(got))}; "
                f"expected {self.mobile.label_names}, exit layers {sorted(set(expected))}): deploy packages of "
                "one export")

    def _answer(self, rid: str, probs: np.ndarray, tier: str, routed: str, exit_layer: int,
                degraded: bool = False, errors: list[str] | None = None, fallback: bool = False,
                plan: str = "") -> Answer:
        label_id = int(np.argmax(probs))
        return Answer(rid, self.mobile.label_names[label_id], label_id, [round(float(p), 6) for p in probs],
                      tier, routed, int(exit_layer), degraded, errors or [], fallback, plan)

    def stats(self) -> dict[str, int]:
        with self._lock:
            out = dict(self.counts)
        out["retries"] = sum(getattr(r, "retry_count", 0) for r in self.remotes.values())
        for kind in ("raw", "hidden"):
            out[f"bytes_sent_{kind}"] = sum(getattr(r, "bytes_sent", {}).get(kind, 0) for r in self.remotes.values())
            out[f"requests_sent_{kind}"] = sum(getattr(r, "requests_sent", {}).get(kind, 0)
                                               for r in self.remotes.values())
        return {**out, **self.fleet.stats()}

    def close(self) -> None:
        if self.live is not None:
            self.live.close()
        for remote in self.remotes.values():
            if hasattr(remote, "close"):
                remote.close()

    def __enter__(self) -> MobileClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _attempts(stages: Plan) -> list[tuple[int, Plan]]:
    """Where the rest of a plan may run: its own next tier, then the other remote tier running the same stages
    at the exits it holds (edge down: the cloud runs them; cloud down: the edge answers at exit n at most)."""
    target = stages[0].tier
    other = CLOUD if target == EDGE else EDGE
    return [(target, stages), (other, substitute_tier(stages, other))]


def substitute_tier(stages: Plan, tier: int) -> Plan:
    """The same stages run on `tier`: exits capped at what the tier holds, repeated exits merged (the later
    stage wins), the last stage always answering."""
    top = 2 if tier == CLOUD else tier
    out: list[Stage] = []
    for s in stages:
        stage = Stage(tier, min(s.exit, top), s.threshold)
        if out and out[-1].exit == stage.exit:
            out[-1] = stage
        else:
            out.append(stage)
    out[-1] = Stage(tier, out[-1].exit, None)
    return check_plan(tuple(out))


class _MobileStages:
    """Runs the mobile stage of a plan for some rows of a call (layers 1..m and exit m, on the device) and
    keeps each row's hidden state after layer m, for the rows that go on."""

    def __init__(self, client: MobileClient, call: _Call, rows: np.ndarray) -> None:
        self.client, self.call, self.rows = client, call, rows
        self.hidden: list[np.ndarray] | None = None  # (T_i, H) per row, once the stage ran
        self.probs: np.ndarray | None = None  # (R, C)

    def run(self, stage: Stage, open_rows: np.ndarray) -> np.ndarray:
        mobile = self.client.mobile
        start = time.perf_counter()
        logits, self.hidden = mobile.mobile_stage(self.call.batch(mobile).rows(self.rows[open_rows]))
        self.client.fleet.observe_mobile((time.perf_counter() - start) * 1e3)
        self.probs = mobile.exit_probs(logits, MOBILE)  # (R, C)
        return self.probs


class _Call:
    """One classify call: its inputs, answers so far, and the tokens, made only if the mobile needs them
    (a cloud-only client never tokenises)."""

    def __init__(self, texts: list[str], pairs: list[str] | None, ids: list[str]) -> None:
        self.texts, self.pairs, self.ids = texts, pairs, ids
        self.answers: list[Answer | None] = [None] * len(texts)
        self.flags: list[list[str]] = [[] for _ in texts]  # set by the FleetPolicy (constraints.py)
        self.constraints, self.started = Constraints(), time.monotonic()
        self._batch = None

    def batch(self, mobile: TierModel):
        if self._batch is None:
            self._batch = mobile.encode(self.texts, self.pairs)
        return self._batch


def answers_jsonl(answers: list[Answer]) -> str:
    return "\n".join(json.dumps(a.to_dict()) for a in answers)
