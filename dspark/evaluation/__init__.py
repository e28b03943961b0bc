"""Evaluation: the numbers a draft is judged by.

prompt_sets (vendored MT-bench / HumanEval / MMATH-en and user JSONL), continuations (the target's own answers,
cached), offline (acceptance on those answers: loop replay at T=0, teacher-forced expectation at T>0), paired and
bootstrap (draft A vs B with cluster-bootstrap intervals), bench and serving (end-to-end throughput in ABBA order),
report and plots (JSON with provenance, Markdown, PNG), eval_command and bench_command (`dspark eval`, `dspark bench`).
"""
