"""A tier's requests as batcher items, and the batched forward pass that answers them (batcher.py).

Two kinds of request share forward passes, each only with its own kind (every request is a plan: the one
it carries, or the tier's own one-stage plan, continuation.py):

    ("plan", plan, confidence, pairs?)           POST /v1/classify: one PlanRunner.classify call
    ("continue", layer, plan, confidence, dtype) POST /v1/continue: the hidden states padded to the widest,
                                                 one PlanRunner pass from layer k

Request ids are replaced by unique batch ids while the batch runs (two clients may both send id "a", and a
plan that goes on to the cloud ships ids with the hidden states), then each answer gets its own ids back.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from typing import Any

import numpy as np

from dimec.runtime.wire import HiddenState, WireError
from dimec.serving.servers.batcher import Batcher, BatchingConfig, BatchRefused, Item
from dimec.serving.servers.continuation import request_plan


class TierBatcher:
    """Items for a tier service's requests, and `run` for its Batcher."""

    def __init__(self, service, config: BatchingConfig, on_shed=None) -> None:
        self.service = service
        self.batcher = Batcher(self.run, config, on_shed)

    # ---- items ---------------------------------------------------------------------------------------------------
    def classify_item(self, body, texts: list[str], pairs: list[str] | None, rank: int = 0,
                      deadline_ms: float | None = None) -> Item:
        length = max(len(t) for t in [*texts, *(pairs or [])])
        try:  # a plan this tier cannot run is refused before it waits
            plan = self.service.plans.check_here(request_plan(body.plan) or self.service.plans.own_plan(), 0)
        except WireError as exc:
            raise BatchRefused(exc.status, exc.message) from None
        key: Hashable = ("plan", plan, body.confidence, pairs is not None)
        return Item(key, (body, texts, pairs), len(texts), length, rank, _deadline(deadline_ms))

    def continue_item(self, state: HiddenState, rank: int = 0) -> Item:
        plan = state.plan or self.service.plans.own_plan()
        key = ("continue", state.layer, plan, state.confidence, str(state.hidden.dtype))
        return Item(key, state, len(state), state.hidden.shape[1], rank)

    async def submit(self, item: Item):
        return await self.batcher.submit(item)

    def close(self) -> None:
        self.batcher.close()

    # ---- the batched forward pass (the batcher's thread) ----------------------------------------------------------
    def run(self, key: Hashable, payloads: list[Any]) -> list[Any]:
        try:
            if key[0] == "plan":
                return self._plan(key, payloads)
            return self._continue(key, payloads)
        except WireError as exc:  # a plan this tier cannot run: the request's fault, 4xx
            raise BatchRefused(exc.status, exc.message) from None

    def _plan(self, key: Hashable, payloads: list[Any]) -> list[Any]:
        _, plan, kind, _ = key
        texts = [t for _, ts, _ in payloads for t in ts]
        pairs = None if payloads[0][2] is None else [p for _, _, ps in payloads for p in ps]
        answer = self.service.plans.classify(texts, pairs, _batch_ids(len(texts)), plan, kind)
        return _split(answer, [(body.ids, len(ts)) for body, ts, _ in payloads])

    def _continue(self, key: Hashable, states: list[HiddenState]) -> list[Any]:
        _, layer, plan, kind, _ = key
        width = max(s.hidden.shape[1] for s in states)
        n, size = sum(len(s) for s in states), states[0].hidden.shape[2]
        hidden = np.zeros((n, width, size), dtype=np.float32)  # (N, T, H), zero past each row's own length
        mask = np.zeros((n, width), dtype=np.int64)  # (N, T)
        row = 0
        for s in states:
            b, t, _ = s.hidden.shape
            hidden[row : row + b, :t] = s.hidden
            mask[row : row + b, :t] = s.attention_mask
            row += b
        answer = self.service.plans._run(hidden, mask, layer, plan, kind, _batch_ids(n), states[0].hidden.dtype)
        return _split(answer, [(s.ids, len(s)) for s in states])


def _deadline(deadline_ms: float | None) -> float | None:
    return None if deadline_ms is None else time.monotonic() + deadline_ms / 1e3


def _batch_ids(n: int) -> list[str]:
    return [f"batch-{i}" for i in range(n)]


PER_SAMPLE = ("labels", "label_ids", "probs", "tiers", "exits", "exit_layers", "fallback")


def _split(answer, parts: list[tuple[list[str] | None, int]]) -> list[Any]:
    """One PlanAnswer per request from the batch's: its rows, its own ids; the batch's times and errors."""
    out, row = [], 0
    for ids, n in parts:
        update = {name: getattr(answer, name)[row : row + n] for name in PER_SAMPLE}
        out.append(answer.model_copy(update={**update, "ids": ids}, deep=True))
        row += n
    return out
