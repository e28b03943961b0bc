"""Results as documents: JSON with full provenance, and Markdown tables people can read at a glance.

An `eval` document holds one section per temperature ("T0", "T1", ...): the measure (loop replay or teacher-forced
expectation, spelled out), per arm and domain the acceptance summaries, per-sequence numbers, where the continuations
came from, and the paired comparison. A `bench` document holds the local ABBA benchmark and, when configured, the
serving one. Both carry `provenance` (command, date, device, host, package versions, git commit) and the seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..provenance import run_provenance
from .offline import OfflineResult


def document(kind: str, device, settings: dict, seeds: dict) -> dict:
    """The top of every results file: what produced it, where, with which seeds and settings."""
    return {"kind": kind, "provenance": {**run_provenance(device), "seeds": seeds}, "settings": settings}


def temperature_key(temperature: float) -> str:
    return f"T{temperature:g}"


def eval_section(result: OfflineResult, continuations: dict | None = None, paired: dict | None = None) -> dict:
    """One temperature of an eval document (see the module docstring)."""
    data = result.to_dict(per_sequence=True)
    return {
        "temperature": result.temperature,
        "measure": result.measure,
        "sequences": data["sequences"],
        "domains": data["domains"],
        "continuations": continuations,
        "continuation_agreement": data["continuation_agreement"],
        "arms": {
            name: {key: arm[key] for key in ("draft", "max_draft_tokens", "confidence_threshold", "num_slots")}
            for name, arm in data["arms"].items()
        },
        "acceptance": {name: arm["summary"] for name, arm in data["arms"].items()},
        "per_sequence": {name: arm["per_sequence"] for name, arm in data["arms"].items()},
        "paired": paired,
    }


def write_document(out_dir: str | Path, stem: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    """OUT/stem.json and OUT/stem.md, written whole (a reader never sees half a file)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / f"{stem}.json", out / f"{stem}.md")
    for path, text in zip(paths, (json.dumps(payload, indent=1), markdown)):
        partial = path.with_name(path.name + ".partial")
        partial.write_text(text)
        partial.replace(path)
    return paths


def _number(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _percent(value) -> str:
    return "-" if value is None else f"{value:+.1%}"


def _matched(match: dict | None) -> str:
    return "-" if not match else f"{match['identical']}/{match['rows']}"


def _interval(values, percent: bool = False) -> str:
    if not values:
        return "-"
    low, high = values
    return f"{low:+.1%} .. {high:+.1%}" if percent else f"{low:.2f} .. {high:.2f}"


def eval_markdown(payload: dict) -> str:
    """Per temperature: acceptance length per arm and domain, per-position acceptance, and the paired comparison."""
    lines = [f"# dspark eval ({payload['provenance']['date']}, {payload['provenance']['device']})", ""]
    for key, section in payload.items():
        if not (key.startswith("T") and isinstance(section, dict) and "acceptance" in section):
            continue
        domains = list(section["domains"])
        replay = section["temperature"] == 0
        lines += [f"## temperature {section['temperature']:g}", "", f"Measure: {section['measure']}.", ""]
        agreement = section.get("continuation_agreement")
        if agreement and agreement.get("rate") is not None and agreement["rate"] < 1:
            lines += [
                f"Warning: only {agreement['rate']:.2%} of the continuation tokens equal the target's argmax in this "
                "forward (dtype or batching effects); the replay is then close to, not exactly, the loop.",
                "",
            ]
        header = ["arm", *domains, "all", "every anchor" if replay else "anchors", "mean draft length"]
        lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        for name, per_domain in section["acceptance"].items():
            overall = per_domain["all"]
            cells = [_number(per_domain[d]["acceptance_length"]) for d in [*domains, "all"]]
            extra = _number(overall.get("every_anchor_length")) if replay else str(overall.get("anchors"))
            cells += [extra, _number(overall["mean_proposed_length"])]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        slots = max(len(d["all"]["per_position_acceptance"]) for d in section["acceptance"].values())
        lines += ["", "Per-position conditional acceptance (all domains):", ""]
        lines += ["| arm | " + " | ".join(str(k + 1) for k in range(slots)) + " |", "|---" * (slots + 1) + "|"]
        for name, per_domain in section["acceptance"].items():
            values = per_domain["all"]["per_position_acceptance"]
            lines.append(f"| {name} | " + " | ".join(_number(v) for v in values) + " |")
        paired = section.get("paired")
        if paired:
            lines += ["", f"Paired: {paired['b']} (B) vs {paired['a']} (A), cluster bootstrap over sequences:", ""]
            lines += ["| domain | A | B | gain | 95% CI | relative | 95% CI | verdict |", "|---" * 8 + "|"]
            for domain in ["all", *domains]:
                comparison = paired.get(domain)
                if not comparison:
                    continue
                lines.append(
                    f"| {domain} | {_number(comparison['a'])} | {_number(comparison['b'])} | "
                    f"{comparison['absolute_gain']:+.3f} | {_interval(comparison['absolute_gain_ci'])} | "
                    f"{_percent(comparison['relative_gain'])} | "
                    f"{_interval(comparison['relative_gain_ci'], percent=True)} | {comparison['verdict']} |"
                )
        lines.append("")
    return "\n".join(lines)


def bench_markdown(payload: dict) -> str:
    """Per batch size: every method's throughput, time per token, speedup with its interval, token match, memory,
    failures and skips; then the serving comparison if it ran."""
    lines = [f"# dspark bench ({payload['provenance']['date']}, {payload['provenance']['device']})", ""]
    for title, block in (("local", payload.get("local")), ("serving", payload.get("serving"))):
        if not block:
            continue
        if "summary" not in block:
            lines += [f"## {title}", "", f"Skipped: {block.get('skipped', 'no results')}.", ""]
            continue
        baseline = block["baseline"]
        lines += [f"## {title} (speedup against {baseline})", ""]
        header = "| batch | method | runs | failed | tokens/s | ms/token | speedup | 95% CI | token match | peak MiB |"
        lines += [header, "|---" * 10 + "|"]
        for batch, methods in block["summary"].items():
            for name, entry in methods.items():
                versus = entry.get(f"vs_{baseline}") or {}
                lines.append(
                    f"| {batch} | {name} | {entry['runs']} | {entry['failed_runs']} | "
                    f"{_number(entry['tokens_per_second'], 1)} | {_number(entry['time_per_output_token_ms'])} | "
                    f"{_number(versus.get('speedup'))} | {_interval(versus.get('speedup_ci'))} | "
                    f"{_matched(entry.get('token_match'))} | "
                    f"{_number(entry['peak_memory_mib'], 0)} |"
                )
        notes = []
        for batch, methods in block["summary"].items():
            for name, entry in methods.items():
                notes += [f"batch {batch}, {name} failed: {error}" for error in entry["errors"]]
        for batch, skipped in (block.get("skipped") or {}).items():
            notes += [f"batch {batch}, {name} skipped: {reason}" for name, reason in skipped.items()]
        if notes:
            lines += ["", *[f"- {note}" for note in notes]]
        lines.append("")
    return "\n".join(lines)
