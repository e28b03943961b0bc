"""Render a draft's model card (README.md with Hub front matter) from its checkpoint, training record and results.

The text lives in Jinja2 templates (`dspark/model_card/templates/`); this module gathers the facts, formats numbers
the same way everywhere, and checks that the front matter parses as the Hub's model-card metadata.
"""

from __future__ import annotations

import re
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from ..pair import resolve_draft_path
from .checkpoint import DraftFacts, component_label, describe_draft
from .limitations import findings, not_measured
from .plots import draw_plots
from .results import METHOD_LABELS, Results, load_results
from .training import TrainingFacts, describe_training

TEMPLATES_DIR = Path(__file__).parent / "templates"
CARD_TEMPLATE = "README.md.j2"
DEFAULT_LICENSE = "apache-2.0"
TAGS = ("speculative-decoding", "dspark", "dflash", "draft-model")
# Short names `dspark` commands accept for a target, and the Hub model each one is.
TARGET_HUB_IDS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
HUB_MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PLACEHOLDER_REPO_ID = "path/to/this-draft"


# ----------------------------------------------------------------------------------------------------------------
# Number formatting: one place, so a number in the card is always the JSON's number rounded the same way
# ----------------------------------------------------------------------------------------------------------------


def fixed(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def signed(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:+.{digits}f}"


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}"


def interval(values: list[float] | None, digits: int = 2, kind: str = "fixed") -> str:
    """`low .. high` in the style of `fixed`, `signed` or `percent`; `-` when there is none."""
    if not values:
        return "-"
    style = {"fixed": lambda v: fixed(v, digits), "signed": lambda v: signed(v, digits), "percent": percent}[kind]
    return f"{style(values[0])} .. {style(values[1])}"


def thousands(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def general(value: float) -> str:
    """Temperatures and other settings as written on the command line: 0, 0.7, 1."""
    return f"{value:g}"


def template_environment() -> Environment:
    environment = Environment(
        loader=FileSystemLoader(TEMPLATES_DIR),
        undefined=StrictUndefined,  # a misspelt field fails the render instead of leaving a hole in the card
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # Markdown, not HTML
    )
    environment.filters.update(
        fixed=fixed,
        signed=signed,
        percent=percent,
        interval=interval,
        thousands=thousands,
        g=general,
        component=component_label,
    )
    return environment


# ----------------------------------------------------------------------------------------------------------------
# The target model
# ----------------------------------------------------------------------------------------------------------------


def recorded_targets(training: TrainingFacts | None, results: Results) -> list[str]:
    """Target names as the training record and the results files give them, first mention first."""
    names = [training.settings.get("target")] if training else []
    names += [report.target for report in [*results.acceptance, *results.speed]]
    return list(dict.fromkeys(name for name in names if name))


def hub_id_of(target: str) -> str | None:
    """The Hub model id a recorded target name stands for; None for a local path or anything not shaped owner/name."""
    if target in TARGET_HUB_IDS:
        return TARGET_HUB_IDS[target]
    if HUB_MODEL_ID.match(target) and not Path(target).exists():
        return target
    return None


def base_model_of(explicit: str | None, targets: list[str]) -> str | None:
    """--base-model when given (checked), else the first recorded target that names a Hub model."""
    if explicit:
        if not HUB_MODEL_ID.match(explicit):
            raise ValueError(f"dspark card: --base-model {explicit!r} is not a Hub model id (owner/name).")
        return explicit
    return next((hub for hub in map(hub_id_of, targets) if hub), None)


# ----------------------------------------------------------------------------------------------------------------
# The card
# ----------------------------------------------------------------------------------------------------------------


def check_front_matter(card: str) -> dict:
    """Parse the card as the Hub does and return its metadata; ValueError when the front matter is not valid.

    `huggingface_hub.ModelCard.validate()` asks the Hub over the network, so only the local parse is done here.
    """
    from huggingface_hub import ModelCard

    try:
        data = ModelCard(card, ignore_metadata_errors=False).data.to_dict()
    except Exception as error:  # the YAML parser and the metadata class raise several types
        raise ValueError(f"dspark card: the rendered front matter does not parse as Hub metadata: {error}") from None
    for key in ("license", "library_name", "pipeline_tag"):
        if not data.get(key):
            raise ValueError(f"dspark card: the rendered front matter lacks {key}.")
    return data


def render_model_card(
    checkpoint: str | Path,
    results: list[str | Path] | None = None,
    *,
    training_config: str | Path | None = None,
    base_model: str | None = None,
    license: str = DEFAULT_LICENSE,
    datasets: list[str] | None = None,
    draft_name: str | None = None,
    repo_id: str | None = None,
    plots_dir: str | Path | None = None,
    card_dir: str | Path | None = None,
    include_vllm: bool = True,
) -> str:
    """The README.md text for the DSpark draft in `checkpoint` (a folder, or `default` for the embedded draft).

    results: `dspark eval` / `dspark bench` JSON files (and the older benchmark files); none gives a card that says
        nothing was measured. training_config: a `dspark train` output folder or a config file.
    draft_name: the name this checkpoint has inside the results files, when they compare several drafts.
    repo_id: where users load the draft from (its Hub id); a placeholder path otherwise.
    plots_dir: draw figures there (needs matplotlib); links are written relative to `card_dir` (default: the
        checkpoint folder, where a card usually lives).
    """
    folder = Path(resolve_draft_path(checkpoint))
    draft: DraftFacts = describe_draft(folder)
    training = describe_training(training_config) if training_config else None
    measured = load_results(results, folder, draft_name)
    targets = recorded_targets(training, measured)
    hub_base_model = base_model_of(base_model, targets)
    learning_curve = None
    if plots_dir is not None:
        learning_curve = draw_plots(measured, training, Path(plots_dir), Path(card_dir or folder))
    card = (
        template_environment()
        .get_template(CARD_TEMPLATE)
        .render(
            draft=draft,
            training=training,
            results=measured,
            findings=findings(measured, training, draft),
            not_measured=not_measured(measured),
            license=license,
            tags=TAGS,
            base_model=hub_base_model,
            target_names=targets,
            datasets=list(datasets or []),
            repo_id=repo_id or PLACEHOLDER_REPO_ID,
            include_vllm=include_vllm,
            learning_curve=learning_curve,
            method_labels=METHOD_LABELS,
        )
    )
    card = re.sub(r"\n{3,}", "\n\n", card)  # includes and skipped blocks leave blank runs behind
    check_front_matter(card)
    return card
