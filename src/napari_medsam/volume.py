"""Volume: voxels plus their geometry, the one currency between I/O, engine and UI.

Conventions (see docs/formats.md):

* ``array`` is 3D in *display order* ``(slice, row, column)``. Readers reorient the file's voxels
  with axis permutations and flips only (never resampling) so that, for any acquisition, the
  slice axis points to the patient's head (S), rows run anterior to posterior (P) and columns run
  from the patient's right to left (L): the radiological view of an axial image.
* Geometry is in DICOM patient coordinates (LPS, millimetres), per display axis:
  ``world = origin_mm + direction @ (spacing_mm * index)`` with ``index = (slice, row, column)``;
  ``direction[:, a]`` is the unit vector of display axis ``a``.
* ``axes`` records how display axes relate to the file's own voxel axes, so writers can put a
  label volume back into exactly the file's voxel order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple
from pathlib import Path
from typing import Any

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# The planes cut across display axis 0, 1 and 2 of a Volume (slices run feet to head).
AXIS_NAMES = ("axial", "coronal", "sagittal")


@dataclass(frozen=True)
class AxisMapping:
    """How display axes come from the file's voxel axes.

    ``file_axis[d]`` is the file axis (0, 1, 2 in the file's own index order, e.g. nibabel's
    i, j, k) that display axis ``d`` walks along, and ``flipped[d]`` says whether it walks it
    backwards.
    """

    file_axis: tuple[int, int, int] = (0, 1, 2)
    flipped: tuple[bool, bool, bool] = (False, False, False)

    def to_display(self, file_array: np.ndarray) -> np.ndarray:
        """File-order array -> display-order view (no copy where possible)."""
        out = np.transpose(file_array, self.file_axis)
        for d, flip in enumerate(self.flipped):
            if flip:
                out = np.flip(out, axis=d)
        return out

    def to_file(self, display_array: np.ndarray) -> np.ndarray:
        """Display-order array -> file-order view; inverse of :meth:`to_display`."""
        out = display_array
        for d, flip in enumerate(self.flipped):
            if flip:
                out = np.flip(out, axis=d)
        inverse = tuple(int(i) for i in np.argsort(self.file_axis))
        return np.transpose(out, inverse)

    def display_index_to_file(self, index: np.ndarray, display_shape: tuple[int, ...]) -> np.ndarray:
        """Display voxel indices (N, 3) -> file voxel indices (N, 3)."""
        index = np.atleast_2d(np.asarray(index, dtype=float))
        out = np.empty_like(index)
        for d in range(3):
            value = index[:, d]
            if self.flipped[d]:
                value = (display_shape[d] - 1) - value
            out[:, self.file_axis[d]] = value
        return out

    def file_index_to_display(self, index: np.ndarray, display_shape: tuple[int, ...]) -> np.ndarray:
        """File voxel indices (N, 3) -> display voxel indices (N, 3)."""
        index = np.atleast_2d(np.asarray(index, dtype=float))
        out = np.empty_like(index)
        for d in range(3):
            value = index[:, self.file_axis[d]]
            if self.flipped[d]:
                value = (display_shape[d] - 1) - value
            out[:, d] = value
        return out

    def describe(self, file_axis_names: tuple[str, str, str] = ("i", "j", "k")) -> list[str]:
        """Human-readable mapping, e.g. ``['slice <- -k', 'row <- j', 'column <- i']``."""
        names = ("slice", "row", "column")
        return [
            f"{names[d]} <- {'-' if self.flipped[d] else ''}{file_axis_names[self.file_axis[d]]}"
            for d in range(3)
        ]


@dataclass
class Volume:
    """A 3D scalar image in display order with its physical geometry and source reference."""

    array: np.ndarray
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    direction: np.ndarray
    modality: str = "OT"
    intensity_unit: str = ""
    source_format: str = ""
    source_path: Path | None = None
    axes: AxisMapping = field(default_factory=AxisMapping)
    file_axis_names: tuple[str, str, str] = ("i", "j", "k")
    # The exact affine of a NIfTI source (RAS, file voxel order) and its header, so labels are
    # written on precisely the same grid.
    nifti_affine: np.ndarray | None = None
    nifti_header: Any = None
    # pydicom datasets (without pixel data) of a DICOM source, in STACK order (sorted along the
    # slice normal; None for blank slices inserted at gaps). How the stack axis maps to display
    # axes is in metadata["dicom_slice_axis_display"/"dicom_slice_axis_flipped"]; see io/dicom/series.py.
    dicom_datasets: list | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.spacing_mm = tuple(float(s) for s in self.spacing_mm)  # type: ignore[assignment]
        self.origin_mm = tuple(float(o) for o in self.origin_mm)  # type: ignore[assignment]
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        if self.source_path is not None:
            self.source_path = Path(self.source_path)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape in display order (slice, row, column)."""
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def file_shape(self) -> tuple[int, int, int]:
        """Shape in the file's own voxel order."""
        shape = [0, 0, 0]
        for d in range(3):
            shape[self.axes.file_axis[d]] = self.shape[d]
        return tuple(shape)  # type: ignore[return-value]

    def affine_lps(self) -> np.ndarray:
        """4x4 matrix: display index (slice, row, column, 1) -> LPS millimetres."""
        affine = np.eye(4)
        affine[:3, :3] = self.direction * np.asarray(self.spacing_mm)[None, :]
        affine[:3, 3] = self.origin_mm
        return affine

    def file_affine_ras(self) -> np.ndarray:
        """4x4 matrix: file voxel index -> RAS millimetres (what a NIfTI of this grid carries)."""
        if self.nifti_affine is not None:
            return np.array(self.nifti_affine, dtype=float)
        return LPS_TO_RAS @ self.affine_lps() @ self._file_to_display_matrix()

    def _file_to_display_matrix(self) -> np.ndarray:
        """4x4 matrix taking a file voxel index to the display voxel index."""
        m = np.zeros((4, 4))
        m[3, 3] = 1.0
        for d in range(3):
            f = self.axes.file_axis[d]
            if self.axes.flipped[d]:
                m[d, f] = -1.0
                m[d, 3] = self.shape[d] - 1
            else:
                m[d, f] = 1.0
        return m

    def napari_affine(self) -> np.ndarray:
        """4x4 napari layer affine: display index -> world (z, y, x) = LPS (S, P, L) in mm."""
        to_zyx = np.eye(4)[[2, 1, 0, 3]]
        return to_zyx @ self.affine_lps()

    def is_oblique(self, tolerance_deg: float = 1e-3) -> bool:
        """True when an axis is not aligned with the LPS world axes."""
        closest = np.abs(self.direction).max(axis=0)
        angles = np.degrees(np.arccos(np.clip(closest, -1.0, 1.0)))
        return bool(np.any(angles > tolerance_deg))

    def index_to_world(self, index: np.ndarray) -> np.ndarray:
        """Display voxel indices (N, 3) -> LPS millimetres (N, 3)."""
        index = np.atleast_2d(np.asarray(index, dtype=float))
        return index @ (self.direction * np.asarray(self.spacing_mm)[None, :]).T + np.asarray(self.origin_mm)

    def world_to_index(self, world_lps: np.ndarray) -> np.ndarray:
        """LPS millimetres (N, 3) -> display voxel indices (N, 3) (not rounded)."""
        world = np.atleast_2d(np.asarray(world_lps, dtype=float)) - np.asarray(self.origin_mm)
        matrix = self.direction * np.asarray(self.spacing_mm)[None, :]
        return np.linalg.solve(matrix, world.T).T

    def same_grid(self, other: "Volume", atol_mm: float = 1e-3) -> bool:
        """True when both volumes have the same shape and the same voxel-to-world mapping."""
        return self.shape == other.shape and np.allclose(
            self.affine_lps(), other.affine_lps(), atol=atol_mm
        )

    def with_array(self, array: np.ndarray, **changes: Any) -> "Volume":
        """A copy of this volume's geometry and source reference around another array."""
        if tuple(array.shape) != self.shape:
            raise ValueError(f"array shape {array.shape} differs from volume shape {self.shape}")
        values = dict(self.__dict__)
        values.update(array=array, metadata=dict(self.metadata))
        values.update(changes)
        return Volume(**values)


