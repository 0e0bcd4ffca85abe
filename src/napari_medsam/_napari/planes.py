"""Axial, coronal and sagittal views in one step, each the way radiologists read it.

The plugin's readers give every scan in display order: axis 0 runs from the feet to the head,
axis 1 from anterior to posterior, axis 2 from the patient's right to left (the radiological
convention: the patient's right on the screen's left). So:

* axial: slices along axis 0; rows (anterior at the top) down, columns (right at the left) across;
* coronal: slices along axis 1; axis 0 up (the head at the top), columns across;
* sagittal: slices along axis 2; axis 0 up, axis 1 across (anterior at the left).

napari's own Roll and Transpose reach these orders too, but in several presses, and two of the
three intermediate views lie on their side. :func:`show_plane` sets the dims order and the
camera's orientation at once; the scan's leading axes (if the viewer has more than three
dimensions) keep their place.
"""

from __future__ import annotations

from typing import Any

PLANES = ("axial", "coronal", "sagittal")
_SLICING_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}


def plane_order(ndim: int, plane: str) -> tuple[int, ...]:
    """The viewer's dims order that shows ``plane`` of the last three axes."""
    if plane not in _SLICING_AXIS:
        raise ValueError(f"plane must be one of {PLANES}, not {plane!r}")
    if ndim < 3:
        raise ValueError("a plane needs three dimensions")
    offset = ndim - 3
    slicing = _SLICING_AXIS[plane]
    shown = [a for a in (0, 1, 2) if a != slicing]
    return (*range(offset), offset + slicing, *(offset + a for a in shown))


def current_plane(viewer: Any) -> str | None:
    """The plane the viewer shows (2D, last three axes), or None for any other arrangement."""
    ndim = viewer.dims.ndim
    if ndim < 3 or viewer.dims.ndisplay != 2:
        return None
    order = tuple(viewer.dims.order)
    for plane in PLANES:
        if order[-3:] == plane_order(ndim, plane)[-3:]:
            return plane
    return None


def show_plane(viewer: Any, plane: str) -> None:
    """Show ``plane`` in 2D with the head (coronal, sagittal) or anterior (axial) at the top."""
    order = plane_order(viewer.dims.ndim, plane)
    viewer.dims.ndisplay = 2
    viewer.dims.order = order
    vertical = order[-2] - (viewer.dims.ndim - 3)  # the axis drawn vertically
    viewer.camera.orientation2d = ("up" if vertical == 0 else "down", "right")
    viewer.reset_view()
