"""Short pieces of text for error and warning lines: each message stays one line of about 200 characters.

Long absolute paths keep their start and their last two parts (``/data/…/series_3/IM0001.dcm``),
long UIDs their start and end, and lists of slice indices become ranges
(``3-40, 52, 60-181 (161 in all)``).
"""

from __future__ import annotations

import os
import re
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


SHORT_NAME = 40  # characters: the longest default file stem the panel suggests (export, session)
_UID = re.compile(r"^\d+(\.\d+){3,}$")  # a DICOM UID ("1.2.840.113619.2.55...")


def short_file_stem(name: str, limit: int = SHORT_NAME) -> str:
    """A short readable file stem for a layer named ``name`` (a DICOM description or UID can be very long).

    Words are joined by "_" (other characters dropped), a UID becomes "series-" and its last six
    digits, and a stem longer than ``limit`` keeps its first words and its last one ("labels").
    """
    words = []
    for word in re.split(r"[^\w.\-]+|_+", str(name)):
        word = word.strip(".-")
        if _UID.match(word):
            word = "series-" + word.replace(".", "")[-6:]
        if word:
            words.append(word[:limit])
    if not words:
        return "labels"
    stem = "_".join(words)
    if len(stem) <= limit:
        return stem
    last = words[-1] if len(words) > 1 and len(words[-1]) <= limit // 3 else ""
    kept = ""
    for word in words[:-1] if last else words:
        candidate = f"{kept}_{word}" if kept else word
        if len(candidate) + (len(last) + 1 if last else 0) > limit:
            break
        kept = candidate
    kept = kept or words[0][: limit - len(last) - 1 if last else limit]
    return f"{kept}_{last}" if last else kept
