"""Short pieces of text for error and warning lines: each message stays one line of about 200 characters.

Long absolute paths keep their start and their last two parts (``/data/…/series_3/IM0001.dcm``),
long UIDs their start and end, and lists of slice indices become ranges
(``3-40, 52, 60-181 (161 in all)``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

MAX_PATH_CHARS = 64
MAX_UID_CHARS = 28
MAX_RUNS = 5
ELLIPSIS = "…"


def short_path(path: str | os.PathLike, limit: int = MAX_PATH_CHARS) -> str:
    """``path`` as text, its middle folders replaced by "…" when it is longer than ``limit``.

    The start (root and first folder) and the last two parts (folder and file) are kept; a last
    part that is alone too long is cut in its own middle.
    """
    text = str(path)
    if len(text) <= limit:
        return text
    parts = Path(text).parts
    tail = os.path.join(*parts[-2:]) if len(parts) >= 2 else text
    head = os.path.join(*parts[:2]) if len(parts) > 4 else (parts[0] if len(parts) > 2 else "")
    shortened = os.path.join(head, ELLIPSIS, tail) if head else tail
    if len(shortened) <= limit:
        return shortened
    shortened = os.path.join(ELLIPSIS, tail)
    if len(shortened) <= limit:
        return shortened
    return short_text(parts[-1], limit)


def short_text(text: str, limit: int) -> str:
    """``text`` with its middle replaced by "…" when longer than ``limit`` characters."""
    text = str(text)
    if len(text) <= limit:
        return text
    keep = max(limit - 1, 2)
    return f"{text[: (keep + 1) // 2]}{ELLIPSIS}{text[len(text) - keep // 2:]}"


def short_uid(uid: str, limit: int = MAX_UID_CHARS) -> str:
    """A UID shortened in its middle (its start names the issuer, its end the instance)."""
    return short_text(uid, limit)


def index_ranges(indices: Iterable[int], max_runs: int = MAX_RUNS) -> str:
    """Sorted indices as runs, e.g. ``3-40, 52, 60-181 (161 in all)``.

    At most ``max_runs`` runs are written: the first ones, "…", and the last. The count is added
    when a run covers more than one index or runs were left out.
    """
    values = sorted({int(i) for i in indices})
    if not values:
        return "none"
    runs: list[tuple[int, int]] = []
    for value in values:
        if runs and value == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], value)
        else:
            runs.append((value, value))
    shown = [f"{a}" if a == b else f"{a}-{b}" for a, b in runs]
    if len(shown) > max_runs:
        shown = [*shown[: max_runs - 1], ELLIPSIS, shown[-1]]
    text = ", ".join(shown)
    if len(values) > len(runs) or len(runs) > max_runs or len(values) > 2:
        text += f" ({len(values)} in all)"
    return text
