"""When propagation accepts a slice, skips it, or stops; and the per-slice report a UI can show.

Every propagated slice is judged against the last *accepted* slice of the same front (the mask
that prompted it) and against the object's key slices:

1. fewer than ``min_area_px`` pixels: the slice is *empty*;
2. otherwise the predicted IoU, the overlap with the previous mask, the area ratio to it, how
   far the new mask reaches beyond it and how far its centroid moved are checked, and, when the
   predictor offers the image (an ``image(index)`` method), whether the new mask has the
   intensities the object has on its key slices (:mod:`.evidence`); a slice failing one of
   them is *rejected*. A rejected mask that still covers most of the previous one with the
   object's intensities there is a *leak* (the object plus something else); any other is
   *another structure*.

Empty and rejected slices are not written; they are *misses*. The front goes on, prompting the
next slice from the last accepted mask (so a one-slice dropout or leak is bridged), until the
misses in a row reach ``max_empty_slices`` (latest miss empty: the normal end of an organ),
``max_rejected_slices`` (latest miss another structure: what a model answers past an organ's
end) or ``max_leak_slices`` (latest miss a leak).

The z-range (inclusive slice indices along the predictor's axis) bounds every front.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .evidence import Evidence

STATUS_KEY = "key"
STATUS_PROPAGATED = "propagated"
STATUS_INTERPOLATED = "interpolated"
STATUS_SKIPPED = "skipped"
STATUS_STOPPED = "stopped"
STATUS_UNCHANGED = "unchanged"


@dataclass(frozen=True)
class StopRule:
    """The stop rule of a propagation; every threshold is documented in docs/propagation.md."""

    z_range: tuple[int | None, int | None] = (None, None)  # inclusive; None = to the volume's edge
    min_score: float = 0.5  # the predictor's IoU estimate below this rejects the slice
    overlap_metric: str = "dice"  # "dice" or "iou", against the previous accepted mask
    min_overlap: float = 0.5  # overlap below this rejects the slice
    min_area_ratio: float = 0.25  # area / previous area below this ("collapse") rejects it
    max_area_ratio: float = 2.5  # ... above this ("explosion", a leak) rejects it
    small_area_px: int = 30  # smaller previous masks skip overlap, collapse, centre and lost-part checks
    min_area_px: int = 3  # a mask with fewer pixels counts as empty
    max_empty_slices: int = 3  # misses in a row that stop the front when the latest is empty
    max_rejected_slices: int = 2  # misses in a row that stop the front when the latest is another structure
    max_leak_slices: int = 4  # misses in a row that stop the front when the latest is a leak
    unchanged_dice: float = 0.99  # corrections stop where the new mask is this close to the old one
    use_image: bool = True  # judge intensities when the predictor offers image(index)
    min_intensity_match: float = 0.5  # fraction of the new mask with intensities the key slices have
    min_previous_match: float = 0.5  # ... and with intensities the previous accepted slice has
    outside_mm: float = 5.0  # per slice of distance: farther from the previous mask counts as "outside"
    max_outside_fraction: float = 0.2  # fraction of the new mask outside that rejects the slice
    max_centroid_shift: float = 1.0  # per slice of distance: centroid shift, in radii of the previous mask
    max_lost_fraction: float = 0.15  # previous mask left out although it still looks like the object
    max_merged_fraction: float = 0.2  # new mask on a look-alike structure beside the previous one
    leak_kept: float = 0.75  # a rejected mask covering this much of the previous one is a leak
    max_steady_change: float = 1.6  # after slices of steady size, growing by more than this factor rejects ...
    min_steady_change: float = 0.45  # ... and so does shrinking below this factor
    dropout_footprint: float = 0.8  # ... and one elsewhere while this much of the object's place still looks like it, a dropout
    min_embedding_similarity: float | None = None  # mask-pooled embeddings vs key slices' (None: report only)

    def __post_init__(self) -> None:
        if self.overlap_metric not in ("dice", "iou"):
            raise ValueError(f"overlap_metric must be 'dice' or 'iou', not {self.overlap_metric!r}")
        lo, hi = self.z_range
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"z_range {self.z_range}: the first slice is after the last")
        if min(self.max_empty_slices, self.max_rejected_slices, self.max_leak_slices) < 1:
            raise ValueError("max_empty_slices, max_rejected_slices and max_leak_slices must be at least 1")
        for name in ("min_intensity_match", "min_previous_match", "max_outside_fraction", "leak_kept",
                     "max_lost_fraction", "max_merged_fraction", "dropout_footprint"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1]")
        if self.outside_mm <= 0 or self.max_centroid_shift <= 0:
            raise ValueError("outside_mm and max_centroid_shift must be positive")
        if not 0 < self.max_area_ratio or not 0 <= self.min_area_ratio <= 1 <= self.max_area_ratio:
            raise ValueError("need 0 <= min_area_ratio <= 1 <= max_area_ratio")
        if not 0 <= self.unchanged_dice <= 1:
            raise ValueError("unchanged_dice must lie in [0, 1]")

    def in_range(self, index: int) -> bool:
        """True when slice ``index`` lies inside :attr:`z_range`."""
        lo, hi = self.z_range
        return (lo is None or index >= lo) and (hi is None or index <= hi)

    def overlap(self, a: np.ndarray, b: np.ndarray) -> float:
        """Dice or IoU (per :attr:`overlap_metric`) of two masks; 1.0 when both are empty."""
        return dice(a, b) if self.overlap_metric == "dice" else iou(a, b)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (1.0 when both are empty)."""
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = int(np.count_nonzero(a | b))
    return 1.0 if union == 0 else int(np.count_nonzero(a & b)) / union


