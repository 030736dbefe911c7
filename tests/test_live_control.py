"""Live control without servers (docs/live-control.md): the betting confidence sequence, the shadow sample,
the feedback store's refusals, the controller's steps along the calibrated path, versioning and persistence."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from dimec.errors import ConfigError
from dimec.routing.targets import betting_p_value
from dimec.serving.live.bound import ConfidenceSequence, RecentSequence
from dimec.serving.live.controller import (
    Controller,
    LiveControl,
    LiveSettings,
    Step,
    etag,
    path_steps,
    status_line,
)
from dimec.serving.live.ledger import FeedbackError, Ledger, ShadowSampler, TokenBucket


# ---- the confidence sequence ---------------------------------------------------------------------------------
def test_sequence_covers_the_mean_at_every_time():
    """Anytime coverage: over 120 streams, the mean leaves the sequence (at any of 25 looks) in at most ~alpha."""
    rng = np.random.default_rng(0)
    misses = 0
    for _ in range(120):
        cs, missed = ConfidenceSequence(0.0, 1.0, alpha=0.1), False
        for t, x in enumerate(rng.random(500) < 0.03):
            cs.update(float(x))
            if t % 20 == 19:
                i = cs.interval()
                missed |= not i.low <= 0.03 <= i.high
        misses += missed
    assert misses / 120 <= 0.1


def test_sequence_narrows_and_separates_rates():
    rng = np.random.default_rng(1)
    low, high = ConfidenceSequence(), ConfidenceSequence()
    low.extend(rng.random(1500) < 0.005)
    high.extend(rng.random(1500) < 0.08)
    assert low.interval().high < high.interval().low  # 0.5% and 8% told apart
    assert high.interval().high - high.interval().low < 0.06


def test_accuracy_loss_sequence_reads_minus_one_to_one():
    cs = ConfidenceSequence(-1.0, 1.0)
    cs.extend([-1, 0, 1, 0, 0] * 200)
    i = cs.interval()
    assert i.low < 0 < i.high and i.estimate == 0
    with pytest.raises(ValueError):
        cs.update(2.0)


def test_sequence_before_any_observation_is_the_whole_range():
    i = ConfidenceSequence().interval()
    assert (i.low, i.high, i.n, i.estimate) == (0.0, 1.0, 0, None)
    with pytest.raises(ConfigError):
        ConfidenceSequence(alpha=0)


def test_betting_p_value_unchanged_by_the_shared_bet():
    """The refactor into betting_moments/kelly_bet keeps Learn-then-Test's p-values."""
    x = np.array([0, 0, 1, 0, -1, 0, 0, 0, 1, 0] * 50, dtype=float)
    assert betting_p_value(x, 0.2, 3) < 0.01
    assert betting_p_value(x, 0.0, 3) == 1.0


# ---- the sample -------------------------------------------------------------------------------------------------
def test_sampler_is_uniform_seeded_and_recorded():
    a, b = ShadowSampler(0.1, seed=7), ShadowSampler(0.1, seed=7)
    picks = a.draw(20_000)
    assert picks == b.draw(20_000)
    assert 0.09 < sum(picks) / len(picks) < 0.11
    assert a.counts["texts"] == 20_000 and a.counts["sampled"] == sum(picks)
    assert not any(ShadowSampler(0.0).draw(1000))
    with pytest.raises(ConfigError):
        ShadowSampler(1.5)


# ---- the feedback store -----------------------------------------------------------------------------------------
def ledger_with(n: int = 10, version: int = 1) -> Ledger:
    ledger = Ledger(n_labels=2, feedback_rate=1000, feedback_burst=1000)
    for i in range(n):
        ledger.shadow(f"id{i}", version, answer=i % 2, cloud=0)  # odd ids disagree with the cloud
    return ledger


def test_feedback_counts_once_and_refuses_bad_input():
    ledger = ledger_with()
    out = ledger.feedback("tok", [("id0", 0), ("id1", 0)])
    assert out["accepted"] == 2 and out["counted"] == {"1": 2}
    assert ledger.of(1).accuracy.n == 2
    cases = [([("nope", 0)], 404, "unknown id"), ([("id0", 0)], 409, "already has label"),
             ([("id1", 1)], 409, "contradicting"), ([("id2", 2)], 422, "out of range"),
             ([("id2", -1)], 422, "out of range"), ([("id2", True)], 422, "out of range"),
             ([("id2", 0), ("id2", 0)], 422, "twice")]
    for items, status, words in cases:
        with pytest.raises(FeedbackError) as err:
            ledger.feedback("tok", items)
        assert err.value.status == status and words in err.value.message
    assert ledger.of(1).accuracy.n == 2  # nothing counted by any refusal
    assert ledger.counts["contradictions"] == 1 and ledger.counts["repeats"] == 1


