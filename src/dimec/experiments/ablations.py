"""Fig. 5: how DIMEC-DC reacts to the cost model. Each of lambda_m, lambda_e, o_c and the cloud fee is
scaled by a multiplier while the others keep their defaults; DIMEC is re-calibrated (fit again on
validation) under each setting and scored on test. No retraining: the exit outputs do not change."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from dimec.atomic import write_json, write_text
from dimec.config import CalibrationConfig, CostConfig
from dimec.costs import CostModel
from dimec.evaluation import evaluate_router
from dimec.experiments import MULTIPLIERS
from dimec.experiments.compare import build_router
from dimec.experiments.tables import csv_text
from dimec.outputs import ExitOutputs
from dimec.training.cartography import Cartography

FACTORS = {"lambda_m": "mobile_layer", "lambda_e": "edge_layer", "o_c": "offload_cloud", "cloud_fee": "cloud_fee"}
ABLATION_METHODS = ("dimec-fixed", "dimec-dynamic")
CSV_FIELDS = ("task", "factor", "multiplier", "value", "method", "accuracy", "metric_name", "metric", "mean_cost",
              "cloud_only_cost", "cost_change_pct", "mobile_share", "edge_share", "cloud_share", "alpha", "beta")


def cost_settings(base: CostConfig, num_layers: int, multipliers: Sequence[float] = MULTIPLIERS
                  ) -> list[tuple[str, float, CostConfig]]:
    """(factor, multiplier, CostConfig) for every factor x multiplier; values in units of lambda."""
    settings = []
    for factor, key in FACTORS.items():
        default = getattr(base, key)
        if default is None:  # cloud_fee None means l (docs/cost-model.md)
            default = float(num_layers)
        settings += [(factor, float(m), replace(base, **{key: default * m})) for m in multipliers]
    return settings


def run_ablations(task: str, val: ExitOutputs, test: ExitOutputs, carto: Cartography, metric: str,
                  base_cost: CostConfig, calibration: CalibrationConfig, cost_model_for,
                  multipliers: Sequence[float] = MULTIPLIERS, methods: Sequence[str] = ABLATION_METHODS
                  ) -> list[dict]:
    """`cost_model_for(CostConfig) -> CostModel` resolves a setting (the run's exit layers).
    One row per (factor, multiplier, method)."""
    num_layers = cost_model_for(base_cost).num_layers
    rows = []
    for factor, mult, cost_cfg in cost_settings(base_cost, num_layers, multipliers):
        cm: CostModel = cost_model_for(cost_cfg)
        for name in methods:
            router = build_router(name, calibration).fit(val, cm, carto)
            r = evaluate_router(router, test, cm, metric)
            rows.append({
                "task": task, "factor": factor, "multiplier": mult, "value": getattr(cost_cfg, FACTORS[factor]),
                "method": name, "accuracy": r.accuracy, "metric_name": metric,
                "metric": r.metrics.get(metric, r.accuracy), "mean_cost": r.mean_cost,
                "cloud_only_cost": cm.cloud_only, "cost_change_pct": r.cost_change_pct,
                "mobile_share": r.tier_shares[0], "edge_share": r.tier_shares[1], "cloud_share": r.tier_shares[2],
                "alpha": getattr(router, "alpha_", None), "beta": getattr(router, "beta_", None),
            })
    return rows


def ablation_markdown(rows: list[dict]) -> str:
    lines = ["# Cost ablations (Fig. 5)", "",
             "Each factor is scaled by the multiplier (value in units of lambda) while the others keep their "
             "defaults; DIMEC-DC is re-calibrated under every setting. Cost change is against cloud-only "
             "under the same setting.", ""]
    for task in dict.fromkeys(r["task"] for r in rows):
        lines += [f"## {task}", "",
                  "| factor | x | value (lambda) | method | accuracy (%) | cost vs cloud (%) | "
                  "mobile / edge / cloud (%) | alpha | beta |",
                  "|---|---:|---:|---|---:|---:|---|---:|---:|"]
        for r in (r for r in rows if r["task"] == task):
            shares = " / ".join(f"{100 * r[k]:.0f}" for k in ("mobile_share", "edge_share", "cloud_share"))
            lines.append(f"| {r['factor']} | {r['multiplier']:g} | {r['value']:g} | {r['method']} | "
                         f"{100 * r['accuracy']:.1f} | {round(r['cost_change_pct'], 1) + 0.0:+.1f} | {shares} | "
                         f"{r['alpha']} | {r['beta']} |")
        lines.append("")
    return "\n".join(lines)


def write_ablations(rows: list[dict], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"ablations.{ext}" for ext in ("md", "csv", "json")}
    write_text(paths["md"], ablation_markdown(rows))
    write_text(paths["csv"], csv_text(CSV_FIELDS, rows))
    write_json(paths["json"], rows)
    return paths
