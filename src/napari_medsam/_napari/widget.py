"""The napari-medsam dock widget: scan, model, objects, segmentation, propagation, labels and export.

The widget composes the panels (:mod:`.model_panel`, :mod:`.objects_panel`, :mod:`.segment_panel`,
:mod:`.propagate_panel`) and its own groups (:mod:`.scan_group`: scan picker, modality and window;
:mod:`.labels_group`: the label layer and its export) around one
:class:`~.controller.SegmentationController`, which it starts when a model is loaded and a scan is
picked. Every scan has a :class:`~.scan_session.ScanSession` (its labels and prompt layers, objects,
history, propagation report and export path); picking or opening another scan closes the
controller and starts one on that scan's session, and removing a scan's image ends its session.
This module holds that life cycle, the layer pickers and the keyboard shortcuts.
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
from .scan_session import ScanSession
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
        # napari hands plugin widgets its viewer behind a PublicOnlyProxy, which wraps every layer it
        # returns in a new proxy: layers would never be identical to themselves (the scans' sessions,
        # the controller's "is this my layer" checks). The panel uses public API only, on the viewer itself.
        while hasattr(napari_viewer, "__wrapped__"):
            napari_viewer = napari_viewer.__wrapped__
        self.viewer = napari_viewer
        self.settings = settings if settings is not None else Settings()
        self._worker = None
        self.controller = None
        self.sessions: dict = {}  # image layer -> ScanSession: each scan's labels, prompts, objects, history, report
        self._current = None  # the image layer whose session is on show
        self._starting = False
        self._updating = False  # the panel is adding, removing or moving layers itself
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
        self._doomed: list = []  # prompt layers of ended scans, removed by _after_removal
        self._removal_timer = QTimer(self)
        self._removal_timer.setSingleShot(True)
        self._removal_timer.setInterval(0)
        self._removal_timer.timeout.connect(self._after_removal)
        self.image_combo.currentIndexChanged.connect(self._on_image_changed)
        self.labels_combo.currentIndexChanged.connect(self._on_labels_changed)
        self.model_panel.model_changed.connect(self._on_model_changed)
        self.model_panel.mapping_changed.connect(self._on_mapping_changed)
        for panel in (self.objects_panel, self.segment_panel):
            panel.error.connect(self._notify)
        self.propagate_panel.report_changed.connect(self._on_report_changed)
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
        from napari.layers import Image

        if self._updating:  # the panel itself adds, removes or moves layers: it refreshes once at the end
            return
        kind, value = getattr(event, "type", None), getattr(event, "value", None)
        if kind == "removed" and value is not None:
            self._layer_removed(value)
        for layer in self.viewer.layers:
            # Renames must show up in the pickers; connecting twice is harmless (same slot).
            layer.events.name.connect(self._refresh_layers)
        # A scan being opened becomes the current one.
        added_image = kind == "inserted" and isinstance(value, Image) and value.ndim >= 2
        self._fill(self.image_combo, self._image_layers(), prefer=value if added_image else None)
        self._fill_labels()
        # Only a scan being added (or picked by the user) starts segmentation; layers being
        # removed, renamed or reordered (e.g. napari closing) never do at once. Once the removals
        # are over, a scan whose session kept all its layers resumes (see _after_removal).
        self._on_image_changed(may_start=added_image)
        if kind == "removed":
            self._removal_timer.start()

    def _image_layers(self) -> list:
        from napari.layers import Image

        return [layer for layer in self.viewer.layers if isinstance(layer, Image) and layer.ndim >= 2]

    def _after_removal(self) -> None:
        """After layers were removed (in the next event loop turn, not inside napari's removal).

        Removes the prompt layers of the scans that ended, and resumes the current scan when its
        session still has all its layers (the scan shown after the current one was closed).
        """
        doomed, self._doomed = self._doomed, []
        self._updating = True
        try:
            for layer in doomed:
                if layer in self.viewer.layers:
                    self.viewer.layers.remove(layer)
        finally:
            self._updating = False
        if doomed:
            self._refresh_layers()
        scan = self.scan
        if self.controller is None and scan is not None and self._complete(scan):
            self._sync_controller(may_start=True)

    def _complete(self, scan: ScanSession) -> bool:
        """True when the scan's labels and prompt layers are all still in the viewer."""
        return all(layer is not None and layer in self.viewer.layers for layer in (scan.labels, scan.points, scan.boxes))

    @staticmethod
    def _fill(combo: QComboBox, layers: list, prefer=None) -> None:
        current = combo.currentText()
        names = [layer.name for layer in layers]
        combo.blockSignals(True)
        combo.clear()
        combo.addItems(names)
        if prefer is not None and prefer.name in names:
            combo.setCurrentText(prefer.name)
        elif current in names:
            combo.setCurrentText(current)
        combo.blockSignals(False)

    def _fill_labels(self) -> None:
        """The Labels picker offers the current scan's label layers only, its own first and chosen."""
        image = self.image_layer
        labels = self.labels_for(image)
        scan = self.sessions.get(image) if image is not None else None
        own = scan.labels if scan is not None and scan.labels in labels else None
        names = [layer.name for layer in labels]
        current = self.labels_combo.currentText()
        self.labels_combo.blockSignals(True)
        self.labels_combo.clear()
        self.labels_combo.addItems(names)
        if own is not None:
            self.labels_combo.setCurrentText(own.name)
        elif current in names and self.viewer.layers[current].visible:
            self.labels_combo.setCurrentText(current)
        else:  # never a hidden layer (e.g. a sample's ground truth) when a visible one fits
            visible = [layer for layer in labels if layer.visible]
            if visible:
                self.labels_combo.setCurrentText(visible[0].name)
        self.labels_combo.blockSignals(False)

    def labels_for(self, image) -> list:
        """The label layers that may hold ``image``'s segmentation: on its grid, and not another scan's.

        A label layer belongs to another scan when that scan's session made or adopted it, or when
        it carries the other scan's Volume (e.g. a sample's ground truth). With no scan chosen,
        every label layer is offered (export of a hand-made layer).
        """
        from napari.layers import Labels

        layers = [layer for layer in self.viewer.layers if isinstance(layer, Labels)]
        if image is None:
            return layers
        shape = tuple(np.shape(image.data))
        return [layer for layer in layers
                if tuple(np.shape(layer.data)) == shape and self._labels_owner(layer) in (None, image)]

    def _labels_owner(self, labels):
        """The image layer a label layer belongs to, or None when it is not linked to an open scan."""
        for image, scan in self.sessions.items():
            if scan.labels is labels:
                return image
        volume = volume_from_layer_meta(labels.metadata)
        if volume is not None:
            for image in self._image_layers():
                if volume_from_layer_meta(image.metadata) is volume:
                    return image
        return None

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

    @property
    def scan(self) -> ScanSession | None:
        """The current scan's session (made when the scan is first chosen), or None without a scan."""
        layer = self.image_layer
        if layer is None:
            return None
        scan = self.sessions.get(layer)
        if scan is None:
            scan = self.sessions[layer] = ScanSession(layer)
        return scan

    def _on_image_changed(self, _index: int | None = None, *, may_start: bool = True) -> None:
        volume = self.volume
        layer = self.image_layer
        self._switch_to(layer, raise_layers=_index is not None)
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

    def _switch_to(self, image, raise_layers: bool = False) -> None:
        """Make ``image`` the current scan: the other scan's controller stops, its prompt layers hide.

        The previous scan keeps its labels, objects, history and report in its session; the new
        one's prompt layers show again, its own layers are drawn on top of the other scans' (when
        the user picked it: ``raise_layers``), and the Labels picker offers its label layers only.
        """
        previous = self._current
        if previous is image:
            return
        self._current = image
        if self.controller is not None and self.controller.image_layer is not image:
            self.stop_segmentation()
        old = self.sessions.get(previous) if previous is not None else None
        if old is not None:
            old.show_prompts(False)
        self.propagate_panel.show_report(None)
        self._fill_labels()
        if image is None:
            return
        scan = self.scan
        scan.show_prompts(True)
        if raise_layers and previous is not None and previous in self.viewer.layers:
            self._raise(scan)

    def _raise(self, scan: ScanSession) -> None:
        """Draw the scan's image, labels and prompt layers above the other layers (order kept among them)."""
        layers = self.viewer.layers
        own = [i for i, layer in enumerate(layers) if scan.owns(layer)]
        top = list(range(len(layers) - len(own), len(layers)))
        if own == top:
            return
        self._updating = True
        try:
            layers.move_multiple(own, len(layers))
        finally:
            self._updating = False

    def _layer_removed(self, layer) -> None:
        """A layer went away: a scan's image ends its session; its labels or a prompt layer stop its controller."""
        scan = self.sessions.pop(layer, None)
        if scan is not None:
            self._end_session(scan)
            return
        for scan in self.sessions.values():
            if not scan.owns(layer):
                continue
            if scan.controller is self.controller:
                self.stop_segmentation()
            elif scan.controller is not None:
                scan.controller.close()
                scan.controller = None
            if layer is scan.labels:
                scan.forget_labels()
                scan.report = None
            elif layer is scan.points:
                scan.points = None
            elif layer is scan.boxes:
                scan.boxes = None

    def _end_session(self, scan: ScanSession) -> None:
        """The scan's image was removed: stop its controller and remove its prompt layers (its labels stay)."""
        if scan.controller is not None:
            if scan.controller is self.controller:
                self.stop_segmentation()
            else:
                scan.controller.close()
                scan.controller = None
        if self._current is scan.image:
            self._current = None
            self.propagate_panel.show_report(None)
        # Removed once napari has finished removing the image (not inside its removal event).
        self._doomed += [layer for layer in (scan.points, scan.boxes) if layer is not None]
        scan.points = scan.boxes = scan.engine = None
        self._removal_timer.start()

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

    def _on_report_changed(self, image, report) -> None:
        scan = self.sessions.get(image)
        if scan is not None:
            scan.report = report

    def _sync_controller(self, *, may_start: bool = True) -> None:
        """Keep, re-model or stop the controller to match the chosen scan, label layer and model; maybe start one."""
        if self._starting:  # layers added while starting announce themselves: nothing to decide yet
            return
        image, model = self.image_layer, self.model_panel.model
        controller = self.controller
        scan = self.sessions.get(image) if image is not None else None
        if controller is not None and (controller.image_layer is not image or model is None
                                       or scan is None or controller.labels_layer is not scan.labels
                                       or any(layer not in self.viewer.layers for layer in (
                                           controller.image_layer, controller.labels_layer,
                                           controller.points_layer, controller.boxes_layer))):
            self.stop_segmentation()
            controller = None
        if controller is not None:
            if controller.model is not model:
                controller.set_model(model)
            return
        if image is not None and model is not None and may_start:
            self.start_segmentation()

    def start_segmentation(self):
        """Segment the chosen scan with the loaded model into its label layer (made once per scan)."""
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
            self._fill_labels()

    def _start(self, image, model):
        from .controller import SegmentationController

        scan = self.scan
        labels = self.labels_layer
        # Never write into a hidden layer (e.g. a sample's ground truth): the user could not see it change.
        if labels is not None and not labels.visible:
            labels = None
        if (labels is None or tuple(labels.data.shape) != tuple(image.data.shape)
                or not isinstance(labels.data, np.ndarray) or self._labels_owner(labels) not in (None, image)):
            labels = self.add_labels_layer()
        if labels is not scan.labels:
            scan.labels, scan.engine, scan.report = labels, None, None
        engine = scan.engine
        if engine is not None and not np.may_share_memory(engine.labels, labels.data):
            engine = None  # the layer's data were replaced: its objects are adopted afresh
        prompts = (scan.points, scan.boxes) if scan.points is not None and scan.boxes is not None else None
        if self.cache is None:
            from ..segment.cache import DiskCache, EmbeddingCache, MemoryCache

            self.cache = EmbeddingCache(MemoryCache(), DiskCache())
        try:
            controller = SegmentationController(
                self.viewer, image, labels, model, mapping=self.model_panel.mapping_for(image), cache=self.cache,
                overwrite=self.segment_panel.overwrite.isChecked(), session=engine, prompt_layers=prompts,
                signature=scan.signature)
        except MedSamError as error:
            self._notify(str(error))
            return None
        self.controller = scan.controller = controller
        scan.engine, scan.points, scan.boxes = controller.session, controller.points_layer, controller.boxes_layer
        scan.show_prompts(True)
        image.events.contrast_limits.connect(self._on_contrast_limits)
        for panel in (self.objects_panel, self.segment_panel):
            panel.set_controller(controller)
        self.propagate_panel.set_controller(controller, scan.report)
        # Back to the scan's own layers: selecting the points layer lets clicks become prompts.
        self.viewer.layers.selection.active = controller.points_layer
        self.status.setText(f"Segmenting {image.name!r} into {labels.name!r} with {self.model_panel.model_name}.")
        return controller

    def stop_segmentation(self) -> None:
        """Disconnect the controller (every layer stays as it is; the scan's session keeps its objects and history)."""
        if self.controller is None:
            return
        controller, self.controller = self.controller, None
        scan = self.sessions.get(controller.image_layer)
        if scan is not None and scan.controller is controller:
            scan.controller = None
            scan.signature = controller._signature or scan.signature
            if self.propagate_panel.controller is controller:
                scan.report = self.propagate_panel.report_state()
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
