"""`load_task`: from a DataConfig to a TaskData, whichever task, source and split it names."""

from __future__ import annotations

from dimec.config import DATA_SOURCES, DataConfig
from dimec.data.examples import RawTask, TaskData
from dimec.data.files import load_file_task
from dimec.data.glue import GLUE_TASKS, load_glue_local
from dimec.data.rotten_tomatoes import load_rotten_tomatoes
from dimec.data.splits import check_split_config, split_task
from dimec.errors import ConfigError, DataError

_ALIASES = {"sst-2": "sst2", "rotten-tomatoes": "rotten_tomatoes"}


def known_tasks() -> list[str]:
    """Task names accepted by data.task."""
    return ["rotten_tomatoes", *GLUE_TASKS, "file"]


def canonical_task(task: str) -> str:
    """"SST-2" -> "sst2"; an unknown name is a DataError listing the known ones."""
    name = str(task).strip().lower()
    name = _ALIASES.get(name, name)
    if name not in known_tasks():
        raise DataError(f"unknown task {task!r}", f"data.task must be one of: {', '.join(known_tasks())}")
    return name


def load_task(cfg: DataConfig) -> TaskData:
    """Read the task's labelled rows and split them (see `dimec.data.splits` for data.split)."""
    check_split_config(cfg)  # fail on a bad config before reading any file
    return split_task(read_raw_task(cfg), cfg)


def read_raw_task(cfg: DataConfig) -> RawTask:
    task = canonical_task(cfg.task)
    if cfg.source not in DATA_SOURCES:
        raise ConfigError(f"unknown data.source {cfg.source!r}",
                          "use data.source=local (files) or data.source=hub (Hugging Face, needs internet)")
    if cfg.source == "hub":
        if task not in GLUE_TASKS:
            raise ConfigError(f"data.source=hub serves the GLUE tasks only, not {task!r}",
                              f"use data.source=local, or data.task one of {', '.join(GLUE_TASKS)}")
        from dimec.data.hub import load_glue_hub

        return load_glue_hub(GLUE_TASKS[task])
    if task == "file":
        return load_file_task(cfg)
    if task == "rotten_tomatoes":
        return load_rotten_tomatoes(cfg)
    return load_glue_local(GLUE_TASKS[task], cfg, need_train=cfg.split == "own")
