"""The napari-medsam dock widget: scan, window, label layers and export.

This panel is the home of the segmentation workflow; this module holds the parts every
workflow needs: which scan, how it is windowed, its geometry, a label layer on its grid and
saving that layer in the right format (DICOM-SEG for a DICOM series, NIfTI otherwise).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..windows import CT_WINDOWS, window_limits
from .layers import META_KEY, labels_layer_data, volume_from_layer_meta
from .writer import default_output_path

if TYPE_CHECKING:
    import napari

AUTO_WINDOW = "auto (0.5-99.5 percentile)"


class MedSamWidget(QWidget):
    """Dock widget: pick the scan, window it, make and export label layers."""

    def __init__(self, napari_viewer: "napari.viewer.Viewer") -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._worker = None
        self.last_saved: Path | None = None

        self.image_combo = QComboBox()
        self.image_combo.setToolTip("The scan to segment (a 3D image layer)")
        self.info = QLabel()
        self.info.setWordWrap(True)
        self.info.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.window_combo = QComboBox()
        self.window_combo.addItems([*CT_WINDOWS.keys(), AUTO_WINDOW])
        self.window_combo.setToolTip("CT window (level/width in HU); voxels keep their values")

        scan_box = QGroupBox("Scan")
        scan_form = QFormLayout(scan_box)
        scan_form.addRow("Image", self.image_combo)
        scan_form.addRow("Window", self.window_combo)
        scan_form.addRow(self.info)

        self.labels_combo = QComboBox()
        self.labels_combo.setToolTip("Label layer to save (must lie on the scan's grid)")
        self.new_labels_button = QPushButton("New label layer")
        self.new_labels_button.setToolTip("Add an empty Labels layer on the scan's grid")
        self.export_button = QPushButton("Export labels...")
        self.export_button.setToolTip("DICOM-SEG for a DICOM series, NIfTI otherwise")
        buttons = QHBoxLayout()
        buttons.addWidget(self.new_labels_button)
        buttons.addWidget(self.export_button)
        labels_box = QGroupBox("Labels")
        labels_layout = QVBoxLayout(labels_box)
        labels_layout.addWidget(self.labels_combo)
        labels_layout.addLayout(buttons)

        self.status = QLabel("")
        self.status.setWordWrap(True)

        layout = QVBoxLayout(self)
        layout.addWidget(scan_box)
        layout.addWidget(labels_box)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.image_combo.currentIndexChanged.connect(self._on_image_changed)
        self.window_combo.activated.connect(lambda _i: self.apply_window(self.window_combo.currentText()))
        self.new_labels_button.clicked.connect(self.add_labels_layer)
        self.export_button.clicked.connect(self._export_clicked)
        events = self.viewer.layers.events
        events.inserted.connect(self._refresh_layers)
        events.removed.connect(self._refresh_layers)
        events.reordered.connect(self._refresh_layers)
        self._refresh_layers()

    # ----------------------------------------------------------------- layers
    def _refresh_layers(self, event=None) -> None:
        from napari.layers import Image, Labels

        for layer in self.viewer.layers:
            # Renames must show up in the pickers; connecting twice is harmless (same slot).
            layer.events.name.connect(self._refresh_layers)
        self._fill(self.image_combo, [l for l in self.viewer.layers if isinstance(l, Image) and l.ndim >= 2])
        self._fill(self.labels_combo, [l for l in self.viewer.layers if isinstance(l, Labels)])
        self._on_image_changed()

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

    def _on_image_changed(self, _index: int | None = None) -> None:
        volume = self.volume
        layer = self.image_layer
        if layer is None:
            self.info.setText("Open a CT or MR scan (File > Open, or File > Open Sample > napari-medsam).")
            self.window_combo.setEnabled(False)
            return
        self.window_combo.setEnabled(True)
        if volume is None:
            self.info.setText(f"{layer.name}: shape {tuple(layer.data.shape)} (no scan geometry; opened without napari-medsam)")
            return
        spacing = " x ".join(f"{s:.3g}" for s in volume.spacing_mm)
        shape = " x ".join(str(s) for s in volume.shape)
        lines = [
            f"<b>{volume.modality}</b> {volume.intensity_unit}  from {volume.source_format}",
            f"{shape} voxels (slice x row x column)",
            f"{spacing} mm",
        ]
        if volume.is_oblique():
            lines.append("oblique acquisition: shown with its exact rotation")
        self.info.setText("<br>".join(lines))
        is_ct = volume.modality == "CT"
        self.window_combo.blockSignals(True)
        self.window_combo.setCurrentText("soft tissue" if is_ct else AUTO_WINDOW)
        self.window_combo.blockSignals(False)

    # ----------------------------------------------------------------- window
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
        from napari.qt.threading import create_worker

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

        def save() -> Path:
            from ..io import save_labels

            like = source_volume_for(labels, attributes)
            return save_labels(labels, like, path, segments=_segments(labels, attributes))

        worker = create_worker(save)
        worker.returned.connect(self._saved)
        worker.errored.connect(lambda exc: self._notify(f"Export failed: {exc}"))
        self.status.setText(f"Saving {Path(path).name}...")
        self.export_button.setEnabled(False)
        worker.finished.connect(lambda: self.export_button.setEnabled(True))
        self._worker = worker
        worker.start()
        return worker

    def _saved(self, path: Path) -> None:
        self.last_saved = Path(path)
        self.status.setText(f"Saved {Path(path).name}")
        from napari.utils.notifications import show_info

        show_info(f"Saved {path}")

    def _notify(self, message: str) -> None:
        from napari.utils.notifications import show_warning

        self.status.setText(message)
        show_warning(message)
