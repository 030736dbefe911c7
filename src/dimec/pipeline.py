"""The stages of a run, each reading and writing one run directory:

    train      -> config.json, data.json, model/, dynamics/epoch_*.jsonl, train_log.jsonl, checkpoint/,
                  outputs/oof.safetensors (train.cross_fit), outputs/spare.safetensors (calibration.spare_rows)
    calibrate  -> outputs/validation.safetensors, router.json, calibration.json, data_map.png
    evaluate   -> outputs/test.safetensors, metrics.json
    route      -> tiers and labels for new texts

`run_all` chains train, calibrate and evaluate.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from dimec.atomic import read_json, write_json, write_text
from dimec.config import CalibrationConfig, CostConfig, RunConfig, TrainConfig
from dimec.costs import CostModel
from dimec.data import Example, TaskData, load_task
from dimec.errors import ArtifactError, ConfigError
from dimec.evaluation import MethodResult, evaluate_methods
from dimec.modeling.multi_exit import MultiExitConfig, MultiExitModel
from dimec.outputs import ExitOutputs, softmax
from dimec.routing import ROUTERS, make_router
from dimec.routing.auto import AutoRouter
from dimec.routing.base import TrainingSignal, load_router, save_router
from dimec.routing.cascade import target_of
from dimec.routing.dimec import DimecDynamicRouter, DimecFixedRouter
from dimec.routing.plan import PlanRouter, plan_text
from dimec.routing.targets import Target
from dimec.rundir import CONFIG, MODEL_CONFIG, MODEL_DIR, OOF, SPARE, SPLITS, RunDir
from dimec.runtime.executor import run_plan
from dimec.textinput import check_batch
from dimec.tiers import POOLS, TIERS
from dimec.training.batching import encode
from dimec.training.cartography import (
    Cartography,
    dynamics_rows,
    dynamics_sample,
    plot_data_map,
    read_dynamics,
)
from dimec.training.crossfit import CrossFit, check_folds, cross_fit_to, fingerprint
from dimec.training.temperature import fit_temperatures
from dimec.training.trainer import TrainResult, new_model, predict_exit_outputs, train


# ---- run directory -------------------------------------------------------------------------------------
def load_saved_config(run_dir: Path) -> RunConfig:
    """The RunConfig a run directory was made with (its config.json); config.load_run_config reads a user's file."""
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
        for section in training_differences(load_saved_config(run_dir), cfg)[:1]:
            raise ConfigError(
                f"{run_dir} holds a run with other {section} settings",
                "use a new --run-dir, or delete the old one to start over",
            )
    cfg.save(path)


RUNS_ANYWHERE = ("device", "mixed_precision")  # where and in what precision: a run may resume elsewhere


def training_differences(old: RunConfig, new: RunConfig) -> list[str]:
    """The one answer to "was this run trained with these settings?": the sections among data, model and
    train whose settings differ (progress bars aside: they do not change what is trained; nor do the device
    and precision it runs in, so a run may resume on another device). Compared as saved (JSON), so a list
    read back equals the tuple it was saved from."""
    def saved(cfg: RunConfig, section: str) -> str:
        raw = asdict(getattr(cfg, section))
        if section == "train":
            raw |= {"progress": None} | dict.fromkeys(RUNS_ANYWHERE)
        return json.dumps(raw, sort_keys=True, default=list)

    return [s for s in ("data", "model", "train") if saved(old, s) != saved(new, s)]


def task_data(cfg: RunConfig) -> TaskData:
    """The run's splits; deterministic for a config (seeded), so every stage sees the same samples."""
    return load_task(cfg.data)


