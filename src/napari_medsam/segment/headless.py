"""Headless segmentation of a volume from prompt files: what `napari-medsam segment` runs.

The same engine as the napari panel: a SlicePredictor per plane, prompts on key slices, and,
when asked, propagation of every object through the volume with the visible stop rule, by
either engine: "slice" (each slice prompted from the previous mask) or "memory" (SAM 2 /
MedSAM2 tracking, :mod:`napari_medsam.segment.memory`; one tracker per plane, shared by the
objects, whose key slices are prompted with the prompt file's points and boxes as MedSAM2 does).
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

ENGINES = ("auto", "slice", "memory")


def choose_engine(engine: str, model: SamModel) -> str:
    """``"slice"`` or ``"memory"`` for ``engine`` ("auto": memory for SAM 2 family models)."""
    sam2 = getattr(model, "family", "sam") == "sam2"
    if engine not in ENGINES:
        raise MedSamError(f"--engine {engine}: choose one of {', '.join(ENGINES)}")
    if engine == "auto":
        return "memory" if sam2 else "slice"
    if engine == "memory" and not sam2:
        raise MedSamError(f"--engine memory needs a SAM 2.1 or MedSAM2 model; {model.name} is a SAM 1 model "
                          "(use --engine slice, or e.g. --model medsam2)")
    return engine


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
    engine: str | None = None  # the propagation engine ("slice" / "memory"), None without propagation

    def object_scores(self) -> dict | None:
        """The memory engine's object scores (logits, > 0 = present): range, mean and the slices called absent."""
        scores = {int(r["index"]): float(r["object_score"]) for r in self.report
                  if r.get("object_score") is not None}
        if not scores:
            return None
        values = np.array(list(scores.values()))
        return {"min": round(float(values.min()), 3), "mean": round(float(values.mean()), 3),
                "max": round(float(values.max()), 3),
                "absent_slices": sorted(k for k, v in scores.items() if v <= 0)}

    def as_dict(self) -> dict:
        """JSON-ready summary (the per-slice report is left out; see ``report``)."""
        extra: dict = {}
        if self.engine is not None:
            extra["engine"] = self.engine
        scores = self.object_scores()
        if scores is not None:
            extra["object_scores"] = scores
        return {
            "label": self.label, "name": self.name, "axis": self.axis, "key_slices": self.key_slices,
            "slices_reached": len(self.slices),
            "slice_range": [min(self.slices), max(self.slices)] if self.slices else None,
            "voxels": self.voxels, "volume_ml": round(self.volume_ml, 3),
            "stop_reasons": self.stop_reasons, "seconds": round(self.seconds, 3), **extra,
        }


def window_mapping(window: str | None, volume: Volume) -> IntensityMapping:
    """The intensity mapping of ``segment --window`` (and of ``batch``): a preset name, LEVEL/WIDTH
    in HU, "percentile", or None for the scan's default (CT soft tissue, MR percentiles)."""
    from .intensity import ct_window, default_mapping, percentile_mapping, window_level_width

    if window is None:
        return default_mapping(volume.array, volume.modality)
    if window.lower() == "percentile":
        return percentile_mapping(volume.array)
    if "/" in window:
        try:
            level, width = (float(v) for v in window.split("/"))
            return window_level_width(level, width)
        except ValueError:
            raise MedSamError(f"--window {window!r}: give LEVEL/WIDTH in HU, e.g. 40/400") from None
    try:
        return ct_window(window)
    except ValueError as exc:
        raise MedSamError(str(exc)) from None


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
    engine: str = "auto",
) -> tuple[np.ndarray, list[ObjectSummary]]:
    """Segment every object of ``objects`` on ``volume``; return the label volume and summaries.

    ``engine`` ("auto", "slice", "memory") chooses how propagation finds each next slice; "auto"
    is the memory engine for SAM 2 family models.
    """
    engine = choose_engine(engine, model)
    if propagate_objects:
        check_z_range(z_range, volume.shape, objects)
    labels = np.zeros(volume.shape, dtype=np.uint16 if max(o.label for o in objects) > 255 else np.uint8)
    predictors: dict[int, SlicePredictor] = {}
    summaries = []
    try:
        _segment_objects(volume, objects, model, labels, predictors, summaries, mapping=mapping, cache=cache,
                         propagate_objects=propagate_objects, z_range=z_range, progress=progress, cancel=cancel,
                         engine=engine)
    finally:
        # Propagation's prefetch thread may still be embedding (and writing to the disk cache)
        # after propagate() returned: wait for it, or a process that exits now loses that slice.
        for predictor in predictors.values():
            predictor.cache.flush()
    return labels, summaries


def _segment_objects(volume, objects, model, labels, predictors, summaries, *, mapping, cache, propagate_objects,
                     z_range, progress, cancel, engine) -> None:
    voxel_ml = float(np.prod(volume.spacing_mm)) / 1000.0
    trackers: dict = {}  # axis -> the memory engine's tracker of that plane
    for obj in objects:
        started = time.perf_counter()
        predictor = predictors.get(obj.axis)
        if predictor is None:
            predictor = SlicePredictor(model, volume, mapping=mapping, axis=obj.axis, cache=cache)
            predictors[obj.axis] = predictor
        summary = ObjectSummary(obj.label, obj.name, obj.axis, sorted(obj.slices))
        if propagate_objects and engine == "memory":
            from .memory.engine import propagate_memory, tracker_for

            tracker = trackers.get(obj.axis)
            if tracker is None:
                tracker = trackers[obj.axis] = tracker_for(predictor)
            result = propagate_memory(predictor, labels, obj.label, dict(obj.slices), tracker=tracker,
                                      stop=StopRule(z_range=z_range), progress=progress, cancel=cancel,
                                      spacing_mm=volume.spacing_mm)
            summary.engine, summary.stop_reasons, summary.report = engine, dict(result.stop_reasons), result.table()
        elif propagate_objects:
            result = propagate(predictor, labels, obj.label, dict(obj.slices), stop=StopRule(z_range=z_range),
                               progress=progress, cancel=cancel, spacing_mm=volume.spacing_mm)
            summary.engine = engine
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
