"""The session side of the interactive controller: objects, undo/redo, clearing, hand paint, layer sync.

A mixin of :class:`~.controller.SegmentationController`: everything here goes through its
:class:`~napari_medsam.segment.session.SegmentationSession` and keeps the napari layers (prompt
markers, the Labels layer's colours, selected label and segment metadata) in step with it.
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import MedSamError
from ..segment.session.state import SessionChange
from .layers import META_KEY
from .prompt_layers import Key, write_group

log = logging.getLogger(__name__)


class SessionEditsMixin:
    """Session-facing methods of the controller (see the module docstring)."""

    session: Any
    labels_layer: Any
    points_layer: Any
    boxes_layer: Any
    _closed: bool
    _own_edit: int
    _syncing: bool
    _quiet_selection: bool
    flat: bool

    # ------------------------------------------------------------------ objects, undo, clearing
    def undo(self) -> None:
        """Undo the active object's last change (prompts, masks, hand edits, propagation)."""
        self.session.undo()

    def redo(self) -> None:
        """Redo the active object's last undone change."""
        self.session.redo()

    def next_object(self) -> None:
        """Select the next object (wrapping)."""
        self.session.next_object(1)

    def previous_object(self) -> None:
        """Select the previous object (wrapping)."""
        self.session.next_object(-1)

    def new_object(self) -> int:
        """Add an object with the next free label value, select it and return its value (the M key)."""
        return self.session.add_object().value

    def _plane_or_error(self) -> tuple[int, int]:
        plane = self.current_plane()
        if plane is None:
            raise MedSamError("Show a 2D slice of the scan first.")
        return plane

    def _active_or_error(self) -> int:
        if self.session.active is None:
            raise MedSamError("Add an object first.")
        return self.session.active

    def clear_slice(self) -> None:
        """Remove the active object's prompts and model-made mask on the shown slice (hand paint stays)."""
        self.session.clear_slice(self._active_or_error(), *self._plane_or_error())

    def accept_slice(self) -> None:
        """Keep the active object's mask on the shown slice and remove its prompt markers."""
        self.session.clear_prompts(self._active_or_error(), *self._plane_or_error())

    def clear_object(self) -> None:
        """Remove all of the active object's voxels and prompts (undoable)."""
        self.session.clear_object(self._active_or_error())

    def delete_object(self) -> None:
        """Remove the active object from the table with its voxels and prompts (undoable with its value)."""
        self.session.delete_object(self._active_or_error())

    # ------------------------------------------------------------------ session -> layers
    def _on_session_change(self, change: SessionChange) -> None:
        if self._closed:
            return
        if change.regions:
            self.labels_layer.refresh()
        if change.prompts and not self._own_edit:
            self._sync_prompts({(axis, index, obj) for obj, axis, index in change.prompts})
        if change.objects:
            self._update_colormap()
            self._update_segments()
        if change.active or change.objects:
            active = self.session.active
            if active is not None and self.labels_layer.selected_label != active:
                self.labels_layer.selected_label = active
        self.changed.emit(change)

    def _sync_prompts(self, keys: set[Key]) -> None:
        """Rewrite the prompt layers' rows of ``keys`` from the session (after undo, redo or clearing)."""
        self._syncing = True
        try:
            for key in sorted(keys):
                axis, index, obj = key
                prompts = self.session.slice_prompts(obj, axis, index) if obj in self.session else None
                write_group(self.points_layer, self.boxes_layer, key, prompts)
        finally:
            self._syncing = False
            self._sizes = {id(self.points_layer): len(self.points_layer.data),
                           id(self.boxes_layer): len(self.boxes_layer.data)}
        self._groups = self._read_groups()

    def session_groups(self) -> dict[Key, Any]:
        """{(axis, index, object): SlicePrompts} of every prompt the session holds."""
        session = self.session
        return {(axis, index, obj.value): session.slice_prompts(obj.value, axis, index)
                for obj in session.objects for axis in range(3) for index in session.prompted_slices(obj.value, axis)}

    def _match_prompts_to_session(self) -> None:
        """Make the prompt layers hold exactly the session's prompts (reused layers, a reused or new session).

        Layers that already agree (switching back to a scan) are left untouched; otherwise every
        row is removed and the session's prompts are written back, so a new session on reused
        layers starts without another session's markers.
        """
        wanted = {k: v for k, v in self.session_groups().items() if not v.empty}
        points, boxes = self.points_layer, self.boxes_layer
        have = self._read_groups()
        unread = len(points.data) + len(boxes.data) != sum(len(g.points) + (g.box is not None) for g in have.values())
        if have != wanted or unread:
            self._syncing = True
            try:
                for layer in (points, boxes):
                    if len(layer.data):
                        layer.selected_data = set(range(len(layer.data)))
                        layer.remove_selected()
                for key in sorted(wanted):
                    write_group(points, boxes, key, wanted[key])
            finally:
                self._syncing = False
        self._sizes = {id(points): len(points.data), id(boxes): len(boxes.data)}
        self._groups = self._read_groups()

    def _update_segments(self) -> None:
        """Keep the objects' names and colours in the layer's metadata: the writers name segments after them."""
        from ..io.segments import default_segment

        objects = self.session.objects
        meta = dict(self.labels_layer.metadata.get(META_KEY) or {})
        meta["names"] = {o.value: o.name for o in objects}
        meta["segments"] = [default_segment(o.value, o.name, o.color) for o in objects]
        self.labels_layer.metadata[META_KEY] = meta

    def _update_colormap(self) -> None:
        from napari.utils.colormaps import DirectLabelColormap

        colors: dict[Any, Any] = {None: (0.8, 0.8, 0.8, 1.0), 0: (0.0, 0.0, 0.0, 0.0)}
        for obj in self.session.objects:
            colors[obj.value] = (*(c / 255.0 for c in obj.color), 1.0)
        # napari rebuilds a large lookup table for every new colormap (tens of ms): only when
        # the objects' colours really changed (a model load used to set the same one twice).
        key = tuple((k, tuple(v)) for k, v in colors.items() if k is not None)
        if key == getattr(self, "_colormap_key", None) and self.labels_layer.colormap is getattr(
                self, "_colormap_set", None):
            return
        self._quiet_selection = True  # napari re-announces the selected label with a new colormap
        try:
            self.labels_layer.colormap = DirectLabelColormap(color_dict=colors)
            self._colormap_key, self._colormap_set = key, self.labels_layer.colormap
        finally:
            self._quiet_selection = False

    # ------------------------------------------------------------------ labels layer -> session
    def _on_paint(self, event: Any) -> None:
        """A brush, eraser, fill or polygon stroke: its voxels become hand-made (never overwritten) and undoable."""
        if self._closed:
            return
        atoms = [_as_3d(atom) for atom in event.value] if self.flat else list(event.value)
        try:
            with self._editing():
                self.session.record_paint(atoms)  # also right when napari announces before it writes
        except MedSamError as error:
            log.warning("could not record a hand edit: %s", error)
            self._set_status(f"hand edit not recorded for undo: {error}")

    def _on_selected_label(self, event: Any = None) -> None:
        if self._closed:
            return
        value = int(self.labels_layer.selected_label)
        if self._quiet_selection or value <= 0 or value == self.session.active:
            return
        if value in self.session:
            self.session.select(value)
        else:
            self.session.add_object(value=value)


def _as_3d(atom: Any) -> Any:
    """A 2D Labels layer's paint atom as one on slice 0 of a one-slice volume."""
    import numpy as np

    if len(atom) == 4 and all(isinstance(s, slice) for s in atom[0]):
        slice_key, mask, old_values, new_value = atom
        mask = None if mask is None else np.asarray(mask)[None]
        if mask is None:
            old_values = np.asarray(old_values)[None]
        return ((slice(0, 1), *slice_key), mask, old_values, new_value)
    indices, old_values, new_value = atom
    indices = tuple(np.asarray(i) for i in indices)
    return ((np.zeros_like(indices[0]), *indices), old_values, new_value)