# ---- stages --------------------------------------------------------------------------------------------
def train_stage(cfg: RunConfig, run_dir: Path) -> TrainResult:
    run_dir = Path(run_dir)
    cfg.validate()  # settings, data and model are checked before anything is written to run_dir
    from dimec.devices import resolve_device, resolve_training_precision

    resolve_training_precision(cfg.train.mixed_precision, resolve_device(cfg.train.device, "train.device"))
    data = task_data(cfg)
    dynamics_of = dynamics_sample(np.array([e.label for e in data.train]), cfg.train.train_dynamics_samples,
                                  cfg.train.seed)  # training rows whose dynamics are recorded
    if cfg.train.cross_fit:
        check_folds(cfg.train.cross_fit, len(data.train), "training rows")
    config = model_config(cfg, data)
    model = new_model(config, cfg.train.seed)
    positions = getattr(model.encoder.config, "max_position_embeddings", None)
    if positions is not None and cfg.data.max_length > positions:
        raise ConfigError(f"data.max_length={cfg.data.max_length} is over the encoder's {positions} positions",
                          f"use data.max_length <= {positions}")
    prepare_run_dir(cfg, run_dir)
    write_json(RunDir(run_dir).data, {
        "task": data.name, "label_names": data.label_names, "metric": data.metric,
        "sizes": {s: len(getattr(data, s)) for s in SPLITS},
    })
    train_enc = encode(model.tokenizer, data.train, cfg.data.max_length)
    val_enc = encode(model.tokenizer, data.validation, cfg.data.max_length)
    result = train(model, train_enc, val_enc, cfg.train, run_dir, dynamics_of)
    del model
    if cfg.calibration.spare_rows and data.spare:
        result.calibration["with_spare_rows"] = refit_temperatures_with_spare(run_dir, cfg, data)
    if cfg.train.cross_fit:
        oof = cross_fit_to(RunDir(run_dir).outputs(OOF), RunDir(run_dir).crossfit, data.train,
                           model_config(cfg, data), cfg.train, cfg.train.cross_fit,
                           log=print if cfg.train.progress else lambda _: None)
        result.calibration["cross_fit"] = {"k": cfg.train.cross_fit, "rows": len(oof.outputs),
                                           "fold_temperatures": oof.fold_temperatures.round(4).tolist(),
                                           "oof_exit_accuracy": oof.outputs.correct.mean(0).round(4).tolist()}
    write_json(RunDir(run_dir).train_result, asdict(result))
    return result


def model_config(cfg: RunConfig, data: TaskData) -> MultiExitConfig:
    """The untrained model's configuration: the deployed model and every cross-fit fold model start here."""
    return MultiExitConfig(**asdict(cfg.model), label_names=data.label_names, task=data.name,
                           metric=data.metric, max_length=cfg.data.max_length)


def load_model(run_dir: Path) -> MultiExitModel:
    folder = RunDir(run_dir).model
    if not folder.is_dir():
        raise ArtifactError(f"{run_dir} has no trained model ({MODEL_DIR}/)", "run `dimec train` on it first")
    try:
        return MultiExitModel.from_pretrained(folder)
    except ArtifactError:
        raise
    except Exception as exc:  # noqa: BLE001  (safetensors, transformers and torch each raise their own)
        raise ArtifactError(f"the model in {folder} is damaged ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''})",
                            "train again into a fresh --run-dir (or restore the model folder)") from None


def load_model_on_device(run_dir: Path, train_cfg: TrainConfig) -> tuple[MultiExitModel, str]:
    """The kept model on train.device, with the autocast precision its exit outputs are computed in."""
    from dimec.devices import resolve_device, resolve_training_precision

    device = resolve_device(train_cfg.device, "train.device")
    precision = resolve_training_precision(train_cfg.mixed_precision, device)
    return load_model(run_dir).to(device), precision


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
    cfg = load_saved_config(run_dir)
    model, precision = load_model_on_device(run_dir, cfg.train)
    examples: list[Example] = getattr(task_data(cfg), split)
    outputs = predict_exit_outputs(model, encode(model.tokenizer, examples, cfg.data.max_length),
                                   cfg.train.eval_batch_size, progress=cfg.train.progress, precision=precision)
    outputs = outputs.with_temperatures(temperatures)
    outputs.save(cache)
    return outputs


