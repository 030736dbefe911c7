"""The one plan executor: given a plan, a batch and a way to run stages here and hand the rest on, run the
stages and apply the stop rule (plans.stops). `dimec route` (every stage in one process), the phone client
(its mobile stage, then the edge or cloud), the edge (its stages, then the cloud) and the cloud all run
their plans through `run_plan`; only how a stage runs and where the rest goes differ:

    run_stage(stage, rows)   -> (R, C) the exit's probabilities for the open rows, computed in this process
                                (the runner keeps the hidden state of the rows between stages)
    handoff(rest, rows)      -> an Outcome for those rows from wherever the rest of the plan runs, or an
                                error text: the rows are then answered at the last stage run here, marked
                                `fallback` (nothing is lost)

Torch-free: the runners bring the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dimec.errors import DimecError
from dimec.runtime.plans import Plan, Stage, stops


@dataclass
class Outcome:
    """Per sample: the probabilities that answered, which exit of which tier gave them, and what went wrong."""

    probs: np.ndarray  # (N, C)
    exits: np.ndarray  # (N,) 0: m, 1: n, 2: l
    tiers: np.ndarray  # (N,) the tier whose exit answered
    fallback: np.ndarray  # (N,) bool: answered by another tier than the plan said, because one failed
    degraded: np.ndarray  # (N,) bool: every remote tier failed; answered on the device
    errors: list[list[str]] = field(default_factory=list)  # per sample: why a fallback happened

    @classmethod
    def empty(cls, n: int, classes: int) -> Outcome:
        return cls(np.zeros((n, classes)), np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, bool),
                   np.zeros(n, bool), [[] for _ in range(n)])

    def __len__(self) -> int:
        return len(self.exits)

    def put(self, rows: np.ndarray, other: Outcome) -> None:
        """Take `other`'s answers (one per row, in order) for `rows`."""
        self.probs[rows], self.exits[rows], self.tiers[rows] = other.probs, other.exits, other.tiers
        self.fallback[rows], self.degraded[rows] = other.fallback, other.degraded
        for j, i in enumerate(rows):
            self.errors[i] = list(other.errors[j])

    def error_list(self) -> list[str]:
        """Every distinct error, sorted (one list for a whole answer)."""
        return sorted({e for row in self.errors for e in row})


RunStage = Callable[[Stage, np.ndarray], np.ndarray]
Handoff = Callable[[Plan, np.ndarray], "Outcome | str"]
AlsoStop = Callable[[Stage, np.ndarray], np.ndarray]


def run_plan(plan: Plan, n: int, classes: int, here: frozenset[int] | set[int], run_stage: RunStage, kind: str,
             handoff: Handoff | None = None, also_stop: AlsoStop | None = None) -> Outcome:
    """Run `plan` on n samples: its leading stages on the tiers in `here` with `run_stage`, the rest (if any
    sample is still open) through `handoff`. `kind`: what thresholds read ("max_prob" or "entropy").
    `also_stop(stage, probs)` may stop more samples at a stage (the phone under the edge's advice)."""
    out = Outcome.empty(n, classes)
    open_rows = np.arange(n)
    ran = 0
    for stage in plan:
        if stage.tier not in here or not len(open_rows):
            break
        probs = run_stage(stage, open_rows)  # (R, C)
        out.probs[open_rows], out.exits[open_rows], out.tiers[open_rows] = probs, stage.exit, stage.tier
        stop = stops(probs, stage, kind)
        if also_stop is not None:
            stop |= also_stop(stage, probs)
        open_rows, ran = open_rows[~stop], ran + 1
    rest = plan[ran:]
    if len(open_rows) and rest:
        if handoff is None:
            raise DimecError(f"internal error: no way to run the stages after {ran} here")
        result = handoff(rest, open_rows)
        if isinstance(result, str):  # the next tier failed: the last stage run here answers
            if not ran:
                raise DimecError(f"internal error: the plan's first tier failed ({result}) and nothing ran here")
            out.fallback[open_rows] = True
            for i in open_rows:
                out.errors[i].append(result)
        else:
            out.put(open_rows, result)
    return out
