"""Interactive segmentation in napari: prompt layers in, masks into a Labels layer out.

A :class:`SegmentationController` adds two layers on the scan's grid: "<scan> points" (click =
include, Shift- or Alt-click = exclude; napari's Points "add" mode ignores modifiers, so both
are free) and "<scan> boxes" (rectangles). Every prompt remembers the plane it was made in
(feature ``axis``: 0 axial, 1 coronal, 2 sagittal, the not-displayed axis of the 2D view) and
the label value that was selected then (feature ``label``); its slice is its coordinate along
that axis. Prompts of one (axis, slice, label) form a group; whenever a group changes, its slice
is predicted again and the best mask replaces that label on that slice.

The encoder never runs on the Qt thread: a slice without a cached embedding is embedded by
an :class:`~.workers.EmbeddingQueue` worker and predicted when it returns; landing on a slice
starts embedding it ahead of the first click. The decoder (a few ms) runs on the Qt thread.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from psygnal import Signal

from ..errors import LabelsMismatchError, NotAVolumeError
from ..segment.cache import EmbeddingCache, volume_signature
from ..segment.cache_memory import MemoryCache
from ..segment.intensity import IntensityMapping, default_mapping
from ..segment.model import SamModel
from ..segment.predictor import Prompts, SliceMasks, SlicePredictor
from .layers import volume_from_layer_meta
from .workers import EmbeddingQueue

log = logging.getLogger(__name__)

AXIS_NAMES = ("axial", "coronal", "sagittal")
# Modifiers that turn a click on the points layer into an exclude (negative) point.
NEGATIVE_MODIFIERS = ("Shift", "Alt")
POSITIVE_COLOR = "lime"
NEGATIVE_COLOR = "red"
UNASSIGNED = -1

Key = tuple[int, int, int]  # (axis, slice index, label value)


class SegmentationController:
    """Wires prompt layers, a SAM model and a Labels layer into click-to-segment."""

    status_changed = Signal(str)
    mask_written = Signal(object)  # (axis, index, label)

    def __init__(self, viewer: Any, image_layer: Any, labels_layer: Any, model: SamModel, *,
                 mapping: IntensityMapping | None = None, cache: EmbeddingCache | None = None,
                 overwrite: bool = False) -> None:
        array = np.asarray(image_layer.data)
        if array.ndim != 3 or image_layer.rgb:
            raise NotAVolumeError(f"layer {image_layer.name!r} has shape {array.shape}: "
                                  "interactive segmentation needs a scalar 3D image layer")
        if tuple(labels_layer.data.shape) != array.shape:
            raise LabelsMismatchError(f"labels layer {labels_layer.name!r} has shape {tuple(labels_layer.data.shape)} "
                                      f"but the scan has {array.shape}: make a new label layer on the scan's grid")
        self.viewer = viewer
        self.image_layer = image_layer
        self.labels_layer = labels_layer
        self.model = model
        self.overwrite = overwrite
        volume = volume_from_layer_meta(image_layer.metadata)
        self._array = array
        self._spacing = tuple(float(s) for s in (volume.spacing_mm if volume is not None
                                                 else np.abs(np.asarray(image_layer.scale, float)[-3:])))
        self.mapping = mapping or default_mapping(array, volume.modality if volume is not None else "OT")
        self.cache = cache if cache is not None else EmbeddingCache(MemoryCache())
        self._signature: str | None = None  # computed by the first worker: hashing a scan is slow
        self._predictors: dict[int, SlicePredictor] = {}
        self._groups: dict[Key, tuple] = {}
        self._results: dict[Key, SliceMasks] = {}
        self._choice: dict[Key, int] = {}
        self._waiting: set[Key] = set()
        self._last_key: Key | None = None
        self.status = "ready"
        self._closed = False
        self.queue = EmbeddingQueue(self._embed_job, on_start=self._on_embed_start, on_done=self._on_embedded,
                                    on_error=self._on_embed_error)
        self.points_layer, self.boxes_layer = self._add_prompt_layers()
        self._connections: list[tuple[Any, Any]] = []
        # Rows each prompt layer had before its current edit: napari appends new prompts at the end.
        self._sizes = {id(self.points_layer): 0, id(self.boxes_layer): 0}
        for layer in (self.points_layer, self.boxes_layer):
            self._connect(layer.events.data, lambda event, layer=layer: self._on_prompts_event(layer, event))
            self._connect(layer.events.features, lambda event, layer=layer: self._on_prompts_event(layer, event))
        self._connect(viewer.dims.events.current_step, self._on_view_changed)
        self._connect(viewer.dims.events.order, self._on_view_changed)
        self._connect(viewer.dims.events.ndisplay, self._on_view_changed)
        # First in the list: runs on press, before the Points "add" mode callback adds the point.
        self.points_layer.mouse_drag_callbacks.insert(0, self._on_points_press)
        self._on_view_changed()

    # ------------------------------------------------------------------ layers
    def _add_prompt_layers(self) -> tuple[Any, Any]:
        import pandas as pd

        image = self.image_layer
        grid = dict(scale=image.scale, translate=image.translate, rotate=image.rotate, shear=image.shear,
                    affine=image.affine.affine_matrix)
        size = max(3.0, min(self._array.shape[1:]) / 40.0)
        features = pd.DataFrame({"positive": pd.Series([], dtype=bool), "axis": pd.Series([], dtype=int),
                                 "label": pd.Series([], dtype=int)})
        defaults = {"positive": True, "axis": UNASSIGNED, "label": 0}
        boxes = self.viewer.add_shapes(
            ndim=3, name=f"{image.name} boxes", edge_color="yellow", face_color="transparent",
            edge_width=max(1.0, size / 4), features=features.drop(columns="positive"),
            feature_defaults={k: v for k, v in defaults.items() if k != "positive"}, **grid)
        points = self.viewer.add_points(
            np.zeros((0, 3)), ndim=3, name=f"{image.name} points", size=size, features=features,
            feature_defaults=defaults, face_color="positive",
            face_color_cycle={True: POSITIVE_COLOR, False: NEGATIVE_COLOR}, border_color="white", **grid)
        points.mode = "add"
        self.viewer.layers.selection.active = points
        return points, boxes

    def _connect(self, emitter: Any, callback: Any) -> None:
        emitter.connect(callback)
        self._connections.append((emitter, callback))

    def close(self) -> None:
        """Disconnect from napari and stop background work; every layer stays as it is."""
        if self._closed:
            return
        self._closed = True
        for emitter, callback in self._connections:
            emitter.disconnect(callback)
        self._connections.clear()
        if self._on_points_press in self.points_layer.mouse_drag_callbacks:
            self.points_layer.mouse_drag_callbacks.remove(self._on_points_press)
        self.queue.close()

    # ------------------------------------------------------------------ view
    def current_plane(self) -> tuple[int, int] | None:
        """(axis, slice index) of the 2D view in the scan's voxels, or None (3D view, outside the scan)."""
        dims = self.viewer.dims
        if dims.ndisplay != 2:
            return None
        offset = dims.ndim - 3
        hidden = [a - offset for a in dims.not_displayed if a >= offset]
        if len(hidden) != 1:
            return None
        axis = hidden[0]
        position = self.image_layer.world_to_data(dims.point)
        index = int(round(float(position[-3:][axis])))
        if not 0 <= index < self._array.shape[axis]:
            return None
        return axis, index

    def _on_view_changed(self, event: Any = None) -> None:
        plane = self.current_plane()
        if plane is None:
            if self.queue.running is None:
                self._set_status("switch to a 2D view of the scan to segment")
            return
        if self.is_embedded(*plane):
            if self.queue.running is None:
                self._set_status("ready")
        else:
            self.queue.request(*plane)

    def _set_status(self, text: str) -> None:
        self.status = text
        self.status_changed.emit(text)

    # ------------------------------------------------------------------ model
    def _make_predictor(self, axis: int, signature: str) -> SlicePredictor:
        return SlicePredictor(self.model, self._array, mapping=self.mapping, axis=axis, spacing_mm=self._spacing,
                              cache=self.cache, signature=signature)

    def predictor(self, axis: int) -> SlicePredictor:
        """The predictor of one plane (all share one cache); only once the scan's signature is known."""
        if self._signature is None:
            raise RuntimeError("no slice embedded yet: the scan's signature is computed by the first embedding")
        if axis not in self._predictors:
            self._predictors[axis] = self._make_predictor(axis, self._signature)
        return self._predictors[axis]

    def is_embedded(self, axis: int, index: int) -> bool:
        """True when the slice's embedding is cached (never hashes the scan on the Qt thread)."""
        return self._signature is not None and self.predictor(axis).is_embedded(index)

    def set_mapping(self, mapping: IntensityMapping) -> None:
        """Embed with another intensity mapping from now on (cached embeddings of the old one stay)."""
        self.mapping = mapping
        for predictor in self._predictors.values():
            predictor.set_mapping(mapping)
        self._on_view_changed()

    def _embed_job(self, axis: int, index: int) -> str:
        """Worker thread: the slice's embedding into the cache; returns the scan's signature."""
        signature = self._signature or volume_signature(self._array, self._spacing)
        self._make_predictor(axis, signature).embed(index)
        return signature

    def _on_embed_start(self, axis: int, index: int) -> None:
        self._set_status(f"embedding slice {index} ({AXIS_NAMES[axis]})...")

    def _on_embedded(self, axis: int, index: int, signature: object) -> None:
        self._signature = self._signature or str(signature)
        for key in sorted(k for k in self._waiting if k[:2] == (axis, index)):
            self._waiting.discard(key)
            self._update_slice(key)
        if self.queue.running is None:
            self._set_status("ready")

    def _on_embed_error(self, axis: int, index: int, error: Exception) -> None:
        self._waiting = {k for k in self._waiting if k[:2] != (axis, index)}
        self._set_status(f"embedding slice {index} ({AXIS_NAMES[axis]}) failed: {error}")

    # ------------------------------------------------------------------ prompts
    def _on_points_press(self, layer: Any, event: Any):
        """Shift/Alt at press time makes the point napari is about to add a negative one."""
        negative = any(m in event.modifiers for m in NEGATIVE_MODIFIERS)
        layer.feature_defaults = {"positive": not negative, "axis": UNASSIGNED, "label": 0}
        yield
        while event.type == "mouse_move":
            yield
        if negative:
            from qtpy.QtCore import QTimer

            # The add happens after this release handler; restore the default once it is done.
            QTimer.singleShot(0, self._reset_point_default)

    def _reset_point_default(self) -> None:
        if not self._closed:
            self.points_layer.feature_defaults = {"positive": True, "axis": UNASSIGNED, "label": 0}

    def _on_prompts_event(self, layer: Any, event: Any = None) -> None:
        action = str(getattr(event, "action", "") or "")
        if action.endswith("ING"):  # ADDING/CHANGING/REMOVING: remember the size, the data are not final yet
            self._sizes[id(layer)] = len(layer.data)
            return
        if action:
            self._claim_new(layer, self._sizes[id(layer)])
            self._sizes[id(layer)] = len(layer.data)
        self.refresh_prompts()

    def refresh_prompts(self) -> None:
        """Predict every (axis, slice, label) group of prompts that changed since the last call."""
        if self._closed:
            return
        # A rectangle being dragged out is not final: keep the boxes as they were until it is.
        groups = self._collect_groups(include_boxes=not getattr(self.boxes_layer, "_is_creating", False))
        changed = [k for k in set(groups) | set(self._groups) if groups.get(k) != self._groups.get(k)]
        self._groups = groups
        for key in sorted(changed):
            self._update_slice(key)

    def _claim_new(self, layer: Any, first: int) -> None:
        """Rows ``first:`` are new prompts: they belong to the current plane and the selected label.

        Assigned here rather than through feature defaults, which napari copies from whatever
        prompt is selected.
        """
        if len(layer.data) <= first:
            return
        plane = self.current_plane()
        features = layer.features
        features.iloc[first:, features.columns.get_loc("axis")] = UNASSIGNED if plane is None else plane[0]
        features.iloc[first:, features.columns.get_loc("label")] = int(self.labels_layer.selected_label)

    def _collect_groups(self, include_boxes: bool) -> dict[Key, tuple]:
        """{(axis, index, label): (points tuple, box tuple or None)} from both prompt layers."""
        shape = self._array.shape
        points: dict[Key, list] = {}
        data = np.asarray(self.points_layer.data, float).reshape(-1, 3)
        features = self.points_layer.features
        for coord, axis, label, positive in zip(data, features["axis"], features["label"], features["positive"]):
            axis = int(axis)
            if axis == UNASSIGNED:
                continue
            index = int(round(coord[axis]))
            row, col = (coord[a] for a in range(3) if a != axis)
            rows, cols = (shape[a] for a in range(3) if a != axis)
            if 0 <= index < shape[axis] and -0.5 <= row <= rows - 0.5 and -0.5 <= col <= cols - 0.5:
                points.setdefault((axis, index, int(label)), []).append((float(row), float(col), bool(positive)))
        boxes: dict[Key, tuple] = {}
        previous_boxes = {k: v[1] for k, v in self._groups.items() if v[1] is not None}
        if include_boxes:
            features = self.boxes_layer.features
            for vertices, axis, label in zip(self.boxes_layer.data, features["axis"], features["label"]):
                axis = int(axis)
                if axis == UNASSIGNED:
                    continue
                vertices = np.asarray(vertices, float)
                index = int(round(float(vertices[:, axis].mean())))
                if not 0 <= index < shape[axis]:
                    continue
                inplane = vertices[:, [a for a in range(3) if a != axis]]
                limits = np.array([s - 0.5 for a, s in enumerate(shape) if a != axis])
                low = np.clip(inplane.min(0), -0.5, limits)
                high = np.clip(inplane.max(0), -0.5, limits)
                if np.all(high > low):  # the newest box of a group wins
                    boxes[(axis, index, int(label))] = (float(low[0]), float(low[1]), float(high[0]), float(high[1]))
        else:
            boxes = previous_boxes
        return {k: (tuple(points.get(k, ())), boxes.get(k)) for k in set(points) | set(boxes)}

    # ------------------------------------------------------------------ masks
    def _update_slice(self, key: Key) -> None:
        axis, index, label = key
        group = self._groups.get(key)
        if group is None:  # its last prompt was removed: so is the mask it made
            self._results.pop(key, None)
            self._waiting.discard(key)
            self.write_mask(axis, index, np.zeros(self._slice_shape(axis), bool), label)
            return
        if not self.is_embedded(axis, index):
            self._waiting.add(key)
            self.queue.request(axis, index, urgent=True)
            return
        points, box = group
        multimask = box is None and len(points) == 1  # SAM's rule: one click is ambiguous
        masks = self.predictor(axis).predict(index, self._prompts(group), multimask=multimask)
        self._results[key] = masks
        self._choice[key] = 0
        self._last_key = key
        self.write_mask(axis, index, masks.masks[0], label)

    @staticmethod
    def _prompts(group: tuple) -> Prompts:
        points, box = group
        coords = np.array([(r, c) for r, c, _ in points], float).reshape(-1, 2) if points else None
        flags = np.array([p for _, _, p in points], bool) if points else None
        return Prompts(points=coords, positive=flags, box=None if box is None else np.array(box))

    def _slice_shape(self, axis: int) -> tuple[int, int]:
        return tuple(s for a, s in enumerate(self._array.shape) if a != axis)  # type: ignore[return-value]

    def write_mask(self, axis: int, index: int, mask: np.ndarray, label: int) -> None:
        """Make ``label`` cover exactly ``mask`` on one slice (other labels kept unless ``overwrite``).

        The single place where model output enters the labels: an object/undo session takes over here.
        """
        label = int(label)
        where: list[Any] = [slice(None)] * 3
        where[axis] = int(index)
        plane = np.asarray(self.labels_layer.data[tuple(where)])
        owned = plane == label
        allowed = np.ones_like(owned) if self.overwrite else (plane == 0) | owned
        target = np.asarray(mask, bool) & allowed
        change = target != owned
        if label == 0 or not change.any():
            self.mask_written.emit((axis, index, label))
            return
        rows, cols = np.nonzero(change)
        values = np.where(target[rows, cols], label, 0)
        indices: list[np.ndarray] = [rows, cols]
        indices.insert(axis, np.full(rows.shape, int(index)))
        self.labels_layer.data_setitem(tuple(indices), values)
        self.mask_written.emit((axis, index, label))

    @property
    def last_masks(self) -> SliceMasks | None:
        """The candidates of the most recent prediction, best first."""
        return None if self._last_key is None else self._results.get(self._last_key)

    @property
    def current_iou(self) -> float | None:
        """The model's predicted IoU of the candidate now shown for the most recent prediction."""
        masks = self.last_masks
        return None if masks is None else float(masks.scores[self._choice.get(self._last_key, 0)])

    def cycle_mask(self) -> float | None:
        """Show the next candidate mask of the most recent prediction; returns its predicted IoU."""
        key = self._last_key
        masks = self._results.get(key) if key is not None else None
        if key is None or masks is None:
            return None
        axis, index, label = key
        if len(masks.scores) == 1 and key in self._groups:
            # A single-mask prediction: add the three multimask candidates to cycle through.
            extra = self.predictor(axis).predict(index, self._prompts(self._groups[key]), multimask=True)
            masks = SliceMasks(np.concatenate([masks.masks, extra.masks]), np.concatenate([masks.scores, extra.scores]),
                               np.concatenate([masks.low_res_logits, extra.low_res_logits]), index=index, axis=axis)
            self._results[key] = masks
        choice = (self._choice.get(key, 0) + 1) % len(masks.scores)
        self._choice[key] = choice
        self.write_mask(axis, index, masks.masks[choice], label)
        return float(masks.scores[choice])
