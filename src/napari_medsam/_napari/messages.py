"""Message labels that never widen the dock: they wrap, break long words, and elide long texts.

A QLabel with word wrap still asks for the width of its longest word, so a path or a URL in a
message would push the panel wider than napari's dock. :class:`MessageLabel` lets such words break
anywhere (zero-width spaces every few characters), shortens texts longer than ``max_chars`` with
an ellipsis, and keeps the whole text in its tooltip (and in :meth:`MessageLabel.full_text`).

:class:`RunProgress` is the in-panel progress bar of a long run (precompute, propagation): slices
done of the total and the time left from the mean time per slice so far, shown only while running.
"""

from __future__ import annotations

import re
import time
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QLabel, QProgressBar, QSizePolicy

LONG_WORD = 32  # characters: a longer run without spaces may break anywhere
MAX_CHARS = 240  # a longer message is shortened on screen; the tooltip keeps all of it
_ZWSP = "\u200b"


def breakable(text: str, every: int = LONG_WORD) -> str:
    """``text`` with zero-width spaces inside words longer than ``every`` characters (plain text only)."""
    def split(match: re.Match) -> str:
        word = match.group(0)
        return _ZWSP.join(word[i:i + every] for i in range(0, len(word), every))

    return re.sub(r"\S{%d,}" % (every + 1), split, text)


def shortened(text: str, max_chars: int = MAX_CHARS) -> str:
    """``text`` cut at ``max_chars`` (at a space when one is near) with an ellipsis."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return (cut[:space] if space > max_chars * 0.7 else cut).rstrip() + " …"


class MessageLabel(QLabel):
    """A status line: wraps, never wider than its dock, long texts elided with the whole text in the tooltip."""

    def __init__(self, text: str = "", parent: Any = None, *, max_chars: int = MAX_CHARS) -> None:
        super().__init__(parent)
        self.max_chars = max_chars
        self._full = ""
        self.setWordWrap(True)
        self.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        policy = self.sizePolicy()
        policy.setHorizontalPolicy(QSizePolicy.Policy.Ignored)  # the layout gives the width; the text wraps in it
        self.setSizePolicy(policy)
        self.setText(text)

    def setText(self, text: str) -> None:  # noqa: N802 (Qt's name)
        """Show ``text`` (rich text as is; plain text made breakable and shortened if long)."""
        text = str(text)
        self._full = text
        if re.search(r"<[a-zA-Z/][^>]*>", text):  # rich text (e.g. <b>): shown as it is
            shown = text
        else:
            shown = breakable(shortened(text, self.max_chars))
        super().setText(shown)
        self.setToolTip(text if shown != text else "")

    def text(self) -> str:
        """The whole message (also when the label shows it shortened)."""
        return self._full

    def full_text(self) -> str:
        return self._full


def time_left_text(seconds: float) -> str:
    """``seconds`` in words a user reads at a glance: "about 8 s", "about 3 min"."""
    seconds = max(0.0, float(seconds))
    if seconds < 1.5:
        return "about 1 s"
    if seconds < 90:
        return f"about {round(seconds)} s"
    if seconds < 90 * 60:
        return f"about {round(seconds / 60)} min"
    return f"about {seconds / 3600:.1f} h"


class RunProgress(QProgressBar):
    """A long run's progress in the panel: "slice 12 of 40 - about 8 s left", hidden when no run is going.

    :meth:`start` shows it, :meth:`step` moves it (``done`` slices of ``total``; the time left is
    the mean time per slice so far times the slices still to do), :meth:`stop` hides it.
    """

    clock = staticmethod(time.monotonic)  # replaceable in tests

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self.setTextVisible(True)
        self.setAlignment(Qt.AlignmentFlag.AlignCenter)
        policy = self.sizePolicy()
        policy.setHorizontalPolicy(QSizePolicy.Policy.Ignored)  # never widens the dock; the layout gives the width
        self.setSizePolicy(policy)
        self._started = 0.0
        self.done = self.total = 0
        self.setVisible(False)

    def start(self, total: int = 0, text: str = "starting...") -> None:
        """Show the bar at 0 of ``total`` slices (0: not known yet, a busy bar saying ``text``)."""
        self._started = self.clock()
        self.done, self.total = 0, max(0, int(total))
        self.setRange(0, max(self.total, 1) if self.total else 0)
        self.setValue(0)
        self._show(self.text_for(0, self.total, 0.0) if self.total else text)
        self.setVisible(True)

    def step(self, done: int, total: int | None = None) -> None:
        """``done`` slices of ``total`` (None: the total given before) are finished."""
        self.done = max(0, int(done))
        self.total = max(self.done, int(self.total if total is None else total))
        self.setRange(0, max(self.total, 1))
        self.setValue(self.done)
        self._show(self.text_for(self.done, self.total, self.clock() - self._started))

    @staticmethod
    def text_for(done: int, total: int, elapsed: float) -> str:
        """The bar's text after ``done`` of ``total`` slices in ``elapsed`` seconds."""
        if done <= 0:
            return f"slice 0 of {total} - estimating time left"
        if done >= total:
            return f"slice {done} of {total} - finishing"
        return f"slice {done} of {total} - {time_left_text(elapsed / done * (total - done))} left"

    def note(self, text: str) -> None:
        """Say ``text`` after the slices done so far (e.g. "cancelling after this slice"), the bar where it is."""
        self._show(f"slice {self.done} of {self.total} - {text}" if self.total else text)

    def stop(self) -> None:
        """Hide the bar (the run ended, was cancelled or failed)."""
        self.setVisible(False)
        self.setRange(0, 1)
        self.setValue(0)

    def _show(self, text: str) -> None:
        self.setFormat(text.replace("%", "%%"))
        self.setToolTip(text)

    def message(self) -> str:
        """The text on the bar."""
        return self.format().replace("%%", "%")
