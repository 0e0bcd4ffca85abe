"""The napari-medsam dock widget: scan, model, objects, segmentation, propagation, labels and export.

The widget composes the panels (:mod:`.model_panel`, :mod:`.objects_panel`, :mod:`.segment_panel`,
:mod:`.propagate_panel`) around one :class:`~.controller.SegmentationController`, which it starts
when a model is loaded and a scan is picked, and restarts when the scan changes. This module
holds the scan picker and window, the label layer on the scan's grid, and saving that layer in
the right format (DICOM-SEG for a DICOM series, NIfTI otherwise).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QScrollArea,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..errors import MedSamError
from ..windows import CT_WINDOWS, window_limits
from .layers import META_KEY, labels_layer_data, volume_from_layer_meta
from .model_panel import ModelPanel
from .objects_panel import ObjectsPanel
from .propagate_panel import PropagatePanel
from .segment_panel import SegmentPanel
from .settings import Settings
from .writer import default_output_path

if TYPE_CHECKING:
    import napari

AUTO_WINDOW = "auto (0.5-99.5 percentile)"
# The Modality combo: None follows the file (DICOM Modality) or the guess from the values.
MODALITY_CHOICES = {"auto": None, "CT": "CT", "MR": "MR"}
# In the image layer's metadata[META_KEY]: the user's override, and what the scan said before it.
MODALITY_OVERRIDE = "modality_override"
MODALITY_ORIGINAL = "modality_original"
CONTRAST_DEBOUNCE_MS = 400  # the model follows napari's contrast slider once it rests this long


class MedSamWidget(QWidget):
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

        self.image_combo = QComboBox()
        self.image_combo.setToolTip("The scan to segment (a 3D image layer)")
        self.info = QLabel()
        self.info.setWordWrap(True)
        self.info.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.window_combo = QComboBox()
        self.window_combo.addItems([*CT_WINDOWS.keys(), AUTO_WINDOW])
        self.window_combo.setToolTip("CT window (level/width in HU) for display; voxels keep their values")
        self.modality_combo = QComboBox()
        for label, value in MODALITY_CHOICES.items():
            self.modality_combo.addItem(label, value)
        self.modality_combo.setToolTip("auto: the file's DICOM Modality, else a guess from the values. CT or MR "
                                       "overrides it for this image (window presets, model input); "
                                       "the file is not read again")

        scan_box = QGroupBox("Scan")
        scan_form = QFormLayout(scan_box)
        scan_form.addRow("Image", self.image_combo)
        scan_form.addRow("Modality", self.modality_combo)
        scan_form.addRow("Window", self.window_combo)
        scan_form.addRow(self.info)

        self.model_panel = ModelPanel(self.settings)
        self.objects_panel = ObjectsPanel()
        self.segment_panel = SegmentPanel()
        self.propagate_panel = PropagatePanel()
        self.segment_panel.overwrite.setChecked(bool(self.settings.get("overwrite", False)))

        self.labels_combo = QComboBox()
        self.labels_combo.setToolTip("The label layer the masks go into (on the scan's grid)")
        self.new_labels_button = QPushButton("New label layer")
        self.new_labels_button.setToolTip("Add an empty Labels layer on the scan's grid")
        self.export_button = QPushButton("Export labels...")
        self.export_button.setToolTip("DICOM-SEG for a DICOM series, NIfTI otherwise; segments named after the objects")
        buttons = QHBoxLayout()
        buttons.addWidget(self.new_labels_button)
        buttons.addWidget(self.export_button)
        labels_box = QGroupBox("Labels")
        labels_layout = QVBoxLayout(labels_box)
        labels_layout.addWidget(self.labels_combo)
        labels_layout.addLayout(buttons)

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
        self.window_combo.activated.connect(self._window_picked)
        self.modality_combo.activated.connect(self._modality_picked)
        self.new_labels_button.clicked.connect(self._new_labels_clicked)
        self.labels_combo.currentIndexChanged.connect(self._on_labels_changed)
        self.export_button.clicked.connect(self._export_clicked)
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

    def _show_scan(self, volume, *, apply_window: bool) -> None:
        """The info label and the window preset for ``volume``'s modality (applied if asked, or if not the default)."""
        spacing = " x ".join(f"{s:.3g}" for s in volume.spacing_mm)
        shape = " x ".join(str(s) for s in volume.shape)
        by_user = " (override)" if volume.metadata.get("modality_from") == "user" else ""
        lines = [
            f"<b>{volume.modality}</b>{by_user} {volume.intensity_unit}  from {volume.source_format}",
            f"{shape} voxels (slice x row x column)",
            f"{spacing} mm",
        ]
        if volume.is_oblique():
            lines.append("oblique acquisition: shown with its exact rotation")
        self.info.setText("<br>".join(lines))
        is_ct = volume.modality == "CT"
        self.window_combo.blockSignals(True)
        preferred = self.settings.get("window", "soft tissue")
        self.window_combo.setCurrentText((preferred if preferred in CT_WINDOWS else "soft tissue") if is_ct
                                         else AUTO_WINDOW)
        self.window_combo.blockSignals(False)
        if apply_window or (is_ct and self.window_combo.currentText() != "soft tissue"):
            self.apply_window(self.window_combo.currentText())

    # ----------------------------------------------------------------- modality
    def _show_modality_override(self, layer) -> None:
        entry = layer.metadata.get(META_KEY) or {}
        index = self.modality_combo.findData(entry.get(MODALITY_OVERRIDE))
        self.modality_combo.blockSignals(True)
        self.modality_combo.setCurrentIndex(max(index, 0))
        self.modality_combo.blockSignals(False)

    def _modality_picked(self, _index: int | None = None) -> None:
        self.set_modality(self.modality_combo.currentData())

    def set_modality(self, modality: str | None) -> None:
        """Override the chosen image's modality ("CT", "MR"; None: back to the file's or the guess).

        Changes the Volume in the layer's metadata as ``load_volume(modality=...)`` would (CT means
        values in HU), remembers the choice in the layer's metadata, shows it, and picks the
        window for it (a CT preset, or the percentile window otherwise); the model's input follows
        the window when it is "current contrast limits". The file is not read again.
        """
        layer, volume = self.image_layer, self.volume
        if layer is None or volume is None:
            return
        entry = layer.metadata.setdefault(META_KEY, {})
        original = entry.setdefault(MODALITY_ORIGINAL, {
            "modality": volume.modality, "intensity_unit": volume.intensity_unit,
            "modality_from": volume.metadata.get("modality_from"),
        })
        if modality is None:
            volume.modality, volume.intensity_unit = original["modality"], original["intensity_unit"]
            if original["modality_from"] is None:
                volume.metadata.pop("modality_from", None)
            else:
                volume.metadata["modality_from"] = original["modality_from"]
            entry.pop(MODALITY_OVERRIDE, None)
        else:
            from ..io import override_modality

            override_modality(volume, modality)
            entry[MODALITY_OVERRIDE] = volume.modality
        self._show_modality_override(layer)
        self._show_scan(volume, apply_window=True)

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

    # ----------------------------------------------------------------- window
    def _window_picked(self, _index: int) -> None:
        name = self.window_combo.currentText()
        if name in CT_WINDOWS:
            self.settings.set("window", name)
        self.apply_window(name)

    def apply_window(self, name: str) -> None:
        """Set the image layer's contrast limits to a CT window or to robust percentiles."""
        layer = self.image_layer
        if layer is None:
            return
        if name == AUTO_WINDOW:
            data = np.asarray(layer.data)
            sample = data.reshape(-1)[:: max(1, data.size // 500_000)].astype(np.float32)
            low, high = np.percentile(sample[sample != 0] if np.any(sample != 0) else sample, [0.5, 99.5])
            limits = (float(low), float(max(high, low + 1)))
        else:
            limits = window_limits(name)
        layer.contrast_limits_range = (
            min(layer.contrast_limits_range[0], limits[0]),
            max(layer.contrast_limits_range[1], limits[1]),
        )
        layer.contrast_limits = limits
        self.status.setText(f"Window: {name} ({limits[0]:g} to {limits[1]:g})")
        if self.controller is not None and layer is self.controller.image_layer:
            self._on_mapping_changed()  # "current contrast limits" follows the window

    # ----------------------------------------------------------------- labels
    def add_labels_layer(self, name: str | None = None):
        """Add an empty Labels layer on the selected scan's grid; return it."""
        layer = self.image_layer
        volume = self.volume
        if layer is None:
            self._notify("Open a scan first.")
            return None
        base = name or f"{layer.name} labels"
        if volume is not None:
            data, kwargs, _ = labels_layer_data(np.zeros(volume.shape, np.uint16), volume, base)
            new = self.viewer.add_labels(data, **kwargs)
        else:
            new = self.viewer.add_labels(
                np.zeros(layer.data.shape, np.uint16), name=base, scale=layer.scale,
                translate=layer.translate, affine=layer.affine.affine_matrix,
            )
        self.labels_combo.setCurrentText(new.name)
        return new

    def _new_labels_clicked(self) -> None:
        self.stop_segmentation()
        self.add_labels_layer()
        self._sync_controller()

    def _export_clicked(self) -> None:
        layer = self.labels_layer
        if layer is None:
            self._notify("Choose or create a label layer first.")
            return
        volume = volume_from_layer_meta(layer.metadata) or self.volume
        suggested = default_output_path(volume, layer.name)
        filters = "DICOM-SEG (*.dcm);;NIfTI (*.nii.gz *.nii);;NRRD (*.nrrd);;MetaImage (*.mha)"
        if suggested.suffix != ".dcm":
            filters = "NIfTI (*.nii.gz *.nii);;NRRD (*.nrrd);;MetaImage (*.mha)"
        path, _ = QFileDialog.getSaveFileName(self, "Export labels", str(suggested), filters)
        if path:
            self.export_labels(path)

    def export_labels(self, path: str | Path):
        """Save the selected label layer in a background thread; return the napari worker."""
        from .workers import start_worker
        from .writer import _segments, source_volume_for

        layer = self.labels_layer
        if layer is None:
            self._notify("Choose or create a label layer first.")
            return None
        labels = np.asarray(layer.data).copy()  # the user may keep painting while we write
        attributes = {"metadata": layer.metadata, "scale": tuple(layer.scale), "translate": tuple(layer.translate),
                      "affine": layer.affine.affine_matrix}
        if volume_from_layer_meta(layer.metadata) is None and self.volume is not None:
            attributes["metadata"] = {**layer.metadata, META_KEY: {"volume": self.volume}}

        def save() -> tuple[Path, list[str]]:
            from ..io import save_labels_named

            like = source_volume_for(labels, attributes)
            written, _, messages = save_labels_named(labels, like, path, _segments(labels, attributes))
            return written, messages

        self.status.setText(f"Saving {Path(path).name}...")
        self.export_button.setEnabled(False)
        worker = start_worker(save, on_done=lambda result: self._saved(*result),
                              on_error=lambda exc: self._notify(f"Export failed: {exc}. Nothing was written; "
                                                                "your labels are unchanged in napari."),
                              on_finished=lambda: self.export_button.setEnabled(True))
        self._worker = worker
        return worker

    def _saved(self, path: Path, warnings: list[str] = ()) -> None:
        from napari.utils.notifications import show_info

        from .writer import notify_warnings

        self.last_saved = Path(path)
        self.status.setText(f"Saved {Path(path).name}" + (f" ({len(warnings)} warning(s))" if warnings else ""))
        show_info(f"Saved {path}")
        notify_warnings(list(warnings))  # e.g. new UIDs a DICOM-SEG had to be given

    def _notify(self, message: str) -> None:
        from napari.utils.notifications import show_warning

        self.status.setText(message)
        show_warning(message)
