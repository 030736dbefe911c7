"""Keeping the stated loss on small calibration sets: the analysis stage of bench_calibration.py.

For one task's pool of out-of-fold exit outputs (every labelled row answered by a model that never trained
on it), every cascade configuration `auto` considers is routed over the whole pool once: per-sample loss
against the cloud exit (accuracy and disagreement) and per-sample cost, a (N, K) matrix each. A calibration
draw is then a set of rows: each mode chooses a candidate from the draw's rows alone, with the library's own
selection functions (routing/targets.py), and the held-out rows (all the others) measure what it really
loses and saves. Thousands of draws take seconds.

The candidates' thresholds are quantiles of the whole pool's confidences: label-free, so they carry no
information about any draw's losses (the library takes them from the calibration rows; the difference is
the grid's position, not its labels). The families are the cascades and the single tiers: the hybrids need
a pre-router trained on training-split cartography that out-of-fold rows do not have.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dimec.config import CalibrationConfig
from dimec.costs import CostModel
from dimec.outputs import ExitOutputs
from dimec.routing import ROUTERS, make_router
from dimec.routing.selection import candidate_losses, test_order
from dimec.routing.targets import (
    Target,
    control_expected_loss,
    learn_then_test,
    select_point,
    split_rows,
)

FAMILIES = ("cascade", "edge-cascade", "cloud-early-exit", "mobile-only", "edge-only", "cloud-only")
MODES = ("point", "point + 1 SE", "expected", "LTT binomial", "LTT betting", "label-free LTT")


@dataclass
class CandidateMatrix:
    """Every candidate routed over a pool once."""

    families: list[str]  # (K,)
    describe: list[str]  # (K,)
    loss: np.ndarray  # (N, K) int8: accuracy loss against the cloud exit
    disagree: np.ndarray  # (N, K) int8: disagreement with the cloud exit
    cost: np.ndarray  # (N, K) float32
    oracle_cost: np.ndarray  # (N,) the cheapest exit that is right (the cloud when none is)
    cloud_only: float  # mean cost of cloud-only (the same for every row)
    safe: int  # the cloud-only candidate

    @classmethod
    def build(cls, pool: ExitOutputs, cost_model: CostModel, grid: int = 20) -> CandidateMatrix:
        cal = CalibrationConfig(threshold_grid=grid)
        routers: list[tuple[str, object]] = []
        for family in FAMILIES:
            router = ROUTERS[family].from_config(cal)
            if hasattr(router, "candidates"):
                routers += [(family, c) for c in router.candidates(pool, cost_model, None, None)]
            else:
                routers.append((family, router.fit(pool, cost_model)))
        loss = np.empty((len(pool), len(routers)), np.int8)
        disagree, cost = np.empty_like(loss), np.empty(loss.shape, np.float32)
        for j, (_, router) in enumerate(routers):
            loss[:, j], cost[:, j] = candidate_losses(router, pool, cost_model, "accuracy")
            disagree[:, j] = candidate_losses(router, pool, cost_model, "disagreement")[0]
        oracle = make_router("oracle").route(pool, cost_model).cost
        safe = next(j for j, (f, _) in enumerate(routers) if f == "cloud-only")
        return cls([f for f, _ in routers], [r.describe() for _, r in routers], loss, disagree, cost,
                   np.asarray(oracle, np.float64), cost_model.cloud_only, safe)


def choose(m: CandidateMatrix, rows: np.ndarray, mode: str, eps_pt: float = 0.5, delta: float = 0.1,
           order_share: float = 0.5, seed: int = 0) -> int:
    """The candidate a mode picks from the calibration rows `rows` alone."""
    if mode in ("point", "point + 1 SE"):
        losses = m.loss[rows].astype(np.float64)
        loss_pt = 100 * losses.mean(0)
        if mode == "point + 1 SE":
            loss_pt = loss_pt + 100 * losses.std(0) / np.sqrt(len(rows))
        j = select_point(loss_pt, m.cost[rows].mean(0), eps_pt)
        return m.safe if j is None else j
    matrix = m.disagree if mode == "label-free LTT" else m.loss
    order, test = split_rows(len(rows), order_share, seed)
    order, test = rows[order], rows[test]
    order_loss, order_cost = 100 * matrix[order].mean(0, dtype=np.float64), m.cost[order].mean(0, dtype=np.float64)
    target = Target(max_loss=eps_pt, delta=None if mode == "expected" else delta, seed=seed,
                    control="expected" if mode == "expected" else "point",
                    loss="disagreement" if mode == "label-free LTT" else "accuracy",
                    test="betting" if mode == "LTT betting" else "binomial")
    added_pt = 100 * (matrix[order] > 0).mean(0)
    front = test_order(matrix[order], order_loss, added_pt, order_cost, [m.safe], target)  # as selection.py orders

    class _Lazy(dict):
        def __missing__(self, j):
            self[j] = matrix[test, j]
            return self[j]

    if mode == "expected":
        admitted = control_expected_loss(list(front), _Lazy(), eps_pt / 100).admitted
    else:
        admitted = learn_then_test(order_loss, order_cost, _Lazy(), target, front).certified
    admitted = admitted + [m.safe]
    return min(admitted, key=lambda j: (order_cost[j], order_loss[j]))


def draws(m: CandidateMatrix, sizes: tuple[int, ...], repeats: int, eps_pt: float = 0.5, delta: float = 0.1,
          seed: int = 0, min_held_out: int = 200) -> dict:
    """Per calibration size and mode: held-out loss (mean, 90th percentile), violation share, cost cut and the
    share of the oracle's cut, over `repeats` random calibration / held-out splits of the pool."""
    n, rng, out = len(m.loss), np.random.default_rng(seed), {}
    for size in sizes:
        if size > n - min_held_out:
            continue
        per_mode = {mode: {"loss_pt": [], "cut_pct": [], "oracle_cut_pct": []} for mode in MODES}
        for r in range(repeats):
            perm = rng.permutation(n)
            cal, held = perm[:size], perm[size:]
            oracle_cut = 100 * (1 - m.oracle_cost[held].mean() / m.cloud_only)
            for mode in MODES:
                j = choose(m, cal, mode, eps_pt, delta, seed=r)
                rec = per_mode[mode]
                rec["loss_pt"].append(100 * m.loss[held, j].mean(dtype=np.float64))
                rec["cut_pct"].append(100 * (1 - m.cost[held, j].mean(dtype=np.float64) / m.cloud_only))
                rec["oracle_cut_pct"].append(oracle_cut)
        out[str(size)] = {mode: summarize(rec, eps_pt) for mode, rec in per_mode.items()}
    return out


