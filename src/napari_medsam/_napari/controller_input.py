"""The input side of the interactive controller: prompt-layer gestures and events, and the plugin's keys.

A mixin of :class:`~.controller.SegmentationController`. A mouse gesture on a prompt layer is one
edit, read once on release (napari has no public "edit finished" event; see
docs/architecture.md); prompt-layer events are read into (plane, slice, object) groups; the
keys of :data:`~.keys.SHORTCUTS` (with the user's keys from the settings, see
:func:`~.keys.load_shortcuts`) are bound where napari would otherwise give them another meaning.
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import MedSamError
from ..segment.session.state import SlicePrompts
from .prompt_layers import UNASSIGNED, Key, box_keys, collect_groups, point_defaults

log = logging.getLogger(__name__)

# Key-setting warnings already shown in this napari session (a controller is made per scan and model).
_WARNED: set[str] = set()

# Modifiers that turn a click on the points layer into an exclude (negative) point.
NEGATIVE_MODIFIERS = ("Shift", "Alt")
# Mouse buttons (napari/vispy numbering: 1 left, 2 right) whose click adds an exclude point.
NEGATIVE_BUTTONS = (2,)


class PromptInputMixin:
    """Gestures, prompt events and key bindings of the controller (see the module docstring)."""

    viewer: Any
    image_layer: Any
    labels_layer: Any
    points_layer: Any
    boxes_layer: Any
    session: Any
    _array: Any
    _closed: bool
    _syncing: bool
    _gestures: int
    _groups: dict
    _sizes: dict
    _bound: list
    shortcuts: dict
    key_warnings: list

    def _bind_keys(self) -> None:
        """Bind ``self.shortcuts`` (SHORTCUTS with the user's keys) on the viewer and on the layers
        where no napari key of the same name must win.

        A layer's own bindings come before the viewer's in napari, so the keys are bound on the
        scan's layers (the image's "C" would auto-contrast it, the labels' "M" would pick an
        unused label) and on any other layer without editing keys (images, vectors, surfaces,
        tracks: added later too). Other Labels, Points and Shapes layers keep napari's keys:
        Ctrl+Z there undoes that layer's own edit. The replaced bindings come back on close.
        A user's key that could not be used was replaced by its default: that is said once per
        napari session, as a napari warning (the panel's Keys help lists it too).
        """
        self._warn_about_keys()
        self._bind_on(self.viewer)
        for layer in (self.points_layer, self.boxes_layer, self.labels_layer, self.image_layer):
            self._bind_on(layer)
        for layer in list(self.viewer.layers):
            if _takes_plugin_keys(layer):
                self._bind_on(layer)
        self._connect(self.viewer.layers.events.inserted, self._on_layer_inserted)

    def _bind_on(self, target: Any) -> None:
        from napari.utils.key_bindings import coerce_keybinding

        if any(t is target for t, _, _ in self._bound):
            return
        for key, (method, _) in self.shortcuts.items():
            previous = target.keymap.get(coerce_keybinding(key))
            target.bind_key(key, lambda _target, method=method: self.run_shortcut(method), overwrite=True)
            self._bound.append((target, key, previous))

    def _warn_about_keys(self) -> None:
        new = [text for text in self.key_warnings if text not in _WARNED]
        if not new:
            return
        _WARNED.update(new)
        for text in new:
            log.warning("napari-medsam: %s", text)
        from napari.utils.notifications import show_warning

        show_warning("napari-medsam keys: " + " | ".join(new))

    def _on_layer_inserted(self, event: Any) -> None:
        layer = getattr(event, "value", None)
        # Closed during this very event (the panel switched to the scan being added): bind nothing.
        if not self._closed and layer is not None and _takes_plugin_keys(layer):
            self._bind_on(layer)

    def run_shortcut(self, method: str) -> None:
        """Run the controller method of a plugin key; a refusal (MedSamError) goes to the status."""
        try:
            getattr(self, method)()
        except MedSamError as error:
            self._set_status(str(error))

    # ------------------------------------------------------------------ prompts
    def _on_prompt_press(self, layer: Any, event: Any):
        """A mouse gesture on a prompt layer: one edit, read once when the button is released.

        napari's own drag callbacks announce a drag piece by piece (a rectangle is added on
        press and finished on release, a dragged point emits a features event per move) and
        has no public "edit finished" event, so this callback, first in the layer's
        ``mouse_drag_callbacks`` (public API), brackets the gesture: prompt events during it
        only claim new rows, and the prompts are read once the release has been handled by
        napari (the deferred :meth:`_gesture_ended`). On the points layer, a right-click, or
        Shift/Alt at press time, also makes the point napari is about to add a negative one.
        """
        negative = layer is self.points_layer and (
            getattr(event, "button", 1) in NEGATIVE_BUTTONS
            or any(m in event.modifiers for m in NEGATIVE_MODIFIERS))
        if layer is self.points_layer:
            layer.feature_defaults = point_defaults(not negative)
        self._gestures += 1
        try:
            yield
            while event.type == "mouse_move":
                yield
        finally:
            # Also runs when napari drops the gesture without a release (the generator is closed).
            self._gestures = max(0, self._gestures - 1)
            from qtpy.QtCore import QTimer

            # napari's release handler (which finishes a drawn shape or adds a clicked point)
            # runs after this one: read the prompts once it is done.
            QTimer.singleShot(0, lambda: self._gesture_ended(negative))

    def _gesture_ended(self, negative: bool = False) -> None:
        if self._closed:
            return
        if negative:
            self.points_layer.feature_defaults = point_defaults(True)
        if not self._gestures:
            self.refresh_prompts()

    @property
    def editing_prompts(self) -> bool:
        """True while a mouse gesture on a prompt layer is under way (its edits are not final)."""
        return self._gestures > 0

    def _on_prompts_event(self, layer: Any, event: Any = None) -> None:
        if self._syncing or self._closed:
            return
        action = str(getattr(event, "action", "") or "")
        if action.endswith("ING"):  # ADDING/CHANGING/REMOVING: remember the size, the data are not final yet
            self._sizes[id(layer)] = len(layer.data)
            return
        if action:
            self._claim_new(layer, self._sizes[id(layer)])
            self._sizes[id(layer)] = len(layer.data)
        if not self._gestures:  # mid-drag: read once the gesture ends
            self.refresh_prompts()

    def refresh_prompts(self) -> None:
        """Predict every (axis, slice, label) group of prompts that changed since the last call."""
        if self._closed:
            return
        self._drop_replaced_boxes()
        groups = self._read_groups()
        changed = [k for k in set(groups) | set(self._groups) if groups.get(k) != self._groups.get(k)]
        self._groups = groups
        for key in sorted(changed):
            self._update_slice(key)

    def _read_groups(self) -> dict[Key, SlicePrompts]:
        return collect_groups(self.points_layer, self.boxes_layer, self._array.shape)

    def _drop_replaced_boxes(self) -> None:
        """Keep one box per (plane, slice, object) in the layer: a box drawn over an older one replaces it.

        Redrawing is how a box is corrected on coronal and sagittal slices, where napari cannot
        select or move shapes (docs/napari-notes.md).
        """
        keys = box_keys(self.boxes_layer)
        newest: dict[Key, int] = {}
        for row, key in enumerate(keys):
            if key is not None:
                newest[key] = row
        stale = {row for row, key in enumerate(keys) if key is not None and newest[key] != row}
        if not stale:
            return
        self._syncing = True
        try:
            self.boxes_layer.selected_data = stale
            self.boxes_layer.remove_selected()
        finally:
            self._syncing = False
            self._sizes[id(self.boxes_layer)] = len(self.boxes_layer.data)

    def _claim_new(self, layer: Any, first: int) -> None:
        """Rows ``first:`` are new prompts: they belong to the current plane and the active object.

        Assigned here rather than through feature defaults, which napari copies from whatever
        prompt is selected.
        """
        if len(layer.data) <= first:
            return
        plane = self.current_plane()
        label = int(self.labels_layer.selected_label)
        if label > 0 and label not in self.session:
            self.session.add_object(value=label)
        features = layer.features
        features.iloc[first:, features.columns.get_loc("axis")] = UNASSIGNED if plane is None else plane[0]
        features.iloc[first:, features.columns.get_loc("label")] = label

    # ------------------------------------------------------------------ masks


def _takes_plugin_keys(layer: Any) -> bool:
    """Layers whose selection should not stop the plugin's keys: all but Labels, Points and Shapes."""
    from napari.layers import Labels, Points, Shapes

    return not isinstance(layer, Labels | Points | Shapes)
