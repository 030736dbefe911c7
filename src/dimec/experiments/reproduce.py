"""`dimec reproduce`: the paper's Table I, the cost ablations (Fig. 5) and the figures, from one command.

For each task: train once into OUT/runs/<task> (a finished run with the same settings is reused), load
the cached validation/test exit outputs, fit every router on validation (cartography + cost model),
score each on test through `dimec.evaluation` (seeded methods over several seeds), then re-calibrate
DIMEC-DC under scaled cost settings. Everything lands in OUT with an index.md linking it all.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from dimec.config import RunConfig
from dimec.errors import ArtifactError, ConfigError
from dimec.experiments import METHODS, MULTIPLIERS, TASKS

if TYPE_CHECKING:  # the heavy modules (torch, scikit-learn) load only when reproduce runs, not with the CLI
    import numpy as np

    from dimec.costs import CostModel
    from dimec.outputs import ExitOutputs
    from dimec.routing.base import TrainingSignal
    from dimec.training.cartography import Cartography


@dataclass
class TaskRun:
    """One task's trained run and everything the methods are fitted and scored on."""

    task: str
    run_dir: Path
    cfg: RunConfig
    metric: str
    sizes: dict[str, int]
    val: ExitOutputs
    test: ExitOutputs
    carto: Cartography
    cost_model: CostModel
    reused: bool
    train: TrainingSignal | None  # the training split's routing features and cartography, when recorded


def task_config(base_cfg: RunConfig, task: str, task_settings: dict | None = None) -> RunConfig:
    """The base settings for `task`, then the task's own settings over them (the `tasks:` section of the
    config file, e.g. {"train": {"epochs": 5}}: docs/method.md says how they were chosen)."""
    from dimec.config import with_task_settings

    cfg = replace(base_cfg, data=replace(base_cfg.data, task=task))
    own = (task_settings or {}).get(task)
    return RunConfig.from_dict(with_task_settings(cfg.to_dict(), own, task)) if own else cfg


def load_reproduce_config(path: str | None, overrides: list[str], epochs: int | None = None
                          ) -> tuple[RunConfig, dict]:
    """The base RunConfig (the file, `epochs`, then the --set overrides) and the per-task settings of the
    file's `tasks:` section, each task's checked now, before anything trains. A task's own settings win over
    the base and over `epochs`; a --set override wins over both."""
    from dimec.config import apply_overrides, read_config_file, split_task_settings

    raw = read_config_file(path) if path else {}
    base, task_settings = split_task_settings(raw, overrides)
    unknown = sorted(set(task_settings) - set(TASKS))
    if unknown:
        raise ConfigError(f"settings for unknown task(s) {', '.join(unknown)} in {path}", f"known: {', '.join(TASKS)}")
    base_overrides = ([f"train.epochs={epochs}"] if epochs is not None else []) + list(overrides)
    cfg = RunConfig.from_dict(apply_overrides(base, base_overrides))
    for task in task_settings:
        task_config(cfg, task, task_settings)  # raises on a bad key or value
    return cfg, task_settings


def run_name(cfg: RunConfig) -> str:
    """A run's folder name: the task, or for custom data data.name, else the data file's (or folder's) name."""
    if cfg.data.task != "file":
        return cfg.data.task
    return cfg.data.name or Path(cfg.data.path or "file").stem


def _calibrated(run_dir: Path) -> bool:
    """Whether the run's model has fitted exit temperatures (a run trained before them goes through
    train_stage again, which resumes after its last epoch and only fits them)."""
    from dimec.modeling.multi_exit import MultiExitConfig
    from dimec.rundir import RunDir

    try:
        return MultiExitConfig.load(RunDir(run_dir).model).temperatures is not None
    except ArtifactError:
        return False


def prepare_task(task: str, base_cfg: RunConfig, out_dir: Path, task_settings: dict | None = None) -> TaskRun:
    from dimec.pipeline import (
        load_cartography,
        load_cost_model,
        load_saved_config,
        split_outputs,
        train_stage,
        training_differences,
        training_signal,
    )
    from dimec.rundir import RunDir

    cfg = task_config(base_cfg, task, task_settings)
    task = run_name(cfg)
    run_dir = Path(out_dir) / "runs" / task
    reused = RunDir(run_dir).train_result.is_file() and not training_differences(load_saved_config(run_dir), cfg) \
        and _calibrated(run_dir)
    if not reused:
        train_stage(cfg, run_dir)  # resumes a half-finished run; refuses one with other settings
    val, test = split_outputs(run_dir, "validation"), split_outputs(run_dir, "test")
    carto = load_cartography(run_dir, cfg.calibration)
    if len(carto.confidence) != len(val):
        raise ArtifactError(f"{run_dir}: dynamics cover {len(carto.confidence)} samples, validation has {len(val)}",
                            "delete that run directory and run reproduce again")
    info = json.loads(RunDir(run_dir).data.read_text())
    return TaskRun(task, run_dir, cfg, info["metric"], info["sizes"], val, test, carto,
                   load_cost_model(run_dir, cfg.cost), reused, training_signal(run_dir, cfg))


