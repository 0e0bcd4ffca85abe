"""The Scan group of the dock widget: image picker, modality override and display window.

:class:`ScanGroupMixin` builds the group's controls on the widget (``image_combo``,
``modality_combo``, ``window_combo``, ``info``) and holds their handlers: the scan summary, the
modality override (remembered in the image layer's metadata) and the CT window or percentile
window. :class:`~.widget.MedSamWidget` mixes it in; the methods use the widget's ``settings``,
``status``, ``image_layer``, ``volume``, ``controller`` and ``_on_mapping_changed``.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox, QFormLayout, QGroupBox, QLabel

from ..windows import CT_WINDOWS, window_limits
from .layers import META_KEY

AUTO_WINDOW = "auto (0.5-99.5 percentile)"
# The Modality combo: None follows the file (DICOM Modality) or the guess from the values.
MODALITY_CHOICES = {"auto": None, "CT": "CT", "MR": "MR"}
# In the image layer's metadata[META_KEY]: the user's override, and what the scan said before it.
MODALITY_OVERRIDE = "modality_override"
MODALITY_ORIGINAL = "modality_original"


class ScanGroupMixin:
    """The Scan group's controls and handlers, mixed into the dock widget."""

    def _build_scan_box(self) -> QGroupBox:
        """Create the Scan group's controls on the widget; return the group box."""
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
        self.window_combo.activated.connect(self._window_picked)
        self.modality_combo.activated.connect(self._modality_picked)
        return scan_box

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