@dataclass
class SliceReport:
    """What happened on one slice: a row of the table a UI shows after a propagation."""

    index: int  # slice index along the predictor's axis
    status: str  # "key", "propagated", "interpolated", "unchanged", "skipped: <why>", "stopped: <why>"
    front: str = ""  # which front produced it: "down", "up", "fill 12-20 up", "correction up", ...
    area_px: int | None = None
    area_mm2: float | None = None  # None when the in-plane spacing is unknown
    score: float | None = None  # the predictor's IoU estimate
    overlap: float | None = None  # with the previous accepted mask of the same front
    written: bool = False  # True when this slice's labels were changed by this report's step
    evidence: Evidence | None = None  # the stop rule's measurements on a propagated slice
    object_score: float | None = None  # memory engine: the object-score logit (> 0 = object present)

    @property
    def kind(self) -> str:
        """The status without its reason: "stopped", "skipped", "propagated", ..."""
        return self.status.split(":", 1)[0]

    @property
    def reason(self) -> str:
        """The reason after the colon ("" for accepted slices)."""
        return self.status.split(":", 1)[1].strip() if ":" in self.status else ""


@dataclass
class Verdict:
    """The stop rule's decision on one slice."""

    accept: bool
    stop: bool
    reason: str = ""

    @property
    def status(self) -> str:
        """The report status for this decision."""
        if self.accept:
            return STATUS_PROPAGATED
        return f"{STATUS_STOPPED if self.stop else STATUS_SKIPPED}: {self.reason}"


class FrontCounters:
    """Misses (empty or rejected slices) in a row, and how many of them were another structure.

    Both are reset whenever a slice is accepted.
    """

    def __init__(self) -> None:
        self.misses = 0
        self.foreign = 0


