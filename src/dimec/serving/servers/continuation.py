"""Model-distributed paths on the edge and cloud: run the rest of a plan from a hidden state (or from raw text).

A tier receives either a hidden state after layer k (POST /v1/continue, wire.py) or raw text (POST
/v1/classify) with the rest of a plan; a request without a plan is the one-stage plan of this tier's own exit,
so every answer has one shape (PlanAnswer). The plan's stages on this tier run through the one executor
(runtime/executor.py): layers up to the stage's exit, then the exit; a sample stops at the first stage whose
confidence (softmax at the exit's temperature, read as the plan says: max_prob or entropy) clears its
threshold, and the last stage always answers. If the plan goes on to a higher tier (edge -> cloud), the edge forwards the hidden state of the
samples still open to the cloud as a continuation request; if the cloud cannot be reached, the edge answers
them at its own last exit, marked `fallback` with the error (nothing is lost).

Refused with a clear 4xx (the server stays up): another model's state (409), a hidden size, length, batch or
k this tier cannot continue from, or a plan whose next stage is not on this tier (422).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from dimec.runtime import wire
from dimec.runtime.executor import Outcome, run_plan
from dimec.runtime.plans import Plan, Stage, own_plan, plan_text
from dimec.runtime.tier import TierModel
from dimec.runtime.validate import NON_FINITE
from dimec.runtime.wire import HiddenState, WireError
from dimec.tiers import CLOUD, TIERS

log = logging.getLogger("dimec.serving")


class PlanStage(BaseModel):
    """One stage of a plan in the HTTP API: run up to `exit` on `tier`; answer if confidence >= threshold."""

    model_config = ConfigDict(extra="forbid", strict=True)
    tier: Literal["mobile", "edge", "cloud"]
    exit: int = Field(ge=0, le=2, description="0: exit after layer m, 1: after n, 2: after l")
    threshold: float | None = Field(None, description="null on the last stage: it always answers")


class PlanAnswer(BaseModel):
    """The answer to a request that carried a plan: per sample, which tier's exit answered."""

    tier: str = Field(description="the tier that received the request")
    label_names: list[str]
    ids: list[str] | None
    labels: list[str]
    label_ids: list[int]
    probs: list[list[float]]
    tiers: list[str] = Field(description="per sample: the tier whose exit answered")
    exits: list[int] = Field(description="per sample: the exit that answered (0: m, 1: n, 2: l)")
    exit_layers: list[int] = Field(description="per sample: the layer of the exit that answered")
    fallback: list[bool] = Field(description="per sample: answered by this tier because the next one failed")
    errors: list[str] = Field(description="why a fallback happened (empty when none did)")
    compute_ms: float = Field(description="model time on this server")
    forward_ms: float = Field(0.0, description="time spent forwarding hidden states to the next tier")
    queue_ms: float | None = Field(None, description="time waiting for the model (sources mode)")
    source: str | None = Field(None, description="the source the token maps to")
    priority: str | None = Field(None, description="the source's priority class")
    advice: dict[str, Any] | None = Field(None, description="PA-MDI allocation advice (docs/fleet.md)")


