"""Routing that wins (issue 8): the calibrated default policy (`auto`) against every baseline, on the runs
of a reproduction, from their cached exit outputs (no training here).

    python benchmarks/bench_routing.py [--out results/reproduce] [--splits 50]

Per task: every method fitted on validation and scored on test (95% paired bootstrap intervals against
cloud-only); auto at --max-loss 0.5 as a point estimate (plain, and with a margin of one standard error), with a guarantee (--delta 0.1; binomial and
betting p-values) and label-free (disagreement with the cloud exit); the violation share of each mode over
random re-splits of validation + test; the pre-routers' AUC and pool accuracy. Writes
benchmarks/results/routing.json and the BENCHMARKS.md section.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report import markdown_table, save  # noqa: E402

COMMAND = "python benchmarks/bench_routing.py --out results/reproduce"
BASELINES = ("mobile-only", "edge-only", "random", "deebert", "adaee", "isplitee", "knn", "dimec-fixed",
             "dimec-dynamic")
OURS = ("cascade", "edge-cascade", "cloud-early-exit", "hybrid-centroid", "hybrid-learned")
MAX_LOSS, DELTA = 0.5, 0.1
HEADLINE_TASKS = ("sst2", "rotten_tomatoes")  # the paper's >= 43% cut at <= 0.5 pt, asked of auto here
HEADLINE_CUT = 43.0


def modes(cal):
    """auto's calibration modes, each a CalibrationConfig."""
    return {"point": replace(cal, max_loss=MAX_LOSS, delta=None),
            "point + 1 SE": replace(cal, max_loss=MAX_LOSS, delta=None, point_margin=1.0),
            "guarantee (binomial)": replace(cal, max_loss=MAX_LOSS, delta=DELTA, guarantee_test="binomial"),
            "guarantee (betting)": replace(cal, max_loss=MAX_LOSS, delta=DELTA, guarantee_test="betting"),
            "label-free guarantee": replace(cal, max_loss=MAX_LOSS, delta=DELTA, loss="disagreement")}


def bench_task(run_dir: Path, splits: int) -> dict:
    from dimec.evaluation import evaluate_methods
    from dimec.experiments.compare import compare_methods
    from dimec.experiments.resplits import prerouter_diagnostics, resplit_check
    from dimec.pipeline import (
        load_cartography,
        load_cost_model,
        load_saved_config,
        split_outputs,
        training_signal,
    )
    from dimec.routing.auto import AutoRouter
    from dimec.rundir import RunDir

    cfg = load_saved_config(run_dir)
    cal, metric = cfg.calibration, __import__("json").loads(RunDir(run_dir).data.read_text())["metric"]
    val, test = split_outputs(run_dir, "validation"), split_outputs(run_dir, "test")
    carto, cm, train = load_cartography(run_dir, cal), load_cost_model(run_dir, cfg.cost), training_signal(run_dir, cfg)
    t0 = time.perf_counter()
    rows = compare_methods(val, test, cm, carto, metric, replace(cal, max_loss=MAX_LOSS, delta=None),
                           ("cloud-only", *BASELINES, *OURS, "oracle"), seeds=(0, 1, 2), train=train)
    methods = {r["method"]: _flat(r, cm) for r in rows}
    auto = {}
    for mode, mode_cal in modes(cal).items():
        router = AutoRouter.from_config(mode_cal).fit(val, cm, carto, train)
        result = evaluate_methods({"auto": router}, test, cm, metric)[0]
        check = resplit_check(val, test, cm, mode_cal, train, splits=splits, seed=cal.seed)
        auto[mode] = {**_result(result), "winner": router.winner_, "describe": router.describe(),
                      "how": router.how_, "families": router.summary_, "resplits": check.to_dict()}
    return {"run_dir": str(run_dir), "metric": metric, "sizes": {"validation": len(val), "test": len(test),
            "training_signal": None if train is None else len(train.lengths)},
            "cost_model": cm.to_dict(), "methods": methods, "auto": auto,
            "prerouters": prerouter_diagnostics(val, carto, train, cm, cal), "seconds": time.perf_counter() - t0}