def summarize(rec: dict, eps_pt: float) -> dict:
    loss, cut, oracle = (np.asarray(rec[k]) for k in ("loss_pt", "cut_pct", "oracle_cut_pct"))
    return {"draws": len(loss), "mean_loss_pt": float(loss.mean()), "p90_loss_pt": float(np.quantile(loss, 0.9)),
            "violation_share": float((loss > eps_pt).mean()), "mean_cut_pct": float(cut.mean()),
            "oracle_share": float(cut.mean() / oracle.mean()) if oracle.mean() > 0 else 0.0}


# ---- the stage: every pool, every size, every mode ----------------------------------------------------------
SIZES = (500, 1000, 2000, 5000, 10000)
EPS_PT, DELTA = 0.5, 0.1


def analyse(pool_dir, tasks, repeats: int = 200, sizes=SIZES, seed: int = 0) -> dict:
    """Per task: the pool's size and exits, the oracle's cut, each candidate count, and `draws` per size."""
    import json
    import time
    from pathlib import Path

    from dimec.config import CostConfig

    out = {}
    for task in tasks:
        from bench_calibration import load_pool

        folder = Path(pool_dir) / task
        pool, _ = load_pool(Path(pool_dir), task)
        info = json.loads((folder / "pool.json").read_text()) if (folder / "pool.json").is_file() else {}
        cost_model = CostModel.from_config(CostConfig(), (2, 3, 6))
        start = time.perf_counter()
        m = CandidateMatrix.build(pool, cost_model)
        result = draws(m, sizes, repeats, EPS_PT, DELTA, seed)
        out[task] = {"rows": len(pool), "candidates": len(m.families),
                     "exit_accuracy": [float(a) for a in pool.correct.mean(0)],
                     "oracle_cut_pct": float(100 * (1 - m.oracle_cost.mean() / m.cloud_only)),
                     "in_sample_best_cut_pct": in_sample_best(m, EPS_PT),
                     "pool": {k: info[k] for k in ("k", "caps", "rows_before_cap", "model") if k in info},
                     "seconds": round(time.perf_counter() - start, 1), "sizes": result}
        print(f"{task}: {len(pool)} rows, {len(m.families)} candidates, {out[task]['seconds']} s", flush=True)
    return out


def in_sample_best(m: CandidateMatrix, eps_pt: float) -> dict:
    """What the whole pool would allow (no noise: every row both chooses and measures): the cheapest
    candidate within eps by net loss, and by added errors (what the monotonised controls can reach)."""
    net, added = 100 * m.loss.mean(0), 100 * (m.loss > 0).mean(0)
    cut = 100 * (1 - m.cost.mean(0) / m.cloud_only)
    return {"net_loss": float(cut[net <= eps_pt].max(initial=0.0)), "added_errors": float(cut[added <= eps_pt].max(initial=0.0))}


