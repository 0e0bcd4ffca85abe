"""Optional clean-up of a propagated object: keep its largest 3D component, fill holes per slice.

The functions here are pure (mask in, mask out); propagation applies their result only to the
slices it wrote itself, through the same write rule as the propagation (locked voxels and other
objects' voxels are respected), so a post-processing step is undone with the run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class PostProcess:
    """Which clean-up steps run after a propagation (both off by default)."""

    largest_component: bool = False  # drop islands not connected in 3D to the biggest piece
    fill_holes: bool = False  # close holes inside each slice's mask
    connectivity: int = 1  # 1: faces (6-neighbourhood), 2: + edges (18), 3: + corners (26)

    def __post_init__(self) -> None:
        if self.connectivity not in (1, 2, 3):
            raise ValueError(f"connectivity must be 1, 2 or 3, not {self.connectivity}")

    @property
    def active(self) -> bool:
        """True when at least one step is switched on."""
        return self.largest_component or self.fill_holes


def largest_component_3d(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """The largest connected component of a 3D boolean mask (ties: the first found)."""
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    components, count = ndimage.label(mask, structure=structure)
    if count <= 1:
        return mask.copy()
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def fill_holes_per_slice(mask: np.ndarray, axis: int = 0) -> np.ndarray:
    """``mask`` with the holes of every 2D slice along ``axis`` filled (a hole touches no slice edge)."""
    mask = np.asarray(mask, dtype=bool)
    out = np.empty_like(mask)
    for k in range(mask.shape[axis]):
        index = tuple(k if a == axis else slice(None) for a in range(mask.ndim))
        out[index] = ndimage.binary_fill_holes(mask[index])
    return out


def postprocess_mask(mask: np.ndarray, settings: PostProcess, axis: int = 0) -> np.ndarray:
    """Apply the steps of ``settings`` to a 3D object mask: largest component first, then holes."""
    out = np.asarray(mask, dtype=bool)
    if settings.largest_component:
        out = largest_component_3d(out, settings.connectivity)
    if settings.fill_holes:
        out = fill_holes_per_slice(out, axis)
    return out
