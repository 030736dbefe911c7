"""The torch-free runtime: the one plan executor and the one stop rule, shared by the offline evaluation
(vectorised), `dimec route`, the phone client and the edge and cloud servers."""

from __future__ import annotations

import numpy as np
import pytest

from dimec.errors import DataError
from dimec.runtime.executor import Outcome, run_plan
from dimec.runtime.plans import Stage, check_plan, confidence, softmax, stop_stages, stops
from dimec.textinput import check_batch
from dimec.tiers import CLOUD, EDGE, MOBILE

CASCADE = check_plan((Stage(MOBILE, 0, 0.8), Stage(EDGE, 1, 0.7), Stage(CLOUD, 2)))


def random_probs(n: int, classes: int, seed: int = 0) -> np.ndarray:
    """(N, 3, C) probabilities at exits m, n, l, from spread logits."""
    rng = np.random.default_rng(seed)
    return softmax(rng.normal(0, 2, (n, 3, classes)))


@pytest.mark.parametrize("kind, classes", [("max_prob", 2), ("entropy", 3), ("max_prob", 4)])
def test_the_executor_stops_where_the_offline_evaluation_does(kind, classes):
    probs = random_probs(200, classes)
    conf = confidence(probs, kind)  # (N, 3)
    t_m, t_n = np.quantile(conf[:, 0], 0.6), np.quantile(conf[:, 1], 0.5)
    plan = check_plan((Stage(MOBILE, 0, float(t_m)), Stage(EDGE, 1, float(t_n)), Stage(CLOUD, 2)))

    def run_stage(stage, rows):
        return probs[rows, stage.exit]

    out = run_plan(plan, len(probs), classes, {MOBILE, EDGE, CLOUD}, run_stage, kind)
    offline = stop_stages(conf, plan)  # the vectorised rule routing/plan.py evaluates with
    assert out.exits.tolist() == [plan[s].exit for s in offline]
    assert out.tiers.tolist() == [plan[s].tier for s in offline]
    assert np.array_equal(out.probs, probs[np.arange(len(probs)), out.exits])
    assert not out.fallback.any() and 0 < (offline == 0).sum() < len(probs)


def test_the_rest_of_a_plan_is_handed_on_and_a_failed_handoff_answers_here():
    probs = random_probs(50, 2, seed=1)
    here = {MOBILE}
    sent = []

    def handoff(rest, rows):
        sent.append((rest, rows.copy()))
        n = len(rows)
        return Outcome(np.full((n, 2), 0.5), np.full(n, 2), np.full(n, CLOUD), np.zeros(n, bool), np.zeros(n, bool),
                       [[] for _ in range(n)])

    out = run_plan(CASCADE, 50, 2, here, lambda s, rows: probs[rows, s.exit], "max_prob", handoff)
    shipped = np.flatnonzero(probs[:, 0].max(-1) < 0.8)
    assert len(sent) == 1 and sent[0][0] == CASCADE[1:] and sent[0][1].tolist() == shipped.tolist()
    assert (out.tiers[shipped] == CLOUD).all() and (out.tiers[np.setdiff1d(np.arange(50), shipped)] == MOBILE).all()

    failed = run_plan(CASCADE, 50, 2, here, lambda s, rows: probs[rows, s.exit], "max_prob", lambda r, rows: "down")
    assert failed.fallback[shipped].all() and (failed.tiers == MOBILE).all() and (failed.exits == 0).all()
    assert failed.errors[shipped[0]] == ["down"] and failed.error_list() == ["down"]
    assert np.array_equal(failed.probs, probs[:, 0])  # answered at the last stage run here


def test_also_stop_and_the_last_stage():
    probs = random_probs(20, 2, seed=2)
    never = check_plan((Stage(MOBILE, 0, 2.0), Stage(EDGE, 1)))  # no confidence reaches 2
    everyone = run_plan(never, 20, 2, {MOBILE, EDGE}, lambda s, rows: probs[rows, s.exit], "max_prob",
                        also_stop=lambda stage, p: np.ones(len(p), bool))
    assert (everyone.exits == 0).all()
    assert stops(probs[:, 1], never[-1], "entropy").all()  # the last stage always answers


def test_text_batches_are_checked_in_one_place():
    assert check_batch(("a", "b"), ["c", "d"], [1, 2]) == (["a", "b"], ["c", "d"], ["1", "2"])
    for args, message in [(("good",), "one string"), (([],), "empty"), ((["a", " "],), "text 2 is empty"),
                          ((["a"], ["b", "c"]), "text pairs"), ((["a", "b"], None, ["x", "x"]), "unique")]:
        with pytest.raises(DataError, match=message):
            check_batch(*args)
    with pytest.raises(DataError, match="over the limit of 1"):
        check_batch(["a", "b"], max_batch=1)
    assert check_batch(["a", "b"], None, ["x", "x"], unique_ids=False)[2] == ["x", "x"]


def test_importing_the_phone_client_loads_no_router_model_code_or_torch():
    import json
    import subprocess
    import sys

    code = ("import sys, json; import dimec.serving.phone.client; "
            "print(json.dumps([sorted(m for m in sys.modules if m.startswith('dimec')), 'torch' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    loaded, torch_loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert not torch_loaded
    assert not [m for m in loaded if m.split(".")[1:2] and m.split(".")[1] in
                ("routing", "modeling", "training", "data", "pipeline", "experiments", "outputs")], loaded
