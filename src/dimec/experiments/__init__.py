"""Experiments: every method on the paper's tasks (Table I), cost ablations (Fig. 5) and the plots."""
