"""`dimec plan RUN_DIR --profile profile.json`: what every policy costs beyond the cost model, and which one a
set of constraints picks (after multi-objective inference placement: accuracy, latency, money, exposure).

For every candidate policy, on the cached exit outputs of a split (validation by default):

    accuracy     the task's accuracy (and metric), as in every report
    cost         mean cost in the cost model's reward units, and its change against cloud-only
    latency_ms   mean and p95 time per text under the measured profile (`dimec profile`): the same path
                 formula as the cost model (raw offload + layers at each tier's rate + hidden-state hops),
                 priced in milliseconds; unloaded (no queueing)
    money        per 1,000 texts: `--cloud-price` for a text through the whole cloud model (pro rata for
                 fewer cloud layers) + `--edge-price` for one through the edge's layers
    exposure     share of texts whose input (raw or hidden state) reaches a tier not in `--trusted`;
                 `leaves_device`: share that leaves the phone at all

A policy's path is re-priced exactly when it is a plan router (every stage priced through the cost model)
or a bandit over fixed arms (the arms it chose, re-priced); other routers are re-routed under the new prices
and kept when their decisions do not change, else priced as "answered on tier t at exit e" (marked
approximate). Candidates: `--policies FILE` (router.json entries with a name); else what calibration
chooses from, fitted on validation: every configuration of every family `auto` considers (cascades at each
grid threshold, hybrids, DIMEC-DC, single tiers) plus the paper's other baselines. The Pareto front is over (accuracy up, latency, money, exposure down). The pick is made on
validation figures, always: the most accurate (or cheapest, fastest, ...: `--objective`) policy that meets
every constraint.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dimec.costs import CostModel, read_profile
from dimec.errors import ArtifactError, ConfigError, DimecError
from dimec.evaluation import score_decisions
from dimec.outputs import ExitOutputs
from dimec.routing.base import Decisions, Router
from dimec.routing.plan import PlanRouter, run_plans
from dimec.rundir import RunDir
from dimec.tiers import CLOUD, MOBILE, TIERS

OBJECTIVES = ("cost", "accuracy", "latency", "money", "exposure")


@dataclass(frozen=True)
class PlanConstraints:
    max_loss: float | None = None  # accuracy points below cloud-only
    max_latency_ms: float | None = None  # mean per text
    max_money: float | None = None  # per 1,000 texts
    max_exposure: float | None = None  # share of texts reaching an untrusted tier

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is not None and not value >= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {value}",
                                  "constraints are upper bounds: a loss, a deadline, a budget, a share")
        if self.max_exposure is not None and self.max_exposure > 1:
            raise ConfigError(f"--max-exposure is a share in [0, 1], got {self.max_exposure}")

    def violations(self, p: dict[str, Any], cloud_accuracy: float) -> dict[str, float]:
        """How far point `p` is past each bound (empty: it meets them all)."""
        out = {}
        if self.max_loss is not None and 100 * (cloud_accuracy - p["accuracy"]) > self.max_loss + 1e-9:
            out["loss"] = 100 * (cloud_accuracy - p["accuracy"]) - self.max_loss
        for key, bound in (("latency_ms", self.max_latency_ms), ("money", self.max_money),
                           ("exposure", self.max_exposure)):
            if bound is not None and p[key] > bound + 1e-9:
                out[key] = p[key] - bound
        return out


# ---- prices beyond the cost model -----------------------------------------------------------------------------------
def latency_model(profile: str | Path, exit_layers: tuple[int, int, int], hidden_state_factor: float) -> CostModel:
    """The cost model's path formulas in milliseconds: per-layer times and offload times of the profile."""
    ms = read_profile(profile, "latency profile")
    return CostModel(ms["lambda_m_ms"], ms["lambda_e_ms"], ms["o_e_ms"], ms["o_c_ms"],
                     ms["cloud_layer_ms"] * exit_layers[2], tuple(exit_layers),
                     ms.get("hidden_state_factor", hidden_state_factor))


def money_model(cloud_price: float, edge_price: float, exit_layers: tuple[int, int, int]) -> CostModel:
    """Money per text: the cloud bills its layers pro rata, the edge its own; moving bytes is free."""
    if not all(math.isfinite(p) and p >= 0 for p in (cloud_price, edge_price)):
        raise ConfigError(f"prices must be >= 0 and finite (--cloud-price, --edge-price), got cloud {cloud_price}, "
                          f"edge {edge_price}")
    n = exit_layers[1]
    return CostModel(0.0, edge_price / 1000 / n, 0.0, 0.0, cloud_price / 1000, tuple(exit_layers), 0.0)


