"""The napari-medsam dock widget: scan, model, objects, segmentation, propagation, labels and export.

The widget composes the panels (:mod:`.model_panel`, :mod:`.objects_panel`, :mod:`.segment_panel`,
:mod:`.propagate_panel`) and its own groups (:mod:`.scan_group`: scan picker, modality and window;
:mod:`.labels_group`: the label layer and its export) around one
:class:`~.controller.SegmentationController`, which it starts when a model is loaded and a scan is
picked, and restarts when the scan changes. This module holds that life cycle, the layer pickers
and the keyboard shortcuts.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox, QLabel, QScrollArea, QVBoxLayout, QWidget

from ..errors import MedSamError
from .labels_group import LabelsGroupMixin
from .layers import volume_from_layer_meta
from .model_panel import ModelPanel
from .objects_panel import ObjectsPanel
from .propagate_panel import PropagatePanel
from .scan_group import (
    AUTO_WINDOW,
    MODALITY_CHOICES,
    MODALITY_ORIGINAL,
    MODALITY_OVERRIDE,
    ScanGroupMixin,
)
from .segment_panel import SegmentPanel
from .settings import Settings

if TYPE_CHECKING:
    import napari

# The Scan group's names are re-exported: callers and tests import them from here.
__all__ = ["MedSamWidget", "AUTO_WINDOW", "MODALITY_CHOICES", "MODALITY_ORIGINAL", "MODALITY_OVERRIDE"]

CONTRAST_DEBOUNCE_MS = 400  # the model follows napari's contrast slider once it rests this long


class MedSamWidget(ScanGroupMixin, LabelsGroupMixin, QWidget):
    """Dock widget: pick the scan, window it, make and export label layers."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer", settings: Settings | None = None) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.settings = settings if settings is not None else Settings()
        self._worker = None
        self.controller = None
        self._starting = False
        self.cache = None
        self.last_saved: Path | None = None

        scan_box = self._build_scan_box()

        self.model_panel = ModelPanel(self.settings)
        self.objects_panel = ObjectsPanel()
        self.segment_panel = SegmentPanel()
        self.propagate_panel = PropagatePanel()
        self.segment_panel.overwrite.setChecked(bool(self.settings.get("overwrite", False)))

        labels_box = self._build_labels_box()

        self.status = QLabel("")
        self.status.setWordWrap(True)

        content = QWidget()
        inner = QVBoxLayout(content)
        for part in (scan_box, self.model_panel, labels_box, self.objects_panel, self.segment_panel,
                     self.propagate_panel, self.status):
            inner.addWidget(part)
        inner.addStretch(1)
        self.scroll = scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)  # content follows the dock's width
        scroll.setWidget(content)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(scroll)
        self.setMinimumWidth(360)

        self._add_shortcuts()
        from qtpy.QtCore import QTimer

        self._contrast_timer = QTimer(self)
        self._contrast_timer.setSingleShot(True)
        self._contrast_timer.setInterval(CONTRAST_DEBOUNCE_MS)
        self._contrast_timer.timeout.connect(self._on_mapping_changed)
        self.image_combo.currentIndexChanged.connect(self._on_image_changed)
        self.labels_combo.currentIndexChanged.connect(self._on_labels_changed)
        self.model_panel.model_changed.connect(self._on_model_changed)
        self.model_panel.mapping_changed.connect(self._on_mapping_changed)
        for panel in (self.objects_panel, self.segment_panel):
            panel.error.connect(self._notify)
        self.segment_panel.overwrite.toggled.connect(lambda on: self.settings.set("overwrite", bool(on)))
        self.viewer.dims.events.order.connect(self._orient_camera)
        events = self.viewer.layers.events
        events.inserted.connect(self._refresh_layers)
        events.removed.connect(self._refresh_layers)
        events.reordered.connect(self._refresh_layers)
        self._refresh_layers()

    def _add_shortcuts(self) -> None:
        """The plugin's keys while the focus is in this panel (e.g. on the Objects table).

        Qt shortcuts rather than key handlers: Qt offers a key to the focused widget first as a
        ShortcutOverride, so a text field being edited (an object's name, a spin box) keeps its
        letters and its own Ctrl+Z, while lists, tables, buttons and combo boxes let them through.
        """
        from qtpy.QtGui import QKeySequence
        from qtpy.QtWidgets import QShortcut

        from .keys import SHORTCUTS, qt_key_sequence

        self.shortcuts = {}
        for key, (method, _) in SHORTCUTS.items():
            sequence = QKeySequence(qt_key_sequence(key))
            shortcut = QShortcut(sequence, self)
            shortcut.setContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
            shortcut.activated.connect(lambda method=method: self._on_shortcut(method))
            self.shortcuts[key] = shortcut

    def _on_shortcut(self, method: str) -> None:
        if self.controller is None:
            self.status.setText("Load a model and pick a scan first: the keys act on the segmentation.")
            return
        self.controller.run_shortcut(method)
        self.segment_panel._refresh()

    # ----------------------------------------------------------------- layers
    def _refresh_layers(self, event=None) -> None:
        from napari.layers import Image, Labels

        for layer in self.viewer.layers:
            # Renames must show up in the pickers; connecting twice is harmless (same slot).
            layer.events.name.connect(self._refresh_layers)
        self._fill(self.image_combo, [l for l in self.viewer.layers if isinstance(l, Image) and l.ndim >= 2])
        self._fill(self.labels_combo, [l for l in self.viewer.layers if isinstance(l, Labels)])
        # Only a scan being added (or picked by the user) starts segmentation; layers being
        # removed, renamed or reordered (e.g. napari closing) never do.
        added_image = getattr(event, "type", None) == "inserted" and isinstance(getattr(event, "value", None), Image)
        self._on_image_changed(may_start=added_image)

    @staticmethod
    def _fill(combo: QComboBox, layers: list) -> None:
        current = combo.currentText()
        combo.blockSignals(True)
        combo.clear()
        combo.addItems([layer.name for layer in layers])
        if current in [layer.name for layer in layers]:
            combo.setCurrentText(current)
        combo.blockSignals(False)

    @property
    def image_layer(self):
        """The selected image layer, or None."""
        name = self.image_combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    @property
    def labels_layer(self):
        """The selected label layer, or None."""
        name = self.labels_combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    @property
    def volume(self):
        """The Volume behind the selected image (None for layers this plugin did not open)."""
        layer = self.image_layer
        return volume_from_layer_meta(layer.metadata) if layer is not None else None

    def _on_image_changed(self, _index: int | None = None, *, may_start: bool = True) -> None:
        volume = self.volume
        layer = self.image_layer
        if layer is None:
            self.info.setText("Open a CT or MR scan (File > Open, or File > Open Sample > napari-medsam).")
            self.window_combo.setEnabled(False)
            self.modality_combo.setEnabled(False)
            self._sync_controller(may_start=False)
            return
        self.window_combo.setEnabled(True)
        self.modality_combo.setEnabled(volume is not None)
        self._show_modality_override(layer)
        self._sync_controller(may_start=may_start)
        if volume is None:
            self.info.setText(f"{layer.name}: shape {tuple(layer.data.shape)} (no scan geometry; opened without napari-medsam)")
            return
        self._show_scan(volume, apply_window=False)

    # ----------------------------------------------------------------- segmentation
    def _on_model_changed(self, model) -> None:
        self._sync_controller()

    def _on_mapping_changed(self) -> None:
        controller = self.controller
        if controller is not None:
            mapping = self.model_panel.mapping_for(controller.image_layer)
            if mapping != controller.mapping:  # an unchanged mapping keeps the embeddings on screen
                controller.set_mapping(mapping)

    def _on_contrast_limits(self, event=None) -> None:
        """napari's contrast slider moved: with "current contrast limits", the model follows it.

        Debounced: a drag of the slider sends many events; the mapping changes once it rests, and
        the shown slice is embedded again in the background (each mapping's embeddings are
        cached apart, so going back to earlier limits costs nothing).
        """
        from .model_choices import MAPPING_LIMITS

        if self.controller is not None and self.model_panel.mapping_combo.choice == MAPPING_LIMITS:
            self._contrast_timer.start()

    def _on_labels_changed(self, _index: int | None = None) -> None:
        labels = self.labels_layer
        if self.controller is not None and labels is not None and labels is not self.controller.labels_layer:
            self.stop_segmentation()
        self._sync_controller()

    def _sync_controller(self, *, may_start: bool = True) -> None:
        """Keep, re-model or stop the controller to match the chosen scan, label layer and model; maybe start one."""
        if self._starting:  # layers added while starting announce themselves: nothing to decide yet
            return
        image, model = self.image_layer, self.model_panel.model
        controller = self.controller
        if controller is not None and (controller.image_layer is not image or model is None
                                       or controller.image_layer not in self.viewer.layers
                                       or controller.labels_layer not in self.viewer.layers):
            self.stop_segmentation()
            controller = None
        if controller is not None:
            if controller.model is not model:
                controller.set_model(model)
            return
        if image is not None and model is not None and may_start:
            self.start_segmentation()

    def start_segmentation(self):
        """Segment the chosen scan with the loaded model into the chosen label layer (a new one if it does not fit)."""
        image, model = self.image_layer, self.model_panel.model
        if image is None or model is None:
            self._notify("Pick a scan and load a model first.")
            return None
        if np.ndim(image.data) not in (2, 3) or image.rgb:
            self._notify(f"{image.name!r} is not a 2D or 3D scalar image (shape {tuple(np.shape(image.data))}"
                         f"{', RGB' if image.rgb else ''}); pick a CT or MR volume.")
            return None
        self._starting = True
        try:
            return self._start(image, model)
        finally:
            self._starting = False

    def _start(self, image, model):
        from .controller import SegmentationController

        labels = self.labels_layer
        # Never write into a hidden layer (e.g. a sample's ground truth): the user could not see it change.
        if labels is not None and not labels.visible:
            labels = None
        if labels is None or tuple(labels.data.shape) != tuple(image.data.shape) or not isinstance(labels.data, np.ndarray):
            labels = self.add_labels_layer()
        if self.cache is None:
            from ..segment.cache import DiskCache, EmbeddingCache, MemoryCache

            self.cache = EmbeddingCache(MemoryCache(), DiskCache())
        try:
            controller = SegmentationController(
                self.viewer, image, labels, model, mapping=self.model_panel.mapping_for(image), cache=self.cache,
                overwrite=self.segment_panel.overwrite.isChecked())
        except MedSamError as error:
            self._notify(str(error))
            return None
        self.controller = controller
        image.events.contrast_limits.connect(self._on_contrast_limits)
        for panel in (self.objects_panel, self.segment_panel, self.propagate_panel):
            panel.set_controller(controller)
        # Back to the scan's own layers: selecting the points layer lets clicks become prompts.
        self.viewer.layers.selection.active = controller.points_layer
        self.status.setText(f"Segmenting {image.name!r} into {labels.name!r} with {self.model_panel.model_name}.")
        return controller

    def stop_segmentation(self) -> None:
        """Disconnect the controller (every layer stays as it is)."""
        if self.controller is None:
            return
        controller, self.controller = self.controller, None
        controller.image_layer.events.contrast_limits.disconnect(self._on_contrast_limits)
        self._contrast_timer.stop()
        for panel in (self.objects_panel, self.segment_panel, self.propagate_panel):
            panel.set_controller(None)
        controller.close()

    def _orient_camera(self, event=None) -> None:
        """Coronal and sagittal views with the head up, as radiologists read them.

        The readers order slices from feet to head, so when the slice axis is drawn vertically
        (after napari's roll/transpose) the camera's vertical axis must point up.
        """
        if self.volume is None or self.viewer.dims.ndisplay != 2:
            return
        offset = self.viewer.dims.ndim - 3
        vertical = self.viewer.dims.displayed[0] - offset
        camera = self.viewer.camera
        want = ("up" if vertical == 0 else "down", camera.orientation2d[1])
        if tuple(str(getattr(o, "value", o)) for o in camera.orientation2d) != want:
            camera.orientation2d = want

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        """Stop segmenting and any model download/load when the panel closes; the layers stay."""
        self.stop_segmentation()
        self.model_panel.shutdown()
        super().closeEvent(event)

    def _notify(self, message: str) -> None:
        from napari.utils.notifications import show_warning

        self.status.setText(message)
        show_warning(message)
