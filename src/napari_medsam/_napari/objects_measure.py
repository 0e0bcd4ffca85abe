"""Per-object measurements for the Objects table: voxel count, volume in mL, first and last slice.

No Qt here. :class:`ObjectMeasures` keeps, for every object, its voxel count on each slice along
axis 0 of the label volume (the scan's slice axis: axial for scans opened by napari-medsam, the
index napari's slider shows). A session change names the boxes of the label volume it touched;
only the slices those boxes cross are counted again (``np.count_nonzero`` per slice and object),
so a click on one slice costs one slice, not the volume. Volumes use the scan's voxel size.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from .layers import volume_from_layer_meta

AXIS = 0  # slice extents are given along the label volume's first axis
CSV_HEADER = ("name", "label", "volume_ml", "voxels", "first_slice", "last_slice")


@dataclass(frozen=True)
class ObjectRow:
    """One object's line of the table (and of the CSV)."""

    name: str
    value: int
    voxels: int
    volume_ml: float
    first: int | None  # first and last slice along AXIS holding a voxel; None when empty
    last: int | None

    def fields(self) -> tuple[str, ...]:
        """The CSV fields, in :data:`CSV_HEADER` order."""
        first = "" if self.first is None else str(self.first)
        last = "" if self.last is None else str(self.last)
        return (self.name, str(self.value), f"{self.volume_ml:.4f}", str(self.voxels), first, last)


def voxel_size_mm(image_layer: Any, labels_layer: Any = None) -> tuple[tuple[float, float, float], str]:
    """The voxel size (mm, label-volume axis order) and where it came from.

    The scan's :class:`~napari_medsam.volume.Volume` (layer metadata) when the plugin opened it,
    else the layer's napari scale read as millimetres (a 2D layer: one slice 1 mm thick).
    """
    for layer in (image_layer, labels_layer):
        volume = None if layer is None else volume_from_layer_meta(layer.metadata)
        if volume is not None:
            return tuple(float(s) for s in volume.spacing_mm), "the scan's voxel spacing"  # type: ignore[return-value]
    layer = image_layer if image_layer is not None else labels_layer
    if layer is None:
        return (1.0, 1.0, 1.0), "no scan: 1 mm voxels assumed"
    scale = [abs(float(s)) for s in np.asarray(layer.scale, float)[-3:]]
    while len(scale) < 3:
        scale.insert(0, 1.0)
    return (scale[0], scale[1], scale[2]), "the layer's scale, read as mm"


class ObjectMeasures:
    """Voxel counts per object and slice along :data:`AXIS`, updated per changed slice."""

    def __init__(self, labels: np.ndarray, voxel_mm: Sequence[float] = (1.0, 1.0, 1.0)) -> None:
        self.labels = labels
        self.voxel_mm3 = float(np.prod([float(s) for s in voxel_mm]))
        self._counts: dict[int, np.ndarray] = {}  # value -> voxels on each slice along AXIS

    @property
    def voxel_ml(self) -> float:
        """Volume of one voxel in mL (mm³ / 1000)."""
        return self.voxel_mm3 / 1000.0

    def sync(self, values: Iterable[int]) -> list[int]:
        """Count objects not measured yet (whole volume, once) and forget those gone; returns the new ones."""
        values = [int(v) for v in values]
        for gone in set(self._counts) - set(values):
            del self._counts[gone]
        new = [v for v in values if v not in self._counts]
        if new:
            self._count(range(self.labels.shape[AXIS]), new, fresh=True)
        return new

    def recount(self, values: Iterable[int]) -> None:
        """Count every object on every slice again (e.g. when the labels changed outside the session)."""
        self._counts.clear()
        self.sync(values)

    def update(self, regions: Iterable[Sequence[slice]]) -> list[int]:
        """Count again the slices that ``regions`` (boxes of the label volume) cross; returns those slices."""
        n = self.labels.shape[AXIS]
        planes: set[int] = set()
        for region in regions:
            start, stop, _ = region[AXIS].indices(n)
            planes.update(range(start, stop))
        if planes and self._counts:
            self._count(sorted(planes), list(self._counts))
        return sorted(planes)

    def _count(self, planes: Iterable[int], values: list[int], *, fresh: bool = False) -> None:
        n = self.labels.shape[AXIS]
        if fresh:
            for v in values:
                self._counts[v] = np.zeros(n, np.int64)
        # One slice at a time: the comparison's temporary stays one slice big (faster than a
        # whole-volume `labels == v`, which allocates and walks a volume-sized array).
        for z in planes:
            plane = self.labels[z] if AXIS == 0 else np.take(self.labels, z, axis=AXIS)
            if not plane.any():  # most slices of a scan hold no object: one pass instead of one per object
                if not fresh:
                    for v in values:
                        self._counts[v][z] = 0
                continue
            for v in values:
                self._counts[v][z] = np.count_nonzero(plane == v)

    def voxels(self, value: int) -> int:
        """Voxels of object ``value`` (0 when not measured)."""
        counts = self._counts.get(int(value))
        return 0 if counts is None else int(counts.sum())

    def volume_ml(self, value: int) -> float:
        """Volume of object ``value`` in mL: its voxel count times the voxel volume."""
        return self.voxels(value) * self.voxel_ml

    def extent(self, value: int) -> tuple[int, int] | None:
        """First and last slice along :data:`AXIS` holding a voxel of ``value``; None when it has none."""
        counts = self._counts.get(int(value))
        if counts is None:
            return None
        hit = np.flatnonzero(counts)
        return None if hit.size == 0 else (int(hit[0]), int(hit[-1]))

    def row(self, value: int, name: str) -> ObjectRow:
        """The table line of object ``value``."""
        extent = self.extent(value)
        first, last = (None, None) if extent is None else extent
        return ObjectRow(name, int(value), self.voxels(value), self.volume_ml(value), first, last)


def table_text(rows: Iterable[ObjectRow], delimiter: str = ",") -> str:
    """The rows with a header line, as CSV (``delimiter=","``) or tab-separated text (``"\\t"``)."""
    out = io.StringIO()
    writer = csv.writer(out, delimiter=delimiter, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for row in rows:
        writer.writerow(row.fields())
    return out.getvalue()


def format_ml(value: float) -> str:
    """A volume for the table cell: 3 significant figures or more, never scientific notation."""
    if value == 0:
        return "0"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 0.01:
        return f"{value:.2f}"
    return f"{value:.4f}"
