"""Speculative rounds as coloured HTML: which drafted tokens the target kept, which it threw away, and its own token.

Each round of `speculative_generate` reports (through `on_round`) the drafted tokens the target accepted, the drafted
tokens after them that it rejected, and the target's own next token: a *bonus* when nothing was rejected, otherwise
the *correction* that replaces the first rejected token. The very first token comes from the prompt pass alone.

Every token is a `<span>` with a class per kind (for tests and custom CSS) and an inline style (so the colours show
in any Gradio version or theme without injecting a stylesheet). Rejected tokens stay visible, struck through, at the
place they were proposed, so a reader sees what the draft guessed and where the target disagreed.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

from ..speculative import RoundEvent


@dataclass(frozen=True)
class TokenKind:
    """How one kind of token looks and what the legend says about it."""

    css_class: str
    style: str
    label: str
    description: str


# Light backgrounds with explicit dark text, so the spans stay readable in dark themes too.
TOKEN_KINDS: dict[str, TokenKind] = {
    "prefill": TokenKind(
        "dspark-prefill",
        "background:#e5e7eb;color:#111827;",
        "first token",
        "from the prompt pass, no draft involved",
    ),
    "accepted": TokenKind(
        "dspark-accepted",
        "background:#bbf7d0;color:#14532d;",
        "accepted",
        "drafted and kept by the target",
    ),
    "rejected": TokenKind(
        "dspark-rejected",
        "background:#fecaca;color:#7f1d1d;text-decoration:line-through;",
        "rejected",
        "drafted, then thrown away by the target",
    ),
    "bonus": TokenKind(
        "dspark-bonus",
        "background:#bfdbfe;color:#1e3a8a;",
        "bonus",
        "the target's own token after a fully accepted block",
    ),
    "correction": TokenKind(
        "dspark-correction",
        "background:#fde68a;color:#78350f;",
        "correction",
        "the target's own token in place of the first rejected one",
    ),
}

# Tokens decoded together with this many preceding ones, so leading spaces and multi-byte characters come out right.
DECODE_CONTEXT_TOKENS = 8
ROUND_STYLE = "border-right:1px dotted #6b7280;padding-right:1px;"
VIEW_STYLE = "white-space:pre-wrap;line-height:1.9;word-break:break-word;"
TOKEN_STYLE = "border-radius:3px;padding:0 1px;"


@dataclass(frozen=True)
class ShownToken:
    kind: str
    token_id: int
    text: str


@dataclass
class ShownRound:
    """One round as displayed: its tokens in reading order (accepted, rejected, then the target's own token)."""

    index: int
    tokens: list[ShownToken] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(token.kind == kind for token in self.tokens)


def token_pieces(tokenizer, context: list[int], tokens: list[int]) -> list[str]:
    """The text each of `tokens` adds after `context`.

    Decoding tokens one by one loses leading spaces (SentencePiece) and splits multi-byte characters (byte-level
    BPE), so each piece is the difference between decoding the context with and without the token. A token that
    ends inside a character gets an empty piece; the character goes to the token that completes it.
    """
    context = context[-DECODE_CONTEXT_TOKENS:]
    previous = tokenizer.decode(context, skip_special_tokens=False)
    pieces = []
    for end in range(1, len(tokens) + 1):
        text = tokenizer.decode(context + tokens[:end], skip_special_tokens=False)
        if text.endswith("\ufffd"):
            pieces.append("")
            continue
        if text.startswith(previous):
            pieces.append(text[len(previous) :])
        else:  # the tokenizer rewrote the context's tail (clean-up rules): fall back to the token alone
            pieces.append(tokenizer.decode([tokens[end - 1]], skip_special_tokens=False))
        previous = text
    return pieces


class RoundView:
    """Collects the `RoundEvent`s of one row and renders them as HTML, one `<span>` per token, one per round."""

    def __init__(self, tokenizer, row: int = 0):
        self.tokenizer = tokenizer
        self.row = row
        self.output: list[int] = []  # tokens emitted so far: the context that later pieces are decoded against
        self.rounds: list[ShownRound] = []

    def add(self, event: RoundEvent) -> None:
        """Append one round. Only the emitted tokens are shown as kept: a stop token or the token budget can cut a
        round short, and what was cut never reaches the output."""
        if event.row != self.row:
            return
        shown = ShownRound(index=len(self.rounds))
        emitted = list(event.emitted)
        kept_drafts = emitted[: len(event.accepted)]
        target_token = emitted[len(event.accepted) :]  # empty when the round was cut before the target's token
        self._show(shown, "accepted", kept_drafts)
        self._show(shown, "rejected", list(event.rejected), keep=False)
        if event.first:
            kind = "prefill"
        else:
            kind = "bonus" if event.bonus else "correction"
        self._show(shown, kind, target_token)
        self.rounds.append(shown)

    def _show(self, shown: ShownRound, kind: str, tokens: list[int], keep: bool = True) -> None:
        if not tokens:
            return
        for token, text in zip(tokens, token_pieces(self.tokenizer, self.output, tokens)):
            shown.tokens.append(ShownToken(kind, token, text))
        if keep:
            self.output.extend(tokens)

    def html(self) -> str:
        if not self.rounds:
            return f'<div class="dspark-rounds" style="{VIEW_STYLE}"></div>'
        return f'<div class="dspark-rounds" style="{VIEW_STYLE}">{"".join(map(round_html, self.rounds))}</div>'


def round_html(shown: ShownRound) -> str:
    summary = (
        f"round {shown.index}: {shown.count('accepted')} accepted, {shown.count('rejected')} rejected"
        if shown.index
        else "first token (prompt pass)"
    )
    tokens = "".join(token_html(token) for token in shown.tokens)
    return (
        f'<span class="dspark-round" data-round="{shown.index}" title="{summary}" style="{ROUND_STYLE}">{tokens}</span>'
    )


def token_html(token: ShownToken) -> str:
    kind = TOKEN_KINDS[token.kind]
    text = token.text
    if token.kind == "rejected":
        # a rejected newline would break the line of text that was actually kept
        text = text.replace("\n", "\u21b5")
    return (
        f'<span class="dspark-token {kind.css_class}" data-token-id="{token.token_id}" '
        f'title="{kind.label} (id {token.token_id})" style="{TOKEN_STYLE}{kind.style}">{html.escape(text)}</span>'
    )


def legend_html() -> str:
    """One sample chip per kind with its meaning."""
    # items joined by spaces: the line may wrap between items, never inside one
    items = " ".join(
        f'<span class="dspark-legend-item" style="margin-right:1em;white-space:nowrap;">'
        f'<span class="dspark-token {kind.css_class}" style="{TOKEN_STYLE}{kind.style}">{kind.label}</span> '
        f"{html.escape(kind.description)}</span>"
        for kind in TOKEN_KINDS.values()
    )
    return f'<div class="dspark-legend" style="line-height:2;">{items}</div>'
