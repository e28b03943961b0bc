"""Results files a model card can show, recognised by their shape and brought to one form.

Recognised files:

* `dspark eval` JSON (`"kind": "dspark eval"`): per temperature, acceptance length per arm and domain,
  per-position acceptance, and the paired comparison of two arms with its bootstrap interval.
* `dspark bench` JSON (`"kind": "dspark bench"`): per batch size and method, throughput and the paired speedup against
  plain decoding with its bootstrap interval, token match, failures; the serving comparison when it ran.
* The older files of `benchmarks/smollm2_default.py` (temperature sections `T0`, `T1`, ... without `kind`, and an
  optional batch-1 `speed` part) and `benchmarks/speed.py` (`batch_1`, `batches`). Their speed spreads are medians
  with an interquartile or min-max range, not confidence intervals, and each table says which it shows.

Nothing is computed here that the file does not hold, except medians of samples the file lists (older speed files).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..evaluation.offline import EXPECTATION, REPLAY
from ..pair import DEFAULT_DRAFT, DEFAULT_DRAFT_DIR

EVAL_KIND = "dspark eval"
BENCH_KIND = "dspark bench"
OVERALL = "all"
# Methods whose speed depends on the draft (the others are the baseline and prompt lookup, a draft-free reference).
DRAFT_METHODS = ("assisted", "loop", "dflash", "spec")
METHOD_LABELS = {
    "plain": "plain `generate` (baseline)",
    "assisted": "`generate(assistant_model=draft)`",
    "loop": "`dspark.speculative_generate`",
    "loop_static": "`dspark.speculative_generate(static_cache=True)`",
    "lookup": "prompt lookup (no draft, reference)",
    "dflash": '`generate(..., speculation_type="dflash")`',
    "no_spec": "server without speculation (baseline)",
    "spec": "server with speculative decoding",
}
BOOTSTRAP_CI = "95% bootstrap CI"  # `dspark bench` always reports 95% percentile intervals


@dataclass
class ArmAcceptance:
    """One arm (a draft under one drafting setting) at one temperature."""

    name: str
    draft: str
    is_this_draft: bool
    acceptance_length: dict[str, float | None]  # "all" and each domain
    per_position: dict[str, list[float | None]]  # "all" and each domain the file has it for
    rounds: int | None  # rounds (T=0) or anchors (T>0) over all domains
    max_draft_tokens: int | None = None
    confidence_threshold: float | None = None


@dataclass
class PairedRow:
    """Arm B against arm A on one domain (or all), with cluster-bootstrap intervals over sequences."""

    domain: str
    sequences: int
    a: float
    b: float
    absolute_gain: float
    absolute_gain_ci: list[float]
    relative_gain: float | None
    relative_gain_ci: list[float] | None
    includes_zero: bool


@dataclass
class PairedComparison:
    a: str
    b: str
    confidence: float
    replicates: int | None
    rows: list[PairedRow]

    @property
    def overall(self) -> PairedRow | None:
        return next((row for row in self.rows if row.domain == OVERALL), None)


@dataclass
class AcceptanceSection:
    """One temperature of an evaluation: every arm per domain, and the paired comparison."""

    temperature: float
    measure: str
    sequences: int
    domains: dict[str, int]  # domain -> sequences
    arms: list[ArmAcceptance]
    paired: PairedComparison | None
    continuation_agreement: float | None = None
    plot: str | None = None  # link to the per-position plot, set when plots are drawn

    @property
    def is_replay(self) -> bool:
        return self.temperature == 0

    @property
    def this_arm(self) -> ArmAcceptance | None:
        """This checkpoint's arm, preferring its own drafting settings (whole block, its own threshold) in a sweep."""
        own = [arm for arm in self.arms if arm.is_this_draft]
        defaults = [arm for arm in own if arm.max_draft_tokens is None and arm.confidence_threshold is None]
        return (defaults or own or [None])[0]

    @property
    def slots(self) -> int:
        return max((len(arm.per_position.get(OVERALL, [])) for arm in self.arms), default=0)


