"""The Labels group of the dock widget: the label layer on the scan's grid, and exporting it.

:class:`LabelsGroupMixin` builds the group's controls on the widget (``labels_combo``,
``new_labels_button``, ``export_button``) and holds their handlers: a new empty label layer on
the scan's grid, and saving a label layer in a background thread in the right format (DICOM-SEG
for a DICOM series, NIfTI otherwise), with the writer's warnings shown as notifications.
:class:`~.widget.MedSamWidget` mixes it in; the methods use the widget's ``viewer``, ``status``,
``image_layer``, ``labels_layer``, ``volume``, ``stop_segmentation``, ``_sync_controller`` and ``_notify``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from qtpy.QtWidgets import QComboBox, QFileDialog, QGroupBox, QHBoxLayout, QPushButton, QVBoxLayout

from .layers import META_KEY, labels_layer_data, volume_from_layer_meta
from .writer import default_output_path


class LabelsGroupMixin:
    """The Labels group's controls and handlers, mixed into the dock widget."""

    def _build_labels_box(self) -> QGroupBox:
        """Create the Labels group's controls on the widget; return the group box."""
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
        self.new_labels_button.clicked.connect(self._new_labels_clicked)
        self.export_button.clicked.connect(self._export_clicked)
        return labels_box

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
        scan = self.scan
        # The scan's own label layer from now on: a new one starts new objects and history.
        scan.labels, scan.engine, scan.report = new, None, None
        self._fill_labels()
        self.labels_combo.setCurrentText(new.name)
        return new

    def _new_labels_clicked(self) -> None:
        self.stop_segmentation()
        self.add_labels_layer()
        self._sync_controller()

    def _export_volume(self, layer):
        """The scan a label layer is exported on: the current scan when the layer lies on its grid."""
        volume = self.volume
        if volume is not None and tuple(np.shape(layer.data)) == tuple(volume.shape):
            return volume
        return volume_from_layer_meta(layer.metadata) or volume

    def export_suggestion(self) -> Path | None:
        """The Export dialog's default: where this scan's labels went last, else beside the scan, named after the layer."""
        layer = self.labels_layer
        if layer is None:
            return None
        scan = self.scan
        if scan is not None and scan.export_path is not None and scan.labels is layer:
            return scan.export_path
        return default_output_path(self._export_volume(layer), layer.name)

    def _export_clicked(self) -> None:
        layer = self.labels_layer
        if layer is None:
            self._notify("Choose or create a label layer first.")
            return
        suggested = self.export_suggestion()
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
        volume = self._export_volume(layer)
        if volume is not None and volume_from_layer_meta(layer.metadata) is not volume:
            # The current scan's geometry and source (a DICOM-SEG references its series), with the layer's names.
            attributes["metadata"] = {**layer.metadata, META_KEY: {**(layer.metadata.get(META_KEY) or {}),
                                                                   "volume": volume}}
        scan = self.scan
        if scan is not None and scan.labels is layer:
            scan.export_path = Path(path)

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