def reorientation_from_direction(file_direction: np.ndarray) -> AxisMapping:
    """Choose the display axes for a file whose voxel axes have LPS unit vectors ``file_direction[:, f]``.

    Each display axis takes the file axis closest to its target world axis (slice <- S,
    row <- P, column <- L), flipped when it points the other way. Ties (45 degree obliques)
    are broken deterministically; the mapping is always a permutation.
    """
    d = np.asarray(file_direction, dtype=float).reshape(3, 3)
    targets = (2, 1, 0)  # slice follows LPS z (S), row follows y (P), column follows x (L)
    remaining = [0, 1, 2]
    file_axis: list[int] = [0, 0, 0]
    flipped: list[bool] = [False, False, False]
    # Assign the most clear-cut pairs first so an oblique axis cannot steal a better match.
    pairs = sorted(
        ((abs(d[w, f]), disp, f) for disp, w in enumerate(targets) for f in range(3)), reverse=True
    )
    taken_display: set[int] = set()
    for _, disp, f in pairs:
        if disp in taken_display or f not in remaining:
            continue
        file_axis[disp] = f
        flipped[disp] = bool(d[targets[disp], f] < 0)
        taken_display.add(disp)
        remaining.remove(f)
    return AxisMapping(tuple(file_axis), tuple(flipped))  # type: ignore[arg-type]


def display_geometry(
    file_shape: tuple[int, int, int],
    file_spacing: np.ndarray,
    file_origin: np.ndarray,
    file_direction: np.ndarray,
    axes: AxisMapping,
) -> tuple[tuple[float, float, float], tuple[float, float, float], np.ndarray]:
    """Spacing, origin and direction (LPS) of the display grid given the file grid."""
    file_direction = np.asarray(file_direction, dtype=float).reshape(3, 3)
    spacing = tuple(float(file_spacing[axes.file_axis[d]]) for d in range(3))
    direction = np.zeros((3, 3))
    origin = np.asarray(file_origin, dtype=float).copy()
    for d in range(3):
        f = axes.file_axis[d]
        vec = file_direction[:, f]
        if axes.flipped[d]:
            origin = origin + vec * file_spacing[f] * (file_shape[f] - 1)
            vec = -vec
        direction[:, d] = vec
    return spacing, tuple(origin), direction  # type: ignore[return-value]


class DisplayGrid(NamedTuple):
    """The display-order grid of a file grid: axis mapping, shape and LPS geometry."""

    axes: AxisMapping
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    direction: np.ndarray


def display_grid(
    file_shape: tuple[int, ...], file_spacing, file_origin, file_direction
) -> DisplayGrid:
    """Reorient a file grid (LPS unit vectors ``file_direction[:, f]``) to display order."""
    file_direction = np.asarray(file_direction, dtype=float).reshape(3, 3)
    axes = reorientation_from_direction(file_direction)
    spacing, origin, direction = display_geometry(
        tuple(file_shape), np.asarray(file_spacing, dtype=float), np.asarray(file_origin, dtype=float),
        file_direction, axes,
    )
    shape = tuple(int(file_shape[axes.file_axis[d]]) for d in range(3))
    return DisplayGrid(axes, shape, spacing, origin, direction)  # type: ignore[arg-type]