@dataclass
class AcceptanceReport:
    """One evaluation file."""

    source: Path
    file_format: str
    provenance: dict
    target: str | None
    drafts: dict[str, str]
    this_draft: str | None
    prompt_sets: list[str] | None
    max_new_tokens: int | None
    sections: list[AcceptanceSection]


@dataclass
class SpeedRow:
    batch_size: int
    method: str
    speedup: float | None
    interval: list[float] | None
    tokens_per_second: float | None
    identical: int | None = None
    compared: int | None = None
    runs: int | None = None
    failed_runs: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def uses_draft(self) -> bool:
        return self.method in DRAFT_METHODS

    @property
    def label(self) -> str:
        return METHOD_LABELS.get(self.method, f"`{self.method}`")


@dataclass
class SpeedTable:
    """Speedups measured under one protocol, against one baseline."""

    title: str
    protocol: str
    baseline: str
    statistic: str
    interval_name: str
    interval_short: str  # the same, in a few words, for sentences
    interval_is_ci: bool
    rows: list[SpeedRow]
    notes: list[str] = field(default_factory=list)
    bench_block: dict | None = None  # the `dspark bench` block a throughput plot is drawn from
    plot: str | None = None


@dataclass
class SpeedReport:
    """One speed file (or the speed part of an older evaluation file)."""

    source: Path
    file_format: str
    provenance: dict
    target: str | None
    draft: str | None
    max_new_tokens: int | None
    tables: list[SpeedTable]
    serving_skipped: str | None = None

    @property
    def measured_serving(self) -> bool:
        return any(table.baseline == "no_spec" for table in self.tables)


@dataclass
class Results:
    """Every results file given to the card, in the order given."""

    acceptance: list[AcceptanceReport] = field(default_factory=list)
    speed: list[SpeedReport] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.acceptance and not self.speed


# ----------------------------------------------------------------------------------------------------------------
# Which draft in a file is this checkpoint
# ----------------------------------------------------------------------------------------------------------------


def same_folder(recorded: str, checkpoint: Path) -> bool:
    """Whether a draft path recorded in a results file is `checkpoint` (the name `default` is the embedded draft)."""
    path = DEFAULT_DRAFT_DIR if recorded == DEFAULT_DRAFT else Path(recorded)
    try:
        return path.exists() and path.resolve() == checkpoint.resolve()
    except OSError:
        return False


def this_draft_name(drafts: dict[str, str], checkpoint: Path, requested: str | None, source: Path) -> str | None:
    """The name this checkpoint has in a file: the requested one (checked), the one whose path is the checkpoint, or
    the only one; None when the file compares several drafts and none can be told to be this one."""
    if requested is not None:
        if requested not in drafts:
            raise ValueError(
                f"dspark card: --draft-name {requested!r} is not a draft in {source}; its drafts are "
                f"{', '.join(drafts) or 'none'}."
            )
        return requested
    matching = [name for name, path in drafts.items() if same_folder(path, checkpoint)]
    if len(matching) == 1:
        return matching[0]
    return next(iter(drafts)) if len(drafts) == 1 else None


# ----------------------------------------------------------------------------------------------------------------
# Acceptance: `dspark eval` and the older benchmarks/smollm2_default.py sections
# ----------------------------------------------------------------------------------------------------------------


def temperature_sections(payload: dict) -> list[tuple[str, dict]]:
    """(key, section) for every `T<temperature>` section that holds acceptance numbers."""
    return [
        (key, section)
        for key, section in payload.items()
        if key.startswith("T")
        and isinstance(section, dict)
        and isinstance(section.get("acceptance"), dict)
        and section["acceptance"]
    ]


def has_values(values: list | None) -> bool:
    """Older files hold a list of nulls where a number was not defined (per-position acceptance at T>0)."""
    return bool(values) and any(value is not None for value in values)


