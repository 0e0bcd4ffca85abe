"""The interactive-segmentation session (no napari, no Qt): see :mod:`.core` and docs/session.md.

Modules: ``core`` (:class:`SegmentationSession`: objects and history), ``prompts`` (prompts and
predictions), ``edits`` (label edits and propagation runs), ``history`` (per-object undo),
``state`` (object, prompt and change records), ``paint`` (paint-stroke geometry).
"""

from .core import DEFAULT_HISTORY_BYTES, SegmentationSession
from .history import Step
from .state import Candidate, LockMap, SegObject, SessionChange, SlicePrompts

__all__ = [
    "DEFAULT_HISTORY_BYTES", "Candidate", "LockMap", "SegObject", "SegmentationSession", "SessionChange",
    "SlicePrompts", "Step",
]
