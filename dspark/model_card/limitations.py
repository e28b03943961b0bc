"""The card's limitations, written from the numbers: what the results show against this draft, and what nobody
measured. Every sentence here is derived from the results files, the training record and the checkpoint; when a
file does not hold a number, the sentence says it was not measured instead of guessing it.
"""

from __future__ import annotations

from .checkpoint import DraftFacts
from .results import OVERALL, AcceptanceReport, Results, SpeedRow, SpeedTable
from .training import TrainingFacts

QUALITY_NOTE = (
    "Output quality was not measured separately: verification keeps only what the target itself would produce "
    "(greedy output equal to the target's, sampling from the target's distribution), so quality is the target's."
)


def _interval_text(row: SpeedRow, table: SpeedTable) -> str:
    if not row.interval:
        return "no interval (a single measurement)"
    low, high = row.interval
    return f"{table.interval_short} {low:.2f}-{high:.2f}"


def speed_findings(table: SpeedTable, device: str | None) -> list[str]:
    """Per batch size and draft method: slower than the baseline, not distinguishable from it, failed runs, and
    outputs that differ from plain greedy decoding."""
    where = f" on {device}" if device else ""
    findings = []
    for row in table.rows:
        if not row.uses_draft:
            continue
        at = f"At batch {row.batch_size}, {row.label}"
        if row.failed_runs:
            attempted = (row.runs or 0) + row.failed_runs
            errors = "; ".join(row.errors) if row.errors else "no error recorded"
            findings.append(f"{at}: {row.failed_runs} of {attempted} runs failed and are left out ({errors}).")
        if row.speedup is not None:
            interval = _interval_text(row, table)
            low, high = row.interval or (row.speedup, row.speedup)
            if row.speedup < 1 and high < 1:
                findings.append(
                    f"{at} is slower than {table.baseline} decoding ({row.speedup:.2f}x, {interval}): this draft "
                    f"slows decoding at batch {row.batch_size}{where}."
                )
            elif row.speedup < 1:
                findings.append(
                    f"{at} measured {row.speedup:.2f}x, below 1, and the {interval} includes 1: no speedup over "
                    f"{table.baseline} decoding at batch {row.batch_size}{where}."
                )
            elif low <= 1:
                findings.append(
                    f"{at} measured {row.speedup:.2f}x, but the {interval} includes 1: the speedup at batch "
                    f"{row.batch_size} is not established{where}."
                )
        if row.identical is not None and row.compared and row.identical < row.compared:
            findings.append(
                f"{at}: {row.identical} of {row.compared} outputs were token-identical to plain greedy decoding; the "
                "others diverged (verifying several tokens in one forward changes summation order, which can flip "
                "near-tied argmaxes in reduced precision)."
            )
    return findings


def acceptance_findings(report: AcceptanceReport, max_tokens_per_round: int) -> list[str]:
    """This draft's replayed acceptance against its ceiling, unattributed arms, paired comparisons whose interval
    includes 0, expectations, imperfect replays."""
    findings = []
    for section in report.sections:
        arm = section.this_arm
        overall = arm.acceptance_length.get(OVERALL) if arm else None
        if section.is_replay and overall is not None:
            findings.append(
                f"At T={section.temperature:g} (loop replay, {section.sequences} sequences) this draft yields "
                f"{overall:.2f} tokens per target forward, of at most {max_tokens_per_round}."
            )
    if report.this_draft is None and len(report.drafts) > 1:
        findings.append(
            f"{report.source.name} compares {', '.join(report.drafts)}, and which one is this checkpoint was not "
            "stated (`--draft-name`), so none of its numbers is attributed to this draft."
        )
    for section in report.sections:
        paired = section.paired
        overall = paired.overall if paired else None
        if overall and overall.includes_zero:
            low, high = overall.absolute_gain_ci
            findings.append(
                f"At T={section.temperature:g}, {paired.b} against {paired.a}: the {paired.confidence:.0%} CI of the "
                f"gain in acceptance length ({low:+.3f} .. {high:+.3f}) includes 0, so these {overall.sequences} "
                "sequences show no significant difference."
            )
        if not section.is_replay:
            findings.append(
                f"Acceptance at T={section.temperature:g} is a teacher-forced expectation over every anchor, not a "
                "replay of the sampling loop."
            )
        if section.continuation_agreement is not None and section.continuation_agreement < 1:
            findings.append(
                f"At T={section.temperature:g}, only {section.continuation_agreement:.2%} of the continuation tokens "
                "equal the target's argmax in the scoring forward, so the replay approximates the loop."
            )
    return findings


