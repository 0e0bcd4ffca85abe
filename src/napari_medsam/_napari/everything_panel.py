"""The "Segment everything" group: SAM's automatic mask generator on the slice shown.

"Segment everything" runs :func:`napari_medsam.segment.everything.segment_everything` on the
shown slice of the shown plane in a napari thread worker (progress bar in points, Cancel keeps
what was found). The candidates appear as their own colour-coded Labels layer, "candidates",
one slice thick and placed on that slice, so it never stands in for the scan's labels (the Labels
picker offers only layers of the scan's shape). Nothing touches the user's labels until a
candidate is accepted: clicking a candidate on that layer, or "Accept all", adds a new object
per candidate to the session and writes its mask as that object's kept prediction on the slice,
so it is a key slice for propagation like a clicked one; each acceptance is one undo step of its
object (session undo). Torch is imported when a run starts, not when the panel docks.
"""

from __future__ import annotations

import threading
from typing import Any

from qtpy.QtCore import Signal
from qtpy.QtWidgets import QGroupBox, QHBoxLayout, QLabel, QPushButton, QSpinBox, QVBoxLayout

from ..volume import AXIS_NAMES
from .slice_candidates import CandidatesLayerMixin, add_slice_labels, drop_label

LAYER_NAME = "candidates"


class EverythingPanel(CandidatesLayerMixin, QGroupBox):
    """Run the automatic mask generator on the shown slice and accept its candidates as objects."""

    error = Signal(str)
    progressed = Signal(int, int)  # points decoded, points in all (emitted from the worker thread)
    finished = Signal()

    def __init__(self, parent: Any = None) -> None:
        super().__init__("Segment everything", parent)
        self.controller: Any = None
        self.worker: Any = None
        self.result: Any = None  # the last EverythingResult on show
        self.layer: Any = None  # the candidates Labels layer
        self.accepted: dict[int, int] = {}  # candidate label -> object value
        self._where: tuple[int, int] | None = None  # (axis, index) of the candidates
        self._cancel = threading.Event()

        self.points = QSpinBox()
        self.points.setRange(4, 64)
        self.points.setValue(32)
        self.points.setToolTip("Points per side of the prompt grid (SAM's default 32: 1024 point prompts)")
        self.run_button = QPushButton("Segment everything")
        self.run_button.setToolTip("Propose every structure on the slice shown (encoder once, the grid of points "
                                   "decoded in batches); the candidates appear as the 'candidates' layer")
        self._make_candidate_controls()

        row = QHBoxLayout()
        row.addWidget(QLabel("Points per side"))
        row.addWidget(self.points)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        more = QHBoxLayout()
        more.addWidget(self.accept_all_button)
        more.addWidget(self.clear_button)
        layout = QVBoxLayout(self)
        layout.addLayout(row)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addLayout(more)
        layout.addWidget(self.state)

        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.accept_all_button.clicked.connect(self.accept_all)
        self.clear_button.clicked.connect(self.clear)
        self.progressed.connect(self._on_progress)
        self.set_controller(None)

    # ------------------------------------------------------------------ state
    def set_controller(self, controller: Any) -> None:
        """Work on ``controller``'s scan and session (None: disabled); candidates of another scan go."""
        if controller is not self.controller:
            self.cancel()
            self.clear()
        self.controller = controller
        self._update_buttons()

    def _update_buttons(self) -> None:
        on, busy = self.controller is not None, self.worker is not None
        left = self.result is not None and any(i + 1 not in self.accepted for i in range(len(self.result.candidates)))
        self.run_button.setEnabled(on and not busy)
        self.points.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)
        self.accept_all_button.setEnabled(on and not busy and left)
        self.clear_button.setEnabled(self.layer is not None and not busy)

    # ------------------------------------------------------------------ running
    def run(self) -> Any:
        """Start the generator on the shown slice in a worker; returns the worker (None when it cannot run)."""
        from .workers import start_worker

        c = self.controller
        if c is None or self.worker is not None:
            return self.worker
        plane = c.current_plane()
        if plane is None:
            self.state.setText("Show a 2D slice of the scan first.")
            return None
        axis, index = plane
        n = int(self.points.value())
        self._cancel = threading.Event()
        self.state.setText(f"Segmenting everything on {AXIS_NAMES[axis]} slice {index} ({n}x{n} points)...")
        self.progress.setRange(0, n * n)
        self.progress.setValue(0)
        self.progress.setFormat("embedding the slice...")
        self.progress.setVisible(True)
        cancel, emit = self._cancel, self.progressed.emit

        def job() -> Any:
            from ..segment.everything import EverythingSettings, segment_everything

            c.scan_signature()  # hashes the scan the first time; the predictor needs it
            predictor = c.predictor(axis)
            return segment_everything(predictor, index, EverythingSettings(points_per_side=n), cancel=cancel,
                                      progress=emit)

        self.worker = start_worker(job, on_done=lambda result: self._show(c, axis, index, result),
                                   on_error=lambda exc: self.error.emit(f"Segment everything failed: {exc}"),
                                   on_finished=self._on_finished)
        self._update_buttons()
        return self.worker

    def cancel(self) -> None:
        """Stop after the batch of points being decoded (the candidates found so far are shown)."""
        if self.worker is not None:
            self._cancel.set()
            self.progress.setFormat("cancelling...")

    def _on_progress(self, done: int, total: int) -> None:
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(done)
        self.progress.setFormat(f"{done} of {total} points")

    def _on_finished(self) -> None:
        self.worker = None
        self.progress.setVisible(False)
        self._update_buttons()
        self.finished.emit()

    # ------------------------------------------------------------------ the candidates layer
    def _show(self, controller: Any, axis: int, index: int, result: Any) -> None:
        if controller is not self.controller:  # the scan changed while it ran
            return
        self.clear()
        self.result, self.accepted, self._where = result, {}, (axis, index)
        self.layer = add_slice_labels(controller, result.label_image(), axis, index, LAYER_NAME,
                                      {"candidates": {"axis": axis, "index": index}}, self._on_click)
        count = len(result.candidates)
        word = "cancelled, " if result.cancelled else ""
        self.state.setText(f"{word}{count} candidate(s) on {AXIS_NAMES[axis]} slice {index} in "
                           f"{result.seconds.get('total', 0.0):.1f} s. Click one on the 'candidates' layer to "
                           "accept it as an object, or Accept all.")
        self._update_buttons()

    # ------------------------------------------------------------------ accepting
    def accept(self, label: int, name: str | None = None) -> int | None:
        """Add candidate ``label`` (1-based) as a new object; returns its value (None: nothing to accept)."""
        from ..segment.everything import candidate_masks

        c, result = self.controller, self.result
        if c is None or result is None or not 1 <= label <= len(result.candidates) or label in self.accepted:
            return None
        axis, index = self._where
        cand = result.candidates[label - 1]
        session = c.session
        with session.group():
            obj = session.add_object(name)
            masks = candidate_masks(cand, int(getattr(c.model, "low_res", 256)))
            session.apply_prediction(obj.value, axis, index, masks)
        self.accepted[label] = obj.value
        drop_label(self.layer, label)
        c.labels_layer.refresh()
        self.state.setText(f"Candidate {label} ({cand.area_mm2:.0f} mm²) is now {obj.name!r}; "
                           f"{len(result.candidates) - len(self.accepted)} candidate(s) left.")
        self._update_buttons()
        return obj.value

    def accept_all(self) -> list[int]:
        """Accept every candidate not accepted yet, largest first; returns the new objects' values."""
        if self.result is None:
            return []
        values = [self.accept(i + 1) for i in range(len(self.result.candidates)) if i + 1 not in self.accepted]
        return [v for v in values if v is not None]