def reproduce(tasks: Sequence[str], base_cfg: RunConfig, out_dir: str | Path, seeds: Sequence[int] = (0, 1, 2),
              methods: Sequence[str] | None = None, multipliers: Sequence[float] = MULTIPLIERS,
              meta: dict | None = None, tsne_points: int = 1500, task_settings: dict | None = None) -> dict:
    """Table I + ablations + plots for `tasks`; returns {"tables", "ablations", "index"}."""
    from dimec.experiments import plots
    from dimec.experiments.ablations import run_ablations, write_ablations
    from dimec.experiments.compare import build_router, compare_methods
    from dimec.experiments.tables import task_rows, write_table
    from dimec.pipeline import load_cost_model
    from dimec.routing import ROUTERS

    out_dir = Path(out_dir)
    methods = list(dict.fromkeys(["cloud-only", *(methods or METHODS), "oracle"]))  # references always in
    unknown = [m for m in methods if m not in ROUTERS]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}", f"known: {', '.join(sorted(ROUTERS))}")
    if not tasks or not seeds:
        raise ConfigError("reproduce needs at least one task and one seed")
    plot_dir = out_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    tables, ablation_rows, task_files, pool_shares, device_acc = {}, [], {}, {}, {}
    for task_arg in tasks:
        tr = prepare_task(task_arg, base_cfg, out_dir, task_settings)
        task, cal, cm = tr.task, tr.cfg.calibration, tr.cost_model
        compared = compare_methods(tr.val, tr.test, cm, tr.carto, tr.metric, cal, methods, tuple(seeds), tr.train)
        tables[task] = {"metric": tr.metric, "test_size": len(tr.test), "sizes": tr.sizes,
                        "run_dir": str(tr.run_dir), "reused_run": tr.reused, "cost_model": cm.to_dict(),
                        "training": training_settings(tr.cfg), "exit_calibration": exit_calibration(tr.test),
                        "rows": task_rows(task, tr.metric, compared, cm.cloud_only)}
        ablations = run_ablations(task, tr.val, tr.test, tr.carto, tr.metric, tr.cfg.cost, cal,
                                  lambda c, run_dir=tr.run_dir: load_cost_model(run_dir, c), multipliers)
        ablation_rows += ablations
        fixed = build_router("dimec-fixed", cal).fit(tr.val, cm, tr.carto)
        pool_shares[task], device_acc[task] = fixed.pool_shares_, tr.test.correct.mean(0)  # (3,), (3,)
        task_files[task] = task_plots(tr, fixed.pools_, compared, ablations, plot_dir, tsne_points)
    meta = {**(meta or {}), "tasks": list(tasks), "seeds": list(seeds), "methods": methods,
            "cost": asdict(base_cfg.cost), "model": base_cfg.model.name_or_path, "epochs": base_cfg.train.epochs,
            "max_train_samples (training split cap)": base_cfg.data.max_train_samples,
            "per-task settings (over the base; docs/method.md)": task_settings or {}}
    table_paths = write_table(tables, meta, out_dir)
    ablation_paths = write_ablations(ablation_rows, out_dir)
    for path, figure in ((plot_dir / "pool_proportions.png", plots.plot_pool_proportions),
                         (plot_dir / "device_accuracy.png", plots.plot_device_accuracy)):
        figure(pool_shares if "pool" in path.name else device_acc, path)
    index = write_index(out_dir, meta, tables, table_paths, ablation_paths, task_files)
    return {"tables": tables, "ablations": ablation_rows, "index": index}


def training_settings(cfg: RunConfig) -> dict:
    """What a task was trained with, where tasks may differ (recorded in table_I.json)."""
    t = cfg.train
    return {"learning_rate": t.learning_rate, "epochs": t.epochs, "max_length": cfg.data.max_length,
            "distill_weight": t.distill_weight, "distill_temperature": t.distill_temperature,
            "distill_teacher": t.distill_teacher, "exit_loss_weights": list(t.exit_loss_weights),
            "exit_loss_weighting": t.exit_loss_weighting}


