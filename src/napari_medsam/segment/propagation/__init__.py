"""3D propagation: from prompted key slices to a whole object (see :mod:`.engine` and docs/propagation.md).

Modules: ``engine`` (the entry points :func:`propagate`, :func:`propagate_objects`,
:func:`repropagate`, :func:`segment_boxes`), ``run`` (one run: fronts, writing, undo, the report)
and ``stop_rules`` (when a slice is accepted, skipped, or ends a front).
"""

from .engine import (ObjectsResult, PostProcess, PromptSettings, locked_mask, propagate, propagate_objects,
                     repropagate, segment_boxes)
from .run import PropagationResult, UndoRecord, slice_index
from .stop_rules import SliceReport, StopRule

__all__ = [
    "ObjectsResult", "PostProcess", "PromptSettings", "PropagationResult", "SliceReport", "StopRule",
    "UndoRecord", "locked_mask", "propagate", "propagate_objects", "repropagate", "segment_boxes", "slice_index",
]