def spare_outputs(run_dir: Path, cfg: RunConfig, data: TaskData | None = None) -> ExitOutputs:
    """The deployed model's outputs on the training rows data.max_train_samples dropped (rows it never saw),
    computed once and cached as outputs/spare.safetensors; read at the model's temperatures."""
    rd = RunDir(run_dir)
    temperatures = load_model_config(run_dir).exit_temperatures(str(rd.model))
    if rd.outputs(SPARE).is_file():
        try:
            return ExitOutputs.load(rd.outputs(SPARE)).with_temperatures(temperatures)
        except ArtifactError as exc:
            print(f"dimec: {exc.message}; recomputing it", flush=True)
    rows = (data or task_data(cfg)).spare
    if not rows:
        raise ConfigError("calibration.spare_rows is on but data.max_train_samples drops no training rows",
                          "set calibration.spare_rows=false (or cap the training split)")
    model = load_model(run_dir)
    outputs = predict_exit_outputs(model, encode(model.tokenizer, rows, cfg.data.max_length),
                                   cfg.train.eval_batch_size, progress=cfg.train.progress)
    outputs = outputs.with_temperatures(temperatures)
    outputs.save(rd.outputs(SPARE))
    return outputs


def refit_temperatures_with_spare(run_dir: Path, cfg: RunConfig, data: TaskData) -> dict:
    """The deployed model's exit temperatures fitted (NLL) on validation and the spare rows together, saved
    in its dimec_model.json: more rows, the same unseen-by-the-model kind as validation."""
    rd = RunDir(run_dir)
    both = ExitOutputs.concat([split_outputs(run_dir, "validation"), spare_outputs(run_dir, cfg, data)])
    temperatures = fit_temperatures(both)  # from the raw logits
    model_cfg = load_model_config(run_dir)
    model_cfg.temperatures = tuple(float(t) for t in temperatures)
    write_text(rd.model / MODEL_CONFIG, model_cfg.to_json() + "\n")
    return {"rows": len(both), "temperatures": [round(float(t), 4) for t in temperatures]}


# ---- calibration rows: validation, spare rows, out-of-fold rows -----------------------------------------
CALIBRATION_SOURCES = ("validation", "spare", "oof")


@dataclass
class CalibrationRows:
    """The labelled rows everything chosen on data is fitted on, and where each came from."""

    outputs: ExitOutputs  # (N, 3, C); see `calibration_outputs` for how temperatures are carried
    source: np.ndarray  # (N,) str, one of CALIBRATION_SOURCES
    fold: np.ndarray  # (N,) int: the fold model that answered an "oof" row (0..K-1), -1 for the deployed model

    @property
    def n_validation(self) -> int:
        return int((self.source == "validation").sum())


def oof_outputs(run_dir: Path, cfg: RunConfig, data: TaskData | None = None) -> CrossFit:
    """The cross-fitted outputs train wrote, checked against this run's model, settings and training rows
    (a file from another model or split is an ArtifactError, exit 2)."""
    rd = RunDir(run_dir)
    if not rd.outputs(OOF).is_file():
        raise ArtifactError(f"{run_dir} has no cross-fitted outputs ({rd.outputs(OOF).relative_to(rd.root)})",
                            f"run `dimec train --run-dir {run_dir} --cross-fit {cfg.train.cross_fit}` to add them")
    data = data or task_data(cfg)
    expected = fingerprint(data.train, model_config(cfg, data), cfg.train, cfg.train.cross_fit, cfg.train.seed)
    return CrossFit.load(rd.outputs(OOF), expected)


