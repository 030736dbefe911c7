"""Stronger, honest exits (issue 9): every task trained with and without self-distillation at the
reproduction's budget; each exit's accuracy (and MCC / F1), its ECE before and after temperature scaling,
and the wall times. Writes benchmarks/results/exits.json; BENCHMARKS.md is rendered from it.

    python benchmarks/bench_exits.py [--out ../scratch/exits] [--tasks sst2,cola,mrpc,qnli,rotten_tomatoes]
        [--max-train-samples 8000] [--epochs 3] [--config configs/reproduce.yaml]
        [--distill train.distill_weight=0.5 --distill train.distill_temperature=2]

The runs are built exactly as `dimec reproduce` builds them (configs/reproduce.yaml with its per-task settings,
the training-split cap, the epochs). The variant the config describes as it is lands in OUT/runs/<task>, where
`dimec reproduce --out OUT` with the same arguments reuses it; the other variant in OUT/runs-<variant>/<task>.
Finished runs are reused (same settings), so a second invocation only re-reads them.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import save  # noqa: E402

from dimec.config import RunConfig, apply_overrides  # noqa: E402
from dimec.experiments.reproduce import load_reproduce_config, task_config, with_train_cap  # noqa: E402
from dimec.metrics import compute_metrics, ece_noise_floor  # noqa: E402
from dimec.modeling.multi_exit import MultiExitConfig  # noqa: E402
from dimec.pipeline import (  # noqa: E402
    load_saved_config,
    split_outputs,
    train_stage,
    training_differences,  # noqa: E402
)
from dimec.rundir import RunDir  # noqa: E402
from dimec.tiers import TIERS  # noqa: E402
from dimec.training.temperature import calibration_report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TITLE = "Exits: self-distillation and calibrated confidences (issue 9)"
TASKS = "sst2,cola,mrpc,qnli,rotten_tomatoes"
DEFAULT_DISTILL = ("train.distill_weight=0.5", "train.distill_temperature=2.0", "train.distill_teacher=last")
ECE_TARGET, GAIN_TARGET_PT, CLOUD_TOLERANCE_PT = 0.03, 1.0, 0.3
WALL = "bench_exits_wall.json"  # beside a run: the wall time of the train stage that made it


def variant_configs(base: RunConfig, distill: list[str]) -> dict[str, RunConfig]:
    """{"off": no self-distillation, "distill": the config's own distillation, or `distill` if it has none}."""
    off = replace(base, train=replace(base.train, distill_weight=0.0))
    on = base if base.train.distill_weight > 0 else RunConfig.from_dict(apply_overrides(base.to_dict(), distill))
    return {"off": off, "distill": on}


def train_or_reuse(cfg: RunConfig, run_dir: Path) -> bool:
    """Train unless a finished run with the same training settings is there; returns whether it was reused."""
    if RunDir(run_dir).train_result.is_file() and not training_differences(load_saved_config(run_dir), cfg):
        return True
    t0 = time.perf_counter()
    train_stage(cfg, run_dir)
    (run_dir / WALL).write_text(json.dumps({"train_stage_seconds": time.perf_counter() - t0}) + "\n")
    return False


def run_figures(run_dir: Path) -> dict:
    """Per split and exit: accuracy, the task metric, ECE before/after (15 bins); temperatures; times."""
    metric = json.loads(RunDir(run_dir).data.read_text())["metric"]
    figures: dict = {"metric": metric}
    for split in ("validation", "test"):
        t0 = time.perf_counter()
        outputs = split_outputs(run_dir, split)
        cal = calibration_report(outputs, outputs.temperatures)
        figures[split] = {
            "samples": len(outputs),
            "accuracy": [float(outputs.correct[:, k].mean()) for k in range(3)],
            "metric": [compute_metrics(outputs.labels, outputs.predictions[:, k], metric).get(metric) for k in range(3)],
            "ece_before": cal["ece_before"], "ece_after": cal["ece_after"],
            "ece_floor_after": [ece_noise_floor(outputs.probs[:, k]) for k in range(3)],
            "nll_before": cal["nll_before"], "nll_after": cal["nll_after"],
            "predict_seconds": time.perf_counter() - t0,
        }
        figures["temperatures"] = cal["temperatures"]
    result = json.loads(RunDir(run_dir).train_result.read_text())
    wall = run_dir / WALL
    figures |= {"train_seconds": result["seconds"], "best_epoch": result["best_epoch"],
                "train_stage_seconds": json.loads(wall.read_text())["train_stage_seconds"] if wall.is_file() else None,
                "settings": {k: v for k, v in load_saved_config(run_dir).to_dict()["train"].items()
                             if k in ("learning_rate", "epochs", "distill_weight", "distill_temperature",
                                      "distill_teacher", "exit_loss_weights", "exit_loss_weighting")}}
    return figures


def summarise(tasks: dict[str, dict]) -> dict:
    """Mobile-exit gain and cloud-exit change (points, distill - off) per task and on average, per split; the
    ECE target per exit after scaling."""
    out: dict = {}
    for split in ("validation", "test"):
        gain = {t: 100 * (v["distill"][split]["accuracy"][0] - v["off"][split]["accuracy"][0]) for t, v in tasks.items()}
        cloud = {t: 100 * (v["distill"][split]["accuracy"][2] - v["off"][split]["accuracy"][2]) for t, v in tasks.items()}
        out[split] = {"mobile_gain_pt": gain, "mean_mobile_gain_pt": float(np.mean(list(gain.values()))),
                      "cloud_change_pt": cloud, "mean_cloud_change_pt": float(np.mean(list(cloud.values())))}
    worst = {variant: max(max(v[variant]["test"]["ece_after"]) for v in tasks.values()) for variant in ("off", "distill")}
    out["max_test_ece_after"] = worst
    out["ece_target_met"] = {variant: w <= ECE_TARGET for variant, w in worst.items()}
    out["mobile_gain_target_met_on_test"] = out["test"]["mean_mobile_gain_pt"] >= GAIN_TARGET_PT
    out["cloud_within_tolerance_on_test"] = {t: abs(c) <= CLOUD_TOLERANCE_PT
                                             for t, c in out["test"]["cloud_change_pt"].items()}
    return out


def render(doc: dict) -> str:
    """The BENCHMARKS.md section body from exits.json."""
    tasks, s, meta = doc["tasks"], doc["summary"], doc["meta"]

    def pct(x):
        return f"{100 * x:.1f}"

    def metric_cell(task, variant, split, k):
        f = tasks[task][variant][split]
        m = f["metric"][k]
        return pct(f["accuracy"][k]) + ("" if f_metric(task) == "accuracy" else f" ({f_metric(task).upper()} {pct(m)})")

    def f_metric(task):
        return tasks[task]["off"]["metric"]

    lines = [f"Base: `{meta['config']}` (with its per-task settings), training split capped at "
             f"{meta['max_train_samples']} rows, {meta['epochs']} epochs; self-distillation variant: "
             f"{', '.join(meta['distill'])}. Model {meta['model']}, exits after layers "
             f"{'/'.join(str(x) for x in meta['exit_layers'])}. Peak memory "
             f"{meta['peak_mib']:.0f} MiB; wall time of this invocation {meta['wall_minutes']:.1f} min"
             + (f" (runs reused: {meta['reused']})" if meta["reused"] else "") + ".", ""]
    for split in ("test", "validation"):
        lines += [f"Exit accuracy % on the {split} split (task metric beside it), without -> with self-distillation:", "",
                  "| task | samples | mobile | edge | cloud | mobile gain (pt) | cloud change (pt) |",
                  "|---|---:|---|---|---|---:|---:|"]
        for t in tasks:
            cells = [f"{metric_cell(t, 'off', split, k)} -> {metric_cell(t, 'distill', split, k)}" for k in range(3)]
            lines.append(f"| {t} | {tasks[t]['off'][split]['samples']} | " + " | ".join(cells) +
                         f" | {s[split]['mobile_gain_pt'][t]:+.2f} | {s[split]['cloud_change_pt'][t]:+.2f} |")
        lines += [f"| **mean** | | | | | **{s[split]['mean_mobile_gain_pt']:+.2f}** | "
                  f"{s[split]['mean_cloud_change_pt']:+.2f} |", ""]
    lines += ["ECE (15 bins, test split) of each exit before (T = 1) -> after temperature scaling (T fitted on "
              "validation by NLL); in brackets the noise floor: the ECE a perfectly calibrated exit with the same "
              "confidences shows on a split this size (mean of 200 simulations):", "",
              "| task | variant | T mobile / edge / cloud | mobile | edge | cloud |", "|---|---|---|---:|---:|---:|"]
    for t in tasks:
        for variant in ("off", "distill"):
            f = tasks[t][variant]
            lines.append(f"| {t} | {variant} | " + " / ".join(f"{x:.2f}" for x in f["temperatures"]) + " | " +
                         " | ".join(f"{b:.3f} -> {a:.3f} ({fl:.3f})" for b, a, fl in
                                    zip(f["test"]["ece_before"], f["test"]["ece_after"], f["test"]["ece_floor_after"],
                                        strict=True)) + " |")
    lines += ["", "Training time (the epochs loop) and wall time of the train stage (epochs, dynamics, temperature "
              "fit), minutes:", "", "| task | off: train / stage | distill: train / stage |", "|---|---:|---:|"]
    for t in tasks:
        cells = []
        for variant in ("off", "distill"):
            f = tasks[t][variant]
            stage = f"{f['train_stage_seconds'] / 60:.1f}" if f["train_stage_seconds"] else "-"
            cells.append(f"{f['train_seconds'] / 60:.1f} / {stage}")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    gain = s["test"]["mean_mobile_gain_pt"]
    lines += ["", f"- Mean mobile-exit gain over the tasks: **{gain:+.2f} pt on test** "
              f"({s['validation']['mean_mobile_gain_pt']:+.2f} on validation); target +{GAIN_TARGET_PT:g} pt: "
              f"{'reached' if s['mobile_gain_target_met_on_test'] else 'not reached'}.",
              "- Cloud exit within " f"{CLOUD_TOLERANCE_PT} pt of the run without distillation (test): "
              + ", ".join(f"{t} {'yes' if ok else 'no'} ({s['test']['cloud_change_pt'][t]:+.2f})"
                          for t, ok in s["cloud_within_tolerance_on_test"].items()) + ".",
              f"- Largest test ECE of any exit after scaling: off {s['max_test_ece_after']['off']:.3f}, distill "
              f"{s['max_test_ece_after']['distill']:.3f} (target <= {ECE_TARGET}: "
              + ", ".join(f"{v} {'met' if ok else 'not met'}" for v, ok in s["ece_target_met"].items()) + ")."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT.parent / "scratch" / "exits"), help="runs go here (not the repo)")
    parser.add_argument("--tasks", default=TASKS)
    parser.add_argument("--max-train-samples", type=int, default=8000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--config", default=str(ROOT / "configs" / "reproduce.yaml"))
    parser.add_argument("--distill", action="append", default=None, metavar="SECTION.KEY=VALUE",
                        help=f"the distillation variant's settings when the config has none (default {DEFAULT_DISTILL})")
    args = parser.parse_args()
    out, distill = Path(args.out), args.distill or list(DEFAULT_DISTILL)
    base, task_settings = load_reproduce_config(args.config, [], args.epochs)
    base = with_train_cap(base, args.max_train_samples)
    t0, reused, tasks = time.perf_counter(), [], {}
    for task in args.tasks.split(","):
        tasks[task] = {}
        for variant, cfg in variant_configs(task_config(base, task, task_settings), distill).items():
            as_configured = not training_differences(cfg, task_config(base, task, task_settings))
            run_dir = out / ("runs" if as_configured else f"runs-{variant}") / task
            print(f"{task} / {variant}: {run_dir}", flush=True)
            if train_or_reuse(cfg, run_dir):
                reused.append(f"{task}/{variant}")
            tasks[task][variant] = run_figures(run_dir) | {"run_dir": str(run_dir)}
    command = (f"python benchmarks/bench_exits.py --tasks {args.tasks} --max-train-samples {args.max_train_samples} "
               f"--epochs {args.epochs} --config {Path(args.config).resolve().relative_to(ROOT)}")
    meta = {"command": command, "config": str(Path(args.config).resolve().relative_to(ROOT)),
            "max_train_samples": args.max_train_samples, "epochs": args.epochs, "distill": distill,
            "task_settings": task_settings, "reused": ", ".join(reused),
            "wall_minutes": (time.perf_counter() - t0) / 60,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "tiers": list(TIERS),
            "model": "all-MiniLM-L6-v2" if base.model.name_or_path == "default" else base.model.name_or_path,
            "exit_layers": list(MultiExitConfig.load(Path(tasks[task]["off"]["run_dir"]) / "model").exit_layers)}
    doc = {"meta": meta, "tasks": tasks, "summary": summarise(tasks)}
    print(render(doc))
    print(f"wrote {save('exits', TITLE, command, 'bench_exits.py', doc)}")


if __name__ == "__main__":
    main()