def exit_calibration(test: ExitOutputs) -> dict:
    """Each exit's temperature and its test-split ECE (15 bins) before (T = 1) and after temperature scaling."""
    from dimec.training.temperature import calibration_report

    report = calibration_report(test, test.temperatures)
    return {k: report[k] for k in ("temperatures", "ece_before", "ece_after", "samples", "bins")} | {"split": "test"}


def task_plots(tr: TaskRun, pools: np.ndarray, compared: list[dict], ablations: list[dict], plot_dir: Path,
               tsne_points: int) -> dict[str, Path]:
    """Per-task figures: data map, t-SNE of the pools, Pareto plot (with its sweep data as JSON), ablation."""
    from dimec.atomic import write_json
    from dimec.experiments import plots
    from dimec.experiments.compare import threshold_sweeps
    from dimec.training.cartography import plot_data_map

    t = tr.task
    files = {"data map": plot_dir / f"{t}_data_map.png", "t-SNE of the pools": plot_dir / f"{t}_tsne_pools.png",
             "accuracy vs cost": plot_dir / f"{t}_pareto.png", "cost ablations": plot_dir / f"{t}_ablations.png",
             "reliability": plot_dir / f"{t}_reliability.png"}
    plots.plot_ablation(ablations, files["cost ablations"], f"{t}: DIMEC-DC under scaled costs (Fig. 5)")
    plots.plot_reliability(tr.test, files["reliability"],
                           f"{t}: exit reliability on {len(tr.test)} test samples, before / after temperature scaling")
    cal = tr.cfg.calibration
    plot_data_map(tr.carto, files["data map"], cal.cartography_exit,
                  title=f"{t}: data map at the {cal.cartography_exit} exit ({len(tr.val)} validation samples)")
    plots.plot_pools_tsne(tr.val.embeddings, pools, files["t-SNE of the pools"],
                          f"{t}: t-SNE of validation embeddings by DIMEC pool (Fig. 4b/c)", tsne_points)
    sweeps = threshold_sweeps(tr.val, tr.test, tr.cost_model, tr.carto, tr.metric, cal, tr.train)
    plots.plot_pareto({r["method"]: r["mean"] for r in compared if "mean" in r}, sweeps, files["accuracy vs cost"],
                      f"{t}: accuracy vs cost, every method ({len(tr.test)} test samples)", highlight="auto")
    files["sweep data"] = plot_dir / f"{t}_pareto.json"
    write_json(files["sweep data"], sweeps)
    return files


def write_index(out_dir: Path, meta: dict, tables: dict, table_paths: dict, ablation_paths: dict,
                task_files: dict[str, dict[str, Path]]) -> Path:
    from dimec.atomic import write_text
    from dimec.experiments.tables import PAPER_HEADLINE

    def rel(p: Path) -> str:
        return str(Path(p).relative_to(out_dir))

    lines = ["# DIMEC-DC reproduction", "", f"> {PAPER_HEADLINE}.", "", "## Settings", ""]
    lines += [f"- {k}: `{v}`" for k, v in meta.items()]
    lines += ["", "## Tables", "",
              f"- [Table I]({rel(table_paths['md'])}) ([CSV]({rel(table_paths['csv'])}), "
              f"[JSON]({rel(table_paths['json'])}))",
              f"- [Cost ablations, Fig. 5]({rel(ablation_paths['md'])}) ([CSV]({rel(ablation_paths['csv'])}), "
              f"[JSON]({rel(ablation_paths['json'])}))", "",
              "## Figures", "", "![pool proportions (Fig. 3)](plots/pool_proportions.png)", "",
              "![accuracy of each device alone (Fig. 4a)](plots/device_accuracy.png)", ""]
    lines += noisy_estimates(tables)
    lines += calibration_table(tables)
    for task, files in task_files.items():
        t = tables[task]
        lines += [f"### {task}", "",
                  f"Run `{rel(Path(t['run_dir']))}` ({'reused' if t['reused_run'] else 'trained'}); samples "
                  + ", ".join(f"{k} {v}" for k, v in t["sizes"].items()) + f"; metric {t['metric']}; trained with "
                  + ", ".join(f"{k} {v}" for k, v in t["training"].items()) + ".", ""]
        lines += [f"- [{name}]({rel(p)})" for name, p in files.items()] + [""]
        lines += [f"![{name}]({rel(p)})" for name, p in files.items() if p.suffix == ".png"] + [""]
    path = out_dir / "index.md"
    write_text(path, "\n".join(lines))
    return path