class PlanRunner:
    """Runs plans on one tier (PyTorch backend); `forward` is the next tier's remote (the edge's cloud)."""

    def __init__(self, model: TierModel, max_batch: int = 64, forward=None) -> None:
        self.model, self.max_batch, self.forward = model, max_batch, forward
        self.hidden_size: int | None = None  # learned from the first state this tier computes itself

    # ---- checks ------------------------------------------------------------------------------------------
    def own_plan(self) -> Plan:
        return own_plan(self.model.tier_index)

    def check_here(self, plan: Plan, layer: int) -> Plan:
        """The plan's first stage must run here; exits at or above `layer`; this tier holds layers 1..L."""
        m = self.model
        if plan[0].tier != m.tier_index:
            raise WireError(422, f"the plan's next stage runs on the {TIERS[plan[0].tier]}, not on this "
                                 f"{m.tier}: {plan_text(plan)}")
        held = m.exit_layers[m.tier_index]
        if not 0 <= layer <= held:
            raise WireError(422, f"cannot continue from layer {layer}: the {m.tier} holds layers 1..{held}")
        first = m.exit_layers[plan[0].exit]
        if layer > first:
            raise WireError(422, f"the hidden state is after layer {layer}, above the plan's first exit (layer "
                                 f"{first}): {plan_text(plan)}")
        if any(s.tier not in (m.tier_index, CLOUD) for s in plan):
            raise WireError(422, f"this {m.tier} can run or forward only {m.tier} and cloud stages: "
                                 f"{plan_text(plan)}")
        return plan

    def check_state(self, state: HiddenState) -> Plan:
        m = self.model
        if m.model_id is None:
            raise WireError(409, f"this {m.tier} package was exported without a model identity; export it again "
                                 "to accept hidden states")
        if state.model_id != m.model_id:
            raise WireError(409, f"the hidden state is from model {state.model_id[:16]}..., this {m.tier} serves "
                                 f"{m.model_id[:16]}...: deploy packages of one export")
        batch, width, size = state.hidden.shape
        if batch > self.max_batch:
            raise WireError(422, f"batch of {batch} hidden states is over the limit of {self.max_batch}")
        if width > m.max_length:
            raise WireError(422, f"{width} tokens per row is over the model's maximum length {m.max_length}")
        expected = self._hidden_size()
        if size != expected:
            raise WireError(422, f"hidden size {size} does not match the model's {expected}")
        return self.check_here(state.plan or self.own_plan(), state.layer)

    def _hidden_size(self) -> int:
        if self.hidden_size is None:
            self.hidden_size = int(self.model.start(self.model.encode(["a"])).shape[-1])
        return self.hidden_size

    # ---- entry points ------------------------------------------------------------------------------------------
    def continue_state(self, state: HiddenState) -> PlanAnswer:
        plan = self.check_state(state)
        hidden = state.hidden.astype(np.float32)
        return self._run(hidden, state.attention_mask, state.layer, plan, state.confidence, state.ids,
                         state.hidden.dtype)

    def classify(self, texts: list[str], pairs: list[str] | None, ids: list[str] | None, plan: Plan,
                 kind: str) -> PlanAnswer:
        """Raw text with the rest of a plan: embed here, then run the plan from layer 0."""
        plan = self.check_here(plan, 0)
        start = time.perf_counter()
        batch = self.model.encode(texts, pairs)
        hidden = self.model.start(batch)
        spent = (time.perf_counter() - start) * 1e3
        answer = self._run(hidden, batch.attention_mask, 0, plan, kind, ids)
        answer.compute_ms += spent
        return answer

    # ---- the stages ----------------------------------------------------------------------------------------------
    def _run(self, hidden: np.ndarray, mask: np.ndarray, layer: int, plan: Plan, kind: str,
             ids: list[str] | None, dtype=np.float16) -> PlanAnswer:
        """`dtype`: of hidden states forwarded on (the precision the request came in; fp16 for raw text)."""
        m = self.model
        stages = TierStages(m, hidden, mask, layer)
        forward_ms = [0.0]

        def handoff(rest: Plan, rows: np.ndarray) -> Outcome | str:
            start = time.perf_counter()
            try:
                return self._forward(stages.hidden[rows], mask[rows], stages.layer, rest, kind, rows, ids, dtype)
            finally:
                forward_ms[0] = (time.perf_counter() - start) * 1e3

        start = time.perf_counter()
        out = run_plan(plan, len(hidden), len(m.label_names), {m.tier_index}, stages.run, kind, handoff)
        compute_ms = (time.perf_counter() - start) * 1e3 - forward_ms[0]
        label_ids = out.probs.argmax(-1)
        return PlanAnswer(
            tier=m.tier, label_names=m.label_names, ids=ids, labels=[m.label_names[i] for i in label_ids],
            label_ids=label_ids.tolist(), probs=out.probs.round(6).tolist(), tiers=[TIERS[t] for t in out.tiers],
            exits=out.exits.tolist(), exit_layers=[m.exit_layers[e] for e in out.exits],
            fallback=out.fallback.tolist(), errors=out.error_list(), compute_ms=compute_ms, forward_ms=forward_ms[0])

    def _forward(self, hidden, mask, layer, rest: Plan, kind, rows, ids, dtype) -> Outcome | str:
        """Ship the open rows' hidden state to the next tier: their answers, or why they could not be had."""
        from dimec.errors import TierAuthError, TierUnavailableError

        if self.forward is None:
            return f"no {TIERS[rest[0].tier]} tier configured on this {self.model.tier} (dimec serve --cloud-url)"
        sub_ids = [ids[i] for i in rows] if ids else [f"row-{i}" for i in rows]
        trimmed = [h[: int(k.sum())] for h, k in zip(hidden, mask, strict=True)]  # real tokens only
        try:
            result = self.forward.continue_hidden(trimmed, layer, self.model.model_id, sub_ids, rest, kind, dtype)
        except TierUnavailableError as exc:
            return exc.message
        except TierAuthError:  # this edge's deployment is wrong, not the request: answer here, say why
            log.error("the %s refuses this edge's --cloud-token", self.forward.name)
            return f"the {self.forward.name} refused this {self.model.tier}'s token (a deployment error): answered " \
                   f"at this {self.model.tier}'s exit"
        if list(result.label_names) != self.model.label_names:
            return f"the {self.forward.name} serves another model (labels {result.label_names})"
        return result.outcome()


class TierStages:
    """Runs a plan's stages on one tier in this process (PyTorch backend), from the hidden state after
    `layer`; keeps every row's hidden state, so the rows still open can go on (or be shipped) from it."""

    def __init__(self, model: TierModel, hidden: np.ndarray, mask: np.ndarray, layer: int) -> None:
        self.model, self.mask, self.layer = model, mask, layer
        self.hidden = hidden  # (N, T, H) float32, this runner's own copy: open rows are updated in place

    def run(self, stage: Stage, rows: np.ndarray) -> np.ndarray:
        logits, hidden = self.model.continue_from(self.hidden[rows], self.mask[rows], self.layer, stage.exit)
        self.hidden[rows] = hidden
        self.layer = self.model.exit_layers[stage.exit]
        probs = self.model.exit_probs(logits, stage.exit)  # (R, C)
        if not np.isfinite(probs).all():  # never an answer, and never forwarded on as if it were one
            raise WireError(422, NON_FINITE)
        return probs


def request_plan(raw: list[Any] | None) -> Plan | None:
    """The plan of a /v1/classify body (a list of PlanStage) as stages; a bad plan is a WireError(422)."""
    from dimec.errors import ConfigError

    if raw is None:
        return None
    try:
        return wire.plan_from_json([s.model_dump() if hasattr(s, "model_dump") else s for s in raw])
    except ConfigError as exc:
        raise WireError(422, f"'plan': {exc.message}") from None
