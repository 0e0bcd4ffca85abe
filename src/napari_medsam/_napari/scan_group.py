"""The Scan group of the dock widget: image picker, modality override and display window.

:class:`ScanGroupMixin` builds the group's controls on the widget (``image_combo``,
``modality_combo``, ``window_combo``, ``info``, the plane buttons ``axial_button``,
``coronal_button``, ``sagittal_button``) and holds their handlers: the scan summary, the modality
override (remembered in the image layer's metadata), the CT window or percentile window, and the
one-step views of :mod:`.planes` (also on the keys of :data:`.keys.VIEW_KEYS`). :class:`~.widget.MedSamWidget` mixes it in; the methods use the widget's ``settings``,
``status``, ``image_layer``, ``volume``, ``controller`` and ``_on_mapping_changed``.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox, QFormLayout, QGroupBox, QHBoxLayout, QLabel, QPushButton

from ..windows import CT_WINDOWS, window_limits
from .keys import VIEW_KEYS, qt_key_sequence
from .layers import META_KEY

AUTO_WINDOW = "auto (0.5-99.5 percentile)"
# The Modality combo: None follows the file (DICOM Modality) or the guess from the values.
MODALITY_CHOICES = {"auto": None, "CT": "CT", "MR": "MR"}
# In the image layer's metadata[META_KEY]: the user's override, and what the scan said before it.
MODALITY_OVERRIDE = "modality_override"
MODALITY_ORIGINAL = "modality_original"


def narrow_combo(combo: QComboBox, characters: int = 14) -> QComboBox:
    """Let ``combo`` be narrower than its longest entry (the popup still shows entries whole)."""
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(characters)
    return combo


VIEW_KEYS_TEXT = {plane: text for plane, text in VIEW_KEYS.values()}


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
        for combo in (self.image_combo, self.window_combo, self.modality_combo):
            narrow_combo(combo)
        keys = {plane: qt_key_sequence(key) for key, (plane, _) in VIEW_KEYS.items()}
        planes = QHBoxLayout()
        self.plane_buttons = {}
        for plane in ("axial", "coronal", "sagittal"):
            button = QPushButton(plane.capitalize())
            button.setToolTip(f"{VIEW_KEYS_TEXT[plane]} ({keys[plane]})")
            button.clicked.connect(lambda _=False, plane=plane: self.show_plane(plane))
            setattr(self, f"{plane}_button", button)
            self.plane_buttons[plane] = button
            planes.addWidget(button)
        scan_box = QGroupBox("Scan")
        scan_form = QFormLayout(scan_box)
        scan_form.addRow("Image", self.image_combo)
        scan_form.addRow("Modality", self.modality_combo)
        scan_form.addRow("Window", self.window_combo)
        scan_form.addRow("View", planes)
        scan_form.addRow(self.info)
        self.window_combo.activated.connect(self._window_picked)
        self.modality_combo.activated.connect(self._modality_picked)
        return scan_box

    def show_plane(self, plane: str) -> None:
        """Show the scan's axial, coronal or sagittal plane in one step (see :func:`.planes.show_plane`)."""
        from .planes import show_plane

        if self.viewer.dims.ndim < 3:
            self.status.setText("Open a 3D scan to change the plane.")
            return
        show_plane(self.viewer, plane)

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

    def _bind_view_keys(self) -> None:
        """Alt-A / Alt-C / Alt-S on the viewer: the plane views, whatever has the focus in the canvas."""
        from .keys import VIEW_KEYS

        self._view_handlers = {}
        for key, (plane, _) in VIEW_KEYS.items():
            def handler(viewer, plane=plane):
                self.show_plane(plane)

            handler.__doc__ = f"napari-medsam: {plane} view"
            self.viewer.bind_key(key, handler, overwrite=True)
            self._view_handlers[key] = handler

    def _unbind_view_keys(self) -> None:
        """Give the plane keys back (only those still bound to this panel)."""
        for key, handler in getattr(self, "_view_handlers", {}).items():
            try:
                unbound = self.viewer.bind_key(key, None)
                if unbound is not None and unbound is not handler:  # another panel's: put it back
                    self.viewer.bind_key(key, unbound, overwrite=True)
            except (KeyError, ValueError, TypeError):
                pass
        self._view_handlers = {}

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