def path_prices(decisions: Decisions, cost_model: CostModel) -> np.ndarray:
    """(N,) "answered on tier t at exit e" priced by `cost_model`: raw offload to t, layers up to e there."""
    layers = np.asarray(cost_model.exit_layers)[decisions.exit_index]
    raw = np.array([cost_model.raw_offload(t) for t in range(3)])[decisions.tier]
    rate = np.array([cost_model.layer_rate(t) for t in range(3)])[decisions.tier]
    return raw + layers * rate


# ---- candidates ---------------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    name: str
    family: str  # "router" (fitted) or "sweep" (a plan with fixed thresholds)
    decide: Callable[[ExitOutputs, CostModel], tuple[Decisions, bool]]  # decisions priced by the model, exact?
    description: str = ""


def router_candidate(name: str, router: Router, reward: CostModel) -> Candidate:
    if isinstance(router, PlanRouter):
        def decide(out: ExitOutputs, cm: CostModel) -> tuple[Decisions, bool]:
            choice = router.choose_plans(out.embeddings, out.lengths)
            d = run_plans(out, router.plans_, choice, cm, router.confidence_)
            return Decisions(d.exit_index, d.tier, d.cost), True
    elif hasattr(router, "arm_decisions"):  # a bandit: the arms it picked under the reward costs, re-priced
        def decide(out: ExitOutputs, cm: CostModel) -> tuple[Decisions, bool]:
            base = router.route(out, reward)
            if cm is reward:
                return base, True
            arms = router.play(out, reward)[0] if hasattr(router, "play") else router.arms_  # (N,) as routed
            rows, per_arm = np.arange(len(out)), router.arm_decisions(out, cm)
            cost = np.stack([d.cost for d in per_arm], 1)[rows, arms]
            return Decisions(base.exit_index, base.tier, cost), True
    else:
        def decide(out: ExitOutputs, cm: CostModel) -> tuple[Decisions, bool]:
            base = router.route(out, reward)
            if cm is reward:
                return base, True
            other = router.route(out, cm)
            if np.array_equal(other.tier, base.tier) and np.array_equal(other.exit_index, base.exit_index):
                return other, True
            return Decisions(base.exit_index, base.tier, path_prices(base, cm)), bool(
                np.array_equal(base.tier, base.exit_index))  # one tier at its own exit: the paper's path, exact
    return Candidate(name, "router", decide, getattr(router, "describe", lambda: "")())


PAPER_BASELINES = ("random", "deebert", "adaee", "isplitee", "knn")  # not among calibration's families


def registered_candidates(run_dir: Path, val: ExitOutputs, reward: CostModel, cfg) -> list[Candidate]:
    """What calibration chooses from: every configuration of every family `auto` fits on validation
    (cascades at every grid threshold, hybrids, DIMEC-DC, single tiers), plus the paper's other baselines."""
    from collections import Counter

    from dimec.pipeline import load_cartography
    from dimec.routing.base import ROUTERS, make_router

    make_router("cloud-only")  # registers every router

    try:
        carto = load_cartography(run_dir, cfg.calibration)
    except (ArtifactError, OSError, ValueError):
        carto = None
    needs_carto = ("dimec-fixed", "dimec-dynamic", "knn", "hybrid-centroid")
    out: list[Candidate] = []
    from dimec.pipeline import training_signal

    pairs, _skipped = ROUTERS["auto"].from_config(cfg.calibration).candidates(
        val, reward, carto, training_signal(run_dir, cfg))
    count: Counter[str] = Counter(family for family, _ in pairs)
    seen: Counter[str] = Counter()
    for family, router in pairs:
        seen[family] += 1
        name = family if count[family] == 1 else f"{family}#{seen[family]}"
        out.append(router_candidate(name, router, reward))
    for name in PAPER_BASELINES:
        if not (carto is None and name in needs_carto):
            router = ROUTERS[name].from_config(cfg.calibration, None)  # the run's settings, as calibrate does
            out.append(router_candidate(name, router.fit(val, reward, carto), reward))
    return out


