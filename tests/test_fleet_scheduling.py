"""Sources and priorities on the server side, without a model: the sources file, the scheduler's order,
admission and shedding, and PA-MDI's allocation advice. Every wait is bounded."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time

import pytest

from dimec.config import build_config
from dimec.errors import ConfigError
from dimec.serving.servers.scheduling import Allocator, Scheduler, Shed
from dimec.serving.servers.sources import AllocationConfig, FleetConfig, SourceTable

TOKENS = {"hi": "token-high-1", "mid": "token-medium", "lo": "token-low-01", "lo2": "token-low-02"}


def fleet_config(policy: str = "strict", capacity: int = 3, **extra) -> FleetConfig:
    raw = {
        "classes": [{"name": "high", "weight": 6}, {"name": "medium", "weight": 3}, {"name": "low", "weight": 1}],
        "sources": [{"name": "hi", "token": TOKENS["hi"], "priority": "high"},
                    {"name": "mid", "token": TOKENS["mid"], "priority": "medium"},
                    {"name": "lo", "token": TOKENS["lo"], "priority": "low"},
                    {"name": "lo2", "token_sha256": hashlib.sha256(TOKENS["lo2"].encode()).hexdigest(),
                     "priority": "low"}],
        "scheduling": {"policy": policy, "queue_capacity": capacity, "workers": 1, "retry_after_s": 0.5},
        **extra,
    }
    return build_config(FleetConfig, raw)


def table(policy: str = "strict", capacity: int = 3, **extra) -> SourceTable:
    return SourceTable.from_config(fleet_config(policy, capacity, **extra))


# ---- the sources file ----------------------------------------------------------------------------------------
def test_tokens_map_to_sources_and_classes(tmp_path, monkeypatch):
    t = table()
    assert t.lookup(TOKENS["hi"]).priority == "high" and t.lookup(TOKENS["hi"]).rank == 0
    assert t.lookup(TOKENS["lo2"]).name == "lo2" and t.lookup(TOKENS["lo2"]).rank == 2
    assert t.lookup("not-a-token") is None and t.lookup("") is None
    monkeypatch.setenv("FLEET_TEST_TOKEN", "from-the-environment")
    path = tmp_path / "fleet.yaml"
    path.write_text("classes:\n  - {name: gold}\nsources:\n  - {name: a, token_env: FLEET_TEST_TOKEN, priority: gold}\n"
                    "scheduling: {policy: wfq}\n")
    loaded = SourceTable.load(path)
    assert loaded.lookup("from-the-environment").name == "a" and loaded.scheduled
    assert loaded.config.scheduling.policy == "wfq"
    single = SourceTable.single("one-token")
    assert single.lookup("one-token").name == "default" and not single.scheduled


@pytest.mark.parametrize("change, message", [
    ({"sources": [{"name": "x", "token": "abcdefghij", "priority": "gold"}]}, "unknown class 'gold'"),
    ({"sources": [{"name": "x", "token": "abcdefghij", "priority": "high"},
                  {"name": "y", "token": "abcdefghij", "priority": "low"}]}, "share a token"),
    ({"sources": [{"name": "x", "priority": "high"}]}, "exactly one of token"),
    ({"sources": [{"name": "x", "token": "short", "priority": "high"}]}, "at least 8 characters"),
    ({"sources": [{"name": "x", "token_env": "DIMEC_NO_SUCH_VARIABLE", "priority": "high"}]}, "is not set"),
    ({"sources": [{"name": "x", "token_sha256": "abc", "priority": "high"}]}, "64 hex digits"),
    ({"sources": []}, "'sources' is empty"),
    ({"scheduling": {"policy": "lifo"}}, "scheduling.policy"),
    ({"scheduling": {"queue_capacity": 0}}, r"queue_capacity must be in \[1, 10000\]"),
    ({"classes": [{"name": "high", "weight": -1}]}, "weight must be > 0"),
    ({"allocation": {"target_utilization": 1.5}}, "target_utilization"),
])
def test_bad_sources_files_are_one_clear_error(change, message):
    raw = {"classes": [{"name": "high"}, {"name": "low"}],
           "sources": [{"name": "a", "token": "abcdefghij", "priority": "high"}], **change}
    with pytest.raises(ConfigError, match=message):
        SourceTable.from_config(build_config(FleetConfig, raw))


def test_cli_refuses_a_bad_sources_file(tmp_path, capsys):
    from dimec.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("classes: [{name: a}]\nsources: [{name: s, token: abcdefghij, priority: b}]\n")
    assert main(["serve", "edge", str(tmp_path), "--sources", str(bad)]) == 2
    assert "unknown class 'b'" in capsys.readouterr().err
    bad.write_text("classes: [{name: a}]\nsources: [{name: s, tokn: abcdefghij, priority: a}]\n")
    assert main(["serve", "edge", str(tmp_path), "--sources", str(bad)]) == 2
    assert "unknown config key" in capsys.readouterr().err


# ---- the scheduler ----------------------------------------------------------------------------------------------
class Gate:
    """A work function that blocks until released, recording the order in which jobs ran."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.order: list[str] = []

    def job(self, name: str):
        def work():
            self.started.set()
            assert self.release.wait(10), "gate never released"
            self.order.append(name)
            return name
        return work


