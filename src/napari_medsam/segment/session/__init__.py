"""The interactive-segmentation session (no napari, no Qt): see :mod:`.core` and docs/session.md.

Modules: ``core`` (:class:`SegmentationSession`: objects and history), ``prompts`` (prompts and
predictions), ``edits`` (label edits and propagation runs), ``history`` (per-object undo),
``state`` (object, prompt and change records), ``paint`` (paint-stroke geometry), ``persist``
(saving a session to one file and opening it again).
"""

from .core import DEFAULT_HISTORY_BYTES, SegmentationSession
from .history import Step
from .persist import ScanInfo, SessionFile, SessionFileError, load_session, read_session, save_session, session_path
from .state import Candidate, LockMap, SegObject, SessionChange, SlicePrompts

__all__ = [
    "DEFAULT_HISTORY_BYTES", "Candidate", "LockMap", "ScanInfo", "SegObject", "SegmentationSession",
    "SessionChange", "SessionFile", "SessionFileError", "SlicePrompts", "Step", "load_session", "read_session",
    "save_session", "session_path",
]