def noisy_estimates(tables: dict) -> list[str]:
    """index.md's warning: every method whose validation loss estimate cannot resolve the stated loss."""
    rows = [(task, r) for task, t in tables.items() for r in t["rows"] if r.get("noisy_estimate")]
    if not rows:
        return []
    lines = ["## ⚠ Loss estimates too noisy for the target", "",
             "These methods chose their thresholds on a validation loss estimate whose standard error is at least "
             "the stated loss: on new data their loss will often exceed it (calibrate on more rows, cross-fit, or "
             "use expected-loss control or a guarantee; docs/routing.md).", ""]
    lines += [f"- {task}: {r['method']} (standard error {r['val_loss_se_pt']:.2f} pt; test Δacc "
              f"{r['accuracy_change_pt']:+.2f} pt)" for task, r in rows]
    return lines + [""]


def calibration_table(tables: dict) -> list[str]:
    """Markdown: per task, each exit's temperature and test ECE before -> after temperature scaling."""
    lines = ["## Exit calibration (test split, ECE with 15 bins)", "",
             "Temperatures fitted on validation (NLL) at the end of training; ECE before (T = 1) -> after.", "",
             "| task | T mobile / edge / cloud | ECE mobile | ECE edge | ECE cloud |", "|---|---|---:|---:|---:|"]
    for task, t in tables.items():
        c = t["exit_calibration"]
        lines.append(f"| {task} | " + " / ".join(f"{x:.2f}" for x in c["temperatures"]) + " | "
                     + " | ".join(f"{b:.3f} -> {a:.3f}" for b, a in zip(c["ece_before"], c["ece_after"], strict=True))
                     + " |")
    return lines + [""]


# ---- command line -----------------------------------------------------------------------------------------
def add_reproduce_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma list (default {','.join(TASKS)})")
    parser.add_argument("--out", default="reproduce", help="output directory (runs, tables, plots, index.md)")
    parser.add_argument("--max-train-samples", type=int, default=None, metavar="N",
                        help="cap the training split at N rows (stratified; validation and test keep their share)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default: train.epochs); a task's own epochs in the config win")
    parser.add_argument("--seeds", default="0,1,2", help="seeds for the seeded/online methods (comma list)")
    parser.add_argument("--methods", default=None, help=f"comma list (default all: {','.join(METHODS)})")
    parser.add_argument("--multipliers", default=",".join(f"{m:g}" for m in MULTIPLIERS),
                        help="cost multipliers for the ablations (comma list)")
    parser.add_argument("--cross-fit", type=int, default=None, metavar="K",
                        help="K fold models per task give every training row an out-of-fold answer "
                             "(outputs/oof.safetensors; shortcut for --set train.cross_fit=K)")
    parser.add_argument("--config", help="YAML/JSON base config (its data.task is replaced per task; an optional "
                        "tasks: section holds per-task settings, which win over the base and --epochs, not --set)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting, e.g. --set cost.offload_cloud=4 (repeatable)")
    return parser


def _items(text: str, kind: type, what: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"bad --{what} {text!r}", f"give a comma list of {kind.__name__} values") from None


def with_train_cap(cfg: RunConfig, max_train_samples: int) -> RunConfig:
    """The training split holds at most N rows (stratified); validation and test keep their share of the
    pooled rows, so thresholds are chosen and reported on thousands of samples where the task has them."""
    if max_train_samples < 1:
        raise ConfigError(f"--max-train-samples must be >= 1, got {max_train_samples}")
    return replace(cfg, data=replace(cfg.data, max_train_samples=max_train_samples))


def main_reproduce(args: argparse.Namespace) -> None:
    cross_fit = [] if args.cross_fit is None else [f"train.cross_fit={args.cross_fit}"]
    cfg, task_settings = load_reproduce_config(args.config, cross_fit + list(args.overrides), args.epochs)
    meta = {}
    if args.max_train_samples is not None:
        cfg = with_train_cap(cfg, args.max_train_samples)
    result = reproduce(_items(args.tasks, str, "tasks"), cfg, Path(args.out), _items(args.seeds, int, "seeds"),
                       _items(args.methods, str, "methods") if args.methods else None,
                       _items(args.multipliers, float, "multipliers"), meta, task_settings=task_settings)
    summary = (Path(args.out) / "table_I.md").read_text().split("## All tasks")[-1]
    print(f"## All tasks{summary}")
    print(f"wrote {result['index']}")