def judge(rule: StopRule, mask: np.ndarray, score: float | None, previous: np.ndarray,
          counters: FrontCounters, evidence: Evidence | None = None, unit: str = "") -> tuple[Verdict, float]:
    """Accept, skip or stop on a slice whose prediction is ``mask``; returns the verdict and the overlap.

    ``evidence`` (see :func:`.evidence.measure`) adds the shape and intensity checks; ``unit``
    is the intensities' unit in the report ("mean 212 vs 65 HU").
    """
    area = int(np.count_nonzero(mask))
    prev_area = int(np.count_nonzero(previous))
    overlap = rule.overlap(mask, previous)
    if area < rule.min_area_px:
        counters.misses += 1
        if counters.misses >= rule.max_empty_slices:
            n = counters.misses
            return Verdict(False, True, f"empty ({n} missed slice{'s' if n > 1 else ''} in a row)"), overlap
        return Verdict(False, False, "empty"), overlap
    reasons = []
    if score is not None and score < rule.min_score:
        reasons.append(f"score {score:.2f} < {rule.min_score:.2f}")
    ratio = area / max(prev_area, 1)
    if prev_area >= rule.small_area_px:
        if overlap < rule.min_overlap:
            reasons.append(f"{rule.overlap_metric} {overlap:.2f} < {rule.min_overlap:.2f}")
        if ratio < rule.min_area_ratio:
            reasons.append(f"area collapsed x{ratio:.2f} < {rule.min_area_ratio:.2f}")
    # A tiny previous mask may grow a lot in relative terms without being a leak, as long as
    # the new mask is tiny too.
    if ratio > rule.max_area_ratio and area >= rule.small_area_px:
        reasons.append(f"area exploded x{ratio:.2f} > {rule.max_area_ratio:.2f}")
    if evidence is not None:
        reasons += _evidence_reasons(rule, evidence, prev_area, unit, area)
    if not reasons:
        counters.misses = counters.foreign = 0
        return Verdict(True, False), overlap
    counters.misses += 1
    leak = evidence is not None and evidence.kept >= rule.leak_kept and (
        evidence.core_match is None or evidence.core_match >= rule.min_intensity_match) and (
        evidence.lost is None or evidence.lost <= rule.max_lost_fraction) and (
        evidence.merged is None or evidence.merged <= rule.max_merged_fraction)
    # The object still in its place on the image while the answer is something else: the model
    # dropped it (bridged like a leak), not the object's end.
    dropout = not leak and evidence is not None and evidence.footprint is not None and (
        evidence.footprint >= rule.dropout_footprint)
    counters.foreign += 0 if leak or dropout else 1
    # Another structure on max_rejected_slices slices of a run of misses ends the front (what a
    # model answers past an organ's end); leaks and dropouts alone end it only after max_leak_slices.
    prefix = "leak: " if leak else f"dropout ({evidence.footprint:.0%} of its place still looks like it): " if dropout else ""
    reason = prefix + "; ".join(reasons)
    stop = counters.misses >= rule.max_leak_slices or (
        not (leak or dropout) and counters.foreign >= rule.max_rejected_slices)
    if stop:
        n = counters.misses
        reason += f" ({n} missed slice{'s' if n > 1 else ''} in a row)"
    return Verdict(False, stop, reason), overlap


def _evidence_reasons(rule: StopRule, evidence: Evidence, prev_area: int, unit: str, area: int = 0) -> list[str]:
    """The shape and intensity checks of :func:`judge`."""
    reasons = []
    if evidence.steady_area and area:
        # A tube (a vessel) keeps its cross-section; a sudden change after several steady
        # slices is where it divides or joins another.
        change = area / evidence.steady_area
        if change > rule.max_steady_change or change < rule.min_steady_change:
            reasons.append(f"area x{change:.2f} after slices of steady size (a vessel dividing or joining?)")
    # Distances are in mm, so the reach beyond the previous mask is judged for small masks too
    # (a thin vessel running into a larger one); centre and lost parts need a mask of some size.
    if evidence.outside > rule.max_outside_fraction:
        reasons.append(f"{evidence.outside:.0%} of it lies over {rule.outside_mm:g} mm beyond "
                       "the previous mask")
    if prev_area >= rule.small_area_px:
        if evidence.shift > rule.max_centroid_shift * evidence.gap:
            reasons.append(f"centre moved {evidence.shift:.1f} radii > {rule.max_centroid_shift * evidence.gap:g}")
        if evidence.lost is not None and evidence.lost > rule.max_lost_fraction:
            reasons.append(f"leaves out {evidence.lost:.0%} of the previous mask that still looks like the object")
    if evidence.merged is not None and evidence.merged > rule.max_merged_fraction:
        reasons.append(f"{evidence.merged:.0%} of it lies on a structure that was beside the object on the "
                       "previous slice")
    if (rule.min_embedding_similarity is not None and evidence.similarity is not None
            and evidence.similarity < rule.min_embedding_similarity):
        reasons.append(f"image features differ from key slices: similarity {evidence.similarity:.2f} < "
                       f"{rule.min_embedding_similarity:.2f}")
    if evidence.match is None or evidence.mean is None:
        return reasons
    if evidence.match < rule.min_intensity_match:
        reasons.append(f"intensity differs from key slices: mean {_value(evidence.mean)} vs "
                       f"{_value(evidence.reference)}{' ' + unit if unit else ''} ({evidence.match:.0%} in range)")
    elif evidence.previous_match is not None and evidence.previous_match < rule.min_previous_match:
        reasons.append(f"intensity differs from the previous slice: mean {_value(evidence.mean)} vs "
                       f"{_value(evidence.previous_mean)}{' ' + unit if unit else ''} "
                       f"({evidence.previous_match:.0%} in range)")
    return reasons


def _value(value: float | None) -> str:
    """An intensity for the report: whole numbers unless it is small (MR in arbitrary units may be)."""
    if value is None:
        return "?"
    return f"{value:.0f}" if abs(value) >= 10 else f"{value:.3g}"