def training_findings(training: TrainingFacts | None) -> list[str]:
    if training is None:
        return []
    findings = []
    if not training.from_run:
        findings.append(
            "The training settings come from a config file, not from a run's record: command-line overrides, the "
            "steps actually done and the hardware are not known from it."
        )
    trend = training.late_trend
    if trend and trend[1].expected_length > trend[0].expected_length:
        first, last = trend
        findings.append(
            "Training ended while the held-out acceptance was still rising (teacher-forced, "
            f"{first.expected_length:.3f} at step {first.step}, {last.expected_length:.3f} at step {last.step}): the "
            "run had not levelled off."
        )
    return findings


def findings(results: Results, training: TrainingFacts | None, draft: DraftFacts) -> list[str]:
    """What the measurements say about this draft's limits, in the order of the files."""
    found = training_findings(training)
    for report in results.acceptance:
        found += acceptance_findings(report, draft.max_tokens_per_round)
    for report in results.speed:
        for table in report.tables:
            found += speed_findings(table, report.provenance.get("device"))
    return found


def not_measured(results: Results) -> list[str]:
    """What no given file measured; always at least the hardware, domains and lengths the measurements cover."""
    missing = []
    temperatures = {section.temperature for report in results.acceptance for section in report.sections}
    if not temperatures:
        missing.append("Acceptance length: no `dspark eval` results were given.")
    else:
        if 0 not in temperatures:
            missing.append("Acceptance at T=0 (replay of the greedy loop).")
        if not any(t > 0 for t in temperatures):
            missing.append("Acceptance when sampling (T>0).")
    batch_sizes = {
        row.batch_size for report in results.speed for table in report.tables for row in table.rows if row.uses_draft
    }
    if not results.speed:
        missing.append("End-to-end speed: no `dspark bench` results were given.")
    elif not batch_sizes:
        missing.append("End-to-end speed with this draft: the speed files hold no method that uses a draft.")
    else:
        if 1 not in batch_sizes:
            missing.append("Speed at batch size 1.")
        if batch_sizes == {1}:
            missing.append("Speed at batch sizes above 1.")
    if not any(report.measured_serving for report in results.speed):
        missing.append("Serving throughput (vLLM or another OpenAI-compatible server).")
    devices = sorted(
        {
            report.provenance["device"]
            for report in [*results.acceptance, *results.speed]
            if report.provenance.get("device")
        }
    )
    if devices:
        missing.append(f"Hardware other than {', '.join(devices)}.")
    domains = sorted(
        {domain for report in results.acceptance for section in report.sections for domain in section.domains}
    )
    if domains:
        missing.append(f"Prompt domains other than {', '.join(domains)}.")
    reports = [*results.acceptance, *results.speed]
    lengths = sorted({report.max_new_tokens for report in reports if report.max_new_tokens})
    if lengths:
        missing.append(f"Generations longer than {lengths[-1]} new tokens.")
    unrecorded = list(dict.fromkeys(str(report.source) for report in reports if not report.max_new_tokens))
    if unrecorded:
        missing.append(f"Generation lengths are not recorded in {', '.join(unrecorded)}, so none is stated here.")
    missing.append(QUALITY_NOTE)
    return missing