def _result(r) -> dict:
    return {"accuracy": r.accuracy, "metrics": r.metrics, "accuracy_change_pt": r.accuracy_change_pt.to_dict(),
            "cost_change_pct": r.cost_change.to_dict(), "tier_shares": list(r.tier_shares),
            "oracle_share": r.oracle_share}


def _flat(row: dict, cm) -> dict:
    if "skipped" in row:
        return {"skipped": row["skipped"]}
    m = row["mean"]
    return {"accuracy": m["accuracy"], "metrics": m["metrics"], "runs": m["runs"],
            "accuracy_change_pt": row["ci"]["accuracy_change_pt"], "cost_change_pct": row["ci"]["cost_change_pct"],
            "mean_cost_change_pct": m["cost_change_pct"], "tier_shares": m["tier_shares"],
            "describe": row.get("describe")}


def verdict(task: str, t: dict) -> dict:
    """The issue's figures for one task: auto (point) within 0.5 pt on test, no baseline with test loss
    <= 0.5 pt cheaper, the headline cut where asked, the oracle share."""
    auto = t["auto"]["point"]
    loss_ok = auto["accuracy_change_pt"]["estimate"] >= -MAX_LOSS - 1e-9
    cheaper = [name for name in BASELINES if "skipped" not in t["methods"][name]
               and t["methods"][name]["accuracy_change_pt"]["estimate"] >= -MAX_LOSS - 1e-9
               and t["methods"][name]["cost_change_pct"]["estimate"] < auto["cost_change_pct"]["estimate"] - 1e-9]
    out = {"within_loss_on_test": loss_ok, "baselines_cheaper_within_loss": cheaper,
           "oracle_share": auto["oracle_share"],
           "guarantee_violation_ok": all(t["auto"][m]["resplits"]["violation_share"] <= DELTA + 1e-9
                                         for m in t["auto"] if not m.startswith("point"))}
    if task in HEADLINE_TASKS:
        out["headline_cut"] = -auto["cost_change_pct"]["estimate"] >= HEADLINE_CUT
    return out


