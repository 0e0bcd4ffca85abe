"""3D propagation: from prompted key slices to a whole object (see :mod:`.engine` and docs/propagation.md).

Modules: ``engine`` (the entry points :func:`propagate`, :func:`propagate_objects`,
:func:`repropagate`, :func:`segment_boxes`), ``run`` (one run: fronts, writing, undo, the report),
``stop_rules`` (when a slice is accepted, skipped, or ends a front) and ``evidence`` (what a
new mask looks like next to the object: intensities, reach, centre, parts left out).

The names below are imported on first use: the engine imports the predictor and so torch,
which napari's start (the panel only needs :class:`StopRule`) must not pay for.
"""

from __future__ import annotations

from ..._lazy import lazy_getattr

_NAMES = {
    "ObjectsResult": "engine", "PostProcess": "engine", "PromptSettings": "engine", "locked_mask": "engine",
    "propagate": "engine", "propagate_objects": "engine", "repropagate": "engine", "segment_boxes": "engine",
    "PropagationResult": "run", "UndoRecord": "run", "slice_index": "run",
    "SliceReport": "stop_rules", "StopRule": "stop_rules",
}

__all__ = sorted(_NAMES)


__getattr__ = lazy_getattr(__name__, _NAMES, globals())
