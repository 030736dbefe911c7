"""K-fold cross-fitting: an out-of-fold answer from every exit for every labelled row.

The rows are split into K stratified, seeded folds. For each fold a model is trained with the run's model and
train settings (`trainer.train`, the one training loop) on the other K-1 folds, with the held-out fold as its
"validation" set: the trainer then records the held-out fold's per-epoch dynamics, keeps its best epoch and
fits its exit temperatures on it, and caches its outputs on it, all as it does for a run. Those outputs are
copied out (`fold_K.safetensors` in the work folder) and the fold model is deleted. A crash resumes at the
fold it stopped in: finished folds are read back, a half-trained fold resumes from its own checkpoint.

The result file holds the raw logits of all rows in their original order, the fold of each row, the
temperatures each fold model fitted on its own held-out fold, and each row's per-epoch true-label
probability and correctness (its fold model's held-out dynamics, recorded as validation's are for a run); its metadata carry a fingerprint (model, train settings, K, seed, a hash of the
rows) so a file made for other rows or another model is refused, never silently reused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file
from sklearn.model_selection import StratifiedKFold

from dimec.atomic import read_json, write_json, write_with
from dimec.config import TrainConfig
from dimec.data.examples import Example
from dimec.errors import ArtifactError, ConfigError, DimecError
from dimec.modeling.multi_exit import MultiExitConfig
from dimec.outputs import FORMAT_VERSION, ExitOutputs
from dimec.rundir import RunDir
from dimec.training.batching import Encoded, encode
from dimec.training.cartography import read_dynamics
from dimec.training.trainer import new_model, train

FINGERPRINT = "fingerprint.json"  # in the work folder: which cross-fit its fold files belong to
# Train settings that do not change what a fold model learns (progress bars, threads, prediction batches).
_NEUTRAL_TRAIN_KEYS = ("progress", "num_threads", "eval_batch_size", "cross_fit")


def check_folds(k: int, n: int, what: str = "rows") -> None:
    """K must split the rows into at least 2 non-empty folds (a ConfigError otherwise, before any work)."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 2:
        raise ConfigError(f"cross-fitting needs at least 2 folds, got {k!r}",
                          "use --cross-fit K with K >= 2 (5 is usual), or 0 to switch it off")
    if k > n:
        raise ConfigError(f"cross-fitting with {k} folds needs at least {k} {what}, there are {n}",
                          f"use --cross-fit K with 2 <= K <= {n}")


def assign_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """(N,) fold id in 0..K-1 per row: stratified by label where every label has K rows, seeded."""
    labels = np.asarray(labels)
    check_folds(k, len(labels))
    folds = np.zeros(len(labels), dtype=np.int64)
    counts = np.bincount(labels) if len(labels) else np.zeros(0)
    if (counts[counts > 0] >= k).all():
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    else:  # a label with fewer rows than folds cannot be spread over every fold: plain seeded K-fold
        from sklearn.model_selection import KFold

        splitter = KFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        folds[held_out] = fold
    return folds


def rows_hash(examples: list[Example]) -> str:
    """A hash of the rows' texts and labels, in order: the same rows give the same hash on any machine."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.text, e.text_pair, e.label], ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()[:32]


def fingerprint(examples: list[Example], model: MultiExitConfig, train_cfg: TrainConfig, k: int, seed: int,
                max_train_rows: int | None = None) -> dict:
    """What a cross-fit's outputs depend on: a cache with another fingerprint belongs to another run."""
    train_settings = {key: v for key, v in asdict(train_cfg).items() if key not in _NEUTRAL_TRAIN_KEYS}
    return {"model": model.name_or_path, "exit_layers": list(model.exit_layers or []),
            "exit_pooling": model.exit_pooling, "classifier_dropout": model.classifier_dropout,
            "max_length": model.max_length, "labels": list(model.label_names),
            "train": json.loads(json.dumps(train_settings)), "k": k, "seed": seed,
            "max_train_rows": max_train_rows, "rows": len(examples), "rows_hash": rows_hash(examples)}


