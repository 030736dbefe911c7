"""Task data: GLUE files, generic CSV/TSV/JSONL files, the embedded Rotten Tomatoes default, or the hub.

    data = load_task(DataConfig(task="sst2"))   # TaskData: label_names, metric, train/validation/test

data.split=pooled (default, the paper's protocol) pools every labelled row of the task and splits it
stratified by data.split_ratios; data.split=own keeps the task's train file and halves its dev file into
validation and test, since GLUE's test files have no labels.
"""

from dimec.data.examples import Example, TaskData, label_distribution
from dimec.data.loaders import canonical_task, known_tasks, load_task

__all__ = ["Example", "TaskData", "canonical_task", "known_tasks", "label_distribution", "load_task"]