def test_feedback_batch_is_all_or_nothing():
    ledger = ledger_with()
    with pytest.raises(FeedbackError):
        ledger.feedback("tok", [("id3", 1), ("unknown", 1)])
    assert ledger.records["id3"].label is None
    assert ledger.feedback("tok", [("id3", 1)])["accepted"] == 1


def test_feedback_for_another_version_counts_for_that_version():
    ledger = ledger_with(4, version=1)
    ledger.shadow("new", 2, 0, 0)
    out = ledger.feedback("tok", [("id1", 1), ("new", 0)])
    assert out["counted"] == {"1": 1, "2": 1}
    assert ledger.of(1).accuracy.n == 1 and ledger.of(2).accuracy.n == 1


def test_feedback_rate_limit_per_token():
    ledger = Ledger(2, feedback_rate=1.0, feedback_burst=3)
    for i in range(10):
        ledger.shadow(f"x{i}", 1, 0, 0)
    ledger.feedback("a", [("x0", 0), ("x1", 0), ("x2", 0)])
    with pytest.raises(FeedbackError) as err:
        ledger.feedback("a", [("x3", 0)])
    assert err.value.status == 429 and err.value.retry_after > 0
    assert ledger.feedback("b", [("x3", 0)])["accepted"] == 1  # another token has its own budget
    assert ledger.records["x4"].label is None


def test_token_bucket_refills():
    bucket = TokenBucket(rate=1000, burst=1)
    assert bucket.take("k", 1) == 0
    assert bucket.take("k", 5) > 0


def test_missing_shadow_answers_are_not_agreement():
    ledger = Ledger(2)
    ledger.shadow("a", 1, 0, None)
    ledger.missed(1, 3)
    ev = ledger.of(1)
    assert ev.missing == 4 and ev.disagreement.n == 0
    assert not ledger.shadow("a", 1, 0, 0)  # an id is recorded once


# ---- the controller ---------------------------------------------------------------------------------------------
def steps(k: int = 4) -> list[Step]:
    """A path of k steps: step 0 cloud-only, each further step cheaper and disagreeing more on validation."""
    return [Step(f"step{j}", {"plans": [[["cloud", 2, None]]], "confidence": "max_prob", "prerouter": None},
                 val_disagreement_pt=0.5 * j, val_accuracy_loss_pt=0.0, val_cost=1.0 - 0.1 * j, budget=0.02)
            for j in range(k)]


def feed(control: LiveControl, rate: float, n: int, rng, prefix: str) -> None:
    for i in range(n):
        v = control.controller.version
        disagree = rng.random() < rate
        control.record([{"id": f"{prefix}{i}", "version": v, "label_id": int(disagree)}], {f"{prefix}{i}": 0})


def test_controller_steps_safer_on_drift_and_back_when_it_passes():
    rng = np.random.default_rng(0)
    settings = LiveSettings(patience=300)
    control = LiveControl(Controller(steps(), eps=0.02, settings=settings), n_labels=2, settings=settings)
    feed(control, 0.005, 1500, rng, "calm")  # in domain: well within the 2% budget
    assert control.controller.version == 1 and control.controller.step == 3
    for i in range(600):  # drift: 10% disagreement, except on cloud-only (step 0), which answers as the cloud
        feed(control, 0.10 if control.controller.step > 0 else 0.0, 1, rng, f"drift{i}-")
    assert control.controller.step < 3
    moved = control.controller.history
    assert all(e["direction"] == "safer" and e["from_step"] - e["to_step"] == 1 for e in moved)
    evidence = moved[0]["evidence"]
    assert max(evidence["disagreement"]["low"], evidence["recent_disagreement"]["low"]) > 0.02
    low_step = control.controller.step
    feed(control, 0.0, 3000, rng, "calm2")  # the drift passes: back, one step at a time
    assert control.controller.step > low_step
    assert [e["version"] for e in control.controller.history] == list(range(2, control.controller.version + 1))