def calibration_outputs(run_dir: Path, cfg: RunConfig) -> CalibrationRows:
    """The calibration rows, in this order: the validation rows FIRST and IN ORDER (validation dynamics,
    cartography and everything indexed by validation row align with the first `n_validation` rows), then
    the spare rows (calibration.spare_rows), then the out-of-fold training rows (train.cross_fit = K).

    Temperatures: with validation alone the outputs are `split_outputs(run_dir, "validation")` unchanged.
    With other rows, each row's logits are divided by its own model's temperatures and the result is read at
    T = 1 (`temperatures` all ones): the deployed model's rows by the deployed model's (fitted on validation,
    and on the spare rows when they are used); an out-of-fold row by the deployed model's too, not by its fold
    model's own: fitted on one fold's few hundred held-out rows those spread widely (0.33 to 1.52 on the
    measured run) and moved the out-of-fold confidences further from the deployed model's, not closer
    (docs/routing.md, "Cross-fitted calibration rows"). Call `with_temperatures` on these outputs only to
    scale further, never to undo a model's temperature.

    Embeddings: an out-of-fold row's routing embedding comes from its fold model's embedding layer (with
    train.freeze_word_embeddings the word vectors are the deployed model's; positions and LayerNorm differ).
    Cartography: validation's covers the first `n_validation` rows (`Cartography.rows_of`): DIMEC-DC's pools
    (and the hybrid that uses them) are fitted on validation alone, and every candidate is scored on all rows.

    Cached files: outputs/validation.safetensors, outputs/spare.safetensors (computed here if missing),
    outputs/oof.safetensors (written by `dimec train --cross-fit K`; an ArtifactError if missing or made for
    another model, other settings or other training rows)."""
    run_dir = Path(run_dir)
    val = split_outputs(run_dir, "validation")
    parts, sources, folds = [val], [np.full(len(val), "validation")], [np.full(len(val), -1)]
    data = task_data(cfg) if (cfg.calibration.spare_rows or cfg.train.cross_fit) else None
    if cfg.calibration.spare_rows and data.spare:  # none when no cap dropped any: validation alone
        spare = spare_outputs(run_dir, cfg, data)
        parts.append(spare)
        sources.append(np.full(len(spare), "spare"))
        folds.append(np.full(len(spare), -1))
    if cfg.train.cross_fit:
        oof = oof_outputs(run_dir, cfg, data)
        parts.append(oof.outputs.with_temperatures(val.temperatures))  # the deployed model's (see above)
        sources.append(np.full(len(oof.folds), "oof"))
        folds.append(oof.folds)
    if len(parts) == 1:
        return CalibrationRows(val, sources[0].astype(object), folds[0].astype(np.int64))
    scaled = [ExitOutputs(p.logits / p.temperatures[None, :, None], p.labels, p.embeddings, p.lengths, np.ones(3))
              for p in parts]
    return CalibrationRows(ExitOutputs.concat(scaled), np.concatenate(sources).astype(object),
                           np.concatenate(folds).astype(np.int64))


def load_cartography(run_dir: Path, cfg: CalibrationConfig) -> Cartography:
    probs, correct = read_dynamics(Path(run_dir))
    return Cartography.from_dynamics(probs, correct, cfg.variability)


def load_cost_model(run_dir: Path, cost_cfg: CostConfig | None = None) -> CostModel:
    cfg = load_saved_config(run_dir)
    return CostModel.from_config(cost_cfg or cfg.cost, tuple(load_model_config(run_dir).exit_layers))


def training_signal(run_dir: Path, cfg: RunConfig) -> TrainingSignal | None:
    """The training rows whose dynamics were recorded (train.train_dynamics_samples): their routing
    features (cached as outputs/train.safetensors) and cartography. None when training recorded none."""
    run_dir = Path(run_dir)
    if not RunDir(run_dir).dynamics_dir("train").is_dir():
        return None
    probs, correct = read_dynamics(run_dir, "train")
    rows = dynamics_rows(run_dir, "train")
    cache = RunDir(run_dir).outputs("train")
    outputs = None
    if cache.is_file():
        try:
            outputs = ExitOutputs.load(cache)
        except ArtifactError:
            outputs = None
    if outputs is None or len(outputs) != len(rows):
        model, precision = load_model_on_device(run_dir, cfg.train)
        train_split = task_data(cfg).train  # loaded once: loading the task per row took minutes
        examples = [train_split[i] for i in rows]
        outputs = predict_exit_outputs(model, encode(model.tokenizer, examples, cfg.data.max_length),
                                       cfg.train.eval_batch_size, progress=cfg.train.progress, precision=precision)
        outputs.save(cache)
    carto = Cartography.from_dynamics(probs, correct, cfg.calibration.variability)
    return TrainingSignal(outputs.embeddings, outputs.lengths, carto)