def paired_comparison(paired: dict | None, domains: list[str]) -> PairedComparison | None:
    if not paired:
        return None
    rows = []
    for domain in [OVERALL, *domains]:
        entry = paired.get(domain)
        if not entry:
            continue
        rows.append(
            PairedRow(
                domain=domain,
                sequences=entry["sequences"],
                a=entry["a"],
                b=entry["b"],
                absolute_gain=entry["absolute_gain"],
                absolute_gain_ci=entry["absolute_gain_ci"],
                relative_gain=entry.get("relative_gain"),
                relative_gain_ci=entry.get("relative_gain_ci"),
                includes_zero=bool(entry["includes_zero"]),
            )
        )
    overall = paired.get(OVERALL) or {}
    return PairedComparison(
        a=paired["a"],
        b=paired["b"],
        confidence=overall.get("confidence", 0.95),
        replicates=overall.get("replicates"),
        rows=rows,
    )


def acceptance_section(
    key: str, section: dict, arm_drafts: dict[str, str], this_draft: str | None
) -> AcceptanceSection:
    """One temperature section of either format. `arm_drafts` maps arm -> draft name."""
    temperature = section.get("temperature", float(key[1:]))
    summaries = section["acceptance"]
    first = next(iter(summaries.values()))
    if isinstance(section.get("domains"), dict):
        domains = dict(section["domains"])
    else:  # older files: the domains are the per-arm keys besides "all"
        domains = {domain: entry.get("sequences") for domain, entry in first.items() if domain != OVERALL}
    arm_settings = section.get("arms") or {}
    arms = []
    for name, per_domain in summaries.items():
        overall = per_domain[OVERALL]
        setting = arm_settings.get(name, {})
        arms.append(
            ArmAcceptance(
                name=name,
                draft=arm_drafts.get(name, name),
                is_this_draft=this_draft is not None and arm_drafts.get(name, name) == this_draft,
                acceptance_length={
                    d: per_domain[d]["acceptance_length"] for d in [OVERALL, *domains] if d in per_domain
                },
                per_position={
                    d: per_domain[d]["per_position_acceptance"]
                    for d in [OVERALL, *domains]
                    if d in per_domain and has_values(per_domain[d].get("per_position_acceptance"))
                },
                rounds=overall.get("rounds", overall.get("anchors")),
                max_draft_tokens=setting.get("max_draft_tokens"),
                confidence_threshold=setting.get("confidence_threshold"),
            )
        )
    agreement = (section.get("continuation_agreement") or {}).get("rate")
    return AcceptanceSection(
        temperature=temperature,
        measure=section.get("measure") or (REPLAY if temperature == 0 else EXPECTATION),
        sequences=section.get("sequences") or first[OVERALL].get("sequences"),
        domains=domains,
        arms=arms,
        paired=paired_comparison(section.get("paired"), list(domains)),
        continuation_agreement=agreement,
    )


def acceptance_report(path: Path, payload: dict, file_format: str, checkpoint: Path, draft_name: str | None):
    drafts = dict(payload.get("drafts") or {})
    sections = temperature_sections(payload)
    if not drafts:  # no names recorded: every arm is its own draft
        drafts = {arm: arm for _, section in sections for arm in section["acceptance"]}
    this_draft = this_draft_name(drafts, checkpoint, draft_name, path)
    settings = payload.get("settings") or {}
    parsed = []
    for key, section in sections:
        arm_drafts = {arm: entry.get("draft", arm) for arm, entry in (section.get("arms") or {}).items()}
        parsed.append(acceptance_section(key, section, arm_drafts, this_draft))
    return AcceptanceReport(
        source=path,
        file_format=file_format,
        provenance=payload.get("provenance") or {},
        target=payload.get("target"),
        drafts=drafts,
        this_draft=this_draft,
        prompt_sets=payload.get("prompt_sets"),
        max_new_tokens=settings.get("max_new_tokens"),
        sections=sorted(parsed, key=lambda section: section.temperature),
    )


# ----------------------------------------------------------------------------------------------------------------
# Speed: `dspark bench` and the older benchmarks/speed.py / smollm2_default.py speed parts
# ----------------------------------------------------------------------------------------------------------------