def file_candidates(path: Path, reward: CostModel) -> list[Candidate]:
    """Policies from a JSON file: {"policies": [{"name": ..., "router": ..., "params": ..., "state": ...}]}."""
    from dimec.routing.base import make_router

    try:
        entries = json.loads(path.read_text())["policies"]
        if not isinstance(entries, list) or not entries:
            raise ValueError("'policies' must be a non-empty list")
        out = []
        for i, e in enumerate(entries):
            router = make_router(e["router"], **e.get("params", {}))
            router.load_state(e.get("state", {}))
            out.append(router_candidate(str(e.get("name", f"{e['router']}#{i}")), router, reward))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise ArtifactError(f"{path} is not a list of policies ({type(exc).__name__}: {exc})",
                            'write {"policies": [router.json entries with a "name"]}') from None
    return out


# ---- evaluate, front, pick -----------------------------------------------------------------------------------------
def evaluate(c: Candidate, out: ExitOutputs, reward: CostModel, latency: CostModel, money: CostModel,
             metric: str, trusted: tuple[str, ...]) -> dict[str, Any]:
    d, _ = c.decide(out, reward)
    scored = score_decisions(c.name, d, out, reward, metric)
    dl, exact_l = c.decide(out, latency)
    dm, exact_m = c.decide(out, money)
    allowed = {MOBILE, *(TIERS.index(t) for t in trusted)}
    return {
        "name": c.name, "family": c.family, "description": c.description,
        "accuracy": scored.accuracy, "metrics": scored.metrics, "cost": scored.mean_cost,
        "cost_change_pct": scored.cost_change_pct, "tier_shares": list(scored.tier_shares),
        "latency_ms": float(dl.cost.mean()), "latency_p95_ms": float(np.quantile(dl.cost, 0.95)),
        "money": float(dm.cost.mean() * 1000), "exposure": float(np.isin(d.tier, list(allowed), invert=True).mean()),
        "leaves_device": float((d.tier != MOBILE).mean()), "priced": "exact" if exact_l and exact_m else "approximate",
    }


def pareto_front(points: list[dict[str, Any]]) -> list[int]:
    """Indices of the points no other point beats on every objective (accuracy up; latency, money, exposure
    down) while being strictly better on one; of several points with the same four figures, the first."""
    keys = np.array([[-p["accuracy"], p["latency_ms"], p["money"], p["exposure"]] for p in points])
    front = []
    for i, k in enumerate(keys):
        no_worse = (keys <= k + 1e-12).all(1)
        dominated = (no_worse & (keys < k - 1e-12).any(1)).any()
        duplicate = (no_worse[:i] & (keys[:i] >= k - 1e-12).all(1)).any()
        if not dominated and not duplicate:
            front.append(i)
    return front


