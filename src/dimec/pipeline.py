"""The stages of a run, each reading and writing one run directory:

    train      -> config.json, data.json, model/, dynamics/epoch_*.jsonl, train_log.jsonl, checkpoint/
    calibrate  -> outputs/validation.safetensors, router.json, calibration.json, data_map.png
    evaluate   -> outputs/test.safetensors, metrics.json
    route      -> tiers and labels for new texts

`run_all` chains train, calibrate and evaluate.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from dimec.atomic import write_json
from dimec.config import CalibrationConfig, CostConfig, RunConfig
from dimec.costs import CostModel
from dimec.data import Example, TaskData, load_task
from dimec.errors import ArtifactError, ConfigError, DataError
from dimec.evaluation import MethodResult, evaluate_router
from dimec.modeling.multi_exit import MultiExitConfig, MultiExitModel
from dimec.outputs import ExitOutputs
from dimec.routing import make_router
from dimec.routing.dimec import DimecFixedRouter
from dimec.rundir import CONFIG, MODEL_DIR, SPLITS, RunDir
from dimec.tiers import POOLS, TIERS
from dimec.training.batching import encode
from dimec.training.cartography import Cartography, dynamics_sample, plot_data_map, read_dynamics
from dimec.training.loss import train_setting_problems
from dimec.training.trainer import TrainResult, new_model, predict_exit_outputs, train


# ---- run directory -------------------------------------------------------------------------------------
def load_run_config(run_dir: Path) -> RunConfig:
    path = RunDir(run_dir).config
    if not path.is_file():
        raise ArtifactError(f"{run_dir} is not a dimec run directory (no {CONFIG})",
                            "create one with `dimec train --run-dir DIR` or `dimec run --run-dir DIR`")
    return RunConfig.load(path)


def prepare_run_dir(cfg: RunConfig, run_dir: Path) -> None:
    """Save the config; refuse to resume a run whose data/model/training settings differ."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = RunDir(run_dir).config
    if path.is_file():
        old = load_run_config(run_dir)
        for section in ("data", "model", "train"):
            if asdict(getattr(old, section)) != asdict(getattr(cfg, section)):
                raise ConfigError(
                    f"{run_dir} holds a run with other {section} settings",
                    "use a new --run-dir, or delete the old one to start over",
                )
    cfg.save(path)


def task_data(cfg: RunConfig) -> TaskData:
    """The run's splits; deterministic for a config (seeded), so every stage sees the same samples."""
    return load_task(cfg.data)


# ---- stages --------------------------------------------------------------------------------------------
def train_stage(cfg: RunConfig, run_dir: Path) -> TrainResult:
    run_dir = Path(run_dir)
    data = task_data(cfg)  # data, settings and model are checked before anything is written to run_dir
    problems = train_setting_problems(cfg.train)
    if problems:
        raise ConfigError("; ".join(problems), "fix the train settings (docs/method.md, Training)")
    dynamics_rows = dynamics_sample(np.array([e.label for e in data.train]), cfg.train.train_dynamics_samples,
                                    cfg.train.seed)
    config = MultiExitConfig(**asdict(cfg.model), label_names=data.label_names, task=data.name,
                             metric=data.metric, max_length=cfg.data.max_length)
    model = new_model(config, cfg.train.seed)
    prepare_run_dir(cfg, run_dir)
    write_json(RunDir(run_dir).data, {
        "task": data.name, "label_names": data.label_names, "metric": data.metric,
        "sizes": {s: len(getattr(data, s)) for s in SPLITS},
    })
    train_enc = encode(model.tokenizer, data.train, cfg.data.max_length)
    val_enc = encode(model.tokenizer, data.validation, cfg.data.max_length)
    result = train(model, train_enc, val_enc, cfg.train, run_dir, dynamics_rows)
    write_json(RunDir(run_dir).train_result, asdict(result))
    return result


def load_model(run_dir: Path) -> MultiExitModel:
    if not RunDir(run_dir).model.is_dir():
        raise ArtifactError(f"{run_dir} has no trained model ({MODEL_DIR}/)", "run `dimec train` on it first")
    return MultiExitModel.from_pretrained(RunDir(run_dir).model)


