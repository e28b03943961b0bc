"""The numbers under each panel and the comparison line, as HTML.

Each number is a `<span class="dspark-stat" data-stat="NAME">`, so a browser test (or a user's CSS) can find it.
"""

from __future__ import annotations

import html

from .handlers import Comparison, RunStats

STATS_STYLE = "font-variant-numeric:tabular-nums;line-height:1.8;"


def stat(name: str, value: str) -> str:
    return f'<span class="dspark-stat" data-stat="{name}"><b>{html.escape(value)}</b></span>'


def rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def run_stats_html(stats: RunStats, speculative: bool, started: bool = True) -> str:
    """Tokens, tokens/s and (speculative) acceptance length of one run, live or final."""
    state = "done" if stats.done else ("running" if started else "waiting")
    parts = [
        f"{stat('tokens', str(stats.tokens))} tokens",
        f"{stat('tokens_per_second', rate(stats.tokens_per_second))} tokens/s",
    ]
    if speculative:
        acceptance = stats.acceptance_length
        parts.append(
            f"acceptance length {stat('acceptance_length', '-' if acceptance is None else f'{acceptance:.2f}')} "
            f"tokens/round over {stat('rounds', str(stats.rounds))} rounds"
        )
    return (
        f'<div class="dspark-stats" data-state="{state}" style="{STATS_STYLE}">'
        f"{' &middot; '.join(parts)} <i>({state})</i></div>"
    )


def comparison_html(
    comparison: Comparison | None, speculative: RunStats | None = None, plain: RunStats | None = None
) -> str:
    """Speedup measured on this prompt in this session, and (greedy) whether both runs gave the same tokens."""
    if comparison is None or speculative is None or plain is None:
        return (
            '<div class="dspark-comparison" data-state="waiting">Speedup: measured once both runs have finished '
            "(they take turns, so each is timed alone).</div>"
        )
    speedup = "-" if comparison.speedup is None else f"{comparison.speedup:.2f}x"
    line = (
        f"Speedup {stat('speedup', speedup)} "
        f"({rate(speculative.tokens_per_second)} vs {rate(plain.tokens_per_second)} tokens/s, same prompt, "
        "this session)"
    )
    if comparison.identical is not None:
        verdict = "identical to plain greedy" if comparison.identical else "DIFFERS from plain greedy"
        line += f" &middot; {stat('identical', verdict)}"
    return f'<div class="dspark-comparison" data-state="done" style="{STATS_STYLE}">{line}</div>'