def plot(data: dict, path) -> None:
    """Cost cut against calibration size, one panel per task, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(data["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.2), sharey=True, squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        sizes = data["tasks"][task]["sizes"]
        xs = [int(s) for s in sizes]
        for mode in MODES:
            ax.plot(xs, [sizes[s][mode]["mean_cut_pct"] for s in sizes], marker="o", ms=3, label=mode)
        ax.set_xscale("log")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("calibration rows")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean cost cut on held-out rows (%)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(data: dict) -> str:
    from report import markdown_table

    eps = data["eps_pt"]
    lines = [f"Stated loss {eps:g} pt (delta {data['delta']:g} for Learn-then-Test); {data['repeats']} random "
             "calibration / held-out splits of each task's pool per size; every row of a pool is answered by a "
             "fold model that never trained on it (5-fold cross-fitting of the whole labelled pool). Held-out loss "
             "in accuracy points against the cloud exit on the same rows; cut against cloud-only; oracle share: "
             "the mode's cut over the oracle's (a labelled reference). Candidates: every cascade configuration "
             "`auto` considers and the single tiers (the hybrids need training-split cartography the pools lack).",
             "", f"![cost cut against calibration size]({data['plot']})", ""]
    for task, t in data["tasks"].items():
        acc = " / ".join(f"{100 * a:.1f}" for a in t["exit_accuracy"])
        lines += [f"### {task}", "", f"{t['rows']} pooled rows; exit accuracy mobile / edge / cloud {acc}%; oracle cut "
                  f"{t['oracle_cut_pct']:.1f}%; on the whole pool (no noise) the cheapest configuration within "
                  f"{eps:g} pt cuts {t['in_sample_best_cut_pct']['net_loss']:.1f}% (net loss) or "
                  f"{t['in_sample_best_cut_pct']['added_errors']:.1f}% (added errors, what monotonised controls "
                  f"reach). Pool: {t.get('pool') or '-'}.", ""]
        rows = []
        for size, modes in t["sizes"].items():
            for mode, v in modes.items():
                keeps = "yes" if v["mean_loss_pt"] <= eps else "**no**"
                rows.append([size, mode, f"{v['mean_loss_pt']:+.2f}", f"{v['p90_loss_pt']:+.2f}",
                             f"{v['violation_share']:.2f}", f"{v['mean_cut_pct']:.1f}", f"{v['oracle_share']:.2f}",
                             keeps])
        lines += [markdown_table(["calibration rows", "mode", "mean loss (pt)", "p90 loss (pt)", "violation share",
                                  "mean cut (%)", "oracle share", f"mean <= {eps:g}"], rows, "llrrrrrl"), ""]
    lines += ["### Which mode keeps the promise", "", data["verdict"], ""]
    job = data.get("default_job")
    if job:  # the default job's own model, calibrated under each mode on the same rows, scored on its test split
        lines += ["### The default job (`make run`'s model) under each mode", "",
                  f"Calibration rows: {job['calibration_rows']}; test rows {job['test_rows']}. `dimec calibrate` "
                  f"first says: \"{job['what_the_data_can_carry']}\"."
                  + (f" The whole job (`{job['make_run']['command']}`) took {job['make_run']['wall_min']:g} min "
                     f"from scratch, peak RSS {job['make_run']['peak_rss_mb']} MB." if "make_run" in job else ""), ""]
        lines += [markdown_table(["mode", "test Δacc (pt) [95% CI]", "cost vs cloud-only (%)"],
                                 [[m, f"{v['delta_acc_pt']:+.2f} [{v['ci'][0]:+.2f}, {v['ci'][1]:+.2f}]",
                                   f"{v['cost_change_pct']:+.1f}"] for m, v in job["modes"].items()]), ""]
    return "\n".join(lines)


def verdict(tasks: dict, eps: float) -> tuple[str, str]:
    """The default mode: among the modes whose mean held-out loss is within eps at every size of every task,
    the one with the highest mean cut (averaged over tasks and sizes)."""
    keep, cut = {}, {}
    for mode in MODES:
        cells = [t["sizes"][s][mode] for t in tasks.values() for s in t["sizes"]]
        keep[mode] = all(c["mean_loss_pt"] <= eps for c in cells)
        cut[mode] = float(np.mean([c["mean_cut_pct"] for c in cells]))
    kept = [m for m in MODES if keep[m]]
    best = max(kept, key=lambda m: cut[m]) if kept else "cloud-only"
    text = "; ".join(f"{m}: {'keeps' if keep[m] else 'breaks'} the mean (cut {cut[m]:.1f}%)" for m in MODES)
    return best, f"{text}. Default: **{best}** (the highest mean cut among the modes that keep the mean everywhere)."