def servable_policy(name: str) -> type[PlanRouter]:
    """The registered policy calibrate fits and the tiers serve; one clear error for anything else."""
    import dimec.routing  # noqa: F401  (registers every router)

    servable = sorted(n for n, cls in ROUTERS.items() if issubclass(cls, PlanRouter))
    if name not in servable:
        raise ConfigError(f"calibration.policy {name!r} is not a servable policy",
                          f"use one of: {', '.join(servable)} (auto: the cheapest that meets the target)")
    return ROUTERS[name]


def check_calibration(cfg: CalibrationConfig) -> Target:
    """Every calibration setting a policy reads, checked before calibrate touches the run directory."""
    servable_policy(cfg.policy)
    return Target(**target_of(cfg)).check()


def calibrate_stage(run_dir: Path, cfg: RunConfig | None = None) -> dict:
    """Fit the served policy (calibration.policy, default auto) on validation to meet the target; fit the
    paper's DIMEC-DC pools beside it. Writes router.json, calibration.json and data_map.png, and only then
    config.json: a calibrate that fails leaves the run directory as it was (caches aside)."""
    run_dir = Path(run_dir)
    rd = RunDir(run_dir)
    cfg = (cfg or load_saved_config(run_dir)).validate()  # every setting checked before any work
    c = cfg.calibration
    target = check_calibration(c)
    cost_model = load_cost_model(run_dir, cfg.cost)
    carto = load_cartography(run_dir, c)
    val = split_outputs(run_dir, "validation")
    if len(carto.confidence) != len(val):
        raise ArtifactError(f"dynamics cover {len(carto.confidence)} samples but validation has {len(val)}",
                            "the run directory mixes two runs: train again in a fresh --run-dir")
    # the policy is fitted on the calibration rows (validation, then spare and out-of-fold rows when there are
    # any); the cartography covers their validation prefix: DIMEC-DC's pools and the data map stay on it
    rows = calibration_outputs(run_dir, cfg)
    cal, cal_carto = rows.outputs, carto
    train = training_signal(run_dir, cfg)
    if target.budgeted and target.cost_cap(cost_model.cloud_only) < cost_model.tier_costs.min() - 1e-12:
        raise ConfigError(f"a mean cost of {target.cost_cap(cost_model.cloud_only):.4g} is below mobile-only's "
                          f"{cost_model.tier_costs.min():.4g}: no policy is that cheap",
                          "raise --budget (mobile-only is the cheapest policy)")
    policy = servable_policy(c.policy).from_config(c).fit(cal, cost_model, cal_carto, train)
    paper = DimecFixedRouter.from_config(c).fit(val, cost_model, carto)
    val_scores = evaluate_methods({"cloud-only": make_router("cloud-only"), c.policy: policy}, cal, cost_model,
                                  "accuracy", resamples=500)[1]
    report = {"policy": c.policy, "describe": policy.describe(), "target": target.describe(),
              "calibration_rows": {s: int((rows.source == s).sum()) for s in CALIBRATION_SOURCES},
              "validation": {"samples": len(cal), "accuracy_change_pt": val_scores.accuracy_change_pt.to_dict(),
                             "cost_change_pct": val_scores.cost_change_pct,
                             "tier_shares": list(val_scores.tier_shares)},
              "training_signal": None if train is None else len(train.lengths)}
    if isinstance(policy, AutoRouter):
        report |= {"winner": policy.winner_, "how": policy.how_, "families": policy.summary_,
                   "what_the_data_can_carry": policy.capacity_}
    elif hasattr(policy, "selection_"):
        report["how"] = policy.selection_.how
    summary = {
        **report,
        "dimec": {"alpha": paper.alpha_, "beta": paper.beta_, "expected_reward": paper.expected_reward_,
                  "pool_counts": dict(zip(POOLS, paper.counts_.tolist(), strict=True)),
                  "reward_grid": {"alpha": list(c.alpha_grid), "beta": list(c.beta_grid),
                                  "reward": paper.reward_grid_.tolist()},
                  "variability": c.variability, "medium_rule": c.medium_rule},
        "cost_model": cost_model.to_dict(), "tier_costs": cost_model.tier_costs.tolist(),
    }
    save_router(policy, rd.router, cost_model, report=report)
    write_json(rd.calibration, summary)
    plot_data_map(carto, rd.data_map, c.cartography_exit)
    cfg.save(rd.config)  # last: calibration and cost settings may change between stages, once they work
    return summary