def test_a_drift_after_a_long_quiet_history_is_caught_by_the_recent_window():
    """The version's sequence covers the mean since the version started: 6,000 quiet answers dilute a drift to
    8% for long. The recent epoch's sequence catches it within a few hundred answers; with a window as long as
    the stream (the recent sequence never restarts) the same drift goes unnoticed over that span."""
    def first_move(window: int) -> int | None:
        rng = np.random.default_rng(5)
        settings = LiveSettings(window=window)
        control = LiveControl(Controller(steps(), eps=0.02, settings=settings), n_labels=2, settings=settings)
        feed(control, 0.002, 6000, rng, "calm")
        assert control.controller.version == 1  # no change in domain
        for i in range(600):
            feed(control, 0.08, 1, rng, f"drift{i}-")
            if control.controller.version > 1:
                return i + 1
        return None

    caught = first_move(window=200)
    assert caught is not None and caught <= 400
    assert first_move(window=10**9) is None


def test_recent_sequence_restarts_each_epoch():
    seq = RecentSequence(0.0, 1.0, 0.05, window=50)
    for _ in range(120):
        seq.update(0.0)
    assert seq.epoch == 3 and seq.current.n == 20  # epochs of 50: 50 + 50 + 20
    for _ in range(30):
        seq.update(1.0)
    assert seq.interval().low > 0.3  # the current epoch alone: 30 of 50 disagree
    with pytest.raises(ConfigError):
        RecentSequence(window=0)


def test_no_change_in_domain_and_never_off_the_path():
    rng = np.random.default_rng(2)
    control = LiveControl(Controller(steps(3), eps=0.02), n_labels=2)
    feed(control, 0.01, 2000, rng, "a")
    assert control.controller.version == 1 and control.controller.step == 2  # the calibrated choice is the end
    feed(control, 1.0, 2000, rng, "b")  # everything disagrees: down to cloud-only, and no further
    assert control.controller.step == 0


def test_a_flood_of_false_feedback_cannot_make_the_policy_cheaper():
    """Labels that claim every answer right and the cloud wrong: feedback never votes for a cheaper step,
    counts only for sampled answers, once each, and the controller stays on the path."""
    rng = np.random.default_rng(3)
    settings = LiveSettings(feedback_rate=1e6, feedback_burst=1e6, patience=200)
    control = LiveControl(Controller(steps(), eps=0.02, settings=settings), n_labels=2, settings=settings)
    feed(control, 0.2, 400, rng, "d")  # drift walks it to the safe end
    assert control.controller.step == 0
    ids = list(control.ledger.records)
    control.feedback("attacker", [(rid, control.ledger.records[rid].answer) for rid in ids])  # "answers were right"
    for _ in range(5):  # repeats are refused: nothing counted twice
        with pytest.raises(FeedbackError):
            control.feedback("attacker", [(ids[0], 1)])
    with pytest.raises(FeedbackError):
        control.feedback("attacker", [(f"fake{i}", 0) for i in range(100)])  # ids outside the sample
    assert control.controller.step == 0  # feedback alone never steps back
    assert sum(ev.accuracy.n for ev in control.ledger.evidence.values()) <= len(ids)


def test_true_feedback_makes_it_safer_where_disagreement_alone_would_not():
    """An accuracy promise: the step's disagreement budget (7%) holds, but the labels show every disagreement
    is an error the policy adds (accuracy loss ~6% > eps 2%): feedback moves it one step safer."""
    rng = np.random.default_rng(4)
    settings = LiveSettings(min_evidence=20, feedback_burst=1000)
    path = [replace(s, budget=0.07) for s in steps()]
    control = LiveControl(Controller(path, eps=0.02, settings=settings), n_labels=2, settings=settings)
    feed(control, 0.06, 600, rng, "s")
    assert control.controller.version == 1
    items = [(rid, r.cloud) for rid, r in control.ledger.records.items()]  # the cloud was right every time
    control.feedback("user", items)
    moves = control.controller.history
    assert len(moves) == 1 and moves[0]["direction"] == "safer" and "feedback" in moves[0]["reason"]


