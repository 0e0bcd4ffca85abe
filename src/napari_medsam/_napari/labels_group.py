"""The Labels group of the dock widget: the label layer on the scan's grid, exporting it, session files.

:class:`LabelsGroupMixin` builds the group's controls on the widget (``labels_combo``,
``new_labels_button``, ``export_button``, ``save_session_button``, ``open_session_button``) and
holds their handlers: a new empty label layer on the scan's grid, saving a label layer in a
background thread in the right format (DICOM-SEG for a DICOM series, NIfTI otherwise), with the
writer's warnings shown as notifications, and saving / reopening the scan's whole segmentation
session (labels, objects, prompts, key slices, hand-painted voxels) as one
``NAME.medsam-session.zip`` beside the scan (:mod:`napari_medsam.segment.session.persist`).
:class:`~.widget.MedSamWidget` mixes it in; the methods use the widget's ``viewer``, ``status``,
``image_layer``, ``labels_layer``, ``volume``, ``stop_segmentation``, ``_sync_controller`` and ``_notify``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from qtpy.QtWidgets import QComboBox, QFileDialog, QGroupBox, QHBoxLayout, QPushButton, QVBoxLayout

from .layers import META_KEY, export_naming, export_segments, known_segments, labels_layer_data, volume_from_layer_meta
from ..io._text import short_file_stem
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
        self.save_session_button = QPushButton("Save session...")
        self.save_session_button.setToolTip("Save labels, objects, prompts and key slices of this scan to one file "
                                            "beside it, to resume later (undo history is not saved)")
        self.open_session_button = QPushButton("Open session...")
        self.open_session_button.setToolTip("Reopen a saved session on this scan: its labels, objects and prompts "
                                            "replace the scan's current ones")
        buttons = QHBoxLayout()
        buttons.addWidget(self.new_labels_button)
        buttons.addWidget(self.export_button)
        session_buttons = QHBoxLayout()
        session_buttons.addWidget(self.save_session_button)
        session_buttons.addWidget(self.open_session_button)
        labels_box = QGroupBox("Labels")
        labels_layout = QVBoxLayout(labels_box)
        labels_layout.addWidget(self.labels_combo)
        labels_layout.addLayout(buttons)
        labels_layout.addLayout(session_buttons)
        self.new_labels_button.clicked.connect(self._new_labels_clicked)
        self.export_button.clicked.connect(self._export_clicked)
        self.save_session_button.clicked.connect(self._save_session_clicked)
        self.open_session_button.clicked.connect(self._open_session_clicked)
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
        """The Export dialog's default: where this scan's labels went last, else beside the scan, named after the
        layer (shortened: a long DICOM description or UID gives a short readable name)."""
        layer = self.labels_layer
        if layer is None:
            return None
        scan = self.scan
        if scan is not None and scan.export_path is not None and scan.labels is layer:
            return scan.export_path
        return default_output_path(self._export_volume(layer), short_file_stem(layer.name))

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
        from .writer import source_volume_for

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
        engine = scan.engine if scan is not None and scan.labels is layer else None
        naming = export_naming(layer.metadata, None if engine is None else list(engine.objects))

        def save() -> tuple[Path, list[str]]:
            from ..io import save_labels_named

            like = source_volume_for(labels, attributes)
            written, _, messages = save_labels_named(labels, like, path, export_segments(labels, naming))
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

    # ----------------------------------------------------------------- session files
    def _scan_info(self, image):
        """The identity of ``image`` stored in and checked against session files (shape, spacing, signature)."""
        from ..segment.session.persist import scan_info

        volume = volume_from_layer_meta(image.metadata)
        array = np.asarray(image.data)
        scale = np.abs(np.asarray(image.scale, float))
        # The same spacing as the controller's, so the cache signature it computed can be reused.
        spacing = volume.spacing_mm if volume is not None else ([1.0, *scale[-2:]] if array.ndim == 2 else scale[-3:])
        scan = self.sessions.get(image)
        signature = scan.signature if scan is not None else None
        if signature is None and self.controller is not None and self.controller.image_layer is image:
            signature = self.controller.scan_signature()
        return scan_info(array, spacing=spacing, name=image.name, signature=signature)

    def session_suggestion(self) -> Path | None:
        """The session dialogs' default: the scan's last session file, else ``<scan>.medsam-session.zip`` beside it."""
        from ..segment.session.persist import session_path

        image = self.image_layer
        if image is None:
            return None
        scan = self.scan
        if scan is not None and scan.session_path is not None:
            return scan.session_path
        volume = self.volume
        return session_path(volume.source_path if volume is not None else None, image.name)

    def _save_session_clicked(self) -> None:
        suggested = self.session_suggestion()
        if suggested is None:
            self._notify("Open a scan first.")
            return
        path, _ = QFileDialog.getSaveFileName(self, "Save segmentation session", str(suggested),
                                              "napari-medsam session (*.medsam-session.zip)")
        if path:
            self.save_session(path)

    def _open_session_clicked(self) -> None:
        suggested = self.session_suggestion()
        if suggested is None:
            self._notify("Open a scan first.")
            return
        path, _ = QFileDialog.getOpenFileName(self, "Open segmentation session", str(suggested),
                                              "napari-medsam session (*.medsam-session.zip);;All files (*)")
        if path:
            self.open_session(path)

    def _session_labels(self):
        """The current scan's Labels layer and the 3D view of its data the session edits (None, None without)."""
        scan = self.scan
        layer = scan.labels if scan is not None and scan.labels in self.viewer.layers else self.labels_layer
        if layer is None or not isinstance(layer.data, np.ndarray):
            return None, None
        data = layer.data[None] if layer.data.ndim == 2 else layer.data
        return layer, data

    def save_session(self, path: str | Path) -> Path | None:
        """Save the current scan's session (labels, objects, prompts, key slices, locks) to ``path``; return it."""
        from ..errors import MedSamError
        from ..segment.session import SegmentationSession, save_session

        image, scan = self.image_layer, self.scan
        layer, data = self._session_labels()
        if image is None or layer is None:
            self._notify("Nothing to save: open a scan and segment it (or pick its label layer) first.")
            return None
        engine = scan.engine if scan.labels is layer else None
        try:
            if engine is None or not np.may_share_memory(engine.labels, data):
                names, colors = known_segments(layer.metadata)
                engine = SegmentationSession(np.array(data), names=names, colors=colors)  # a copy: read only here
            written = save_session(engine, data, path, scan=self._scan_info(image))
        except MedSamError as error:
            self._notify(f"Session not saved: {error}")
            return None
        scan.session_path = written
        self.status.setText(f"Session saved to {written.name} ({len(engine.objects)} object(s)).")
        return written

    def open_session(self, path: str | Path):
        """Open a session file on the current scan: its labels, objects and prompts replace the scan's; return it.

        The file is read and checked completely first (another scan, a corrupt file or another
        version leave everything as it was). The scan's Labels layer (made if needed) gets the
        labels, the prompt layers the prompts, and segmentation resumes when a model is loaded.
        """
        from ..errors import MedSamError
        from ..segment.session import read_session

        image = self.image_layer
        if image is None:
            self._notify("Open the scan the session belongs to first.")
            return None
        try:
            saved = read_session(path)
            saved.check_scan(self._scan_info(image))
        except MedSamError as error:
            self._notify(f"Session not opened: {error}")
            return None
        self.stop_segmentation()
        scan = self.scan
        layer = scan.labels if scan.labels is not None and scan.labels in self.viewer.layers else None
        if layer is None or not isinstance(layer.data, np.ndarray) \
                or tuple(np.shape(layer.data)) != tuple(np.shape(image.data)):
            layer = self.add_labels_layer()
            if layer is None:
                return None
        top = max([o.value for o in saved.objects] + [int(saved.labels.max())])
        if not np.issubdtype(layer.data.dtype, np.integer) or top > np.iinfo(layer.data.dtype).max:
            layer.data = np.zeros(np.shape(layer.data), saved.labels.dtype)
        data = layer.data[None] if layer.data.ndim == 2 else layer.data
        engine = saved.session(into=data, overwrite=self.segment_panel.overwrite.isChecked())
        scan.labels, scan.engine, scan.report, scan.session_path = layer, engine, None, Path(path)
        self._show_session_labels(layer, engine)
        self._show_session_prompts(image, scan, engine)
        self._fill_labels()
        self.labels_combo.setCurrentText(layer.name)
        scan.show_prompts(True)
        self._sync_controller()
        prompted = len(saved.prompts)
        self.status.setText(f"Opened session {Path(path).name}: {len(engine.objects)} object(s), "
                            f"prompts on {prompted} slice(s).")
        return engine

    def _show_session_labels(self, layer, engine) -> None:
        """The reopened labels drawn in the objects' colours, named after them (for Export) and refreshed."""
        from napari.utils.colormaps import DirectLabelColormap

        from ..io.segments import default_segment

        colors = {None: (0.8, 0.8, 0.8, 1.0), 0: (0.0, 0.0, 0.0, 0.0)}
        colors.update({o.value: (*(c / 255.0 for c in o.color), 1.0) for o in engine.objects})
        layer.colormap = DirectLabelColormap(color_dict=colors)
        meta = dict(layer.metadata.get(META_KEY) or {})
        meta["names"] = {o.value: o.name for o in engine.objects}
        meta["segments"] = [default_segment(o.value, o.name, o.color) for o in engine.objects]
        layer.metadata[META_KEY] = meta
        if engine.active is not None:
            layer.selected_label = engine.active
        layer.refresh()

    def _show_session_prompts(self, image, scan, engine) -> None:
        """Make the scan's prompt layers (added if missing) hold exactly the reopened session's prompts."""
        from .prompt_layers import add_prompt_layers, write_group

        if scan.points is None or scan.boxes is None or scan.points not in self.viewer.layers \
                or scan.boxes not in self.viewer.layers:
            self._updating = True
            try:
                for layer in (scan.points, scan.boxes):
                    if layer is not None and layer in self.viewer.layers:
                        self.viewer.layers.remove(layer)
                scan.points, scan.boxes = add_prompt_layers(self.viewer, image)
            finally:
                self._updating = False
            self._refresh_layers()
        points, boxes = scan.points, scan.boxes
        for layer in (points, boxes):
            if len(layer.data):
                layer.selected_data = set(range(len(layer.data)))
                layer.remove_selected()
        for obj in engine.objects:
            for axis in range(3):
                for index in engine.prompted_slices(obj.value, axis):
                    write_group(points, boxes, (axis, index, obj.value), engine.slice_prompts(obj.value, axis, index))
