"""Evaluation: vendored prompt sets, offline acceptance, paired comparisons and end-to-end benchmarks."""
