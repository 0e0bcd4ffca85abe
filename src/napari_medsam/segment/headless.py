"""Headless segmentation of a volume from prompt files: what `napari-medsam segment` runs.

The same engine as the napari panel: a SlicePredictor per plane, prompts on key slices, and,
when asked, propagation of every object through the volume with the visible stop rule.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import MedSamError
from ..volume import AXIS_NAMES, Volume
from .cache import EmbeddingCache
from .intensity import IntensityMapping
from .model import SamModel
from .predictor import SlicePredictor
from .prompt_file import ObjectPrompts
from .propagation import propagate
from .propagation import StopRule


@dataclass
class ObjectSummary:
    """What happened to one object: where it was found, how big it is, why fronts stopped."""

    label: int
    name: str
    axis: int
    key_slices: list[int]
    slices: list[int] = field(default_factory=list)
    voxels: int = 0
    volume_ml: float = 0.0
    stop_reasons: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    report: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        """JSON-ready summary (the per-slice report is left out; see ``report``)."""
        return {
            "label": self.label, "name": self.name, "axis": self.axis, "key_slices": self.key_slices,
            "slices_reached": len(self.slices),
            "slice_range": [min(self.slices), max(self.slices)] if self.slices else None,
            "voxels": self.voxels, "volume_ml": round(self.volume_ml, 3),
            "stop_reasons": self.stop_reasons, "seconds": round(self.seconds, 3),
        }


def check_z_range(z_range: tuple[int | None, int | None], shape: tuple[int, ...],
                  objects: list[ObjectPrompts] = ()) -> None:
    """Raise :class:`MedSamError` unless ``z_range`` is an ordered range of existing slices.

    Each bound may be None (to the volume's edge). With ``objects``, the bounds must lie inside
    the slices of every object's propagation plane; without, only their order and sign are checked.
    """
    lo, hi = z_range
    for bound in (lo, hi):
        if bound is not None and bound < 0:
            raise MedSamError(f"--zrange {lo} {hi}: slice indices start at 0")
    if lo is not None and hi is not None and lo > hi:
        raise MedSamError(f"--zrange {lo} {hi}: the first slice is after the last; give the lower index first")
    for axis in sorted({obj.axis for obj in objects}):
        depth = int(shape[axis])
        for bound in (lo, hi):
            if bound is not None and bound > depth - 1:
                raise MedSamError(f"--zrange {lo} {hi}: the scan has {depth} {AXIS_NAMES[axis]} slices "
                                  f"(0..{depth - 1})")


def segment_volume(
    volume: Volume,
    objects: list[ObjectPrompts],
    model: SamModel,
    *,
    mapping: IntensityMapping,
    propagate_objects: bool = False,
    z_range: tuple[int | None, int | None] = (None, None),
    cache: EmbeddingCache | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    cancel=None,
) -> tuple[np.ndarray, list[ObjectSummary]]:
    """Segment every object of ``objects`` on ``volume``; return the label volume and summaries."""
    if propagate_objects:
        check_z_range(z_range, volume.shape, objects)
    labels = np.zeros(volume.shape, dtype=np.uint16 if max(o.label for o in objects) > 255 else np.uint8)
    predictors: dict[int, SlicePredictor] = {}
    summaries = []
    try:
        _segment_objects(volume, objects, model, labels, predictors, summaries, mapping=mapping, cache=cache,
                         propagate_objects=propagate_objects, z_range=z_range, progress=progress, cancel=cancel)
    finally:
        # Propagation's prefetch thread may still be embedding (and writing to the disk cache)
        # after propagate() returned: wait for it, or a process that exits now loses that slice.
        for predictor in predictors.values():
            predictor.cache.flush()
    return labels, summaries


def _segment_objects(volume, objects, model, labels, predictors, summaries, *, mapping, cache, propagate_objects,
                     z_range, progress, cancel) -> None:
    voxel_ml = float(np.prod(volume.spacing_mm)) / 1000.0
    for obj in objects:
        started = time.perf_counter()
        predictor = predictors.get(obj.axis)
        if predictor is None:
            predictor = SlicePredictor(model, volume, mapping=mapping, axis=obj.axis, cache=cache)
            predictors[obj.axis] = predictor
        summary = ObjectSummary(obj.label, obj.name, obj.axis, sorted(obj.slices))
        if propagate_objects:
            result = propagate(predictor, labels, obj.label, dict(obj.slices), stop=StopRule(z_range=z_range),
                               progress=progress, cancel=cancel, spacing_mm=volume.spacing_mm)
            summary.stop_reasons = dict(result.stop_reasons)
            summary.report = result.table()
        else:
            for n, (index, prompts) in enumerate(sorted(obj.slices.items())):
                if progress:
                    progress(n, len(obj.slices), f"{obj.name}: slice {index}")
                mask = predictor.predict(index, prompts).best
                region = labels[tuple(index if a == obj.axis else slice(None) for a in range(3))]
                # Objects never overwrite each other: only free voxels (or its own) are taken.
                region[mask & ((region == 0) | (region == obj.label))] = obj.label
        owned = labels == obj.label
        summary.voxels = int(owned.sum())
        summary.volume_ml = summary.voxels * voxel_ml
        summary.slices = [int(i) for i in np.flatnonzero(owned.any(axis=tuple(a for a in range(3) if a != obj.axis)))]
        summary.seconds = time.perf_counter() - started
        summaries.append(summary)
