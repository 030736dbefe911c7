"""Train / validation / test from a task's labelled rows: the paper's pooled split, or the task's own."""

from __future__ import annotations

from sklearn.model_selection import train_test_split

from dimec.config import DataConfig, raise_problems, section_problems
from dimec.data.examples import SPLIT_NAMES, Example, RawTask, TaskData, label_distribution
from dimec.errors import DataError

_STRATIFY_HINT = ("a stratified split needs at least 2 rows of each label, and splits no smaller than the number "
                  "of labels: raise data.max_samples or give the split a larger share in data.split_ratios")


def check_split_config(cfg: DataConfig) -> None:
    """Every data setting, checked before any file is read (the checks live beside the settings)."""
    raise_problems(section_problems(cfg, "data."))


def split_task(raw: RawTask, cfg: DataConfig) -> TaskData:
    """Apply data.split (after data.max_samples) and check that no split is empty."""
    check_split_config(cfg)
    if cfg.split == "pooled":
        splits = pooled_split([e for part in raw.parts.values() for e in part], cfg.split_ratios, cfg.seed,
                              cfg.max_samples)
    else:
        splits = own_split(raw, cfg.seed, cfg.max_samples)
    splits, spare = cap_splits(splits, cfg)
    for name, rows in zip(SPLIT_NAMES, splits, strict=True):
        if not rows:
            raise DataError(f"the {name} split of task {raw.name!r} is empty",
                            "use more rows (data.max_samples) or other data.split_ratios")
    return TaskData(raw.name, list(raw.label_names), raw.metric, *splits, skipped_rows=raw.skipped_rows, spare=spare)


def cap_splits(splits: tuple[list[Example], list[Example], list[Example]], cfg: DataConfig
               ) -> tuple[tuple[list[Example], list[Example], list[Example]], list[Example]]:
    """data.max_train_samples caps the training split alone, data.max_eval_samples validation and test each:
    training rows cost CPU time, evaluation rows are cheap and make every threshold and interval tighter.
    Returns the splits and the training rows the cap dropped (labelled rows no model sees: "spare" rows)."""
    train, validation, test = splits
    spare: list[Example] = []
    if cfg.max_train_samples is not None:
        train, spare = stratified_partition(train, cfg.max_train_samples, cfg.seed)
    if cfg.max_eval_samples is not None:
        validation = stratified_sample(validation, cfg.max_eval_samples, cfg.seed)
        test = stratified_sample(test, cfg.max_eval_samples, cfg.seed)
    return (train, validation, test), spare


def pooled_split(pool: list[Example], ratios: tuple[float, float, float], seed: int,
                 max_samples: int | None = None) -> tuple[list[Example], list[Example], list[Example]]:
    """The paper's protocol: pool every labelled row, optionally take a stratified sample of `max_samples`,
    then split stratified by label into train / validation / test by `ratios` (two seeded steps)."""
    if not pool:
        raise DataError("the task has no labelled rows", "check data.task and data.path")
    if max_samples is not None and max_samples < len(pool):
        pool = stratified_sample(pool, max_samples, seed)
    n = len(pool)
    n_val, n_test = round(n * ratios[1]), round(n * ratios[2])
    sizes = {"train": n - n_val - n_test, "validation": n_val, "test": n_test}
    for name, ratio in zip(SPLIT_NAMES, ratios, strict=True):
        if sizes[name] < 1:
            raise DataError(f"the {name} split would be empty: {n} pooled rows x {ratio:g} rounds to 0 rows",
                            "raise data.max_samples or give that split a larger share in data.split_ratios")
    rest, test = stratified_split(pool, n_test, seed, "test")
    train, validation = stratified_split(rest, n_val, seed, "validation")
    return train, validation, test


def own_split(raw: RawTask, seed: int, max_samples: int | None = None
              ) -> tuple[list[Example], list[Example], list[Example]]:
    """The task's own splits: its train file for train; validation and test from its own files when it has
    both, else (GLUE, whose test files carry no labels) its dev file halved, stratified and seeded, into
    validation and test. `max_samples` caps the total, shared between the files in proportion to their size."""
    parts = raw.parts
    if "train" not in parts or "validation" not in parts:
        have = ", ".join(f"{p} ({raw.where.get(p, '?')})" for p in parts)
        raise DataError(f"data.split=own needs the task's own train and validation (dev) files; "
                        f"{raw.name!r} has only: {have}",
                        "use data.split=pooled, or (data.task=file) a folder with train and validation/dev files")
    if max_samples is not None:
        parts = _cap_parts(parts, max_samples, seed)
    if "test" in parts:
        return parts["train"], parts["validation"], parts["test"]
    dev = parts["validation"]
    if len(dev) < 2:
        raise DataError(f"the dev rows of {raw.name!r} ({len(dev)}) cannot be halved into validation and test",
                        "raise data.max_samples or use data.split=pooled")
    validation, test = stratified_split(dev, len(dev) // 2, seed, "test")
    return parts["train"], validation, test


def stratified_split(rows: list[Example], n_second: int, seed: int, what: str
                     ) -> tuple[list[Example], list[Example]]:
    """Split off `n_second` rows (the `what` split), keeping label proportions."""
    try:
        first, second = train_test_split(rows, test_size=n_second, stratify=[e.label for e in rows],
                                         random_state=seed)
    except ValueError as exc:
        raise DataError(f"cannot split a stratified {what} split of {n_second} rows off {len(rows)} rows "
                        f"(rows per label id: {label_distribution(rows)}): {exc}", _STRATIFY_HINT) from None
    return list(first), list(second)


def stratified_sample(rows: list[Example], n: int, seed: int) -> list[Example]:
    """A seeded, label-stratified sample of `n` rows, kept in their original order."""
    return stratified_partition(rows, n, seed)[0]


def stratified_partition(rows: list[Example], n: int, seed: int) -> tuple[list[Example], list[Example]]:
    """`stratified_sample`'s `n` rows and the rows it leaves out, each in their original order."""
    if n >= len(rows):
        return rows, []
    try:
        keep, _ = train_test_split(list(range(len(rows))), train_size=n, stratify=[e.label for e in rows],
                                   random_state=seed)
    except ValueError as exc:
        raise DataError(f"cannot take a stratified sample of {n} of {len(rows)} rows "
                        f"(rows per label id: {label_distribution(rows)}): {exc}", _STRATIFY_HINT) from None
    kept = set(keep)
    return [rows[i] for i in sorted(kept)], [rows[i] for i in range(len(rows)) if i not in kept]


def _cap_parts(parts: dict[str, list[Example]], max_samples: int, seed: int) -> dict[str, list[Example]]:
    total = sum(len(rows) for rows in parts.values())
    if max_samples >= total:
        return parts
    return {name: stratified_sample(rows, max(1, round(max_samples * len(rows) / total)), seed)
            for name, rows in parts.items()}
