"""GLUE tasks from the Hugging Face hub (`data.source=hub`): needs the `datasets` package and internet."""

from __future__ import annotations

from typing import Any

from dimec.data.examples import Example, RawTask, make_example
from dimec.data.glue import GlueSpec
from dimec.errors import DataError

HUB_DATASET = "glue"


def load_glue_hub(spec: GlueSpec) -> RawTask:
    """The hub's train and validation splits (its test split has no labels, as in the GLUE download)."""
    try:
        import datasets  # lazy: optional dependency, slow to import
    except ImportError:
        raise DataError("data.source=hub needs the `datasets` package",
                        "pip install datasets, or use data.source=local with the GLUE files") from None
    try:
        dataset = datasets.load_dataset(HUB_DATASET, spec.name)
    except Exception as exc:  # offline, hub errors and cache errors all surface as different types
        raise DataError(f"could not load {HUB_DATASET}/{spec.name} from the Hugging Face hub: "
                        f"{type(exc).__name__}: {exc}",
                        "data.source=hub needs internet; offline, use data.source=local with the GLUE files "
                        "(data.glue_dir=DIR or data.path=DIR/" + spec.folder + ")") from exc
    parts = {"train": dataset["train"], "validation": dataset[spec.hub_dev_split]}
    return RawTask(spec.name, list(spec.label_names), spec.metric,
                   {part: _examples(spec, rows, part) for part, rows in parts.items()},
                   where={part: f"hub {HUB_DATASET}/{spec.name}" for part in parts})


def _examples(spec: GlueSpec, rows: Any, part: str) -> list[Example]:
    label_ids = {str(i): i for i in range(len(spec.label_names))}  # the hub stores label ids
    where = f"hub {HUB_DATASET}/{spec.name} {part} row"
    return [make_example(row, spec.hub_text, spec.hub_pair, "label", label_ids, f"{where} {i}")
            for i, row in enumerate(rows)]