def evaluate_stage(run_dir: Path, cfg: RunConfig | None = None, other_costs: bool = False) -> dict:
    """The served policy, DIMEC-DC Fixed and Dynamic, against cloud-only on the test split, under one cost
    model, with 95% paired bootstrap intervals and the share of the oracle's saving (a labelled reference)."""
    run_dir = Path(run_dir)
    rd = RunDir(run_dir)
    cfg = cfg or load_saved_config(run_dir)
    policy, raw = load_router(rd.router)
    cost_model = load_cost_model(run_dir, cfg.cost)
    fitted_under = CostModel.from_dict(raw["cost_model"])
    mismatch = fitted_under != cost_model
    if mismatch and not other_costs:
        raise ConfigError("router.json was calibrated under other costs than these",
                          "run `dimec calibrate RUN_DIR` with the same --set cost.* settings, or pass "
                          "--other-costs to evaluate the calibrated policy under the new costs knowingly")
    test = split_outputs(run_dir, "test")
    val = split_outputs(run_dir, "validation")
    carto = load_cartography(run_dir, cfg.calibration)
    paper = DimecFixedRouter.from_config(cfg.calibration).fit(val, cost_model, carto)
    data_info = read_json(rd.data, "train the run again: data.json is written by `dimec train`")
    metric = data_info["metric"]
    routers = {"cloud-only": make_router("cloud-only"), raw["router"]: policy, "dimec-fixed": paper,
               "dimec-dynamic": DimecDynamicRouter.from_fixed(paper), "oracle": make_router("oracle")}
    results: list[MethodResult] = evaluate_methods(routers, test, cost_model, metric)
    calibrated = raw.get("report", {})  # what calibrate found on validation: the target, the winner and why
    report = {"task": data_info.get("task", cfg.data.task), "metric": metric, "test_size": len(test), "policy": raw["router"],
              "policy_describe": policy.describe(), "target": calibrated.get("target"),
              "winner": calibrated.get("winner"), "why": calibrated.get("how"),
              "families_on_validation": calibrated.get("families"),
              "cost_model": cost_model.to_dict(), "calibrated_under_other_costs": mismatch,
              "results": [r.to_dict() for r in results]}
    write_json(rd.metrics, report)
    return report


def format_table(report: dict) -> str:
    """The test-split results as a fixed-width table: accuracy, cost, the changes against cloud-only with
    their 95% intervals, the oracle's share and where samples were answered."""
    metric = report["metric"]
    head = (f"{'method':<16}{'accuracy':>9}" + (f"{metric:>8}" if metric != "accuracy" else "")
            + f"{'d acc (pt) [95% CI]':>24}{'cost vs cloud [95% CI]':>26}{'oracle':>8}   mobile/edge/cloud")
    winner = f" (it chose {report['winner']})" if report.get("winner") else ""
    lines = [f"task {report['task']}, {report['test_size']} test samples; served policy {report['policy']}{winner}: "
             f"{report['policy_describe']}", f"target: {report['target']}; {report.get('why') or ''}",
             head, "-" * len(head)]
    for r in report["results"]:
        extra = f"{r['metrics'][metric]:>8.4f}" if metric != "accuracy" else ""
        a, c = r["accuracy_change_pt"], r["cost_change"]
        share = "-" if r["oracle_share"] is None else f"{r['oracle_share']:.2f}"
        lines.append(f"{r['method']:<16}{r['accuracy']:>9.4f}{extra}"
                     f"{a['estimate']:>+9.2f} [{a['low']:+.2f}, {a['high']:+.2f}]"
                     f"{c['estimate']:>+10.1f}% [{c['low']:+.1f}, {c['high']:+.1f}]{share:>8}   "
                     + "/".join(f"{100 * x:.0f}" for x in r["tier_shares"]))
    if report.get("calibrated_under_other_costs"):
        lines.append("note: the policy was calibrated under other costs than these (evaluated with --other-costs)")
    return "\n".join(lines)


