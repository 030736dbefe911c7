"""What the live bound is computed from: the uniform shadow sample, each policy version's evidence, and the
labels that come back as feedback.

The sample is uniform over *all* answered texts (a seeded Bernoulli(rate) draw per text, recorded): a sampled
text answered by the cloud's last exit has loss 0 for free; any other sampled text is sent to the cloud for a
shadow answer. So the mean of the recorded losses estimates the policy's live loss over all its traffic, not
only over the texts answered early.

Evidence is kept per served policy version. Disagreement comes only from shadow answers (our own cloud: it
cannot be forged by a client of the feedback endpoint). The accuracy loss, 1[cloud right] - 1[answer right],
comes from feedback labels, and only for sampled texts, each at most once: feedback's share of the evidence is
bounded by the shadow sample itself, and a label for an answer outside the sample changes nothing.
"""

from __future__ import annotations

import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from dimec.errors import ConfigError
from dimec.serving.live.bound import RECENT_WINDOW, ConfidenceSequence, Interval, RecentSequence

DEFAULT_RATE = 0.02  # shadow.rate: the share of texts shadowed (0: off)


class ShadowSampler:
    """Uniform, seeded draw per answered text; counts what was drawn, sent, shed or paused."""

    def __init__(self, rate: float = DEFAULT_RATE, seed: int = 0) -> None:
        if not 0 <= rate <= 1:
            raise ConfigError(f"shadow.rate must be in [0, 1], got {rate}", "e.g. --shadow-rate 0.02 (2%)")
        self.rate, self.seed = float(rate), seed
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.counts = {"texts": 0, "sampled": 0, "shed": 0, "paused": 0}

    def draw(self, n: int) -> list[bool]:
        """One draw per text, in order (the same seed and stream give the same sample)."""
        with self._lock:
            picks = [self._rng.random() < self.rate for _ in range(n)]
            self.counts["texts"] += n
            self.counts["sampled"] += sum(picks)
        return picks

    def count(self, what: str, n: int = 1) -> None:
        with self._lock:
            self.counts[what] = self.counts.get(what, 0) + n


@dataclass
class Evidence:
    """One policy version's live evidence."""

    version: int
    disagreement: ConfidenceSequence
    accuracy: ConfidenceSequence
    recent: RecentSequence  # the disagreement over the latest epoch of shadow answers: the drift detector
    missing: int = 0  # shadow answers that never came back (timeouts, errors, shed): not counted as agreement
    free: int = 0  # sampled texts the cloud's last exit answered itself (loss 0, no shadow request)
    started: float = field(default_factory=time.time)
    last_at: float | None = None  # when the last observation arrived

    def summary(self) -> dict:
        def interval(i: Interval) -> dict:
            return {"estimate": i.estimate, "low": i.low, "high": i.high, "n": i.n}

        return {"version": self.version, "disagreement": interval(self.disagreement.interval()),
                "accuracy_loss": interval(self.accuracy.interval()),
                "recent_disagreement": interval(self.recent.interval()) | {"epoch": self.recent.epoch},
                "missing": self.missing, "free": self.free,
                "started": self.started, "last_at": self.last_at}


