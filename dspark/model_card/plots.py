"""The card's figures, redrawn from the results files into a plots folder and linked relative to the card.

Plots are drawn by the same functions `dspark eval`, `dspark bench` and `dspark train` use, so a card's figure is the
one the measurement produced. Without matplotlib nothing is drawn and the card simply has no figures.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..evaluation.plots import acceptance_curves, throughput_vs_batch
from ..train.curves import plot_learning_curve
from .results import OVERALL, AcceptanceSection, Results
from .training import TrainingFacts


def _file_stem(index: int, source: Path) -> str:
    """`<position>-<file stem>`: unique per results file, readable, safe in a URL."""
    return f"{index}-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", source.stem)


def _link(path: Path | None, card_dir: Path) -> str | None:
    return None if path is None else Path(os.path.relpath(path, card_dir)).as_posix()


def plotted_section(section: AcceptanceSection) -> dict:
    """The eval-section shape `acceptance_curves` draws, limited to the domains every arm has per-position data for."""
    domains = [d for d in section.domains if all(d in arm.per_position for arm in section.arms)]
    return {
        "temperature": section.temperature,
        "domains": domains,
        "acceptance": {
            arm.name: {
                d: {"per_position_acceptance": arm.per_position[d], "acceptance_length": arm.acceptance_length.get(d)}
                for d in [OVERALL, *domains]
            }
            for arm in section.arms
        },
    }


def draw_plots(results: Results, training: TrainingFacts | None, plots_dir: Path, card_dir: Path) -> str | None:
    """Draw every figure into `plots_dir`, set the links on the results, and return the learning-curve link."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    for index, report in enumerate(results.acceptance, start=1):
        stem = _file_stem(index, report.source)
        for section in report.sections:
            if all(OVERALL in arm.per_position for arm in section.arms):
                path = plots_dir / f"{stem}-per_position_T{section.temperature:g}.png"
                section.plot = _link(acceptance_curves(plotted_section(section), path), card_dir)
    for index, report in enumerate(results.speed, start=1):
        stem = _file_stem(index, report.source)
        for table in report.tables:
            if table.bench_block is not None:
                path = plots_dir / f"{stem}-{table.title.replace(' ', '_')}.png"
                table.plot = _link(throughput_vs_batch(table.bench_block, path), card_dir)
    if training is not None and training.metrics_path is not None:
        return _link(plot_learning_curve(training.metrics_path, plots_dir / "learning_curve.png"), card_dir)
    return None