def counted(count: int | None, noun: str) -> str:
    """`1 prompt`, `9 prompts`; `an unrecorded number of prompts` when the file does not say."""
    if count is None:
        return f"an unrecorded number of {noun}s"
    return f"{count} {noun}{'' if count == 1 else 's'}"


def bench_table(title: str, protocol: str, block: dict) -> SpeedTable:
    """A `dspark bench` block (local or serving): every batch size and method against the block's baseline."""
    baseline = block["baseline"]
    rows, notes = [], []
    for batch, methods in block["summary"].items():
        for method, entry in methods.items():
            versus = entry.get(f"vs_{baseline}") or {}
            match = entry.get("token_match") or {}
            rows.append(
                SpeedRow(
                    batch_size=int(batch),
                    method=method,
                    speedup=versus.get("speedup"),
                    interval=versus.get("speedup_ci"),
                    tokens_per_second=entry.get("tokens_per_second"),
                    identical=match.get("identical"),
                    compared=match.get("rows"),
                    runs=entry.get("runs"),
                    failed_runs=entry.get("failed_runs", 0),
                    errors=list(entry.get("errors") or []),
                )
            )
    for batch, skipped in (block.get("skipped") or {}).items():
        notes += [f"batch {batch}: {method} not run ({reason})" for method, reason in skipped.items()]
    return SpeedTable(
        title=title,
        protocol=protocol,
        baseline=baseline,
        statistic="ratio of total throughput, paired by workload and round",
        interval_name=BOOTSTRAP_CI,
        interval_short=BOOTSTRAP_CI,
        interval_is_ci=True,
        rows=rows,
        notes=notes,
        bench_block=block,
    )


def bench_report(path: Path, payload: dict) -> SpeedReport:
    settings = payload.get("settings") or {}
    rounds, tokens = settings.get("rounds"), settings.get("max_new_tokens")
    local_protocol = (
        f"greedy, {counted(len(payload.get('prompts') or []), 'prompt')}, up to {tokens} new tokens, "
        f"{counted(rounds, 'ABBA round')} per workload after a warm-up run, tokens counted up to each row's stop token"
    )
    tables = []
    local = payload.get("local") or {}
    if "summary" in local:
        tables.append(bench_table("local generation", local_protocol, local))
    serving = payload.get("serving") or {}
    if "summary" in serving:
        protocol = (
            f"OpenAI-compatible servers ({serving.get('model')}), {counted(rounds, 'ABBA round')} per concurrency level"
        )
        tables.append(bench_table("serving", protocol, serving))
    return SpeedReport(
        source=path,
        file_format=f"`{BENCH_KIND}`",
        provenance=payload.get("provenance") or {},
        target=payload.get("target"),
        draft=payload.get("draft"),
        max_new_tokens=tokens,
        tables=tables,
        serving_skipped=serving.get("skipped"),
    )


def batch_one_table(speed: dict) -> SpeedTable:
    """Older batch-1 part: per-prompt speedups of each method, summarised by median and interquartile range."""
    summary = speed["summary"]
    plain_rate = summary.get("plain_tokens_per_second_median")
    rows = [SpeedRow(1, "plain", None, None, plain_rate)]
    prompts = None
    for method, entry in summary.items():
        if not isinstance(entry, dict):
            continue
        prompts = entry.get("prompts", prompts)
        rows.append(
            SpeedRow(
                batch_size=1,
                method=method,
                speedup=entry["median_speedup"],
                interval=entry.get("speedup_iqr"),
                tokens_per_second=None,
                identical=entry.get("identical_to_plain"),
                compared=entry.get("prompts"),
                runs=entry.get("prompts"),
            )
        )
    return SpeedTable(
        title="batch 1, per prompt",
        protocol=f"greedy, {counted(prompts, 'prompt')}, each method once per prompt in a rotating order",
        baseline="plain",
        statistic="median of per-prompt throughput ratios",
        interval_name="interquartile range over prompts (not a confidence interval)",
        interval_short="IQR over prompts",
        interval_is_ci=False,
        rows=rows,
        notes=["tokens/s of the baseline is the median over prompts"],
    )


