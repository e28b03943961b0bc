"""How a draft was trained, read from what `dspark train` leaves behind or from the config file it was given.

A run folder (`config.json`, `provenance.json`, `metrics.jsonl` written by the trainer) is the record of what ran:
its settings are complete, and the metrics give the steps done and the held-out acceptance. A config file
(YAML/TOML/JSON) is only the intent: fields it leaves out take the trainer's defaults and command-line overrides are
not in it, so the card says so.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..train.config import TrainConfig, read_settings_mapping

RUN_CONFIG = "config.json"
RUN_PROVENANCE = "provenance.json"
RUN_METRICS = "metrics.jsonl"
DATA_MANIFEST = "manifest.json"
# The final quarter of a run: long enough to hold a few held-out evaluations, late enough that the warm-up is over.
LATE_STRETCH = 0.75
TRAINING_FIELDS = {item.name: item for item in dataclasses.fields(TrainConfig)}


@dataclass
class HeldoutPoint:
    """One held-out evaluation logged during training (teacher-forced expected acceptance length)."""

    step: int
    expected_length: float


@dataclass
class TrainingFacts:
    """Settings, machine and progress of one training run (or the settings of a config file)."""

    source: Path
    from_run: bool
    settings: dict
    defaulted: list[str] = field(default_factory=list)
    unrecognised: list[str] = field(default_factory=list)
    provenance: dict | None = None
    steps_done: int | None = None
    heldout: list[HeldoutPoint] = field(default_factory=list)
    data_counts: dict | None = None
    metrics_path: Path | None = None

    @property
    def final_heldout(self) -> HeldoutPoint | None:
        return self.heldout[-1] if self.heldout else None

    @property
    def late_trend(self) -> tuple[HeldoutPoint, HeldoutPoint] | None:
        """(first, last) held-out evaluations of the run's final stretch (from LATE_STRETCH of the last step on), or
        None when that stretch holds fewer than two; it shows whether training had levelled off when it ended."""
        if not self.heldout:
            return None
        late = [point for point in self.heldout if point.step >= LATE_STRETCH * self.heldout[-1].step]
        return (late[0], late[-1]) if len(late) >= 2 else None


def read_settings_file(path: Path) -> dict:
    """A training config's mapping from a .yaml/.yml/.toml/.json file, with a clear error for anything else."""
    values = read_settings_mapping(path, "dspark card")
    if not set(values) & set(TRAINING_FIELDS):
        raise ValueError(
            f"dspark card: {path} is not a dspark training config (none of its fields is a `dspark train` field, "
            "e.g. learning_rate, batch_size, num_anchors)."
        )
    return values


def read_metrics(path: Path) -> tuple[int | None, list[HeldoutPoint]]:
    """Last training step logged, and the held-out evaluations in order."""
    last_step = None
    heldout = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("split") == "train":
            last_step = max(last_step or 0, int(record["step"]))
        elif record.get("split") == "heldout" and record.get("expected_length") is not None:
            heldout.append(HeldoutPoint(int(record["step"]), float(record["expected_length"])))
    return last_step, heldout


def data_counts(data_dir: str) -> dict | None:
    """Prompts answered and tokens, summed over the `dspark data respond` folders named in `data_dir` (comma-separated),
    when every one of them is readable here; None otherwise (the card then says the size was not recorded)."""
    folders = [Path(part) for part in data_dir.split(",") if part.strip()]
    totals = {"folders": len(folders), "sequences": 0, "prompt_tokens": 0, "response_tokens": 0}
    if not folders:
        return None
    for folder in folders:
        manifest = folder / DATA_MANIFEST
        if not manifest.is_file():
            return None
        counts = json.loads(manifest.read_text()).get("counts") or {}
        totals["sequences"] += int(counts.get("answered", 0))
        totals["prompt_tokens"] += int(counts.get("prompt_tokens", 0))
        totals["response_tokens"] += int(counts.get("response_tokens", 0))
    return totals


def describe_training(path: str | Path) -> TrainingFacts:
    """Training facts from a run folder, a run's config.json (its siblings are read too) or a config file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dspark card: training config {path} does not exist.")
    run_folder = path if path.is_dir() else path.parent
    from_run = (path.is_dir() or path.name == RUN_CONFIG) and (run_folder / RUN_METRICS).is_file()
    config_path = run_folder / RUN_CONFIG if path.is_dir() else path
    if not config_path.is_file():
        raise FileNotFoundError(
            f"dspark card: {path} is a folder without {RUN_CONFIG}; pass a `dspark train` output folder or a config "
            "file."
        )
    values = read_settings_file(config_path)
    settings = {name: values[name] for name in TRAINING_FIELDS if name in values}
    defaulted = []
    if not from_run:
        # a config file states only what differs from the trainer's defaults
        for name, item in TRAINING_FIELDS.items():
            if name not in settings:
                settings[name] = item.default if item.default is not dataclasses.MISSING else item.default_factory()
                defaulted.append(name)
    facts = TrainingFacts(
        source=path,
        from_run=from_run,
        settings=settings,
        defaulted=defaulted,
        unrecognised=sorted(set(values) - set(TRAINING_FIELDS)),
    )
    if from_run:
        provenance = run_folder / RUN_PROVENANCE
        facts.provenance = json.loads(provenance.read_text()) if provenance.is_file() else None
        facts.metrics_path = run_folder / RUN_METRICS
        facts.steps_done, facts.heldout = read_metrics(facts.metrics_path)
    if settings.get("data_dir"):
        facts.data_counts = data_counts(str(settings["data_dir"]))
    return facts
