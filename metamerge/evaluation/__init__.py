"""Judging a merge: the evaluation backend (lm-eval), score tables, the gate, the comparison."""
