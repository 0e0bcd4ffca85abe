"""The napari-medsam dock widget: scan, model, objects, segmentation, propagation, labels and export.

The widget composes the panels (:mod:`.model_panel`, :mod:`.objects_panel`, :mod:`.segment_panel`,
:mod:`.propagate_panel`) and its own groups (:mod:`.scan_group`: scan picker, modality and window;
:mod:`.labels_group`: the label layer and its export) around one
:class:`~.controller.SegmentationController`, which it starts when a model is loaded and a scan is
picked. Every scan has a :class:`~.scan_session.ScanSession` (its labels and prompt layers, objects,
history, propagation report and export path); picking or opening another scan closes the
controller and starts one on that scan's session, and removing a scan's image ends its session.
This module holds that life cycle, the layer pickers, the keyboard shortcuts (the plugin's
and the one-step plane views, Alt-A / Alt-C / Alt-S on the viewer while the panel is open) and
the "what to do next" line at the top of the panel, which follows the state (:meth:`next_step`).
The scan switching itself lives in :class:`~.scan_session.ScanSwitchMixin`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QScrollArea, QVBoxLayout, QWidget

from ..errors import MedSamError
from .labels_group import LabelsGroupMixin
from .layers import volume_from_layer_meta
from .model_panel import ModelPanel
from .objects_panel import ObjectsPanel
from .propagate_panel import PropagatePanel
from .concept_panel import ConceptPanel
from .everything_panel import EverythingPanel
from .finetune_panel import FinetunePanel
from .messages import MessageLabel
from .scan_session import ScanSwitchMixin
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
MIN_WIDTH = 300  # the panel's least width; more when its content needs it (see minimumSizeHint)

# The "what to do next" line, by state (see MedSamWidget.next_step).
NEXT_STEPS = {
    "no scan": "Open a CT or MR scan (File > Open).",
    "no model": "Load a model in the Model box.",
    "not segmenting": "Pick a 2D or 3D scan (Image) to segment it.",
    "ready": "Click a structure on the image, or draw a box (R).",
    "object": "Propagate to segment it through the volume, or click more to refine.",
    "propagated": "Check the report, correct a slice, then Export.",
}


class MedSamWidget(ScanSwitchMixin, ScanGroupMixin, LabelsGroupMixin, QWidget):
    """Dock widget: pick the scan, window it, make and export label layers."""

    # Make the current scan's Labels and prompt layers when it is opened or picked, not when a
    # model arrives (see _prepare_layers); False: the behaviour before (benchmarks compare both).
    PREPARE_LAYERS = True

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
        self.propagate_panel = PropagatePanel(settings=self.settings)
        self.everything_panel = EverythingPanel()  # segment everything on the shown slice (issue 13)
        self.finetune_panel = FinetunePanel(self.model_panel)  # fine-tune the decoder (issue 13)
        self.concept_panel = ConceptPanel(self.settings, self.propagate_panel)  # text prompts (issue 18)
        self.segment_panel.overwrite.setChecked(bool(self.settings.get("overwrite", False)))

        labels_box = self._build_labels_box()

        self.status = MessageLabel("")
        self.next_step_label = MessageLabel("")
        self.next_step_label.setToolTip("What to do next; the Keys button in the Segment box lists the keys")
        self.next_step_label.setContentsMargins(6, 4, 6, 4)

        content = QWidget()
        inner = QVBoxLayout(content)
        inner.setContentsMargins(4, 4, 4, 4)
        for part in (scan_box, self.model_panel, labels_box, self.objects_panel, self.segment_panel,
                     self.propagate_panel, self.status):
            inner.addWidget(part)
        inner.insertWidget(inner.indexOf(self.propagate_panel) + 1, self.concept_panel)
        inner.insertWidget(inner.indexOf(self.concept_panel) + 1, self.everything_panel)
        inner.insertWidget(inner.indexOf(self.everything_panel) + 1, self.finetune_panel)
        inner.addStretch(1)
        self.scroll = scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)  # content follows the dock's width
        scroll.setWidget(content)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        layout.addWidget(self.next_step_label)
        layout.addWidget(scroll)

        self._add_shortcuts()
        self._bind_view_keys()
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
        # Makes the current scan's Labels and prompt layers, one step per event-loop turn, once
        # the scan is opened or picked (see _prepare_layers).
        self._prepare_timer = QTimer(self)
        self._prepare_timer.setSingleShot(True)
        self._prepare_timer.setInterval(0)
        self._prepare_timer.timeout.connect(self._prepare_layers)
        self.image_combo.currentIndexChanged.connect(self._on_image_changed)
        self.labels_combo.currentIndexChanged.connect(self._on_labels_changed)
        self.model_panel.model_changed.connect(self._on_model_changed)
        self.model_panel.mapping_changed.connect(self._on_mapping_changed)
        for panel in (self.objects_panel, self.segment_panel):
            panel.error.connect(self._notify)
        self.everything_panel.error.connect(self._notify)
        self.concept_panel.error.connect(self._notify)
        self.finetune_panel.error.connect(self._notify)
        self.propagate_panel.report_changed.connect(self._on_report_changed)
        self.propagate_panel.finished.connect(self._update_next_step)
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

        from .keys import load_shortcuts, qt_key_sequence

        self.shortcuts = {}
        for key, (method, _) in load_shortcuts(self.settings)[0].items():  # the user's keys, as on the canvas
            sequence = QKeySequence(qt_key_sequence(key))
            shortcut = QShortcut(sequence, self)
            shortcut.setContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
            shortcut.activated.connect(lambda method=method: self._on_shortcut(method))
            self.shortcuts[key] = shortcut

        from .keys import VIEW_KEYS

        for key, (plane, _) in VIEW_KEYS.items():
            shortcut = QShortcut(QKeySequence(qt_key_sequence(key)), self)
            shortcut.setContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
            shortcut.activated.connect(lambda plane=plane: self.show_plane(plane))
            self.shortcuts[key] = shortcut

    def minimumSizeHint(self):  # noqa: N802 (Qt's name)
        """As wide as the content's least width plus the vertical scroll bar: never a sideways scroll bar."""
        hint = super().minimumSizeHint()
        content = self.scroll.widget()
        extra = self.scroll.verticalScrollBar().sizeHint().width() + 2 * self.scroll.frameWidth()
        hint.setWidth(max(MIN_WIDTH, content.minimumSizeHint().width() + extra))
        return hint

    # ----------------------------------------------------------------- what to do next
    def next_step(self) -> str:
        """The state the panel is in, as a key of :data:`NEXT_STEPS`."""
        if self.image_layer is None:
            return "no scan"
        if self.model_panel.model is None:
            return "no model"
        controller = self.controller
        if controller is None:
            return "not segmenting"
        if self.propagate_panel.last_result is not None:
            return "propagated"
        return "object" if self._active_has_mask() else "ready"

    def _active_has_mask(self) -> bool:
        controller = self.controller
        active = None if controller is None else controller.session.active
        if active is None:
            return False
        measures = self.objects_panel.measures
        if measures is not None:
            try:
                return measures.row(active, "").voxels > 0
            except (KeyError, IndexError):
                pass
        return bool(np.any(controller.session.labels == active))

    def _update_next_step(self, *_: object) -> None:
        self.next_step_label.setText(f"Next: {NEXT_STEPS[self.next_step()]}")

    def _on_shortcut(self, method: str) -> None:
        if self.controller is None:
            self.status.setText("Load a model and pick a scan first: the keys act on the segmentation.")
            return
        self.controller.run_shortcut(method)
        self.segment_panel._refresh()

    # ----------------------------------------------------------------- layers
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
        self._switch_to(layer, raise_layers=_index is not None)
        three_d = layer is not None and self.viewer.dims.ndim >= 3
        for button in self.plane_buttons.values():
            button.setEnabled(three_d)
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
        if self.controller is None and self.PREPARE_LAYERS:
            self._prepare_timer.start()
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

    def _on_report_changed(self, image, report) -> None:
        scan = self.sessions.get(image)
        if scan is not None:
            scan.report = report

    def _sync_controller(self, *, may_start: bool = True) -> None:
        """Keep, re-model or stop the controller to match the chosen scan, label layer and model; maybe start one."""
        if self._starting:  # layers added while starting announce themselves: nothing to decide yet
            return
        try:
            self._decide_controller(may_start)
        finally:
            self._update_next_step()

    def _decide_controller(self, may_start: bool) -> None:
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
                self.propagate_panel.update_engine_choices()  # the memory engine: only with SAM 2 models
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
        labels = self._usable_labels(image)
        if labels is None:
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
                signature=scan.signature, settings=self.settings)
        except MedSamError as error:
            self._notify(str(error))
            return None
        self.controller = scan.controller = controller
        scan.engine, scan.points, scan.boxes = controller.session, controller.points_layer, controller.boxes_layer
        scan.show_prompts(True)
        self._prompts_on_top(scan)
        image.events.contrast_limits.connect(self._on_contrast_limits)
        for panel in (self.objects_panel, self.segment_panel):
            panel.set_controller(controller)
        self.propagate_panel.set_controller(controller, scan.report)
        self.everything_panel.set_controller(controller)
        self.concept_panel.set_controller(controller)
        self.finetune_panel.set_controller(controller)
        controller.changed.connect(self._update_next_step)
        # Back to the scan's own layers: selecting the points layer lets clicks become prompts.
        self.viewer.layers.selection.active = controller.points_layer
        if not scan.started:  # prompt layers made beforehand lost napari's "add" mode when deselected
            scan.started = True
            controller.points_layer.mode = "add"
        self.status.setText(f"Segmenting {image.name!r} into {labels.name!r} with {self.model_panel.model_name}.")
        return controller

    def _usable_labels(self, image):
        """The picked label layer when the scan may be segmented into it, else None (a new one is made)."""
        labels = self.labels_layer
        # Never write into a hidden layer (e.g. a sample's ground truth): the user could not see it change.
        if (labels is None or not labels.visible or tuple(labels.data.shape) != tuple(image.data.shape)
                or not isinstance(labels.data, np.ndarray) or self._labels_owner(labels) not in (None, image)):
            return None
        return labels

    def _prompts_on_top(self, scan) -> None:
        """Draw the scan's prompt layers above its Labels layer (a point under a label colour is hard to see)."""
        layers = self.viewer.layers
        if scan.labels is None or scan.labels not in layers:
            return
        below = [i for i, layer in enumerate(layers) if layer in (scan.points, scan.boxes)
                 and i < layers.index(scan.labels)]
        if below:
            layers.move_multiple(below, layers.index(scan.labels) + 1)

    def _prepare_layers(self) -> None:
        """Make the current scan's Labels and prompt layers before any model is loaded, one per turn.

        Inserting a layer costs napari 100-150 ms on the Qt thread (its vispy visual, layer
        controls, first draw). Made when the model arrives, the three layers froze the window
        for about a second right when the user expects to click (benchmarks/bench_model_load.py);
        made here, once the scan is opened or picked (labels, then the prompt layers, a turn each), loading
        a model adds no layers. A model loaded before they are all made: ``_start`` makes the rest.
        """
        image = self.image_layer
        if (not self.PREPARE_LAYERS or self._starting or self.controller is not None or image is None
                or self.model_panel.model is not None or np.ndim(image.data) != 3 or image.rgb):
            return
        scan = self.scan
        if scan.prepared:
            return
        active = self.viewer.layers.selection.active
        if (scan.labels is None or scan.labels not in self.viewer.layers) and self._usable_labels(image) is None:
            self.add_labels_layer()
        elif scan.points is None and scan.boxes is None:  # (one of them deleted: the controller makes both)
            from .prompt_layers import add_prompt_layers

            scan.points, scan.boxes = add_prompt_layers(self.viewer, image)
            scan.prepared = True  # the last step
        else:
            scan.prepared = True
            return
        if active is not None and active in self.viewer.layers:
            self.viewer.layers.selection.active = active  # clicks go to the prompts once a model is loaded
        if not scan.prepared:
            self._prepare_timer.start()  # the next layer in the next turn

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
        controller.changed.disconnect(self._update_next_step)
        self._contrast_timer.stop()
        for panel in (self.objects_panel, self.segment_panel, self.propagate_panel):
            panel.set_controller(None)
        self.everything_panel.set_controller(None)
        self.concept_panel.set_controller(None)
        self.finetune_panel.set_controller(None)
        controller.close()
        self._update_next_step()

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        """Stop segmenting and any model download/load when the panel closes; the layers stay."""
        self.stop_segmentation()
        self.model_panel.shutdown()
        self._unbind_view_keys()
        super().closeEvent(event)

    def _notify(self, message: str) -> None:
        from napari.utils.notifications import show_warning

        self.status.setText(message)
        show_warning(message)
