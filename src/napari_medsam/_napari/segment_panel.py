"""The "Segment" group of the dock widget: state of the model on this slice, mask actions, undo, precompute."""

from __future__ import annotations

from typing import Any

from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ..errors import MedSamError
from .keys import AXIS_NAMES, key_map_html
from .messages import MessageLabel, RunProgress

def precompute_job(controller: Any, axis: int, first: int, last: int):
    """Worker generator: embed slices ``first..last`` along ``axis`` (cached ones are skipped); yields each index."""
    yield from controller.embed_slices(axis, range(first, last + 1))


class SegmentPanel(QGroupBox):
    """Mask actions for the active object on the shown slice, undo/redo and volume precompute."""

    error = Signal(str)

    def __init__(self, parent: Any = None) -> None:
        super().__init__("Segment", parent)
        self.controller = None
        self.worker = None
        self.state = MessageLabel("no model")
        self.keys_button = QToolButton()
        self.keys_button.setText("Keys")
        self.keys_button.setCheckable(True)
        self.keys_button.setToolTip("Show the mouse actions and keys")
        self.help = QLabel(key_map_html())
        self.help.setWordWrap(True)
        self.help.setStyleSheet("font-size: 11px")
        self.help.setVisible(False)
        self.keys_button.toggled.connect(self.help.setVisible)
        self.overwrite = QCheckBox("overwrite other objects")
        self.overwrite.setToolTip("Let a prediction take voxels that belong to other objects")
        self.refine = QCheckBox("refine from the last mask")
        self.refine.setToolTip("A new click on a slice sends the mask on show (its low-res logits) with all the "
                               "slice's points, as SAM's interactive loop does (remembered)")
        self.prefetch = QCheckBox("embed neighbouring slices ahead")
        self.prefetch.setToolTip("While idle, embed the slices next to the one on show (two each side), so that "
                                 "scrolling to a neighbour and clicking answers at once (remembered)")
        self.iou = MessageLabel("")
        self.cycle_button = QPushButton("Next mask (C)")
        self.cycle_button.setToolTip("SAM gives several masks for an ambiguous prompt: show the next one")
        self.accept_button = QPushButton("Accept slice")
        self.accept_button.setToolTip("Keep the mask on this slice and remove its prompt markers")
        self.clear_slice_button = QPushButton("Clear slice")
        self.clear_slice_button.setToolTip("Remove the active object's prompts and model mask on this slice")
        self.clear_object_button = QPushButton("Clear object")
        self.clear_object_button.setToolTip("Remove all voxels and prompts of the active object")
        self.undo_button = QPushButton("Undo")
        self.undo_button.setToolTip("Ctrl+Z: undo the active object's last change")
        self.redo_button = QPushButton("Redo")
        self.redo_button.setToolTip("Ctrl+Shift+Z")
        grid = QGridLayout()  # two buttons a row: fits napari's dock
        for i, button in enumerate((self.cycle_button, self.accept_button, self.clear_slice_button,
                                    self.clear_object_button, self.undo_button, self.redo_button)):
            grid.addWidget(button, i // 2, i % 2)

        self.first = QSpinBox()
        self.last = QSpinBox()
        for box in (self.first, self.last):
            box.setMinimum(0)
        self.precompute_button = QPushButton("Precompute")
        self.precompute_button.setToolTip("Embed these slices of the current plane in the background "
                                          "(cached slices are skipped, so a cancelled run resumes)")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop after the slice being embedded; the slices done stay cached")
        self.cancel_button.setEnabled(False)
        self.progress = RunProgress()  # slices done of the total and the time left, only while embedding
        # Hidden until a scan and a model exist: no meaningless "0 to 0" before that.
        self.precompute_box = QWidget()
        pre = QGridLayout(self.precompute_box)
        pre.setContentsMargins(0, 0, 0, 0)
        span = QHBoxLayout()
        span.addWidget(self.first, 1)
        span.addWidget(QLabel("to"))
        span.addWidget(self.last, 1)
        pre.addWidget(QLabel("Embed slices (this plane)"), 0, 0, 1, 2)
        pre.addLayout(span, 1, 0, 1, 2)
        pre.addWidget(self.progress, 2, 0, 1, 2)  # right above Cancel while a run goes
        pre.addWidget(self.precompute_button, 3, 0)
        pre.addWidget(self.cancel_button, 3, 1)

        layout = QVBoxLayout(self)
        layout.addWidget(self.state)
        layout.addWidget(self.iou)
        layout.addWidget(self.overwrite)
        layout.addWidget(self.refine)
        layout.addWidget(self.prefetch)
        layout.addLayout(grid)
        layout.addWidget(self.precompute_box)
        layout.addWidget(self.keys_button)
        layout.addWidget(self.help)

        self.cycle_button.clicked.connect(lambda: self._call("cycle_mask"))
        self.accept_button.clicked.connect(lambda: self._call("accept_slice"))
        self.clear_slice_button.clicked.connect(lambda: self._call("clear_slice"))
        self.clear_object_button.clicked.connect(lambda: self._call("clear_object"))
        self.undo_button.clicked.connect(lambda: self._call("undo"))
        self.redo_button.clicked.connect(lambda: self._call("redo"))
        self.overwrite.toggled.connect(self._on_overwrite)
        self.refine.toggled.connect(self._on_refine)
        self.prefetch.toggled.connect(self._on_prefetch)
        self.precompute_button.clicked.connect(self.precompute)
        self.cancel_button.clicked.connect(self.cancel_precompute)
        self.set_controller(None)

    # ------------------------------------------------------------------ wiring
    def set_controller(self, controller: Any) -> None:
        """Act on ``controller`` (None: disabled)."""
        old = self.controller
        if old is not None:
            old.changed.disconnect(self._refresh)
            old.status_changed.disconnect(self._on_status)
            old.view_changed.disconnect(self._refresh)
            old.viewer.dims.events.order.disconnect(self._update_range)
        self.cancel_precompute()
        self.controller = controller
        for widget in (self.cycle_button, self.accept_button, self.clear_slice_button, self.clear_object_button,
                       self.undo_button, self.redo_button, self.precompute_button, self.overwrite, self.refine,
                       self.prefetch):
            widget.setEnabled(controller is not None)
        self.precompute_box.setVisible(controller is not None)
        if controller is None:
            self.state.setText("Load a model and pick a scan to start.")
            self.iou.setText("")
            return
        controller.changed.connect(self._refresh)
        controller.status_changed.connect(self._on_status)
        controller.view_changed.connect(self._refresh)
        controller.viewer.dims.events.order.connect(self._update_range)
        self.overwrite.setChecked(controller.overwrite)
        self.refine.setChecked(bool(controller.refine_from_logits))
        self.prefetch.setChecked(bool(controller.prefetch))
        self._on_status(controller.status)
        self._update_range()
        self._refresh()

    def _call(self, method: str) -> None:
        if self.controller is None:
            return
        try:
            result = getattr(self.controller, method)()
        except MedSamError as error:
            self.error.emit(str(error))
            return
        if method == "cycle_mask" and result is None:
            self.error.emit("No prediction to cycle on this slice: click on the object first.")
        self._refresh()

    def _on_overwrite(self, checked: bool) -> None:
        if self.controller is not None:
            self.controller.overwrite = checked

    def _on_refine(self, checked: bool) -> None:
        if self.controller is not None:
            self.controller.refine_from_logits = checked  # the controller saves the setting

    def _on_prefetch(self, checked: bool) -> None:
        if self.controller is not None and bool(self.controller.prefetch) != checked:
            self.controller.prefetch = checked  # the controller saves the setting

    def _on_status(self, text: str) -> None:
        if self.worker is not None and text == "ready":
            return  # the precompute's progress stays on show until it ends
        self.state.setText(f"Model: {text}")

    def _refresh(self, change: Any = None) -> None:
        controller = self.controller
        if controller is None:
            return
        # The active object's prediction on the slice shown: never another slice's or object's value.
        shown = controller.shown_prediction
        if shown is None:
            self.iou.setText("IoU: - (no prediction of the active object on this slice)")
        else:
            iou, count = shown
            self.iou.setText(f"predicted IoU {iou:.2f} ({count} mask{'s' if count > 1 else ''})")
        session = controller.session
        has_object = session.active is not None
        self.undo_button.setEnabled(has_object and session.can_undo())
        self.redo_button.setEnabled(has_object and session.can_redo())
        self.clear_object_button.setEnabled(has_object)

    def _update_range(self, event: Any = None) -> None:
        controller = self.controller
        if controller is None:
            return
        plane = controller.current_plane()
        axis = 0 if plane is None else plane[0]
        top = controller.shape[axis] - 1
        for box in (self.first, self.last):
            box.setMaximum(top)
        self.first.setValue(0)
        self.last.setValue(top)

    # ------------------------------------------------------------------ precompute
    def precompute(self) -> Any:
        """Embed the chosen slices of the shown plane in a napari worker with a progress bar; returns the worker."""
        from .workers import start_worker

        controller = self.controller
        if controller is None or self.worker is not None:
            return self.worker
        plane = controller.current_plane()
        axis = 0 if plane is None else plane[0]
        first, last = sorted((self.first.value(), self.last.value()))
        total = last - first + 1
        done = [0]

        plane = f"slices {first}-{last} ({AXIS_NAMES[axis]})"

        def step(index: int) -> None:
            done[0] += 1
            self.progress.step(done[0], total)
            self.state.setText(f"Precomputing {plane}: slice {index} done ({done[0]}/{total})")

        self.state.setText(f"Precomputing {plane}...")  # at once: the first slice takes seconds
        self.progress.start(total)
        self.precompute_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        worker = start_worker(precompute_job, controller, axis, first, last, on_yield=step,
                              on_error=lambda exc: self.error.emit(f"Precompute failed: {exc}. The slices done stay cached."),
                              on_finished=lambda: self._precompute_finished(done[0], total),
                              progress_bar={"total": total, "desc": "Embedding slices"})
        self.worker = worker
        return worker

    def cancel_precompute(self) -> None:
        """Stop the precompute after the slice being embedded (the slices done stay cached)."""
        if self.worker is not None:
            self.worker.quit()
            self.progress.note("cancelling after this slice")

    def _precompute_finished(self, done: int, total: int) -> None:
        self.worker = None
        self.progress.stop()
        self.cancel_button.setEnabled(False)
        self.precompute_button.setEnabled(self.controller is not None)
        word = "done" if done == total else "cancelled"
        self.state.setText(f"Precompute {word}: {done}/{total} slices embedded")