@dataclass
class CrossFit:
    """Out-of-fold outputs of N rows (original order) and where each came from."""

    outputs: ExitOutputs  # raw logits (temperatures 1) of the fold model that did not see the row
    folds: np.ndarray  # (N,) fold id 0..K-1
    fold_temperatures: np.ndarray  # (K, 3) per fold model, fitted by NLL on its own held-out fold
    fingerprint: dict
    dynamics: np.ndarray | None = None  # (E, N, 3) per-epoch true-label probability (T = 1), if recorded
    dynamics_correct: np.ndarray | None = None  # (E, N, 3) bool: per epoch, whether the exit was right

    def calibrated(self) -> ExitOutputs:
        """The outputs with each row's logits divided by its fold model's temperatures, read at T = 1: each
        fold model's confidences are calibrated for that model, as the deployed model's are for it."""
        logits = self.outputs.logits / self.fold_temperatures[self.folds][:, :, None]  # (N, 3, C)
        o = self.outputs
        return ExitOutputs(logits, o.labels, o.embeddings, o.lengths, np.ones(3))

    def save(self, path: Path) -> None:
        o = self.outputs
        tensors = {"logits": o.logits, "labels": o.labels, "embeddings": o.embeddings,
                   "temperatures": o.temperatures, "folds": self.folds,
                   "fold_temperatures": np.asarray(self.fold_temperatures, dtype=np.float64)}
        if o.lengths is not None:
            tensors["lengths"] = o.lengths
        if self.dynamics is not None and self.dynamics_correct is not None:
            tensors["dynamics"] = np.asarray(self.dynamics, dtype=np.float32)
            tensors["dynamics_correct"] = np.asarray(self.dynamics_correct, dtype=np.uint8)
        meta = {"format_version": str(FORMAT_VERSION), "fingerprint": json.dumps(self.fingerprint, sort_keys=True)}
        write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: Path, expected: dict | None = None) -> CrossFit:
        """A damaged file is an ArtifactError; so is one whose fingerprint is not `expected`."""
        try:
            with safe_open(str(path), "np") as f:
                meta = f.metadata() or {}
            found = json.loads(meta.get("fingerprint", "null"))
            tensors = load_file(str(path))
            if meta.get("format_version") != str(FORMAT_VERSION):
                raise ValueError(f"format {meta.get('format_version')}, expected {FORMAT_VERSION}")
            outputs = ExitOutputs(tensors["logits"], tensors["labels"], tensors["embeddings"],
                                  tensors.get("lengths"), tensors["temperatures"])
            correct = tensors.get("dynamics_correct")
            result = cls(outputs, tensors["folds"], tensors["fold_temperatures"], found, tensors.get("dynamics"),
                         None if correct is None else correct.astype(bool))
        except (OSError, SafetensorError, KeyError, ValueError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{path} is not a valid cross-fit outputs file ({exc})",
                                "delete it; the next `dimec train` computes it again") from None
        if expected is not None:
            check_fingerprint(found, expected, path)
        return result


def check_fingerprint(found: dict | None, expected: dict, where: Path) -> None:
    if found == expected:
        return
    differs = sorted(k for k in set(expected) | set(found or {}) if (found or {}).get(k) != expected.get(k))
    raise ArtifactError(f"{where} holds cross-fitted outputs of another model or other rows (differs in: "
                        f"{', '.join(differs)})",
                        f"delete {where} (and its crossfit/ work folder) to cross-fit again, or use a fresh --run-dir")


def cross_fit(examples: list[Example], model_config: MultiExitConfig, train_cfg: TrainConfig, k: int,
              work_dir: Path, seed: int | None = None, max_train_rows: int | None = None,
              log=print) -> CrossFit:
    """K fold models over `examples`, each trained on K-1 folds (at most `max_train_rows` of them, a
    stratified seeded sample) and predicting the held-out fold. `work_dir` holds the fold files while it
    runs (resume state) and is removed by the caller once the result is saved (`cross_fit_to`)."""
    seed = train_cfg.seed if seed is None else seed
    labels = np.asarray([e.label for e in examples], dtype=np.int64)
    check_folds(k, len(examples))
    expected = fingerprint(examples, model_config, train_cfg, k, seed, max_train_rows)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    stamp = work_dir / FINGERPRINT
    if stamp.is_file():
        check_fingerprint(read_json(stamp, "delete the cross-fit work folder to start over"), expected, work_dir)
    else:
        write_json(stamp, expected)
    folds = assign_folds(labels, k, seed)
    enc = None  # tokenised once, by the first fold that trains
    parts: list[CrossFit] = []
    for fold in range(k):
        part_path = work_dir / f"fold_{fold}.safetensors"
        if part_path.is_file():
            parts.append(CrossFit.load(part_path, expected))
            log(f"cross-fit fold {fold + 1}/{k}: done before, read back")
            continue
        model = new_model(model_config, train_cfg.seed)
        if enc is None:
            enc = encode(model.tokenizer, examples, model_config.max_length)
        held = np.flatnonzero(folds == fold)
        rest = training_rows(np.flatnonzero(folds != fold), labels, max_train_rows, seed + fold)
        log(f"cross-fit fold {fold + 1}/{k}: training on {len(rest)} rows, predicting {len(held)}")
        part = train_fold(model, enc, rest, held, train_cfg, work_dir / f"fold_{fold}", fold, expected)
        part.save(part_path)
        shutil.rmtree(work_dir / f"fold_{fold}", ignore_errors=True)  # the fold model is not kept
        del model
        parts.append(part)
    return assemble(parts, folds, expected)