def test_changes_are_versioned_logged_and_persisted_atomically(tmp_path):
    router = tmp_path / "router.json"
    path = [{"family": "cloud-only", "describe": "cloud@l", "state": {"plans": [[["cloud", 2, None]]],
             "confidence": "max_prob", "prerouter": None}, "val_disagreement_pt": 0.0, "val_accuracy_loss_pt": 0.0,
             "val_cost": 0.15},
            {"family": "cascade", "describe": "mobile@m>=0.9 -> cloud@l",
             "state": {"plans": [[["mobile", 0, 0.9], ["cloud", 2, None]]], "confidence": "max_prob",
                       "prerouter": None}, "val_disagreement_pt": 1.0, "val_accuracy_loss_pt": 0.3, "val_cost": 0.1}]
    raw = {"format_version": 2, "router": "auto", "params": {"calibration": {"max_loss": 0.5, "loss": "accuracy"}},
           "state": {**path[1]["state"], "path": path}, "cost_model": {}}
    router.write_text(json.dumps(raw))
    control = LiveControl.from_router_file(router, n_labels=2, settings=LiveSettings(min_evidence=5))
    assert control.controller.step == 1 and control.controller.steps[1].budget == pytest.approx(0.01 + 0.002)
    before = control.controller.policy()
    feed(control, 1.0, 50, np.random.default_rng(0), "x")
    after = control.controller.policy()
    assert after["version"] == 2 and after["step"] == 0 and after["etag"] != before["etag"]
    saved = json.loads(router.read_text())
    assert saved["state"]["plans"] == [[["cloud", 2, None]]] and saved["live"]["version"] == 2
    assert saved["live"]["log"][0]["reason"].startswith("live disagreement lower bound")
    assert saved["state"]["path"] == path  # the path itself is never rewritten
    assert not list(tmp_path.glob(".router.json.*"))  # no temporary left behind
    again = LiveControl.from_router_file(router, 2)  # a restarted server continues from the saved state
    assert again.controller.version == 2 and again.controller.step == 0
    assert etag(again.controller.policy()) == after["etag"]


def test_budget_calibrated_policy_is_refused_and_old_router_has_one_step():
    with pytest.raises(ConfigError):
        Controller.from_router({"params": {"calibration": {"max_loss": None, "budget": 0.1}}, "state": {}})
    ctl = Controller.from_router({"params": {"calibration": {"max_loss": 0.5, "loss": "disagreement"}},
                                  "state": {"plans": [[["cloud", 2, None]]], "confidence": "max_prob"}})
    assert len(ctl.steps) == 1 and ctl.steps[0].budget == 0.005
    assert path_steps({"state": {}}, 0.01, "disagreement")[0].budget == 0.01


def test_settings_are_checked():
    for bad in ({"shadow_rate": -0.1}, {"alpha": 1.0}, {"patience": 0}, {"shadow_timeout_s": 0}):
        with pytest.raises(ConfigError):
            LiveSettings(**bad).check()


def test_status_line_says_ok_at_risk_broken_and_stale():
    control = LiveControl(Controller(steps(2), eps=0.005, settings=LiveSettings(enabled=False)), n_labels=2)
    assert "NO EVIDENCE" in status_line(control.status())
    feed(control, 0.0, 3000, np.random.default_rng(0), "ok")
    line = status_line(control.status())
    assert "over 3,000 shadowed texts" in line and line.endswith(": OK")
    control2 = LiveControl(Controller(steps(2), eps=0.005, settings=LiveSettings(enabled=False)), n_labels=2)
    feed(control2, 0.2, 300, np.random.default_rng(0), "bad")
    assert "BROKEN" in status_line(control2.status())
    control3 = LiveControl(Controller(steps(2), eps=0.005, settings=LiveSettings(enabled=False)), n_labels=2)
    feed(control3, 0.0, 50, np.random.default_rng(0), "few")
    control3.ledger.missed(1, 7)
    status = control3.status()
    assert "AT RISK" in status_line(status) and "7 shadow answers missing" in status_line(status)
    status["now"] += 120
    assert "shadowing paused" in status_line(status)


def test_cli_options(tmp_path):
    from dimec.cli import build_parser
    from dimec.serving.live import cli as live_cli

    parser = build_parser()
    args = parser.parse_args(["serve", "edge", "pkg", "--live", str(tmp_path)])
    with pytest.raises(ConfigError, match="cloud tier"):
        live_cli.live_from_args(args)
    args = parser.parse_args(["client", "pkg", "--cloud-url", "http://127.0.0.1:1", "--shadow-rate", "0.1"])
    assert live_cli.settings_from_args(args).shadow_rate == 0.1 and not args.no_follow_policy
    assert live_cli.settings_from_args(parser.parse_args(["client", "pkg"])).shadow_rate == 0.02  # not given
    with pytest.raises(ConfigError, match=r"live.shadow_rate must be in \[0, 1\], got 1.5"):  # the declaration's check
        live_cli.settings_from_args(parser.parse_args(["client", "pkg", "--shadow-rate", "1.5"]))
    router = tmp_path / "router.json"
    router.write_text(json.dumps({"params": {"calibration": {"max_loss": 1.0, "loss": "disagreement"}},
                                  "state": {"plans": [[["cloud", 2, None]]], "confidence": "max_prob"}}))
    args = parser.parse_args(["serve", "cloud", "pkg", "--live", str(tmp_path), "--live-observe-only"])
    live = live_cli.live_from_args(args)
    assert live.controller.eps == 0.01 and not live.settings.enabled
