"""Reading CSV / TSV / JSONL files into rows, and the generic `data.task=file` loader."""

from __future__ import annotations

import csv
import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dimec.config import DataConfig
from dimec.data.examples import RawTask, label_key, make_example, missing_column_error
from dimec.errors import ConfigError, DataError

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl")
# File stems accepted for each split of a folder given to data.task=file.
SPLIT_STEMS = {"train": ("train",), "validation": ("validation", "dev", "valid", "val"), "test": ("test",)}


@dataclass
class Table:
    """Rows of one file, each with the line it started on (for error messages)."""

    path: Path
    columns: list[str]
    rows: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    skipped: int = 0  # malformed rows dropped (only when reading with skip_malformed)


def read_delimited(path: Path, delimiter: str, quoting: int = csv.QUOTE_MINIMAL,
                   fieldnames: Sequence[str] | None = None, skip_malformed: bool = False) -> Table:
    """Read a delimited file; the first row is the header unless `fieldnames` are given.

    "utf-8-sig" drops a byte-order mark (GLUE's MRPC header starts with one) and reads plain UTF-8 alike.
    A row with the wrong number of fields is an error naming its line, or is skipped and counted.
    """
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
            header = list(fieldnames) if fieldnames is not None else next(reader, None)
            if header is None:
                raise DataError(f"{path} is empty", "give a file with a header row and labelled rows")
            table = Table(path, [c.strip() for c in header])
            width = len(table.columns)
            for fields in reader:
                if not fields:  # blank line
                    continue
                if len(fields) != width:
                    if skip_malformed:
                        table.skipped += 1
                        continue
                    raise DataError(
                        f"{path}:{reader.line_num}: {len(fields)} fields where {width} are expected "
                        f"({', '.join(table.columns)})",
                        "fix or remove that line (a stray delimiter or line break inside the text?)",
                    )
                table.rows.append((reader.line_num, dict(zip(table.columns, fields, strict=True))))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason})", "re-save the file as UTF-8") from None
    except csv.Error as exc:
        raise DataError(f"{path}: cannot parse as {'TSV' if delimiter == chr(9) else 'CSV'}: {exc}") from None
    return table


def read_jsonl(path: Path) -> Table:
    """One JSON object per line; the columns are the union of their keys."""
    table = Table(path, [])
    seen: dict[str, None] = {}
    try:
        with path.open(encoding="utf-8-sig") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{line_no}: not valid JSON ({exc.msg})", "one JSON object per line") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}",
                                    'write each row as {"text": ..., "label": ...}')
                seen.update(dict.fromkeys(obj))
                table.rows.append((line_no, obj))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason})", "re-save the file as UTF-8") from None
    table.columns = list(seen)
    return table


def read_table(path: Path) -> Table:
    """A .csv (standard quoting), .tsv (no quoting, as GLUE writes them) or .jsonl file."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_delimited(path, ",")
    if suffix == ".tsv":
        # No quote handling: a text may start with a lone '"' that would otherwise swallow later lines.
        return read_delimited(path, "\t", csv.QUOTE_NONE)
    if suffix == ".jsonl":
        return read_jsonl(path)
    raise DataError(f"unsupported data file type {path.name!r}", f"use one of {', '.join(TABLE_SUFFIXES)}")


# ---- data.task=file --------------------------------------------------------------------------------------
def load_file_task(cfg: DataConfig) -> RawTask:
    """Labelled rows from a file, or from a folder's train / validation (or dev) / test files."""
    if not cfg.path:
        raise ConfigError("data.task=file needs data.path",
                          "data.path=FILE (.csv/.tsv/.jsonl) or a folder with train/validation/test files")
    files = _task_files(Path(cfg.path).expanduser())
    tables = {part: read_table(path) for part, path in files.items()}
    columns = [c for c in (cfg.text_column, cfg.text_pair_column, cfg.label_column) if c is not None]
    for table in tables.values():
        for column in columns:
            if column not in table.columns:
                raise missing_column_error(table.path, column, table.columns,
                                           "name the columns with data.text_column, data.text_pair_column "
                                           "and data.label_column")
        if not table.rows:
            raise DataError(f"{table.path} has no data rows", "give a file with labelled rows")
    label_names = infer_label_names(
        (label_key(row.get(cfg.label_column)) for t in tables.values() for _, row in t.rows), cfg.missing_labels
    )
    if len(label_names) < 2:
        raise DataError(f"column {cfg.label_column!r} of {cfg.path} holds only the label(s) {label_names}",
                        "a classifier needs at least two labels; check data.label_column")
    label_ids = {name: i for i, name in enumerate(label_names)}
    parts = {
        part: [make_example(row, cfg.text_column, cfg.text_pair_column, cfg.label_column, label_ids,
                            f"{table.path}:{line}", cfg.missing_labels) for line, row in table.rows]
        for part, table in tables.items()
    }
    name = cfg.name or Path(cfg.path).expanduser().stem  # reports say "reviews", not "file"
    return RawTask(name, label_names, "accuracy", parts, where={p: str(f) for p, f in files.items()})


def infer_label_names(values: Any, missing: Collection[str] = ()) -> list[str]:
    """Sorted distinct label values, blanks and `missing` markers ("NaN", ...) left out: numerically when all
    are integers (so "10" follows "9"), else as text."""
    names = {v for v in values if v != "" and v not in missing}
    if all(_is_int(v) for v in names):
        return sorted(names, key=lambda v: (int(v), v))
    return sorted(names)


def _is_int(value: str) -> bool:
    return value.lstrip("+-").isdigit()


def _task_files(path: Path) -> dict[str, Path]:
    if path.is_file():
        if path.suffix.lower() not in TABLE_SUFFIXES:
            raise DataError(f"unsupported data file type {path.name!r}", f"use one of {', '.join(TABLE_SUFFIXES)}")
        return {"all": path}
    if not path.is_dir():
        raise DataError(f"data file not found: {path}",
                        "point data.path at a .csv/.tsv/.jsonl file or a folder with train/validation/test files")
    files = {}
    for part, stems in SPLIT_STEMS.items():
        found = [path / f"{s}{x}" for s in stems for x in TABLE_SUFFIXES if (path / f"{s}{x}").is_file()]
        if len(found) > 1:
            raise DataError(f"{path} has several {part} files: {', '.join(f.name for f in found)}", "keep one")
        if found:
            files[part] = found[0]
    if not files:
        raise DataError(f"{path} holds no train/validation/test data files",
                        "name them train, validation (or dev) and test with a .csv, .tsv or .jsonl suffix")
    return files
