"""Table I: every method on every task, as Markdown, CSV and JSON, with the paper's headline beside it."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from dimec.atomic import strict_json, write_json, write_text  # noqa: F401  (strict_json re-exported)
from dimec.experiments import DISPLAY

# We could not find the paper's per-task Table I numbers in a source we can cite, so only the abstract's
# headline is quoted; no per-task number is made up.
PAPER_HEADLINE = ("paper (Bajpai & Hanawal, arXiv 2412.16616, abstract): DIMEC-DC cuts inference cost by "
                  ">43% at <0.5 pt accuracy loss vs cloud-only, on GLUE tasks")
CSV_FIELDS = ("task", "method", "runs", "accuracy", "accuracy_std", "accuracy_change_pt", "metric_name", "metric",
              "metric_std", "mean_cost", "cost_change_pct", "cost_change_pct_std", "oracle_saving_share",
              "mobile_share", "edge_share", "cloud_share", "accuracy_change_low", "accuracy_change_high",
              "cost_change_low", "cost_change_high", "describe", "val_loss_se_pt", "noisy_estimate")


def task_rows(task: str, metric: str, compared: list[dict], cloud_only_cost: float) -> list[dict]:
    """Flat Table I rows for one task from `compare_methods` output. oracle_saving_share =
    (cloud_only - cost) / (cloud_only - oracle cost): 1 = every saving the oracle finds, 0 = none."""
    by_name = {r["method"]: r for r in compared}
    base_acc = by_name["cloud-only"]["mean"]["accuracy"] if "cloud-only" in by_name else math.nan
    oracle_cost = by_name["oracle"]["mean"]["mean_cost"] if "oracle" in by_name else math.nan
    room = cloud_only_cost - oracle_cost
    rows = []
    for r in compared:
        if "skipped" in r:
            rows.append({"task": task, "method": r["method"], "skipped": r["skipped"]})
            continue
        mean, std, ci = r["mean"], r["std"], r["ci"]
        rows.append({
            "task": task, "method": r["method"], "runs": mean["runs"],
            "accuracy": mean["accuracy"], "accuracy_std": std["accuracy"],
            "accuracy_change_pt": 100 * (mean["accuracy"] - base_acc),
            "metric_name": metric, "metric": mean["metrics"].get(metric, mean["accuracy"]),
            "metric_std": std["metrics"].get(metric, std["accuracy"]),
            "mean_cost": mean["mean_cost"], "cost_change_pct": mean["cost_change_pct"],
            "cost_change_pct_std": std["cost_change_pct"],
            "oracle_saving_share": (cloud_only_cost - mean["mean_cost"]) / room if room > 1e-12 else math.nan,
            "mobile_share": mean["tier_shares"][0], "edge_share": mean["tier_shares"][1],
            "cloud_share": mean["tier_shares"][2],
            "accuracy_change_low": ci["accuracy_change_pt"]["low"], "accuracy_change_high": ci["accuracy_change_pt"]["high"],
            "cost_change_low": ci["cost_change_pct"]["low"], "cost_change_high": ci["cost_change_pct"]["high"],
            "describe": r.get("describe") or "", "winner": r.get("winner"),
            "val_loss_se_pt": r.get("val_loss_se_pt"), "noisy_estimate": bool(r.get("noisy_estimate")),
        })
    return rows


def _pm(value: float, std: float, runs: int, scale: float = 100.0, digits: int = 1, sign: str = "") -> str:
    text = f"{round(scale * value, digits) + 0.0:{sign}.{digits}f}"  # + 0.0: no "-0.0"
    return f"{text} ± {scale * std:.{digits}f}" if runs > 1 else text


def markdown_table(tasks: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    """tasks: {task: {"metric", "test_size", "rows"}} -> the whole Table I document."""
    lines = ["# Table I: accuracy and cost of every method", "", f"> {PAPER_HEADLINE}.", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "Accuracy and the task metric in %, cost change vs cloud-only in % (negative = cheaper); "
              "'± std' over seeds for seeded (online/random) methods; [low, high]: 95% paired bootstrap interval "
              "of the change against cloud-only on the same test samples (first seed). Oracle share: the "
              "fraction of the oracle's cost saving a method achieves (the oracle uses the test labels and "
              "pays for no hidden-state hop: a labelled reference, not a method, and not a bound on cost; "
              "a method can be cheaper, so a share can exceed 1). ⚠: the method's validation loss estimate has a "
              "standard error at least as large as the stated loss, so its test loss will often exceed it.", ""]
    for task, t in tasks.items():
        metric = t["metric"]
        extra = f" | {metric.upper()} (%)" if metric != "accuracy" else ""
        lines += [f"## {task} ({t['test_size']} test samples)", "",
                  f"| method | accuracy (%) | Δacc (pt){extra} | cost vs cloud (%) | oracle share | "
                  "mobile / edge / cloud (%) |",
                  "|---|---:|---:|" + ("---:|" if extra else "") + "---:|---:|---|"]
        for r in t["rows"]:
            if "skipped" in r:
                lines.append(f"| {DISPLAY.get(r['method'], r['method'])} | not run: {r['skipped']} |")
                continue
            name = DISPLAY.get(r["method"], r["method"]) + (f" -> {r['winner']}" if r.get("winner") else "")
            if r.get("noisy_estimate"):
                name += f" ⚠ (validation loss SE {r['val_loss_se_pt']:.2f} pt)"
            cells = [name, _pm(r["accuracy"], r["accuracy_std"], r["runs"]),
                     f"{r['accuracy_change_pt']:+.2f} [{r['accuracy_change_low']:+.2f}, {r['accuracy_change_high']:+.2f}]"]
            if extra:
                cells.append(_pm(r["metric"], r["metric_std"], r["runs"]))
            share = r["oracle_saving_share"]
            cells += [_pm(r["cost_change_pct"], r["cost_change_pct_std"], r["runs"], scale=1.0, sign="+")
                      + f" [{r['cost_change_low']:+.1f}, {r['cost_change_high']:+.1f}]",
                      "-" if math.isnan(share) else f"{round(share, 2) + 0.0:.2f}",
                      " / ".join(f"{100 * r[k]:.0f}" for k in ("mobile_share", "edge_share", "cloud_share"))]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += summary_matrix(tasks)
    return "\n".join(lines) + "\n"


def summary_matrix(tasks: dict[str, dict[str, Any]]) -> list[str]:
    """Methods x tasks, each cell 'accuracy % / cost change %' (the paper's layout)."""
    names = list(dict.fromkeys(r["method"] for t in tasks.values() for r in t["rows"]))
    lines = ["## All tasks: accuracy (%) / cost vs cloud-only (%)", "",
             "| method | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for name in names:
        cells = []
        for t in tasks.values():
            r = next((r for r in t["rows"] if r["method"] == name), None)
            cells.append("-" if r is None or "skipped" in r
                         else f"{100 * r['accuracy']:.1f} / {round(r['cost_change_pct'], 1) + 0.0:+.1f}")
        lines.append(f"| {DISPLAY.get(name, name)} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_table(tasks: dict[str, dict[str, Any]], meta: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"table_I.{ext}" for ext in ("md", "csv", "json")}
    write_text(paths["md"], markdown_table(tasks, meta))
    write_text(paths["csv"], csv_text(CSV_FIELDS, [r for t in tasks.values() for r in t["rows"]]))
    write_json(paths["json"], {"paper": PAPER_HEADLINE, "meta": meta, "tasks": tasks})
    return paths


def csv_text(columns: tuple[str, ...], rows: list[dict[str, Any]]) -> str:
    """CSV of the rows' `columns` (a missing value is empty), as one string for an atomic write."""
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=columns)
    w.writeheader()
    w.writerows({k: r.get(k, "") for k in columns} for r in rows)
    return out.getvalue()