def run_all(cfg: RunConfig, run_dir: Path) -> dict:
    train_stage(cfg, run_dir)
    calibrate_stage(run_dir, cfg)
    return evaluate_stage(run_dir, cfg)


# ---- routing new texts ---------------------------------------------------------------------------------
ROUTE_MODES = ("policy", "dimec-fixed", "dimec-dynamic")


@torch.no_grad()
def route_texts(run_dir: Path, texts: list[str], pairs: list[str] | None = None, mode: str = "policy") -> list[dict]:
    """Answer each text as the deployment would: the pre-router picks a plan from the embedding layer's
    output, then the plan's stages run until one is confident (all tiers in this process). mode "policy" is
    the calibrated router.json; "dimec-fixed"/"dimec-dynamic" the paper's routers, fitted on validation."""
    if mode not in ROUTE_MODES:
        raise ConfigError(f"routing mode must be one of {', '.join(ROUTE_MODES)}, got {mode!r}")
    texts, pairs, _ = check_batch(texts, pairs)
    run_dir = Path(run_dir)
    if mode == "policy":
        router, _ = load_router(RunDir(run_dir).router)
    else:
        cfg = load_saved_config(run_dir)
        cost_model = load_cost_model(run_dir, cfg.cost)
        router = DimecFixedRouter.from_config(cfg.calibration).fit(
            split_outputs(run_dir, "validation"), cost_model, load_cartography(run_dir, cfg.calibration))
        if mode == "dimec-dynamic":
            router = DimecDynamicRouter.from_fixed(router)
    model = load_model(run_dir)
    temperatures = model.config.exit_temperatures(str(RunDir(run_dir).model))  # (3,)
    answers = []
    for i, text in enumerate(texts):
        pair = pairs[i] if pairs else None
        enc = model.tokenizer(text, pair, truncation=True, max_length=model.config.max_length, return_tensors="pt")
        inputs = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        emb = model.embed(**inputs).numpy()  # (1, H)
        length = np.array([int(inputs["attention_mask"].sum())])
        try:  # router.json's pre-router must fit this model's embedding (a tampered file may not)
            if isinstance(router, DimecDynamicRouter):
                choice = router.update(emb[0])
            else:
                choice = int(router.choose_plans(emb, length)[0])
            plan = router.plans_[choice]
        except (ValueError, IndexError, TypeError) as exc:
            raise ArtifactError(f"{RunDir(run_dir).router} does not fit the model in {run_dir} "
                                f"({type(exc).__name__}: {str(exc)[:200]})", "run `dimec calibrate RUN_DIR` again") \
                from None
        out = run_plan(plan, 1, len(model.config.label_names), set(range(len(TIERS))),
                       _InProcessStages(model, inputs, plan, temperatures).run, router.confidence_)
        probs, stage_exit, stage_tier = out.probs[0], int(out.exits[0]), int(out.tiers[0])
        label = int(probs.argmax())
        answers.append({"text": text, "tier": TIERS[stage_tier], "exit_layer": model.config.exit_layers[stage_exit],
                        "plan": plan_text(plan), "label": model.config.label_names[label],
                        "confidence": round(float(probs[label]), 4)})
    return answers


class _InProcessStages:
    """Every stage of a plan in this process (one text): the model runs once, up to the plan's last exit,
    and each stage reads its exit at that exit's temperature."""

    def __init__(self, model: MultiExitModel, inputs: dict, plan, temperatures: np.ndarray) -> None:
        self.model, self.inputs, self.top, self.temperatures = model, inputs, plan[-1].exit, temperatures
        self.logits = None

    def run(self, stage, rows: np.ndarray) -> np.ndarray:
        if self.logits is None:
            self.logits = self.model(**self.inputs, upto=self.top)  # only layers 1..exit_layers[last exit]
        z = self.logits[stage.exit].numpy().astype(np.float64)[rows]  # (R, C)
        return softmax(z / self.temperatures[stage.exit])