def load_model_config(run_dir: Path) -> MultiExitConfig:
    """The trained model's configuration (exit layers, labels, temperatures), without its weights."""
    if not RunDir(run_dir).model.is_dir():
        raise ArtifactError(f"{run_dir} has no trained model ({MODEL_DIR}/)", "run `dimec train` on it first")
    return MultiExitConfig.load(RunDir(run_dir).model)


def split_outputs(run_dir: Path, split: str) -> ExitOutputs:
    """Each exit's outputs on a split, computed once with the kept model and cached."""
    run_dir = Path(run_dir)
    cache = RunDir(run_dir).outputs(split)
    temperatures = load_model_config(run_dir).exit_temperatures(str(RunDir(run_dir).model))
    if cache.is_file():
        try:  # logits are cached: a cache read at other temperatures only needs the model's
            return ExitOutputs.load(cache).with_temperatures(temperatures)
        except ArtifactError as exc:  # damaged or outdated: it is only a cache, compute it again
            print(f"dimec: {exc.message}; recomputing it", flush=True)
    cfg = load_run_config(run_dir)
    model = load_model(run_dir)
    examples: list[Example] = getattr(task_data(cfg), split)
    outputs = predict_exit_outputs(model, encode(model.tokenizer, examples, cfg.data.max_length),
                                   cfg.train.eval_batch_size, progress=cfg.train.progress)
    outputs = outputs.with_temperatures(temperatures)
    outputs.save(cache)
    return outputs


def load_cartography(run_dir: Path, cfg: CalibrationConfig) -> Cartography:
    probs, correct = read_dynamics(Path(run_dir))
    return Cartography.from_dynamics(probs, correct, cfg.variability)


def load_cost_model(run_dir: Path, cost_cfg: CostConfig | None = None) -> CostModel:
    cfg = load_run_config(run_dir)
    return CostModel.from_config(cost_cfg or cfg.cost, tuple(load_model_config(run_dir).exit_layers))


def calibrate_stage(run_dir: Path, cfg: RunConfig | None = None) -> dict:
    """Cartography -> thresholds by reward search -> pools -> centroids, saved as router.json."""
    run_dir = Path(run_dir)
    cfg = cfg or load_run_config(run_dir)
    cfg.save(RunDir(run_dir).config)  # calibration and cost settings may be changed between stages
    carto = load_cartography(run_dir, cfg.calibration)
    val = split_outputs(run_dir, "validation")
    if len(carto.confidence) != len(val):
        raise ArtifactError(f"dynamics cover {len(carto.confidence)} samples but validation has {len(val)}",
                            "the run directory mixes two runs: train again in a fresh --run-dir")
    cost_model = load_cost_model(run_dir, cfg.cost)
    c = cfg.calibration
    router = DimecFixedRouter(c.alpha_grid, c.beta_grid, c.medium_rule, c.cartography_exit)
    router.fit(val, cost_model, carto)
    router.save(RunDir(run_dir).router)
    summary = {
        "alpha": router.alpha_, "beta": router.beta_, "expected_reward": router.expected_reward_,
        "pool_counts": dict(zip(POOLS, router.counts_.tolist(), strict=True)),
        "cost_model": cost_model.to_dict(), "tier_costs": cost_model.tier_costs.tolist(),
        "reward_grid": {"alpha": list(c.alpha_grid), "beta": list(c.beta_grid), "reward": router.reward_grid_.tolist()},
        "variability": c.variability, "medium_rule": c.medium_rule,
    }
    RunDir(run_dir).calibration.write_text(json.dumps(summary, indent=2) + "\n")
    plot_data_map(carto, RunDir(run_dir).data_map, c.cartography_exit)
    return summary


