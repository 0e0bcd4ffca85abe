"""Axial / coronal / sagittal in one step, head up, through a real napari viewer."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medsam._napari.planes import PLANES, current_plane, plane_order, show_plane


def test_plane_orders():
    assert plane_order(3, "axial") == (0, 1, 2)
    assert plane_order(3, "coronal") == (1, 0, 2)
    assert plane_order(3, "sagittal") == (2, 0, 1)
    assert plane_order(4, "coronal") == (0, 2, 1, 3)  # a leading (time) axis keeps its place
    with pytest.raises(ValueError):
        plane_order(3, "oblique")
    with pytest.raises(ValueError):
        plane_order(2, "axial")


def _orientation(viewer) -> tuple[str, str]:
    return tuple(str(getattr(o, "value", o)) for o in viewer.camera.orientation2d)


def test_each_plane_is_one_step_and_head_up(make_napari_viewer):
    viewer = make_napari_viewer()
    # axis 0 feet -> head: a marker in the top slice (the head end) must be drawn at the top
    volume = np.zeros((20, 30, 40), np.uint8)
    volume[-1, 10, 10] = 255
    viewer.add_image(volume)
    for plane in ("coronal", "sagittal", "axial", "sagittal", "coronal"):  # from any plane to any
        show_plane(viewer, plane)
        assert current_plane(viewer) == plane and viewer.dims.ndisplay == 2
    show_plane(viewer, "coronal")
    assert viewer.dims.displayed == (0, 2) and _orientation(viewer) == ("up", "right")
    show_plane(viewer, "sagittal")
    assert viewer.dims.displayed == (0, 1) and _orientation(viewer) == ("up", "right")
    show_plane(viewer, "axial")
    assert viewer.dims.displayed == (1, 2) and _orientation(viewer) == ("down", "right")
    # from 3D, too
    viewer.dims.ndisplay = 3
    assert current_plane(viewer) is None
    show_plane(viewer, "coronal")
    assert current_plane(viewer) == "coronal"
    assert set(PLANES) == {"axial", "coronal", "sagittal"}


def test_head_is_drawn_at_the_top_of_a_coronal_view(make_napari_viewer):
    """Pixels, not just settings: the head-end slice lands in the upper half of the canvas."""
    viewer = make_napari_viewer(show=True)
    volume = np.zeros((40, 30, 40), np.uint8)
    volume[-6:, :, :] = 255  # the head end (highest axis-0 indices) bright
    viewer.add_image(volume, contrast_limits=(0, 255))
    show_plane(viewer, "coronal")
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].mean(axis=2)
    rows = np.flatnonzero(shot.max(axis=1) > 128)
    assert rows.size and rows.mean() < shot.shape[0] / 2
