"""Learning-curve plot (PNG) from a run's metrics JSONL."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def plot_learning_curve(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    """Training loss and expected acceptance length (train and held-out) against the step. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("dspark train: matplotlib is not installed; skipping the learning-curve plot (pip install matplotlib)")
        return None
    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("split") == "train"]
    heldout = [r for r in records if r.get("split") == "heldout"]
    figure, (loss_axis, accept_axis) = plt.subplots(1, 2, figsize=(11, 4))
    loss_axis.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if heldout:
        loss_axis.plot([r["step"] for r in heldout], [r["loss"] for r in heldout], "o-", label="held-out")
    loss_axis.set(xlabel="optimizer step", ylabel="loss", title="loss")
    loss_axis.legend()
    accept_axis.plot([r["step"] for r in train], [r["expected_length"] for r in train], label="train")
    if heldout:
        accept_axis.plot([r["step"] for r in heldout], [r["expected_length"] for r in heldout], "o-", label="held-out")
    accept_axis.set(
        xlabel="optimizer step", ylabel="tokens per round", title="expected acceptance length (teacher-forced)"
    )
    accept_axis.legend()
    figure.tight_layout()
    out_path = Path(out_path)
    figure.savefig(out_path, dpi=110)
    plt.close(figure)
    return out_path