class FeedbackError(Exception):
    """A feedback request refused, with its HTTP status."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


@dataclass
class Record:
    version: int
    answer: int  # label id answered
    cloud: int | None  # the cloud's label id (None: its shadow answer is missing)
    label: int | None = None  # feedback


class TokenBucket:
    """Per-key rate limit: `rate` items per second, bursts up to `burst`."""

    def __init__(self, rate: float, burst: float) -> None:
        if not rate > 0 or not burst >= 1:
            raise ConfigError(f"feedback rate limit needs rate > 0 and burst >= 1, got {rate}, {burst}")
        self.rate, self.burst = rate, burst
        self._level: dict[str, tuple[float, float]] = {}

    def take(self, key: str, n: int) -> float:
        """0 when `n` items may pass now (and takes them), else the seconds to wait."""
        now = time.monotonic()
        level, at = self._level.get(key, (self.burst, now))
        level = min(self.burst, level + (now - at) * self.rate)
        if n > level:
            self._level[key] = (level, now)
            return (n - level) / self.rate
        self._level[key] = (level - n, now)
        return 0.0


class Ledger:
    """The sampled answers (id -> version, answer, cloud answer, label), per-version evidence, feedback."""

    def __init__(self, n_labels: int, alpha: float = 0.05, max_records: int = 200_000,
                 feedback_rate: float = 50.0, feedback_burst: float = 500.0, window: int = RECENT_WINDOW) -> None:
        self.n_labels, self.alpha, self.max_records, self.window = n_labels, alpha, max_records, window
        self.records: OrderedDict[str, Record] = OrderedDict()  # bounded: the oldest are forgotten
        self.evidence: dict[int, Evidence] = {}
        self.limit = TokenBucket(feedback_rate, feedback_burst)
        self.counts = {"feedback": 0, "feedback_outside_sample": 0, "contradictions": 0, "repeats": 0,
                       "unknown_ids": 0, "rate_limited": 0}
        self._lock = threading.Lock()

    def of(self, version: int) -> Evidence:
        if version not in self.evidence:
            self.evidence[version] = Evidence(version, ConfidenceSequence(0.0, 1.0, self.alpha),
                                              ConfidenceSequence(-1.0, 1.0, self.alpha),
                                              RecentSequence(0.0, 1.0, self.alpha, self.window))
        return self.evidence[version]

    # ---- shadow answers ----------------------------------------------------------------------------------
    def shadow(self, rid: str, version: int, answer: int, cloud: int | None) -> bool:
        """A sampled text's answer and the cloud's (None: missing). False when the id is already recorded."""
        with self._lock:
            if rid in self.records:
                return False
            self.records[rid] = Record(version, answer, cloud)
            while len(self.records) > self.max_records:
                self.records.popitem(last=False)
            ev = self.of(version)
            if cloud is None:
                ev.missing += 1
            else:
                ev.disagreement.update(float(answer != cloud))
                ev.recent.update(float(answer != cloud))
                ev.last_at = time.time()
            return True

    def free(self, rid: str, version: int, answer: int) -> bool:
        """A sampled text the cloud's last exit answered: its own answer is the cloud's (loss 0)."""
        ok = self.shadow(rid, version, answer, answer)
        if ok:
            with self._lock:
                self.of(version).free += 1
        return ok

    def missed(self, version: int, n: int) -> None:
        """Shadow answers a client lost (timeouts, cloud down, shed): counted as missing, never as agreement."""
        with self._lock:
            self.of(version).missing += n

    # ---- feedback ----------------------------------------------------------------------------------------
    def feedback(self, key: str, items: list[tuple[str, int]]) -> dict:
        """Labels for earlier answers, all or nothing: the whole batch is checked before anything counts.
        422: a label out of range or an id twice in the batch; 404: an unknown id; 409: an id already
        labelled (contradicting or repeating); 429: over the per-token rate."""
        with self._lock:
            seen: set[str] = set()
            for rid, label in items:
                if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < self.n_labels:
                    raise FeedbackError(422, f"label {label!r} for id {rid!r} is out of range "
                                             f"(label ids 0..{self.n_labels - 1})")
                if rid in seen:
                    raise FeedbackError(422, f"id {rid!r} appears twice in this feedback")
                seen.add(rid)
            for rid, label in items:
                record = self.records.get(rid)
                if record is None:
                    self.counts["unknown_ids"] += 1
                    raise FeedbackError(404, f"unknown id {rid!r}: feedback counts only for answers in the shadow "
                                             "sample (answers flagged 'shadowed'), and only while they are kept")
                if record.label is not None:
                    contradicts = record.label != label
                    self.counts["contradictions" if contradicts else "repeats"] += 1
                    raise FeedbackError(409, f"id {rid!r} already has label {record.label}"
                                             + (f"; the contradicting label {label} is not counted" if contradicts
                                                else "; it is counted once"))
            wait = self.limit.take(key, len(items))
            if wait:
                self.counts["rate_limited"] += 1
                raise FeedbackError(429, f"feedback over the rate limit of {self.limit.rate:g} labels/s for this "
                                         "token", retry_after=wait)
            versions: dict[int, int] = {}
            for rid, label in items:
                record = self.records[rid]
                record.label = label
                self.counts["feedback"] += 1
                if record.cloud is None:  # no cloud answer to compare with: kept, not counted in the loss
                    self.counts["feedback_outside_sample"] += 1
                    continue
                loss = int(record.cloud == label) - int(record.answer == label)
                self.of(record.version).accuracy.update(float(loss))
                versions[record.version] = versions.get(record.version, 0) + 1
            return {"accepted": len(items), "counted": {str(v): n for v, n in versions.items()}}

    def summary(self, version: int) -> dict:
        with self._lock:
            return self.of(version).summary()