def evaluate_stage(run_dir: Path, cfg: RunConfig | None = None) -> dict:
    """Cloud-only, DIMEC Fixed and Dynamic on the test split, under one cost model."""
    run_dir = Path(run_dir)
    cfg = cfg or load_run_config(run_dir)
    fixed = DimecFixedRouter.load(RunDir(run_dir).router)
    dynamic = dynamic_from_fixed(fixed)
    test = split_outputs(run_dir, "test")
    cost_model = load_cost_model(run_dir, cfg.cost)
    metric = json.loads(RunDir(run_dir).data.read_text())["metric"]
    results: list[MethodResult] = [
        evaluate_router(make_router("cloud-only"), test, cost_model, metric),  # the reference
        evaluate_router(fixed, test, cost_model, metric, name="dimec-fixed"),
        evaluate_router(dynamic, test, cost_model, metric, name="dimec-dynamic"),
    ]
    report = {"task": cfg.data.task, "metric": metric, "test_size": len(test),
              "cost_model": cost_model.to_dict(), "results": [r.to_dict() for r in results]}
    RunDir(run_dir).metrics.write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_table(report: dict) -> str:
    metric = report["metric"]
    head = f"{'method':<16}{'accuracy':>10}" + (f"{metric:>8}" if metric != "accuracy" else "") + \
        f"{'cost':>9}{'vs cloud':>10}{'mobile':>8}{'edge':>8}{'cloud':>8}"
    lines = [f"task {report['task']}, {report['test_size']} test samples", head, "-" * len(head)]
    for r in report["results"]:
        extra = f"{r['metrics'][metric]:>8.4f}" if metric != "accuracy" else ""
        s = r["tier_shares"]
        lines.append(f"{r['method']:<16}{r['accuracy']:>10.4f}{extra}{r['mean_cost']:>9.4f}"
                     f"{r['cost_change_pct']:>9.1f}%{s[0]:>8.1%}{s[1]:>8.1%}{s[2]:>8.1%}")
    return "\n".join(lines)


def run_all(cfg: RunConfig, run_dir: Path) -> dict:
    train_stage(cfg, run_dir)
    calibrate_stage(run_dir, cfg)
    return evaluate_stage(run_dir, cfg)


# ---- routing new texts ---------------------------------------------------------------------------------
@torch.no_grad()
def route_texts(run_dir: Path, texts: list[str], pairs: list[str] | None = None, mode: str = "fixed") -> list[dict]:
    """Embed, route, and run only the chosen tier's layers for each text."""
    if mode not in ("fixed", "dynamic"):
        raise ConfigError(f"routing mode must be 'fixed' or 'dynamic', got {mode!r}")
    if not texts:
        raise DataError("no texts to route", "give texts on the command line or --file FILE (one per line)")
    if pairs is not None and len(pairs) != len(texts):
        raise DataError(f"{len(texts)} texts but {len(pairs)} text pairs", "give one pair per text")
    model = load_model(run_dir)
    router = DimecFixedRouter.load(RunDir(run_dir).router)
    if mode == "dynamic":
        router = dynamic_from_fixed(router)
    answers = []
    for i, text in enumerate(texts):
        if not text.strip():
            raise DataError(f"text {i + 1} is empty", "give non-empty texts")
        pair = pairs[i] if pairs else None
        enc = model.tokenizer(text, pair, truncation=True, max_length=model.config.max_length, return_tensors="pt")
        inputs = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        emb = model.embed(**inputs).numpy()  # (1, H)
        tier = router.update(emb[0]) if mode == "dynamic" else int(router.predict_tiers(emb)[0])
        temperature = float(model.config.exit_temperatures(str(RunDir(run_dir).model))[tier])
        probs = (model(**inputs, upto=tier)[-1] / temperature).softmax(-1)[0]  # only layers 1..exit_layers[tier]
        label = int(probs.argmax())
        answers.append({"text": text, "tier": TIERS[tier],
                        "label": model.config.label_names[label], "confidence": round(float(probs[label]), 4)})
    return answers


def dynamic_from_fixed(fixed: DimecFixedRouter):
    """A Dynamic router starting from a fitted Fixed router's pools."""
    dynamic = make_router("dimec-dynamic", **fixed.get_params())
    dynamic.__dict__.update({k: (v.copy() if isinstance(v, np.ndarray) else v)
                             for k, v in vars(fixed).items() if k.endswith("_")})
    return dynamic
