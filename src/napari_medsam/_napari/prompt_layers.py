"""The two prompt layers of a scan: a Points layer for clicks and a Shapes layer for boxes.

Each prompt carries two features: ``axis`` (the plane it was made in: 0 axial, 1 coronal,
2 sagittal, i.e. the scan axis not displayed in the 2D view) and ``label`` (the object it
belongs to). Its slice is its data coordinate along ``axis``. Points carry ``positive`` too.
This module reads the layers into per-slice prompt groups and writes a group back (after an
undo, a clear or a redo in the session), and knows nothing of models.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..segment.session.state import SlicePrompts

POSITIVE_COLOR = "lime"
NEGATIVE_COLOR = "red"
UNASSIGNED = -1

Key = tuple[int, int, int]  # (axis, slice index, label value)


def add_prompt_layers(viewer: Any, image: Any) -> tuple[Any, Any]:
    """Add "<scan> boxes" and "<scan> points" on the image's grid; return (points, boxes)."""
    import pandas as pd

    shape = np.asarray(image.data).shape[-3:]
    ndim = 2 if len(shape) == 2 else 3
    grid = dict(scale=image.scale, translate=image.translate, rotate=image.rotate, shear=image.shear,
                affine=image.affine.affine_matrix)
    size = max(3.0, min(shape[1:]) / 40.0)
    boxes = viewer.add_shapes(
        ndim=ndim, name=f"{image.name} boxes", edge_color="yellow", face_color="transparent",
        edge_width=max(1.0, size / 4),
        features=pd.DataFrame({"axis": pd.Series([], dtype=int), "label": pd.Series([], dtype=int)}),
        feature_defaults={"axis": UNASSIGNED, "label": 0}, **grid)
    points = viewer.add_points(
        np.zeros((0, ndim)), ndim=ndim, name=f"{image.name} points", size=size,
        features=pd.DataFrame({"positive": pd.Series([], dtype=bool), "axis": pd.Series([], dtype=int),
                               "label": pd.Series([], dtype=int)}),
        feature_defaults=point_defaults(True), face_color="positive",
        face_color_cycle={True: POSITIVE_COLOR, False: NEGATIVE_COLOR}, border_color="white", **grid)
    points.mode = "add"
    viewer.layers.selection.active = points
    return points, boxes


def point_defaults(positive: bool, axis: int = UNASSIGNED, label: int = 0) -> dict:
    """Feature defaults of the next point added to the points layer."""
    return {"positive": bool(positive), "axis": int(axis), "label": int(label)}


def in_plane(coord: np.ndarray, axis: int) -> tuple[float, float]:
    """(row, col) of a 3D data coordinate in the plane normal to ``axis``."""
    row, col = (float(coord[a]) for a in range(3) if a != axis)
    return row, col


def to_volume(row: float, col: float, axis: int, index: int) -> list[float]:
    """3D data coordinate of (row, col) on slice ``index`` along ``axis``."""
    coord = [float(row), float(col)]
    coord.insert(axis, float(index))
    return coord


def volume_coords(data: Any, ndim: int) -> np.ndarray:
    """(N, 3) coordinates of a prompt layer's points or vertices (a 2D layer's lie on slice 0)."""
    array = np.asarray(data, float).reshape(-1, ndim)
    return np.concatenate([np.zeros((len(array), 1)), array], axis=1) if ndim == 2 else array


def layer_coords(coords: np.ndarray, ndim: int) -> np.ndarray:
    """Inverse of :func:`volume_coords`."""
    coords = np.asarray(coords, float).reshape(-1, 3)
    return coords[:, 1:] if ndim == 2 else coords


def point_keys(points: Any) -> list[Key | None]:
    """The (axis, slice, label) of each point (None when unassigned)."""
    data = volume_coords(points.data, points.ndim)
    features = points.features
    return [None if int(a) == UNASSIGNED else (int(a), int(round(c[int(a)])), int(lab))
            for c, a, lab in zip(data, features["axis"], features["label"])]


def box_keys(boxes: Any) -> list[Key | None]:
    """The (axis, slice, label) of each box (None when unassigned)."""
    features = boxes.features
    return [None if int(a) == UNASSIGNED else
            (int(a), int(round(float(volume_coords(v, boxes.ndim)[:, int(a)].mean()))), int(lab))
            for v, a, lab in zip(boxes.data, features["axis"], features["label"])]


def collect_groups(points: Any, boxes: Any | None, shape: tuple[int, int, int]) -> dict[Key, SlicePrompts]:
    """{(axis, index, label): SlicePrompts} of every assigned prompt inside the scan (boxes skipped when None)."""
    groups: dict[Key, list] = {}
    data = volume_coords(points.data, points.ndim)
    for coord, key, positive in zip(data, point_keys(points), points.features["positive"]):
        if key is None or not 0 <= key[1] < shape[key[0]]:
            continue
        rows, cols = (shape[a] for a in range(3) if a != key[0])
        row, col = in_plane(coord, key[0])
        if -0.5 <= row <= rows - 0.5 and -0.5 <= col <= cols - 0.5:
            groups.setdefault(key, []).append((row, col, bool(positive)))
    found: dict[Key, tuple] = {}
    if boxes is not None:
        for vertices, key in zip(boxes.data, box_keys(boxes)):
            if key is None or not 0 <= key[1] < shape[key[0]]:
                continue
            axis = key[0]
            inplane = volume_coords(vertices, boxes.ndim)[:, [a for a in range(3) if a != axis]]
            limits = np.array([s - 0.5 for a, s in enumerate(shape) if a != axis])
            low = np.clip(inplane.min(0), -0.5, limits)
            high = np.clip(inplane.max(0), -0.5, limits)
            if np.all(high > low):  # the newest box of a slice wins
                found[key] = (float(low[0]), float(low[1]), float(high[0]), float(high[1]))
    return {k: SlicePrompts(tuple(groups.get(k, ())), found.get(k)) for k in set(groups) | set(found)}


def write_group(points: Any, boxes: Any, key: Key, prompts: SlicePrompts | None) -> None:
    """Make the layers hold exactly ``prompts`` for ``key`` (remove its rows, add the session's)."""
    axis, index, label = key
    stale = {i for i, k in enumerate(point_keys(points)) if k == key}
    if stale:
        points.selected_data = stale
        points.remove_selected()
    stale = {i for i, k in enumerate(box_keys(boxes)) if k == key}
    if stale:
        boxes.selected_data = stale
        boxes.remove_selected()
    if prompts is None:
        return
    for row, col, positive in prompts.points:  # one by one: the layer keeps the session's order
        coord = layer_coords(np.array(to_volume(row, col, axis, index)), points.ndim)
        _add_with_defaults(points, point_defaults(positive, axis, label), lambda coord=coord: points.add(coord))
    if prompts.box is not None:
        r0, c0, r1, c1 = prompts.box
        corners = np.array([to_volume(r, c, axis, index) for r, c in ((r0, c0), (r0, c1), (r1, c1), (r1, c0))])
        _add_with_defaults(boxes, {"axis": axis, "label": label},
                           lambda: boxes.add_rectangles(layer_coords(corners, boxes.ndim)))


def _add_with_defaults(layer: Any, defaults: dict, add: Any) -> None:
    """Call ``add()`` with the layer's feature defaults set to ``defaults``, then restore them."""
    before = {k: v.iloc[0] if hasattr(v, "iloc") else v for k, v in dict(layer.feature_defaults).items()}
    layer.feature_defaults = defaults
    try:
        add()
    finally:
        layer.feature_defaults = before
