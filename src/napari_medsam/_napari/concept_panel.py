"""The "Find by name" group: concept (text) prompts with an EfficientSAM3 model on the scan shown.

The user types what to find ("liver", "left kidney", "lesion") and presses *Find on slice*: a
concept model (:mod:`napari_medsam.segment.concept`, loaded once per choice in a worker, its image
features cached per slice) returns every instance scoring above the threshold. They appear as a
colour-coded Labels layer of their own, "found: <phrase>", one slice thick and placed on that slice,
so it never stands in for the scan's labels. Each candidate's number, score and area are listed in
the status line. Boxes drawn on the slice (the Segment box's box tool) go along as exemplars when
"use boxes as examples" is ticked; with boxes the phrase may be empty (SAM 3's box-only prompt).

Nothing touches the user's labels until a candidate is accepted: a click on it, or *Accept all*,
adds an object named after the phrase (DICOM-SEG export codes a known structure's name with its
SNOMED CT codes) and writes its mask as that object's kept prediction on the slice, one undo step.
*Find in all slices* then follows that object (or, with none accepted, the best candidate of the
scan) through the slices with :meth:`ConceptSegmenter.find_in_slices`: every neighbour slice keeps
the candidate that overlaps the last kept mask, and a slice where none does ends that direction.
The result goes through the propagation panel's run, so it has the same report, live merge, Cancel
and one-step undo as a propagation. Torch is imported when a run starts, not when the panel docks.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
)

from ..volume import AXIS_NAMES
from .slice_candidates import CandidatesLayerMixin, add_slice_labels, drop_label

LAYER_PREFIX = "found: "
LOCAL_ITEM = "Local checkpoint..."
MAX_LISTED = 6  # candidates named in the status line


def exemplar_boxes(controller: Any, axis: int, index: int) -> list[tuple[float, float, float, float]]:
    """Boxes drawn on slice ``index`` of ``axis`` as (x0, y0, x1, y1) pixel edges (x = column, y = row)."""
    from .prompt_layers import collect_groups

    boxes = []
    for (a, i, _label), prompts in collect_groups(controller.points_layer, controller.boxes_layer,
                                                  controller.shape).items():
        if (a, i) == (axis, index) and prompts.box is not None:
            r0, c0, r1, c1 = prompts.box  # pixel centres, clipped to the slice
            boxes.append((c0 + 0.5, r0 + 0.5, c1 + 0.5, r1 + 0.5))
    return boxes


class ConceptPanel(CandidatesLayerMixin, QGroupBox):
    """Find every instance of a named structure on the slice shown; accept them; follow one through slices."""

    error = Signal(str)
    progressed = Signal(int, int, str)  # done, total, what (emitted from worker threads)
    finished = Signal()

    def __init__(self, settings: Any = None, propagate_panel: Any = None, parent: Any = None) -> None:
        super().__init__("Find by name (text prompt)", parent)
        from ..models.registry import list_concept_models

        self.settings = settings
        self.propagate_panel = propagate_panel
        self.controller: Any = None
        self.worker: Any = None
        self.model: Any = None  # the loaded ConceptModel
        self._model_key: tuple | None = None
        self._segmenters: dict[tuple, Any] = {}
        self.result: Any = None  # the Candidates on show
        self.layer: Any = None
        self.accepted: dict[int, int] = {}  # candidate label (1-based) -> object value
        self._where: tuple[int, int] | None = None
        self._cancel = threading.Event()
        self._following = False  # a "Find in all slices" run of this panel is under way (in the Propagate group)
        self._loading = threading.Lock()  # a find and a find-in-all-slices may both want the model first
        self.local_path: str = str(self._setting("concept_checkpoint", "") or "")
        self.vocabulary_path: str = str(self._setting("concept_vocabulary", "") or "")

        self.phrase = QLineEdit()
        self.phrase.setPlaceholderText("structure to find, e.g. liver")
        self.phrase.setToolTip("A short noun phrase; every instance scoring above the threshold is proposed")
        self.model_combo = QComboBox()
        self._specs = list_concept_models()
        for spec in self._specs:
            self.model_combo.addItem(spec.display_name, spec.name)
            self.model_combo.setItemData(self.model_combo.count() - 1, spec.notes, 3)  # Qt.ToolTipRole
        self.model_combo.addItem(LOCAL_ITEM, "")
        self.model_combo.setToolTip("The concept model (EfficientSAM3 family; downloaded at first use), or a "
                                    "local checkpoint with the same layout, e.g. a medical fine-tune")
        self.threshold = QDoubleSpinBox()
        self.threshold.setRange(0.0, 1.0)
        self.threshold.setDecimals(4)
        self.threshold.setSingleStep(0.05)
        self.threshold.setValue(float(self._setting("concept_threshold", 0.5) or 0.5))
        self.threshold.setToolTip("Score threshold: sigmoid(class) x sigmoid(presence); the official default 0.5")
        self.use_boxes = QCheckBox("use boxes on the slice as examples")
        self.use_boxes.setChecked(True)
        self.use_boxes.setToolTip("Boxes drawn on this slice with the Segment box's box tool are sent as "
                                  "exemplars of the structure (with them the phrase may be empty)")
        self.find_button = QPushButton("Find on slice")
        self.find_button.setToolTip("Propose every instance of the phrase on the slice shown")
        self.all_button = QPushButton("Find in all slices")
        self.all_button.setToolTip("Follow the active object (an accepted candidate) through the slices: each "
                                   "slice keeps the candidate overlapping its neighbour; report and undo as a "
                                   "propagation")
        self._make_candidate_controls()

        model_row = QHBoxLayout()
        model_row.addWidget(QLabel("Model"))
        model_row.addWidget(self.model_combo, 1)
        limit_row = QHBoxLayout()
        limit_row.addWidget(QLabel("Threshold"))
        limit_row.addWidget(self.threshold)
        limit_row.addStretch(1)
        buttons = QHBoxLayout()
        buttons.addWidget(self.find_button)
        buttons.addWidget(self.all_button)
        more = QHBoxLayout()
        more.addWidget(self.accept_all_button)
        more.addWidget(self.clear_button)
        more.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.phrase)
        layout.addLayout(model_row)
        layout.addLayout(limit_row)
        layout.addWidget(self.use_boxes)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addLayout(more)
        layout.addWidget(self.state)

        chosen = str(self._setting("concept_model", "") or "")
        if chosen == "local" and self.local_path:
            self.model_combo.setCurrentIndex(self.model_combo.count() - 1)
            self._show_local()
        self.model_combo.activated.connect(self._on_model_chosen)
        self.phrase.returnPressed.connect(self.find)
        self.find_button.clicked.connect(self.find)
        self.all_button.clicked.connect(self.find_in_all_slices)
        self.cancel_button.clicked.connect(self.cancel)
        self.accept_all_button.clicked.connect(self.accept_all)
        self.clear_button.clicked.connect(self.clear)
        self.threshold.valueChanged.connect(lambda v: self._store("concept_threshold", float(v)))
        self.progressed.connect(self._on_progress)
        if propagate_panel is not None:
            propagate_panel.finished.connect(self._on_follow_done)
        self.set_controller(None)

    # ------------------------------------------------------------------ settings and model choice
    def _setting(self, key: str, default: Any) -> Any:
        if self.settings is None:
            return default
        try:
            value = self.settings.get(key, default)
        except Exception:
            return default
        return default if value is None else value

    def _store(self, key: str, value: Any) -> None:
        if self.settings is not None:
            try:
                self.settings.set(key, value)
            except Exception:  # an unwritable settings file must not break the panel
                pass

    def use_local_checkpoint(self, path: str, vocabulary: str | None = None) -> None:
        """Use a local EfficientSAM3 checkpoint (and, optionally, a local CLIP vocabulary file)."""
        self.local_path = str(path)
        if vocabulary is not None:
            self.vocabulary_path = str(vocabulary)
            self._store("concept_vocabulary", self.vocabulary_path)
        self._store("concept_checkpoint", self.local_path)
        self._store("concept_model", "local")
        self.model_combo.setCurrentIndex(self.model_combo.count() - 1)
        self._show_local()

    def _show_local(self) -> None:
        from pathlib import Path

        index = self.model_combo.count() - 1
        self.model_combo.setItemText(index, f"Local: {Path(self.local_path).name}" if self.local_path else LOCAL_ITEM)
        self.model_combo.setItemData(index, self.local_path, 3)

    def _on_model_chosen(self, index: int) -> None:
        if self.model_combo.itemData(index):  # a registry model
            self._store("concept_model", self.model_combo.itemData(index))
            return
        path, _ = QFileDialog.getOpenFileName(self, "EfficientSAM3 checkpoint", self.local_path or "",
                                              "PyTorch checkpoints (*.pt *.pth *.bin);;All files (*)")
        if path:
            self.use_local_checkpoint(path)
        elif not self.local_path:
            self.model_combo.setCurrentIndex(0)

    def _model_choice(self) -> tuple[str | None, str | None, str | None]:
        """(registry name, local checkpoint, local vocabulary) of the current choice."""
        name = self.model_combo.currentData()
        vocabulary = self.vocabulary_path or None
        if name:
            return str(name), None, vocabulary
        return None, self.local_path or None, vocabulary

    # ------------------------------------------------------------------ state
    def set_controller(self, controller: Any) -> None:
        """Work on ``controller``'s scan and session (None: disabled); another scan's candidates go."""
        if controller is not self.controller:
            self.cancel()
            self.clear()
            self._segmenters = {}
        self.controller = controller
        self._update_buttons()

    @property
    def busy(self) -> bool:
        return self.worker is not None

    def _update_buttons(self) -> None:
        on, busy = self.controller is not None, self.busy
        left = self.result is not None and any(i + 1 not in self.accepted for i in range(len(self.result)))
        other_run = self.propagate_panel is not None and getattr(self.propagate_panel, "busy", False)
        self.find_button.setEnabled(on and not busy)
        self.all_button.setEnabled(on and not busy and not other_run)
        self.cancel_button.setEnabled(busy or self._following)
        self.accept_all_button.setEnabled(on and not busy and left)
        self.clear_button.setEnabled(self.layer is not None and not busy)
        self.model_combo.setEnabled(not busy)

    def _on_progress(self, done: int, total: int, what: str) -> None:
        self.progress.setRange(0, max(int(total), 1))
        self.progress.setValue(int(done))
        self.progress.setFormat(what)

    def _begin(self, text: str, total: int = 0, what: str = "") -> None:
        self._cancel = threading.Event()
        self.state.setText(text)
        self.progress.setRange(0, total)
        self.progress.setValue(0)
        self.progress.setFormat(what)
        self.progress.setVisible(True)

    def _end(self) -> None:
        self.worker = None
        self.progress.setVisible(False)
        self._update_buttons()
        self.finished.emit()

    def cancel(self) -> None:
        """Stop a download, or a Find in all slices after the slice under way (what was found is kept)."""
        if self.worker is not None:
            self._cancel.set()
            self.progress.setFormat("cancelling...")
        if self._following and self.propagate_panel is not None:
            self.propagate_panel.cancel()

    def _on_follow_done(self, result: Any = None) -> None:
        """Any run of the Propagate group ended (this group's Find in all slices among them)."""
        self._following = False
        self._update_buttons()

    # ------------------------------------------------------------------ worker side
    def _load_model(self) -> Any:
        """The chosen concept model, loaded once per choice (worker thread: may download)."""
        from ..segment.concept import ConceptModel

        name, weights, vocabulary = self._model_choice()
        if name is None and weights is None:
            raise ValueError("choose a concept model, or a local EfficientSAM3 checkpoint")
        key = (name, weights, vocabulary)
        with self._loading:
            if self.model is None or self._model_key != key:
                emit, cancel = self.progressed.emit, self._cancel

                def progress(done: int, total: int | None = None) -> None:
                    emit(int(done) >> 20, int(total or 0) >> 20, "downloading (MiB)...")

                self.model = ConceptModel.from_checkpoint(name, weights, vocabulary, progress=progress,
                                                          cancel=cancel)
                self._model_key, self._segmenters = key, {}
            return self.model

    def _segmenter(self, controller: Any, axis: int) -> Any:
        """The scan's concept segmenter for ``axis`` (image features cached per slice, per mapping)."""
        from ..segment.concept import ConceptSegmenter

        model = self._load_model()
        signature = controller.scan_signature()
        key = (id(controller), axis, model.signature)
        segmenter = self._segmenters.get(key)
        if segmenter is None:
            segmenter = self._segmenters[key] = ConceptSegmenter(
                model, controller.array, mapping=controller.mapping, axis=axis, spacing_mm=controller.spacing_mm,
                signature=signature)
        elif segmenter.mapping != controller.mapping:
            segmenter.set_mapping(controller.mapping)
        return segmenter

    # ------------------------------------------------------------------ find on the slice shown
    def find(self) -> Any:
        """Find the phrase on the shown slice in a worker; returns the worker (None when it cannot start)."""
        from .workers import start_worker

        c = self.controller
        if c is None or self.worker is not None:
            return self.worker
        plane = c.current_plane()
        if plane is None:
            self.state.setText("Show a 2D slice of the scan first.")
            return None
        axis, index = plane
        phrase = self.phrase.text().strip()
        boxes = exemplar_boxes(c, axis, index) if self.use_boxes.isChecked() else []
        if not phrase and not boxes:
            self.state.setText("Type what to find (e.g. liver), or draw a box around an example.")
            return None
        threshold = float(self.threshold.value())
        what = f"'{phrase}'" if phrase else "the boxed structure"
        self._begin(f"Finding {what} on {AXIS_NAMES[axis]} slice {index}...", 0, "image features...")

        def job() -> Any:
            return self._segmenter(c, axis).find(index, phrase or None, boxes or None, threshold=threshold)

        self.worker = start_worker(job, on_done=lambda found: self._show(c, axis, index, found),
                                   on_error=lambda exc: self.error.emit(f"Find by name failed: {exc}"),
                                   on_finished=self._end)
        self._update_buttons()
        return self.worker

    def _show(self, controller: Any, axis: int, index: int, found: Any) -> None:
        if controller is not self.controller:  # the scan changed while it ran
            return
        self.clear()
        self.result, self.accepted, self._where = found, {}, (axis, index)
        if not len(found):
            self.state.setText(f"Nothing scored above {found.threshold:g} for '{found.phrase}' on "
                               f"{AXIS_NAMES[axis]} slice {index}. Try a lower threshold, another phrase, or a "
                               "box around an example.")
            self._update_buttons()
            return
        labels = np.zeros(found.masks.shape[1:], np.uint8 if len(found) < 255 else np.uint16)
        for k in range(len(found) - 1, -1, -1):  # the best candidate on top where they overlap
            labels[found.masks[k]] = k + 1
        meta = {"concept": {"axis": axis, "index": index, "phrase": found.phrase,
                            "scores": [float(s) for s in found.scores]}}
        layer = add_slice_labels(controller, labels, axis, index, LAYER_PREFIX + (found.phrase or "boxed example"),
                                 meta, self._on_click)
        # napari shows a label's row of the features table in the status bar under the mouse.
        layer.features = {"index": np.arange(len(found) + 1),
                          "score": np.concatenate([[np.nan], np.round(found.scores, 4)])}
        self.layer = layer
        self.state.setText(self._describe(found, axis, index))
        self._update_buttons()

    def _describe(self, found: Any, axis: int, index: int) -> str:
        spacing = [s for a, s in enumerate(self.controller.spacing_mm) if a != axis]
        pixel = float(spacing[0] * spacing[1])
        listed = ", ".join(f"{k + 1}: {found.scores[k]:.3f} ({found.masks[k].sum() * pixel:.0f} mm²)"
                           for k in range(min(len(found), MAX_LISTED)))
        more = f", +{len(found) - MAX_LISTED} more" if len(found) > MAX_LISTED else ""
        return (f"{len(found)} candidate(s) for '{found.phrase or 'the boxed example'}' on {AXIS_NAMES[axis]} "
                f"slice {index} (score: {listed}{more}). Click one on the '{self.layer.name}' layer to accept it "
                "as an object, or Accept all.")

    # ------------------------------------------------------------------ accepting
    def accept(self, label: int, name: str | None = None) -> int | None:
        """Add candidate ``label`` (1-based) as a new object named after the phrase; returns its value."""
        from ..segment.everything import sign_logits
        from ..segment.predictor import SliceMasks

        c, found = self.controller, self.result
        if c is None or found is None or not 1 <= label <= len(found) or label in self.accepted:
            return None
        axis, index = self._where
        mask = np.asarray(found.masks[label - 1], bool)
        session = c.session
        with session.group():
            obj = session.add_object(name or found.phrase or None)
            # The session keeps predictions with SAM-style low-res logits; a concept mask has none, so a
            # coarse field with the mask's sign stands in (refining from it behaves like a fresh prompt).
            logits = sign_logits(mask, int(getattr(c.model, "low_res", 256) or 256))
            session.apply_prediction(obj.value, axis, index,
                                     SliceMasks(mask[None].copy(), np.array([found.scores[label - 1]], np.float32),
                                                logits[None], index=index, axis=axis))
        self.accepted[label] = obj.value
        drop_label(self.layer, label)
        c.labels_layer.refresh()
        self.state.setText(f"Candidate {label} (score {found.scores[label - 1]:.3f}) is now {obj.name!r}; "
                           f"{len(found) - len(self.accepted)} candidate(s) left. Find in all slices follows it.")
        self._update_buttons()
        return obj.value

    def accept_all(self) -> list[int]:
        """Accept every candidate not accepted yet, best score first; returns the new objects' values."""
        if self.result is None:
            return []
        values = [self.accept(i + 1) for i in range(len(self.result)) if i + 1 not in self.accepted]
        return [v for v in values if v is not None]

    # ------------------------------------------------------------------ through the slices
    def find_in_all_slices(self) -> bool:
        """Follow the active object (seeded by its mask on the slice shown) through the slices of the plane.

        Every slice, or the Propagate group's slice range when its "limit to range" is ticked.
        With no active object holding voxels on the slice shown, a new object named after the phrase is
        made and the best candidate of the whole plane seeds it. Runs as a propagation (report, undo)."""
        from ..segment.propagation.run import slice_index

        c, panel = self.controller, self.propagate_panel
        if c is None or self.worker is not None or panel is None:
            return False
        if getattr(panel, "busy", False):
            self.state.setText("A propagation is running: wait for it, or cancel it in the Propagate group.")
            return False
        plane = c.current_plane()
        if plane is None:
            self.state.setText("Show a 2D slice of the scan first.")
            return False
        axis, index = plane
        phrase = self.phrase.text().strip() or (self.result.phrase if self.result is not None else "")
        if not phrase:
            self.state.setText("Type what to find (e.g. liver) first.")
            return False
        obj = c.session.active
        seed_mask = None if obj is None else c.session.labels[slice_index(axis, index)] == obj
        seed = (index, seed_mask) if seed_mask is not None and seed_mask.any() else None
        # Boxes drawn on the slice shown go with the phrase there (with no seed, they steer its candidates).
        shown = exemplar_boxes(c, axis, index) if self.use_boxes.isChecked() else []
        examples = {index: shown} if shown else None
        if seed is None:
            obj = c.session.add_object(phrase).value
        threshold = float(self.threshold.value())
        segmenter_of, spacing = self._segmenter, c.spacing_mm
        # The Propagate group's slice range, when "limit to range" is ticked (the seed slice always counts).
        lo, hi = panel.stop_rule().z_range
        count = int(c.shape[axis])
        first, last = max(0 if lo is None else int(lo), 0), min(count - 1 if hi is None else int(hi), count - 1)

        def call(predictor: Any, run: Any, *, locked: Any, overwrite: bool, cancel: Any, progress: Any) -> Any:
            segmenter = segmenter_of(c, axis)
            track = segmenter.find_in_slices(range(first, last + 1), phrase, seed=seed, boxes=examples,
                                             threshold=threshold, progress=progress, cancel=cancel)
            return track.write(run.snapshot, obj, locked=locked, overwrite=overwrite, spacing_mm=spacing)

        started = panel.start_run(obj, axis, {index} if seed is not None else set(), call,
                                  f"finding '{phrase}' in all slices", needs_predictor=False)
        if started:
            self._following = True
            self._update_buttons()
            self.state.setText(f"Following '{phrase}' (object {obj}) through the {AXIS_NAMES[axis]} slices; the "
                               "propagation report shows each slice.")
        return bool(started)