def training_rows(rows: np.ndarray, labels: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    """The fold's training rows, or a stratified seeded sample of `cap` of them (ascending)."""
    if cap is None or cap >= len(rows):
        return rows
    from sklearn.model_selection import train_test_split

    try:
        keep, _ = train_test_split(rows, train_size=cap, stratify=labels[rows], random_state=seed)
    except ValueError:  # a label too rare to stratify: a plain seeded sample
        keep = np.random.default_rng(seed).choice(rows, cap, replace=False)
    return np.sort(np.asarray(keep))


def train_fold(model, enc: Encoded, rest: np.ndarray, held: np.ndarray, train_cfg: TrainConfig, fold_dir: Path,
               fold: int, expected: dict) -> CrossFit:
    """Train one fold model (resuming from its checkpoint) and read its held-out outputs and dynamics."""
    try:
        train(model, enc.subset(rest), enc.subset(held), train_cfg, fold_dir)
    except DimecError as exc:
        raise type(exc)(f"cross-fit fold {fold + 1} failed: {exc.message}", exc.hint) from None
    except (RuntimeError, ValueError, OSError) as exc:
        raise ArtifactError(f"cross-fit fold {fold + 1} failed while training ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''})",
                            f"the finished folds are kept; fix the cause and run the same command to resume "
                            f"at fold {fold + 1}") from None
    run = RunDir(fold_dir)
    outputs = ExitOutputs.load(run.outputs("validation"))  # the kept epoch on the held-out fold
    temperatures = outputs.temperatures.copy()
    probs, correct = read_dynamics(fold_dir)  # (E, n, 3) each
    folds = np.full(len(held), fold, dtype=np.int64)
    raw = outputs.with_temperatures(np.ones(3))
    return CrossFit(raw, folds, temperatures[None, :], expected, probs, correct)


def assemble(parts: list[CrossFit], folds: np.ndarray, expected: dict) -> CrossFit:
    """The folds' outputs put back in the rows' original order."""
    n = len(folds)
    first = parts[0].outputs
    logits = np.zeros((n, *first.logits.shape[1:]), dtype=np.float32)
    labels = np.zeros(n, dtype=np.int64)
    emb = np.zeros((n, first.embeddings.shape[1]), dtype=np.float32)
    lengths = np.zeros(n, dtype=np.int64)
    epochs = {p.dynamics.shape[0] for p in parts if p.dynamics is not None and p.dynamics_correct is not None}
    complete = len(epochs) == 1 and all(p.dynamics is not None and p.dynamics_correct is not None for p in parts)
    dynamics = np.zeros((epochs.pop(), n, 3)) if complete else None  # (E, N, 3)
    correct = np.zeros(dynamics.shape, dtype=bool) if dynamics is not None else None
    temps = np.zeros((len(parts), 3))
    for fold, part in enumerate(parts):
        rows = np.flatnonzero(folds == fold)
        o = part.outputs
        if len(o) != len(rows):
            raise ArtifactError(f"cross-fit fold {fold + 1} holds {len(o)} rows, the fold has {len(rows)}",
                                "delete the cross-fit work folder to start over")
        logits[rows], labels[rows], emb[rows] = o.logits, o.labels, o.embeddings
        lengths[rows] = o.lengths if o.lengths is not None else 0
        temps[fold] = part.fold_temperatures[0]
        if dynamics is not None:
            dynamics[:, rows], correct[:, rows] = part.dynamics, part.dynamics_correct
    outputs = ExitOutputs(logits, labels, emb, lengths, np.ones(3))
    return CrossFit(outputs, folds.astype(np.int64), temps, expected, dynamics, correct)


def cross_fit_to(path: Path, work_dir: Path, examples: list[Example], model_config: MultiExitConfig,
                 train_cfg: TrainConfig, k: int, seed: int | None = None, max_train_rows: int | None = None,
                 log=print) -> CrossFit:
    """`cross_fit` with its result cached at `path`: a file there with the same fingerprint is returned as it
    is, one with another is an ArtifactError; the work folder is removed once the file is written."""
    seed = train_cfg.seed if seed is None else seed
    check_folds(k, len(examples))
    expected = fingerprint(examples, model_config, train_cfg, k, seed, max_train_rows)
    path = Path(path)
    if path.is_file():
        return CrossFit.load(path, expected)
    result = cross_fit(examples, model_config, train_cfg, k, work_dir, seed, max_train_rows, log)
    path.parent.mkdir(parents=True, exist_ok=True)
    result.save(path)
    shutil.rmtree(work_dir, ignore_errors=True)
    return result
