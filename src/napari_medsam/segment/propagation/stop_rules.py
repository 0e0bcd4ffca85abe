"""When propagation accepts a slice, skips it, or stops; and the per-slice report a UI can show.

Every propagated slice is judged against the last *accepted* slice of the same front:

1. fewer than ``min_area_px`` pixels: the slice is *empty*;
2. otherwise the predicted IoU, the overlap with the previous mask and the area ratio to it
   are checked; a slice failing one of them is *rejected*.

Empty and rejected slices are not written; they are *misses*. The front goes on, prompting the
next slice from the last accepted mask (so a one-slice dropout is bridged), until the misses
in a row reach ``max_empty_slices`` (when the latest miss is empty: the normal end of an organ)
or ``max_rejected_slices`` (when it is rejected).

The z-range (inclusive slice indices along the predictor's axis) bounds every front.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
    small_area_px: int = 30  # previous masks smaller than this skip the overlap and area checks
    min_area_px: int = 3  # a mask with fewer pixels counts as empty
    max_empty_slices: int = 3  # misses in a row that stop the front when the latest is empty
    max_rejected_slices: int = 2  # misses in a row that stop the front when the latest is rejected
    unchanged_dice: float = 0.99  # corrections stop where the new mask is this close to the old one

    def __post_init__(self) -> None:
        if self.overlap_metric not in ("dice", "iou"):
            raise ValueError(f"overlap_metric must be 'dice' or 'iou', not {self.overlap_metric!r}")
        lo, hi = self.z_range
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"z_range {self.z_range}: the first slice is after the last")
        if self.max_empty_slices < 1 or self.max_rejected_slices < 1:
            raise ValueError("max_empty_slices and max_rejected_slices must be at least 1")
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
    """Misses (empty or rejected slices) in a row, reset whenever a slice is accepted."""

    def __init__(self) -> None:
        self.misses = 0


def judge(rule: StopRule, mask: np.ndarray, score: float | None, previous: np.ndarray,
          counters: FrontCounters) -> tuple[Verdict, float]:
    """Accept, skip or stop on a slice whose prediction is ``mask``; returns the verdict and the overlap."""
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
    # A tiny previous mask may grow a lot in relative terms without being a leak.
    if ratio > rule.max_area_ratio and max(prev_area, area / rule.max_area_ratio) >= rule.small_area_px:
        reasons.append(f"area exploded x{ratio:.2f} > {rule.max_area_ratio:.2f}")
    if not reasons:
        counters.misses = 0
        return Verdict(True, False), overlap
    counters.misses += 1
    return Verdict(False, counters.misses >= rule.max_rejected_slices, "; ".join(reasons)), overlap