async def _submit_all(scheduler: Scheduler, t: SourceTable, gate: Gate, plan: list[tuple[str, str]]):
    """Block the worker with a first job, queue `plan` [(source, name)] in order, then release."""
    first = asyncio.ensure_future(scheduler.run(t.lookup(TOKENS["mid"]), 1, gate.job("blocker")))
    while not gate.started.is_set():
        await asyncio.sleep(0.001)
    tasks = []
    for source, name in plan:
        tasks.append(asyncio.ensure_future(scheduler.run(t.lookup(TOKENS[source]), 1, gate.job(name))))
        await asyncio.sleep(0.002)  # arrival order
    gate.release.set()
    results = await asyncio.wait_for(asyncio.gather(first, *tasks, return_exceptions=True), 10)
    return results[1:]


def run_plan(policy: str, capacity: int, plan: list[tuple[str, str]]):
    t = table(policy, capacity)
    scheduler, gate = Scheduler(t), Gate()
    try:
        results = asyncio.run(_submit_all(scheduler, t, gate, plan))
    finally:
        scheduler.close()
    return results, gate.order


def test_strict_priority_serves_higher_classes_first():
    results, order = run_plan("strict", 10, [("lo", "l1"), ("mid", "m1"), ("lo", "l2"), ("hi", "h1"), ("hi", "h2")])
    assert order == ["blocker", "h1", "h2", "m1", "l1", "l2"]
    assert all(r.value == name for r, name in zip(results, ["l1", "m1", "l2", "h1", "h2"], strict=True))
    assert all(r.queue_ms >= 0 and r.compute_ms >= 0 for r in results)


def test_fifo_serves_in_arrival_order():
    _, order = run_plan("fifo", 10, [("lo", "l1"), ("mid", "m1"), ("hi", "h1")])
    assert order == ["blocker", "l1", "m1", "h1"]


def test_wfq_shares_by_weight():
    # 6 high and 6 low waiting: weights 6:1, so high gets about six turns for each low one
    plan = [("lo", f"l{i}") for i in range(6)] + [("hi", f"h{i}") for i in range(6)]
    _, order = run_plan("wfq", 20, plan)
    served = order[1:]
    assert served.index("h5") < served.index("l2")  # all high before the third low
    assert served[0] == "l0" or served[0] == "h0"
    assert set(served) == {name for _, name in plan}


def test_full_queue_sheds_lower_classes_never_the_highest_while_lower_wait():
    plan = [("lo", "l1"), ("lo2", "l2"), ("mid", "m1"), ("hi", "h1"), ("hi", "h2"), ("hi", "h3"), ("hi", "h4")]
    results, order = run_plan("strict", 3, plan)
    outcome = {name: (r.value if not isinstance(r, Exception) else r) for (_, name), r in zip(plan, results,
                                                                                                 strict=True)}
    # capacity 3: h1 evicts the newest low (l2), h2 the other low, h3 the medium; h4 finds only high waiting
    for name in ("l1", "l2", "m1"):
        assert isinstance(outcome[name], Shed) and outcome[name].reason == "evicted"
    assert isinstance(outcome["h4"], Shed) and outcome["h4"].reason == "full"
    assert order == ["blocker", "h1", "h2", "h3"]
    assert outcome["h4"].retry_after_s == 0.5


def test_fifo_sheds_the_newcomer_whatever_its_class():
    results, order = run_plan("fifo", 2, [("lo", "l1"), ("lo", "l2"), ("hi", "h1")])
    assert isinstance(results[2], Shed) and results[2].reason == "full"
    assert order == ["blocker", "l1", "l2"]


