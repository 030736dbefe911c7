"""Experiments: every method on the paper's tasks (Table I), cost ablations (Fig. 5) and the plots.

Only names live here, so that the CLI can build its parser without importing torch or scikit-learn.
"""

TASKS = ("sst2", "cola", "mrpc", "qnli", "rotten_tomatoes")  # the paper's GLUE tasks and Rotten Tomatoes
# Table I order: references first, then the baselines, then DIMEC-DC, then the labelled reference
METHODS = ("cloud-only", "mobile-only", "edge-only", "random", "deebert", "adaee", "isplitee", "knn",
           "dimec-fixed", "dimec-dynamic", "cascade", "hybrid-centroid", "hybrid-learned", "auto", "oracle")
DISPLAY = {"cloud-only": "BERT (cloud-only)", "dimec-fixed": "DIMEC-DC Fixed (Ours-F)",
           "dimec-dynamic": "DIMEC-DC Dynamic (Ours-D)", "deebert": "DeeBERT", "adaee": "AdaEE",
           "isplitee": "I-SplitEE", "knn": "kNN pools", "random": "Random", "oracle": "Oracle (uses labels)",
           "mobile-only": "mobile-only", "edge-only": "edge-only", "cascade": "cascade (m-e-c)",
           "edge-cascade": "edge cascade (e-c)", "cloud-early-exit": "cloud early exit",
           "hybrid-centroid": "hybrid, DIMEC pools", "hybrid-learned": "hybrid, learned pre-router",
           "auto": "auto (dimec default)"}
OURS = ("cascade", "hybrid-centroid", "hybrid-learned", "auto")  # dimec's policies; the rest are the paper's rows
SWEPT = ("cascade", "edge-cascade", "cloud-early-exit", "hybrid-centroid")  # Pareto plot: their grids on test
MULTIPLIERS = (0.5, 1.0, 2.0, 4.0)  # cost ablations: each factor times these
