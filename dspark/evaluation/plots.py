"""PNG plots of evaluation and benchmark documents, so people can look rather than read.

Plots are drawn from the JSON documents (`dspark.evaluation.report`), so they can be redrawn from a saved result.
matplotlib is optional: without it the functions print how to install it and return None.
"""

from __future__ import annotations

import sys
from pathlib import Path

MISSING = "dspark: matplotlib is not installed, so no PNG plots were drawn (pip install matplotlib)."


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (with a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(MISSING, file=sys.stderr)
        return None
    return plt


def acceptance_curves(section: dict, path: str | Path) -> Path | None:
    """Per-position conditional acceptance of every arm, one panel per domain and one for all (an eval section)."""
    plt = pyplot()
    if plt is None:
        return None
    panels = ["all", *section["domains"]]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), sharey=True, squeeze=False)
    for axis, domain in zip(axes[0], panels):
        for name, per_domain in section["acceptance"].items():
            values = per_domain[domain]["per_position_acceptance"]
            axis.plot(
                range(1, len(values) + 1),
                [float("nan") if v is None else v for v in values],
                "o-",
                label=f"{name} ({per_domain[domain]['acceptance_length'] or 0:.2f})",
            )
        slots = max(len(d[domain]["per_position_acceptance"]) for d in section["acceptance"].values())
        axis.set_xticks(range(1, slots + 1))
        axis.set(title=domain, xlabel="drafted position", ylim=(0, 1.02))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, title="arm (acceptance length)", title_fontsize=7)
    axes[0][0].set_ylabel("P(kept | earlier kept)")
    kind = "loop replay" if section["temperature"] == 0 else "teacher-forced expectation"
    figure.suptitle(f"per-position acceptance, T={section['temperature']:g} ({kind})")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def throughput_vs_batch(block: dict, path: str | Path) -> Path | None:
    """Tokens/s and speedup (with 95% intervals) against batch size, one line per method (a bench block)."""
    plt = pyplot()
    if plt is None:
        return None
    summary, baseline = block["summary"], block["baseline"]
    sizes = sorted(int(size) for size in summary)
    methods = list(dict.fromkeys(name for size in summary for name in summary[size]))
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, name in enumerate(methods):
        color = palette[index % len(palette)]  # one colour per method in both panels
        points = [(size, summary[str(size)].get(name)) for size in sizes]
        points = [(size, entry) for size, entry in points if entry and entry["tokens_per_second"]]
        if not points:
            continue
        left.plot([s for s, _ in points], [e["tokens_per_second"] for s, e in points], "o-", color=color, label=name)
        versus = [(s, e.get(f"vs_{baseline}")) for s, e in points]
        versus = [(s, v) for s, v in versus if v]
        if versus:
            estimates = [v["speedup"] for _, v in versus]
            low = [v["speedup"] - (v["speedup_ci"] or [v["speedup"]] * 2)[0] for _, v in versus]
            high = [(v["speedup_ci"] or [v["speedup"]] * 2)[1] - v["speedup"] for _, v in versus]
            right.errorbar(
                [s for s, _ in versus], estimates, yerr=[low, high], fmt="o-", capsize=3, color=color, label=name
            )
    right.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(sizes, [str(s) for s in sizes])
        axis.set_xlabel("batch size")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    left.set(ylabel="tokens / s", title="throughput")
    right.set(ylabel=f"speedup vs {baseline}", title="speedup (95% bootstrap CI)")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
