"""Message labels that never widen the dock: they wrap, break long words, and elide long texts.

A QLabel with word wrap still asks for the width of its longest word, so a path or a URL in a
message would push the panel wider than napari's dock. :class:`MessageLabel` lets such words break
anywhere (zero-width spaces every few characters), shortens texts longer than ``max_chars`` with
an ellipsis, and keeps the whole text in its tooltip (and in :meth:`MessageLabel.full_text`).
"""

from __future__ import annotations

import re
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QLabel, QSizePolicy

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
