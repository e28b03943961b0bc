"""Optional progress bars for long evaluation and benchmark runs (tqdm when installed, silence otherwise)."""

from __future__ import annotations


class _Silent:
    """Stands in for a tqdm bar when bars are off or tqdm is missing."""

    def update(self, count: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, description: str, enabled: bool = True):
    """A bar with `update`, `set_postfix_str` and `close`; a silent one when disabled or without tqdm."""
    if not enabled:
        return _Silent()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Silent()
    return tqdm(total=total, desc=description, dynamic_ncols=True)
