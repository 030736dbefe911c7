"""The labelled-example types every loader produces, and the checks that turn raw rows into them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dimec.errors import DataError

SPLIT_NAMES = ("train", "validation", "test")


@dataclass(frozen=True, slots=True)
class Example:
    text: str
    text_pair: str | None
    label: int


@dataclass
class TaskData:
    """A task ready for training: label names (index = label id), its metric and three labelled splits."""

    name: str  # e.g. "sst2"
    label_names: list[str]  # index = label id
    metric: str  # "accuracy", "mcc" or "f1": the task metric reported beside accuracy
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    skipped_rows: int = 0  # malformed rows dropped while reading (QQP only)
    spare: list[Example] = field(default_factory=list)  # training rows data.max_train_samples dropped

    @property
    def is_pair(self) -> bool:
        """Whether examples carry a second text (all rows of a task agree, so the first one decides)."""
        for split in (self.train, self.validation, self.test):
            if split:
                return split[0].text_pair is not None
        return False

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass
class RawTask:
    """What a loader read, before splitting: labelled rows per source file.

    `parts` keys are "train", "validation" and "test" for files that come with their own splits (a GLUE
    dev file is "validation"), or "all" for a single file with no split of its own.
    """

    name: str
    label_names: list[str]
    metric: str
    parts: dict[str, list[Example]]
    skipped_rows: int = 0
    where: dict[str, str] = field(default_factory=dict)  # part -> file it came from, for messages


def label_distribution(examples: Iterable[Example]) -> dict[int, int]:
    """Count of examples per label id, in label order."""
    return dict(sorted(Counter(e.label for e in examples).items()))


def make_example(row: Mapping[str, Any], text: str, pair: str | None, label: str,
                 label_ids: Mapping[str, int], where: str, missing: Collection[str] = ()) -> Example:
    """One checked Example from a parsed row; `where` ("file:line") goes into every error message.
    A label in `missing` (data.missing_labels, e.g. "NaN") is refused like a blank one."""
    first = _text(row, text, where)
    second = _text(row, pair, where) if pair is not None else None
    key = label_key(row.get(label))
    if key in missing:
        raise DataError(f"{where}: label {key!r} in column {label!r} marks a missing value (data.missing_labels)",
                        f"fix or remove that row; if {key!r} is a real class, set data.missing_labels=[]")
    if key not in label_ids:
        allowed = ", ".join(label_ids)
        shown = "an empty value" if key == "" else repr(key)
        raise DataError(f"{where}: label {shown} in column {label!r} is not one of the task's labels ({allowed})",
                        "fix or remove that row")
    return Example(first, second, label_ids[key])


def label_key(value: Any) -> str:
    """Labels compared as text, so the CSV value "1" and the JSON value 1 are the same label."""
    if value is None:
        return ""
    return str(value).strip()


def _text(row: Mapping[str, Any], column: str, where: str) -> str:
    value = row.get(column)
    text = "" if value is None else str(value).strip()
    if not text:
        raise DataError(f"{where}: empty text in column {column!r}", "fix or remove that row")
    return text


def missing_column_error(path: Path | str, column: str, present: Iterable[str], hint: str) -> DataError:
    return DataError(f"{path} has no column {column!r}; its columns are: {', '.join(map(repr, present))}", hint)