def batches_table(batches: dict) -> SpeedTable:
    """Older batched part: plain batched `generate` against the loop, a few alternating samples per batch size."""
    rows, samples = [], None
    for batch, entry in batches.items():
        samples = len(entry.get("loop_tokens_per_second") or []) or samples
        plain, loop = entry.get("plain_tokens_per_second"), entry.get("loop_tokens_per_second")
        rows.append(SpeedRow(int(batch), "plain", None, None, statistics.median(plain) if plain else None))
        rows.append(
            SpeedRow(
                batch_size=int(batch),
                method="loop",
                speedup=entry["median_speedup"],
                interval=entry.get("speedup_range"),
                tokens_per_second=statistics.median(loop) if loop else None,
                runs=len(loop) if loop else None,
            )
        )
    return SpeedTable(
        title="batches",
        protocol=(
            f"greedy, the same prompts repeated to the batch size, {counted(samples, 'sample')} per method in A-B-B-A "
            "order"
        ),
        baseline="plain",
        statistic="median of paired throughput ratios",
        interval_name=f"min-max over the {samples} samples (not a confidence interval)",
        interval_short=f"min-max over {samples} samples",
        interval_is_ci=False,
        rows=rows,
        notes=["tokens/s is the median over samples"],
    )


def older_speed_report(path: Path, payload: dict, speed: dict | None, file_format: str) -> SpeedReport:
    tables = []
    if speed and "summary" in speed:
        tables.append(batch_one_table(speed))
    if payload.get("batches"):
        tables.append(batches_table(payload["batches"]))
    return SpeedReport(
        source=path,
        file_format=file_format,
        provenance=payload.get("provenance") or {},
        target=payload.get("target"),
        draft=payload.get("draft") or (speed or {}).get("draft"),
        max_new_tokens=None,
        tables=tables,
    )


# ----------------------------------------------------------------------------------------------------------------
# Recognising a file
# ----------------------------------------------------------------------------------------------------------------

RECOGNISED = (
    "`dspark eval` JSON (eval.json), `dspark bench` JSON (bench.json), or the older outputs of "
    "benchmarks/smollm2_default.py and benchmarks/speed.py"
)
OLDER_EVAL = "older format of benchmarks/smollm2_default.py"
OLDER_SPEED = "older format of benchmarks/speed.py"


def read_results_file(path: Path, checkpoint: Path, draft_name: str | None, into: Results) -> None:
    """Recognise one file and add what it holds to `into`."""
    if not path.is_file():
        raise FileNotFoundError(f"dspark card: results file {path} does not exist.")
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"dspark card: results file {path} is not JSON ({error}); expected {RECOGNISED}.") from None
    if not isinstance(payload, dict):
        raise ValueError(f"dspark card: results file {path} is not recognised; expected {RECOGNISED}.")
    kind = payload.get("kind")
    if kind == EVAL_KIND:
        into.acceptance.append(acceptance_report(path, payload, f"`{EVAL_KIND}`", checkpoint, draft_name))
    elif kind == BENCH_KIND:
        into.speed.append(bench_report(path, payload))
    elif kind is None and (temperature_sections(payload) or "batch_1" in payload or "batches" in payload):
        if temperature_sections(payload):
            into.acceptance.append(acceptance_report(path, payload, OLDER_EVAL, checkpoint, draft_name))
        speed = payload.get("batch_1") or payload.get("speed")
        if speed or payload.get("batches"):
            into.speed.append(
                older_speed_report(path, payload, speed, OLDER_SPEED if "batch_1" in payload else OLDER_EVAL)
            )
    else:
        raise ValueError(f"dspark card: results file {path} is not recognised (kind={kind!r}); expected {RECOGNISED}.")


def load_results(paths, checkpoint: str | Path, draft_name: str | None = None) -> Results:
    """Every file in `paths`, recognised and normalised (see the module docstring)."""
    results = Results()
    for path in paths or []:
        read_results_file(Path(path), Path(checkpoint), draft_name, results)
    return results
