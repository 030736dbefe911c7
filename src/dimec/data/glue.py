"""GLUE tasks read from the original GLUE download (tab-separated files, one folder per task).

Only train.tsv and dev.tsv (dev_matched.tsv for MNLI) are read: GLUE's test files carry no labels.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path

from dimec.config import DataConfig
from dimec.data.examples import Example, RawTask, make_example, missing_column_error
from dimec.data.files import read_delimited
from dimec.errors import DataError

log = logging.getLogger(__name__)
GLUE_DIR_ENV = "DIMEC_GLUE_DIR"


@dataclass(frozen=True)
class GlueSpec:
    name: str  # canonical task name, e.g. "sst2"
    folder: str  # folder in the GLUE download, e.g. "SST-2"
    text: str  # column names in the GLUE files
    pair: str | None
    label: str
    raw_labels: tuple[str, ...]  # label values as written in the files, in label-id order
    label_names: tuple[str, ...]
    metric: str
    hub_text: str  # column names in the Hugging Face "glue" dataset
    hub_pair: str | None
    dev_file: str = "dev.tsv"
    hub_dev_split: str = "validation"
    fieldnames: tuple[str, ...] | None = None  # for files without a header row (CoLA)
    skip_malformed: bool = False  # QQP has a few broken rows: drop and count them


_NLI = ("entailment", "not_entailment")
GLUE_TASKS: dict[str, GlueSpec] = {s.name: s for s in (
    GlueSpec("sst2", "SST-2", "sentence", None, "label", ("0", "1"), ("negative", "positive"), "accuracy",
             "sentence", None),
    GlueSpec("cola", "CoLA", "sentence", None, "label", ("0", "1"), ("unacceptable", "acceptable"), "mcc",
             "sentence", None, fieldnames=("source", "label", "original_label", "sentence")),
    GlueSpec("mrpc", "MRPC", "#1 String", "#2 String", "Quality", ("0", "1"), ("not_equivalent", "equivalent"),
             "f1", "sentence1", "sentence2"),
    GlueSpec("qnli", "QNLI", "question", "sentence", "label", _NLI, _NLI, "accuracy", "question", "sentence"),
    GlueSpec("rte", "RTE", "sentence1", "sentence2", "label", _NLI, _NLI, "accuracy", "sentence1", "sentence2"),
    GlueSpec("mnli", "MNLI", "sentence1", "sentence2", "gold_label", ("entailment", "neutral", "contradiction"),
             ("entailment", "neutral", "contradiction"), "accuracy", "premise", "hypothesis",
             dev_file="dev_matched.tsv", hub_dev_split="validation_matched"),
    GlueSpec("qqp", "QQP", "question1", "question2", "is_duplicate", ("0", "1"), ("not_duplicate", "duplicate"),
             "f1", "question1", "question2", skip_malformed=True),
)}
_DEFAULT_GLUE_DIR = next(f.default for f in fields(DataConfig) if f.name == "glue_dir")


def glue_folder(spec: GlueSpec, cfg: DataConfig) -> Path:
    """data.path if given, else <glue dir>/<FOLDER>.

    The glue dir is data.glue_dir when set to something other than its default, else $DIMEC_GLUE_DIR when
    set, else the default: an explicit config value wins over the environment, the environment over the default.
    """
    if cfg.path:
        return Path(cfg.path).expanduser()
    glue_dir = cfg.glue_dir
    if glue_dir == _DEFAULT_GLUE_DIR and os.environ.get(GLUE_DIR_ENV):
        glue_dir = os.environ[GLUE_DIR_ENV]
    return Path(glue_dir).expanduser() / spec.folder


def load_glue_local(spec: GlueSpec, cfg: DataConfig, need_train: bool) -> RawTask:
    """Read a task's labelled GLUE files; train.tsv may be absent unless `need_train` (QNLI ships dev only)."""
    folder = glue_folder(spec, cfg)
    if not folder.is_dir():
        raise DataError(f"GLUE folder for task {spec.name!r} not found: {folder}" +
                        (" (not a folder)" if folder.exists() else ""), _where_hint(spec))
    files = {"train": folder / "train.tsv", "validation": folder / spec.dev_file}
    missing = [p for p in files.values() if not p.is_file()]
    if len(missing) == len(files) or (need_train and files["train"] in missing):
        raise DataError(f"{', '.join(map(str, missing))} not found for GLUE task {spec.name!r}",
                        (f"data.split=own needs train.tsv and {spec.dev_file}; data.split=pooled works with "
                         "either. " if need_train else "") + _where_hint(spec))
    raw = RawTask(spec.name, list(spec.label_names), spec.metric, {})
    label_ids = {value: i for i, value in enumerate(spec.raw_labels)}
    for part, path in files.items():
        if path in missing:
            log.info("GLUE %s: %s absent, using the other file only", spec.name, path)
            continue
        raw.parts[part], skipped = _read_glue_file(spec, path, label_ids)
        raw.where[part] = str(path)
        raw.skipped_rows += skipped
    if raw.skipped_rows:
        log.warning("GLUE %s: skipped %d malformed rows", spec.name, raw.skipped_rows)
    return raw


def _read_glue_file(spec: GlueSpec, path: Path, label_ids: dict[str, int]) -> tuple[list[Example], int]:
    # GLUE texts hold unbalanced quotes: quoting off, one row per line.
    table = read_delimited(path, "\t", csv.QUOTE_NONE, spec.fieldnames, spec.skip_malformed)
    for column in (spec.text, spec.pair, spec.label):
        if column is not None and column not in table.columns:
            raise missing_column_error(path, column, table.columns,
                                       f"is this the original GLUE {spec.folder} file? " + _where_hint(spec))
    examples: list[Example] = []
    skipped, where = table.skipped, str(path)
    for line, row in table.rows:
        try:
            examples.append(make_example(row, spec.text, spec.pair, spec.label, label_ids, f"{where}:{line}"))
        except DataError:
            if not spec.skip_malformed:
                raise
            skipped += 1
    if not examples:
        raise DataError(f"{path} has no labelled rows", "give the original GLUE file")
    return examples, skipped


def _where_hint(spec: GlueSpec) -> str:
    return (f"download GLUE and point at it with data.glue_dir=DIR (holding {spec.folder}/), "
            f"data.path=DIR/{spec.folder} or ${GLUE_DIR_ENV}=DIR")
