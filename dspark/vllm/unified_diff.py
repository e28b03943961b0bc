"""Strict unified diffs: make them, apply them forwards or backwards, with no fuzz and no offsets.

The patches ship for files whose exact upstream bytes are known (their sha256 is in the manifest), so a hunk that
does not match at its stated line is an error, never something to search for. Works without `patch` or `git`.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

_HUNK_HEADER = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


class PatchError(ValueError):
    """A diff that is malformed or does not fit the text it is applied to."""


@dataclass
class Hunk:
    """One hunk: `old_start` is 1-based (0 for an empty old side); lines keep their ' ', '-', '+' marks."""

    old_start: int
    old_count: int
    new_start: int
    new_count: int
    lines: list[str] = field(default_factory=list)

    def reversed(self) -> Hunk:
        swap = {" ": " ", "-": "+", "+": "-"}
        return Hunk(
            self.new_start,
            self.new_count,
            self.old_start,
            self.old_count,
            [swap[line[0]] + line[1:] for line in self.lines],
        )


def make_diff(old: str | None, new: str | None, path: str) -> str:
    """A unified diff (3 lines of context, `a/` and `b/` prefixes) from `old` to `new`; None = the file is absent."""
    old_lines = [] if old is None else old.splitlines(keepends=True)
    new_lines = [] if new is None else new.splitlines(keepends=True)
    for text in (old, new):
        if text and not text.endswith("\n"):
            raise PatchError(f"{path}: text without a final newline cannot be diffed by this tool")
    from_name = "/dev/null" if old is None else f"a/{path}"
    to_name = "/dev/null" if new is None else f"b/{path}"
    return "".join(difflib.unified_diff(old_lines, new_lines, from_name, to_name, n=3))


def parse_diff(diff: str) -> list[Hunk]:
    """The hunks of a single-file unified diff (the `---` / `+++` header lines are skipped)."""
    hunks: list[Hunk] = []
    current: Hunk | None = None
    for number, line in enumerate(diff.splitlines(keepends=True), start=1):
        if line.startswith(("--- ", "+++ ")) and (current is None or _hunk_complete(current)):
            current = None
            continue
        match = _HUNK_HEADER.match(line)
        if match:
            old_start, old_count, new_start, new_count = match.groups()
            current = Hunk(
                int(old_start),
                1 if old_count is None else int(old_count),
                int(new_start),
                1 if new_count is None else int(new_count),
            )
            hunks.append(current)
            continue
        if current is None:
            raise PatchError(f"line {number} of the diff is outside any hunk: {line!r}")
        if line.startswith("\\"):  # "\ No newline at end of file" is never produced by make_diff
            raise PatchError(f"line {number}: files without a final newline are not supported")
        if not line or line[0] not in " -+":
            raise PatchError(f"line {number} of the diff is not a hunk line: {line!r}")
        current.lines.append(line)
    for hunk in hunks:
        if not _hunk_complete(hunk):
            raise PatchError(f"the hunk at old line {hunk.old_start} has the wrong number of lines")
    return hunks


def _hunk_complete(hunk: Hunk) -> bool:
    old = sum(1 for line in hunk.lines if line[0] in " -")
    new = sum(1 for line in hunk.lines if line[0] in " +")
    return old == hunk.old_count and new == hunk.new_count


def apply_diff(text: str | None, diff: str, reverse: bool = False) -> str | None:
    """Apply `diff` to `text` (None = absent file); returns the result, None when the diff deletes the file."""
    hunks = parse_diff(diff)
    if reverse:
        hunks = [hunk.reversed() for hunk in hunks]
    lines = [] if text is None else text.splitlines(keepends=True)
    result: list[str] = []
    cursor = 0  # index into `lines` of the next line not yet copied
    for hunk in hunks:
        start = max(hunk.old_start - 1, 0) if hunk.old_count else hunk.old_start
        if start < cursor:
            raise PatchError(f"hunks overlap or are out of order at old line {hunk.old_start}")
        result.extend(lines[cursor:start])
        position = start
        for line in hunk.lines:
            mark, body = line[0], line[1:]
            if mark in " -":
                if position >= len(lines) or lines[position] != body:
                    found = lines[position] if position < len(lines) else "<end of file>"
                    raise PatchError(f"line {position + 1} is {found!r}, the diff expects {body!r}")
                position += 1
            if mark in " +":
                result.append(body)
        cursor = position
    result.extend(lines[cursor:])
    deletes = any(hunk.new_count == 0 and hunk.new_start == 0 for hunk in hunks) and not result
    return None if deletes else "".join(result)


__all__ = ["Hunk", "PatchError", "apply_diff", "make_diff", "parse_diff"]