def pick(points: list[dict[str, Any]], constraints: PlanConstraints, objective: str,
         cloud_accuracy: float) -> tuple[int | None, dict[str, float] | None]:
    """(index of the chosen point, None) or (None, the smallest violations of the closest point)."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {objective!r}", f"use one of {', '.join(OBJECTIVES)}")
    feasible = [i for i, p in enumerate(points) if not constraints.violations(p, cloud_accuracy)]
    if not feasible:
        closest = min(range(len(points)), key=lambda i: sum(constraints.violations(points[i], cloud_accuracy).values()))
        return closest, None
    sign = {"accuracy": -1.0}.get(objective, 1.0)
    key = {"cost": "cost", "accuracy": "accuracy", "latency": "latency_ms", "money": "money", "exposure": "exposure"}
    return min(feasible, key=lambda i: (sign * points[i][key[objective]], -points[i]["accuracy"],
                                        points[i]["cost"])), {}


def plan_run(run_dir: Path, profile: str | None, constraints: PlanConstraints, objective: str = "cost",
             split: str = "validation", policies: str | None = None, cloud_price: float = 1.0, edge_price: float = 0.0,
             trusted: tuple[str, ...] = (), out_dir: Path | None = None, log=print) -> dict[str, Any]:
    from dimec.pipeline import load_cost_model, load_saved_config, split_outputs

    for t in trusted:
        if t not in ("edge", "cloud"):
            raise ConfigError(f"--trusted takes 'edge' and/or 'cloud', got {t!r}")
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {objective!r}", f"use one of {', '.join(OBJECTIVES)}")
    run = RunDir(run_dir)
    cfg = load_saved_config(run.root)
    reward = load_cost_model(run.root, cfg.cost)
    latency = latency_model(profile or run.profile, reward.exit_layers, reward.hidden_state_factor)
    money = money_model(cloud_price, edge_price, reward.exit_layers)
    metric = json.loads(run.data.read_text())["metric"]
    val = split_outputs(run.root, "validation")
    if policies:
        if not Path(policies).is_file():
            raise ArtifactError(f"policies file not found: {policies}")
        candidates = file_candidates(Path(policies), reward)
    else:
        candidates = registered_candidates(run.root, val, reward, cfg)

    def measure(outputs: ExitOutputs) -> list[dict[str, Any]]:
        return [evaluate(c, outputs, reward, latency, money, metric, trusted) for c in candidates]

    points = measure(val)  # the pick is made here, on validation, always
    cloud_accuracy = float(val.correct[:, CLOUD].mean())
    chosen, violations = pick(points, constraints, objective, cloud_accuracy)
    reported = points if split == "validation" else measure(split_outputs(run.root, split))
    front = pareto_front(reported)
    result = {
        "run_dir": str(run.root), "split": split, "chosen_on": "validation", "objective": objective,
        "constraints": asdict(constraints), "trusted": list(trusted), "profile": str(profile or run.profile),
        "prices": {"cloud_per_1000": cloud_price, "edge_per_1000": edge_price},
        "cloud_only_accuracy": float(reported[[p["name"] for p in reported].index("cloud-only")]["accuracy"])
        if any(p["name"] == "cloud-only" for p in reported) else None,
        "policies": reported, "pareto_front": [reported[i]["name"] for i in front],
        "pick": None if violations is None else reported[chosen]["name"],
        "closest": reported[chosen]["name"] if violations is None else None,
    }
    if out_dir is not None:
        from dimec.atomic import write_json

        write_json(Path(out_dir) / "plan.json", result)
        plot_plan(reported, front, None if violations is None else chosen, Path(out_dir) / "plan.png")
    log(format_plan(result, front))
    if violations is None:
        v = constraints.violations(points[chosen], cloud_accuracy)
        raise DimecError(f"no policy meets the constraints; the closest, {points[chosen]['name']}, is past "
                         + ", ".join(f"{k} by {x:.4g}" for k, x in v.items()),
                         "relax a bound (--max-loss, --max-latency-ms, --max-money, --max-exposure)")
    return result


def format_plan(result: dict[str, Any], front: list[int]) -> str:
    pts = result["policies"]
    head = f"{'policy':<22}{'acc':>8}{'cost':>8}{'lat ms':>9}{'p95':>9}{'money':>9}{'expo':>7}  path"
    lines = [f"{len(pts)} policies on {result['split']}; the Pareto front (money per 1,000 texts; exposure: share "
             f"to untrusted tiers; latency unloaded, from {result['profile']}):", head, "-" * len(head)]
    for i in sorted(front, key=lambda i: pts[i]["latency_ms"]):
        p = pts[i]
        lines.append(f"{p['name'][:21]:<22}{p['accuracy']:>8.4f}{p['cost_change_pct']:>7.1f}%{p['latency_ms']:>9.2f}"
                     f"{p['latency_p95_ms']:>9.2f}{p['money']:>9.4f}{p['exposure']:>7.3f}  {p['description'][:60]}"
                     + ("" if p["priced"] == "exact" else " (approx)"))
    lines.append(f"({len(pts) - len(front)} dominated policies in plan.json)")
    if result["pick"]:
        p = pts[[q["name"] for q in pts].index(result["pick"])]
        lines.append(f"pick ({result['objective']}, chosen on validation): {p['name']}: accuracy {p['accuracy']:.4f}, "
                     f"cost {p['cost_change_pct']:+.1f}%, {p['latency_ms']:.2f} ms, money {p['money']:.4f}, "
                     f"exposure {p['exposure']:.3f}  [{p['description']}]")
    return "\n".join(lines)


def plot_plan(points: list[dict[str, Any]], front: list[int], chosen: int | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dimec.atomic import write_with

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    acc = np.array([p["accuracy"] for p in points])
    on_front = np.zeros(len(points), dtype=bool)
    on_front[front] = True
    for ax, key, label in zip(axes, ("latency_ms", "money", "exposure"),
                              ("mean latency per text (ms)", "money per 1,000 texts", "share sent to untrusted tiers"),
                              strict=True):
        x = np.array([p[key] for p in points])
        ax.scatter(x[~on_front], acc[~on_front], s=14, c="0.7", label="dominated")
        ax.scatter(x[on_front], acc[on_front], s=22, c="tab:blue", label="Pareto front (all 4 objectives)")
        for i in np.flatnonzero(on_front):
            if points[i]["family"] == "router":
                ax.annotate(points[i]["name"], (x[i], acc[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if chosen is not None:
            ax.scatter([x[chosen]], [acc[chosen]], s=160, marker="*", c="tab:red", label="pick")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
