"""Model cards for DSpark drafts: `render_model_card(checkpoint, results=[...]) -> str`, used by `dspark card`.

The card's text is in `templates/` (Jinja2); the facts come from the checkpoint (`checkpoint`), the training record
(`training`) and the results files of `dspark eval` / `dspark bench` (`results`); `limitations` writes what the
numbers say against the draft and what was not measured.
"""

from .render import check_front_matter, render_model_card

__all__ = ["check_front_matter", "render_model_card"]