def render(data: dict) -> str:
    tasks = data["tasks"]
    lines = [f"Runs of `{data['reproduce_out']}` (made by `python benchmarks/bench_reproduce.py`); every method "
             "fitted on validation, scored on test; Δacc in points and cost change in % against cloud-only on the "
             "same test samples, with 95% paired bootstrap intervals; cost model at its documented defaults "
             f"(hidden-state hop = {data['hidden_state_offload']:g} raw offloads). auto's target: at most "
             f"{MAX_LOSS} pt below cloud-only.", ""]
    header = ["task", "val / test", "auto (point) picks", "Δacc pt [95% CI]", "cost % [95% CI]", "oracle share",
              "best baseline within 0.5 pt", "auto beats all?"]
    rows = []
    for task, t in tasks.items():
        a, v = t["auto"]["point"], verdict(task, t)
        within = [(n, m) for n, m in t["methods"].items() if n in BASELINES and "skipped" not in m
                  and m["accuracy_change_pt"]["estimate"] >= -MAX_LOSS]
        best = min(within, key=lambda nm: nm[1]["cost_change_pct"]["estimate"], default=None)
        rows.append([task, f"{t['sizes']['validation']} / {t['sizes']['test']}", f"{a['winner']}",
                     _ci(a["accuracy_change_pt"], 2), _ci(a["cost_change_pct"], 1),
                     "-" if a["oracle_share"] is None else f"{a['oracle_share']:.2f}",
                     "-" if best is None else f"{best[0]} {best[1]['cost_change_pct']['estimate']:+.1f}%",
                     "yes" if v["within_loss_on_test"] and not v["baselines_cheaper_within_loss"] else
                     "no: " + ("loss over 0.5 pt on test" if not v["within_loss_on_test"] else
                               "cheaper: " + ", ".join(v["baselines_cheaper_within_loss"]))])
    lines += [markdown_table(header, rows, "llllllll"), ""]
    lines += ["Each mode of auto: test Δacc / cost change, and over random re-splits of validation + test into "
              "calibration and held-out halves the share where the held-out loss exceeds 0.5 pt (must be <= "
              f"{DELTA} with a guarantee; large for a point estimate: that is why the guarantee exists).", ""]
    header = ["task"] + [f"{m}: Δacc / cost / violations" for m in next(iter(tasks.values()))["auto"]]
    rows = []
    for task, t in tasks.items():
        cells = [task]
        for a in t["auto"].values():
            r = a["resplits"]
            cells.append(f"{a['accuracy_change_pt']['estimate']:+.2f} / {a['cost_change_pct']['estimate']:+.1f}% / "
                         f"{r['violation_share']:.2f} (median {r['median_cost_change_pct']:+.1f}%)")
        rows.append(cells)
    lines += [markdown_table(header, rows, "l" * len(header)), ""]
    lines += ["Every method on test, Δacc pt [95% CI] / cost % [95% CI] (seeded methods: mean over 3 seeds, "
              "intervals of seed 0):", ""]
    names = list(next(iter(tasks.values()))["methods"])
    header = ["method"] + list(tasks)
    rows = []
    for name in names:
        cells = [name]
        for t in tasks.values():
            m = t["methods"].get(name, {"skipped": "-"})
            cells.append("not run" if "skipped" in m else
                         f"{_ci(m['accuracy_change_pt'], 2)} / {_ci(m['cost_change_pct'], 1)}")
        rows.append(cells)
    lines += [markdown_table(header, rows, "l" * len(header)), ""]
    lines += ["Telling difficulty before any layer runs (validation): AUC for \"the mobile exit is right\" and "
              "pool accuracy (in brackets: the largest class's share).", ""]
    header = ["task", "learned pre-router AUC", "learned pool acc", "centroid AUC", "centroid pool acc (in-sample)",
              "mobile max-prob AUC (after the layers)"]
    rows = []
    for task, t in tasks.items():
        p = t["prerouters"]
        learned = p["learned"] or {}
        rows.append([task, _f(learned.get("auc")),
                     f"{_f(learned.get('pool_accuracy'))} ({_f(learned.get('largest_class_share'))})",
                     _f(p["centroid"]["auc"]),
                     f"{_f(p['centroid']['pool_accuracy'])} ({_f(p['centroid']['largest_pool_share'])})",
                     _f(p["mobile_max_prob_auc"])])
    lines += [markdown_table(header, rows, "llllll")]
    return "\n".join(lines)


def _ci(iv: dict, digits: int) -> str:
    return f"{iv['estimate']:+.{digits}f} [{iv['low']:+.{digits}f}, {iv['high']:+.{digits}f}]"


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/reproduce", help="a `dimec reproduce` output folder")
    parser.add_argument("--tasks", default="sst2,cola,mrpc,qnli,rotten_tomatoes")
    parser.add_argument("--splits", type=int, default=50, help="random re-splits for the violation share")
    args = parser.parse_args()
    from dimec.config import CostConfig

    out = Path(args.out)
    tasks = {}
    for task in args.tasks.split(","):
        run_dir = out / "runs" / task
        if not (run_dir / "model").is_dir():
            raise SystemExit(f"{run_dir} has no trained run: run `python benchmarks/bench_reproduce.py` first")
        print(f"{task}: benchmarking routing on {run_dir}", flush=True)
        tasks[task] = bench_task(run_dir, args.splits)
        tasks[task]["verdict"] = verdict(task, tasks[task])
        print(f"  {tasks[task]['verdict']}", flush=True)
    data = {"reproduce_out": str(out), "splits": args.splits, "max_loss": MAX_LOSS, "delta": DELTA,
            "hidden_state_offload": CostConfig().hidden_state_offload, "tasks": tasks}
    print(f"wrote {save('routing', 'Routing that wins: auto against every baseline (issue 8)', COMMAND, 'bench_routing.py', data)}")


if __name__ == "__main__":
    main()