def test_class_queue_limit_and_deadline():
    t = SourceTable.from_config(build_config(FleetConfig, {
        "classes": [{"name": "high"}, {"name": "low", "max_queue": 1}],
        "sources": [{"name": "hi", "token": TOKENS["hi"], "priority": "high"},
                    {"name": "lo", "token": TOKENS["lo"], "priority": "low"}],
        "scheduling": {"queue_capacity": 10}}))
    scheduler, gate = Scheduler(t), Gate()
    scheduler.allocator.served(1, 0.05)  # 50 ms per text, measured

    async def scenario():
        hi, lo = t.lookup(TOKENS["hi"]), t.lookup(TOKENS["lo"])
        blocker = asyncio.ensure_future(scheduler.run(hi, 1, gate.job("b")))
        while not gate.started.is_set():
            await asyncio.sleep(0.001)
        first = asyncio.ensure_future(scheduler.run(lo, 1, gate.job("l1")))
        await asyncio.sleep(0.005)
        with pytest.raises(Shed, match="class 'low' has 1 waiting"):
            await scheduler.run(lo, 1, gate.job("l2"))
        with pytest.raises(Shed, match="cannot answer within 10 ms"):  # 1 waiting + half the running one
            await scheduler.run(hi, 1, gate.job("h1"), deadline_ms=10)
        gate.release.set()
        return await asyncio.wait_for(asyncio.gather(blocker, first), 10)

    try:
        assert [d.value for d in asyncio.run(scenario())] == ["b", "l1"]
    finally:
        scheduler.close()


def test_a_failing_job_reaches_its_request_and_the_worker_lives_on():
    t = table()
    scheduler = Scheduler(t)

    def boom():
        raise ValueError("model failed")

    async def scenario():
        with pytest.raises(ValueError, match="model failed"):
            await scheduler.run(t.lookup(TOKENS["hi"]), 1, boom)
        return await asyncio.wait_for(scheduler.run(t.lookup(TOKENS["hi"]), 1, lambda: 42), 5)

    try:
        assert asyncio.run(scenario()).value == 42
    finally:
        scheduler.close()


# ---- PA-MDI allocation -------------------------------------------------------------------------------------------
def test_allocation_gives_capacity_to_higher_classes_first():
    alloc = Allocator(AllocationConfig(target_utilization=0.9, horizon_s=1.0, smoothing=0.5),
                      ["high", "medium", "low"], workers=1)
    assert alloc.advice("low")["keep_fraction"] == 0 and alloc.capacity() is None  # nothing measured yet
    alloc.served(10, 0.1)  # 10 ms per text: 100 texts/s
    assert alloc.capacity() == pytest.approx(100)
    now = 0.0
    for _ in range(3000):  # 30 s of arrivals: high 50/s, medium 30/s, low 40/s, all sent (no compliance)
        now += 0.01
        alloc.arrival("high", 1, now) if _ % 2 == 0 else None
        alloc.arrival("medium", 1, now) if _ % 10 in (1, 5, 9) else None
        alloc.arrival("low", 1, now) if _ % 10 in (2, 4, 6, 8) else None
    # offered 120/s, 90 to hand out: high gets its 50, medium its 30, low 10 of its demand
    assert alloc.keep["high"] == pytest.approx(0, abs=0.02)
    assert alloc.keep["medium"] == pytest.approx(0, abs=0.05)
    assert alloc.advice("low")["keep_fraction"] > 0.5
    assert alloc.advice("low")["capacity_texts_per_s"] == pytest.approx(100)
    disabled = Allocator(AllocationConfig(enabled=False), ["a"], 1)
    disabled.served(1, 1.0)
    for i in range(100):
        disabled.arrival("a", 10, i * 0.01)
    assert disabled.keep["a"] == 0


def test_reserved_workers_keep_room_for_the_highest_class():
    cfg = fleet_config("strict", 10)
    from dataclasses import replace

    t = SourceTable.from_config(replace(cfg, scheduling=replace(cfg.scheduling, workers=2, reserved_workers=1)))
    scheduler = Scheduler(t)
    started: list[str] = []
    release = threading.Event()

    def job(name: str):
        def work():
            started.append(name)
            assert release.wait(10)
            return name
        return work

    async def scenario():
        lo, hi = t.lookup(TOKENS["lo"]), t.lookup(TOKENS["hi"])
        tasks = [asyncio.ensure_future(scheduler.run(lo, 1, job("l1")))]
        await asyncio.sleep(0.05)
        tasks.append(asyncio.ensure_future(scheduler.run(lo, 1, job("l2"))))
        await asyncio.sleep(0.05)
        assert started == ["l1"]  # the second worker is kept for the highest class
        tasks.append(asyncio.ensure_future(scheduler.run(hi, 1, job("h1"))))
        deadline = time.monotonic() + 5
        while len(started) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert started == ["l1", "h1"]  # a high request starts at once, beside the running low one
        release.set()
        return [d.value for d in await asyncio.wait_for(asyncio.gather(*tasks), 10)]

    try:
        assert asyncio.run(scenario()) == ["l1", "l2", "h1"]
    finally:
        scheduler.close()
    with pytest.raises(ConfigError, match="reserved_workers"):
        SourceTable.from_config(replace(cfg, scheduling=replace(cfg.scheduling, workers=2, reserved_workers=2)))
