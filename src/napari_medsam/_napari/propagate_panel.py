"""The dock widget's "Propagate" box: 3D propagation of the active object from its key slices.

The engine (:mod:`napari_medsam.segment.propagation`) runs in a napari thread worker on a
*snapshot* of the label volume, so the user can keep editing. Each slice the worker finishes
is merged into the live labels on the Qt thread, only where the user has not changed a voxel
since the snapshot, so the mask grows on screen. At the end the run becomes one undo step of
the session (its "before" slices are the live ones), so one Ctrl+Z removes it whole.

Two engines: "slice prompts" (:func:`~napari_medsam.segment.propagation.propagate`: each slice
prompted from the previous one's mask, any model) and, with a SAM 2 family model (SAM 2.1,
MedSAM2), "memory" (:func:`~napari_medsam.segment.memory.engine.propagate_memory`: the object
tracked with the model's memory of its key slices and the last slices). The memory engine is
then the default; the user's choice is kept in the settings. Both give the same report (the
memory engine's rows add the object score), undo, locks, cancel and corrections.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (QAbstractItemView, QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QGroupBox,
                            QHBoxLayout, QPushButton, QSpinBox, QTableWidget, QVBoxLayout)
from superqt import QLabeledRangeSlider

from ..errors import MedSamError
from ..segment.propagation.stop_rules import StopRule
from .messages import MessageLabel, RunProgress
from .propagate_engine import ENGINE_TIPS, ENGINES, EngineChoiceMixin, is_memory_model
from .report_window import COLUMNS, OBJECT_SCORE, fill_report_table
from .settings import Settings

if TYPE_CHECKING:  # the engine imports torch: loaded when a run starts, not when the panel docks
    from ..segment.prompting import PromptSettings
    from ..segment.propagation.run import PropagationResult
    from .propagate_run import MemoryTrackers, Run

__all__ = ["COLUMNS", "ENGINES", "OBJECT_SCORE", "PROMPT_MODES", "PropagatePanel", "is_memory_model"]

PROMPT_MODES = ("box+mask", "box", "mask", "points", "box+points", "points+mask", "box+points+mask")
DIMS_EVENTS = ("current_step", "order", "ndisplay")
# StopRule field -> (label, tooltip): the spin boxes edit exactly these fields.
STOP_FIELDS = {
    "min_score": ("min predicted IoU", "A slice whose predicted IoU is below this is rejected"),
    "min_overlap": ("min overlap", "A slice overlapping the previous mask less than this (Dice) is rejected"),
    "max_empty_slices": ("max empty slices", "Empty slices in a row that end a front (the organ's end)"),
}


def _notify(level: str, message: str) -> None:
    from napari.utils import notifications

    (notifications.show_error if level == "error" else notifications.show_warning)(message)


def _button(text: str, tip: str) -> QPushButton:
    button = QPushButton(text)
    button.setToolTip(tip)
    return button


def _stop_spin(name: str) -> QDoubleSpinBox | QSpinBox:
    """A spin box for StopRule field ``name``, at its default."""
    value = getattr(StopRule(), name)
    spin: QDoubleSpinBox | QSpinBox = QSpinBox() if isinstance(value, int) else QDoubleSpinBox()
    spin.setRange(*((1, 50) if isinstance(value, int) else (0.0, 1.0)))
    if isinstance(spin, QDoubleSpinBox):
        spin.setSingleStep(0.05)
    spin.setValue(value)
    spin.setToolTip(f"{STOP_FIELDS[name][1]} (StopRule.{name})")
    spin.setObjectName(name)
    return spin


def _text_overlay(viewer: Any) -> Any:
    """The viewer's text overlay (napari >= 0.9 keeps it on the canvas)."""
    overlays = getattr(getattr(viewer, "canvas", None), "overlays", None)
    return overlays["text"] if overlays is not None and "text" in overlays else viewer.text_overlay


class PropagatePanel(EngineChoiceMixin, QGroupBox):
    """Up / Down / Both / Fill between keys for the active object, with a stop rule, a report and Cancel."""

    status_changed = Signal(str)
    finished = Signal(object)  # the PropagationResult applied (its undo: the live slices before), or None
    # (image layer, report state) whenever a run's report is made, also for a scan no longer shown
    report_changed = Signal(object, object)
    _tick = Signal(object, object)  # (run, (done, total, message, slice or None)) from the worker thread

    def __init__(self, parent: Any = None, settings: Settings | None = None) -> None:
        super().__init__("Propagate", parent)
        self.settings = settings if settings is not None else Settings()
        self.controller: Any = None
        self.last_result: PropagationResult | None = None
        self._run: Run | None = None
        self._worker: Any = None
        self._last: tuple[int, int, set[int]] | None = None  # (object, axis, key slices) of the last run
        self._kinds: dict[int, str] = {}  # slice -> "key" / "propagated" / "interpolated" of that object
        self._overlay_on = False
        self._axis: int | None = None
        self._last_engine = "slice"  # the engine of the last run, which its corrections use too
        self._trackers: MemoryTrackers | None = None  # the scan's memory trackers (made on first use)

        self.up_button = _button("Up", "Propagate from the highest key slice towards higher slice numbers")
        self.down_button = _button("Down", "Propagate from the lowest key slice towards lower slice numbers")
        self.both_button = _button("Both", "Propagate outward from the key slices and fill the gaps between them")
        self.fill_button = _button("Fill between keys", "Only fill the slices between the key slices")
        self.cancel_button = _button("Cancel", "Stop after the current slice; the slices finished so far are kept")
        self.progress = RunProgress()  # slices done of the total and the time left, only while a run goes
        self.range_slider = QLabeledRangeSlider(Qt.Orientation.Horizontal)
        self.limit_check = QCheckBox("limit to range")
        self.limit_check.setToolTip("Fronts stop at the ends of the slice range")
        self.stop_spins = {name: _stop_spin(name) for name in STOP_FIELDS}
        self.prompt_combo = QComboBox()
        self.prompt_combo.addItems(PROMPT_MODES)
        self.prompt_combo.setToolTip("How each slice is prompted from the previous one's mask")
        self.prompt_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.prompt_combo.setMinimumContentsLength(6)
        self.engine_combo = QComboBox()
        for engine, text in ENGINES.items():
            self.engine_combo.addItem(text, engine)
            self.engine_combo.setItemData(self.engine_combo.count() - 1, ENGINE_TIPS[engine],
                                          Qt.ItemDataRole.ToolTipRole)
        self.engine_combo.setToolTip("How each next slice is found; memory needs a SAM 2.1 or MedSAM2 model")
        self.engine_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.engine_combo.setMinimumContentsLength(6)
        self.repropagate_check = QCheckBox("Re-propagate corrections")
        self.repropagate_check.setChecked(True)
        self.repropagate_check.setToolTip("After a propagation, a new prompt on another slice re-propagates from it")
        self.summary, self.status_label = MessageLabel(""), MessageLabel("")
        self.report_button = _button("Open report", "Show the report in a window of its own, as large as you like")
        self.report_window: Any = None
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setMinimumHeight(120)
        self.table.setToolTip("Click a row to show that slice")

        layout = QVBoxLayout(self)
        for row in ((self.up_button, self.down_button, self.both_button), (self.fill_button, self.cancel_button)):
            if self.cancel_button in row:
                layout.addWidget(self.progress)  # right above Cancel while a run goes
            line = QHBoxLayout()
            for button in row:
                line.addWidget(button)
            layout.addLayout(line)
        self.form = form = QFormLayout()
        form.addRow("slices", self.range_slider)  # hidden until a scan is segmented (no "0-99" before)
        form.addRow(self.limit_check)
        for name, spin in self.stop_spins.items():
            form.addRow(STOP_FIELDS[name][0], spin)
        form.addRow("engine", self.engine_combo)
        form.addRow("prompt", self.prompt_combo)
        form.addRow(self.repropagate_check)
        layout.addLayout(form)
        for widget in (self.summary, self.table, self.report_button, self.status_label):
            layout.addWidget(widget)
        self.report_button.clicked.connect(self.open_report)
        self.up_button.clicked.connect(lambda: self.propagate("up"))
        self.down_button.clicked.connect(lambda: self.propagate("down"))
        self.both_button.clicked.connect(lambda: self.propagate("both"))
        self.fill_button.clicked.connect(lambda: self.propagate("both", fill_only=True))
        self.cancel_button.clicked.connect(self.cancel)
        self.table.cellClicked.connect(self._row_clicked)
        self.engine_combo.currentIndexChanged.connect(self._on_engine_chosen)
        self._tick.connect(self._on_tick)
        self.update_engine_choices()

    # ------------------------------------------------------------------ wiring
    @property
    def busy(self) -> bool:
        """True while a run is in flight."""
        return self._run is not None

    def set_controller(self, controller: Any, report: dict | None = None) -> None:
        """Work on ``controller``'s active object (None: segmentation stopped, everything disabled).

        ``report`` (from :meth:`report_state`) is the scan's last report, shown again; None
        empties the report, so a table never shows another scan's run.
        """
        if self._run is not None:
            self._run.cancel.set()  # the run still lands in its own controller's labels and history
        self._wire(self.controller, connect=False)
        self._hide_overlay()
        self.controller, self._last, self._kinds, self._axis = controller, None, {}, None
        self._wire(controller, connect=True)
        self.show_report(report)
        self._on_dims()
        self.update_engine_choices()

    def report_state(self) -> dict | None:
        """The report on show (result, last run's object/axis/keys, slice kinds, texts), or None."""
        if self.last_result is None:
            return None
        return {"result": self.last_result, "last": self._last, "kinds": dict(self._kinds),
                "summary": self.summary.text(), "status": self.status_label.text(),
                "engine": self._last_engine, "trackers": self._trackers}

    def show_report(self, report: dict | None) -> None:
        """Show a report kept by :meth:`report_state` (None: an empty table and no summary)."""
        if report is None:
            self.last_result, self._last, self._kinds = None, None, {}
            self._last_engine, self._trackers = "slice", None  # another scan: its trackers are its own
            self.table.setRowCount(0)
            self.summary.setText("")
            self.status_label.setText("")
            self._hide_overlay()
            self._follow_report()
            return
        self.last_result, self._last = report["result"], report["last"]
        self._last_engine, self._trackers = report.get("engine", "slice"), report.get("trackers")
        self._fill_table(report["result"])
        self._kinds = dict(report["kinds"])
        self.summary.setText(report["summary"])
        self.status_label.setText(report["status"])
        self._update_overlay()
        self._follow_report()

    def _wire(self, controller: Any, connect: bool) -> None:
        if controller is None:
            return
        pairs = [(controller.mask_written, self._on_mask_written)]
        pairs += [(getattr(controller.viewer.dims.events, name), self._on_dims) for name in DIMS_EVENTS]
        for emitter, slot in pairs:
            (emitter.connect if connect else emitter.disconnect)(slot)

    def _update_enabled(self) -> None:
        on, busy = self.controller is not None, self._run is not None
        for button in (self.up_button, self.down_button, self.both_button, self.fill_button):
            button.setEnabled(on and not busy)
        self.cancel_button.setEnabled(busy)
        for widget in (self.range_slider, self.limit_check, self.engine_combo, self.repropagate_check,
                       *self.stop_spins.values()):
            widget.setEnabled(on)
        self.prompt_combo.setEnabled(on and self.engine == "slice")  # the memory engine prompts no slice
        for widget in (self.range_slider, self.limit_check):
            self.form.setRowVisible(widget, on)
        self.report_button.setEnabled(self.last_result is not None)

    def open_report(self) -> Any:
        """Show the report in a resizable window of its own (kept up to date); returns the window."""
        from .report_window import ReportWindow

        if self.report_window is None:
            self.report_window = ReportWindow(self, on_row=self._row_clicked)
        self.report_window.copy_from(self.table, self.summary.text())
        self.report_window.show()
        self.report_window.raise_()
        return self.report_window

    def _follow_report(self) -> None:
        window = self.report_window
        if window is not None and window.isVisible():
            window.copy_from(self.table, self.summary.text())
        self.report_button.setEnabled(self.last_result is not None)

    def _set_status(self, text: str, level: str | None = None) -> None:
        self.status_label.setText(text)
        self.status_changed.emit(text)
        if level is not None:
            _notify(level, text)

    def stop_rule(self) -> StopRule:
        """The stop rule the widgets describe (the slice range only when "limit to range" is on)."""
        z_range = tuple(int(v) for v in self.range_slider.value()) if self.limit_check.isChecked() else (None, None)
        return StopRule(z_range=z_range, **{name: spin.value() for name, spin in self.stop_spins.items()})

    def prompt_settings(self) -> "PromptSettings":
        """The prompt settings (mode from the combo box)."""
        from ..segment.prompting import PromptSettings

        return PromptSettings(mode=self.prompt_combo.currentText())

    # ------------------------------------------------------------------ starting runs
    def propagate(self, direction: str = "both", *, fill_only: bool = False) -> bool:
        """Propagate the active object along the shown plane's axis; False (and a warning) when it cannot start."""
        from ..segment.propagation import propagate
        from .propagate_run import key_masks

        c = self.controller
        if c is None or self._run is not None:
            return False
        plane, obj = c.current_plane(), c.session.active
        keys = {} if plane is None or obj is None else key_masks(c.session, obj, plane[0], plane[1])
        problem = ("Show a 2D slice of the scan to propagate (not the 3D view)." if plane is None else
                   "No object to propagate: add an object and segment it on a slice first." if obj is None else
                   f"Object {obj} has no voxels along this axis: segment it on a slice first." if not keys else
                   "Fill between keys needs at least two key slices." if fill_only and len(keys) < 2 else "")
        if problem:
            self._set_status(problem, "warning")
            return False
        axis, rule = plane[0], self.stop_rule()  # type: ignore[index]
        if fill_only:  # the fronts stay between the first and the last key slice
            lo, hi = rule.z_range
            lo, hi = max(min(keys), 0 if lo is None else lo), min(max(keys), max(keys) if hi is None else hi)
            rule = dataclasses.replace(rule, z_range=(lo, hi))
            if rule.z_range[0] > rule.z_range[1]:
                self._set_status("The slice range does not lie between the key slices.", "warning")
                return False
        prompt, engine = self.prompt_settings(), self.engine
        if engine == "memory" and not self.memory_available():
            self._set_status("The memory engine needs a SAM 2.1 or MedSAM2 model: load one, or choose "
                             "slice prompts.", "warning")
            return False
        trackers = self._memory_trackers()

        def call(predictor: Any, run: Run, **common: Any) -> PropagationResult:
            if engine == "memory":
                from ..segment.memory.engine import propagate_memory

                with trackers.use(c, axis, predictor) as tracker:
                    return propagate_memory(predictor, run.snapshot, obj, keys, tracker=tracker, direction=direction,
                                            stop=rule, **common)
            return propagate(predictor, run.snapshot, obj, keys, direction=direction, stop=rule, prompt=prompt,
                             **common)

        what = "filling between key slices" if fill_only else f"propagating {direction}"
        return self._start(obj, axis, set(keys), call, what + (" (memory)" if engine == "memory" else ""), engine)

    def repropagate_from(self, index: int) -> bool:
        """Re-propagate the last run's object from its corrected slice ``index`` (other key slices protected)."""
        from ..segment.propagation import repropagate
        from ..segment.propagation.run import slice_index

        c = self.controller
        if c is None or self._run is not None or self._last is None or self._last[0] not in c.session:
            return False
        obj, axis, keys = self._last
        mask = c.session.labels[slice_index(axis, index)] == obj
        if not mask.any():
            return False
        rule, prompt = self.stop_rule(), self.prompt_settings()
        # A memory run's corrections go on with its tracker (the object's key slices are in it);
        # without one (another model or mapping since), the slice engine re-propagates.
        trackers = self._trackers
        memory = (self._last_engine == "memory" and trackers is not None and self.memory_available()
                  and trackers.find(c, axis, obj) is not None)

        def call(predictor: Any, run: Run, **common: Any) -> PropagationResult:
            if memory:
                from ..segment.memory.engine import repropagate_memory

                with trackers.use(c, axis, predictor) as tracker:  # type: ignore[union-attr]
                    return repropagate_memory(predictor, run.snapshot, obj, index, mask, tracker=tracker,
                                              other_keys=sorted(keys), stop=rule, **common)
            return repropagate(predictor, run.snapshot, obj, index, mask, other_keys=sorted(keys), stop=rule,
                               prompt=prompt, **common)

        return self._start(obj, axis, keys | {int(index)}, call, f"re-propagating from slice {index}"
                           + (" (memory)" if memory else ""), "memory" if memory else "slice")

    def start_run(self, obj: int, axis: int, keys: set[int], call: Callable, what: str, *,
                  needs_predictor: bool = True) -> bool:
        """Run ``call(predictor, run, locked=, overwrite=, cancel=, progress=)`` -> PropagationResult as a propagation.

        Other panels use it for runs that end in a PropagationResult (the concept panel's "Find in all
        slices"): the same live merge, report, Cancel and one-step undo. ``needs_predictor=False`` passes
        None instead of the scan's SAM predictor (no SAM model or embedding needed). False: a run is already
        under way (or no scan).
        """
        if self.controller is None or self._run is not None:
            return False
        return self._start(obj, axis, set(keys), call, what, needs_predictor=needs_predictor)

    def _start(self, obj: int, axis: int, keys: set[int], call: Callable, what: str, engine: str = "slice", *,
               needs_predictor: bool = True) -> bool:
        from .propagate_run import Recorder, Run

        from napari.utils import progress

        from .workers import start_worker

        c = self.controller
        run = Run(c, obj, axis, keys, what)
        run.engine, run.trackers = engine, self._trackers
        locked, overwrite = c.session.locked_mask(), bool(c.overwrite)

        def report(done: int, total: int, message: str) -> None:  # worker thread
            k = run.last
            content = None if k is None else (k, run.base.get(k), run.view(k).copy())
            self._tick.emit(run, (done, total, message, content))

        def job() -> PropagationResult:
            c.scan_signature()  # hashes the scan the first time: never on the Qt thread
            predictor = Recorder(c.predictor(axis), run) if needs_predictor else None
            return call(predictor, run, locked=locked, overwrite=overwrite, cancel=run.cancel, progress=report)

        run.bar = progress(total=0, desc=f"Object {obj}: {what}")
        self.progress.start(0, f"object {obj}: {what}...")
        self._run = run
        self._set_status(f"Object {obj}: {what}...")
        self._update_enabled()
        # An error comes back as the outcome too: _finish reverts what was merged and reports it.
        self._worker = start_worker(job, on_done=lambda result: self._finish(run, result),
                                    on_error=lambda error: self._finish(run, error))
        return True

    def cancel(self) -> None:
        """Ask the run to stop after the slice it is on; the slices finished so far are kept."""
        if self._run is not None:
            self._run.cancel.set()
            self.progress.note("cancelling after this slice")
            self._set_status("Cancelling: the slices finished so far are kept...")

    # ------------------------------------------------------------------ results reach the live labels
    def _on_tick(self, run: Run, payload: tuple) -> None:
        if run is not self._run:
            return
        done, total, message, content = payload
        # Merge before touching the progress bar: updating it may process pending events, the
        # run's end among them, which must find this slice already merged.
        if content is not None and run.merge(*content):  # the mask grows on screen
            run.controller.labels_layer.refresh()
        if run is not self._run:
            return
        self.progress.step(int(done), int(total))
        if run.cancel.is_set():
            self.progress.note("cancelling after this slice")
        run.bar.total = max(int(total), int(done))
        run.bar.update(int(done) - run.bar.n)
        run.bar.set_description(f"Object {run.obj}: {message}")

    def _finish(self, run: Run, outcome: PropagationResult | Exception) -> None:
        from ..segment.propagation.run import PropagationResult
        from .propagate_run import KEPT, summarize, written_text

        result = outcome if isinstance(outcome, PropagationResult) else None
        self._run, self._worker = None, None
        run.bar.close()
        self.progress.stop()
        previous = {} if result is None else result.undo.previous
        for k in sorted(set(run.expected) | set(previous)):  # after an error the snapshot is restored: this reverts
            run.merge(k, previous.get(k), run.view(k).copy())
        applied = None if result is None else dataclasses.replace(result, undo=run.undo_record())
        if applied is not None and applied.written_slices and run.obj in run.controller.session:
            run.controller.session.push_propagation(run.obj, applied)
        run.controller.labels_layer.refresh()
        self._update_enabled()
        if applied is None:
            self._set_status(f"Object {run.obj}: {run.what} failed: {outcome}. Your labels are as they were.",
                             "warning" if isinstance(outcome, MedSamError) else "error")
        elif run.controller is self.controller:
            self.last_result = applied
            same = self._last is not None and self._last[:2] == (run.obj, run.axis)
            self._last = (run.obj, run.axis, set(run.keys) | (self._last[2] if same else set()))  # type: ignore[index]
            self._last_engine = run.engine
            self._show(applied, run.keys, keep=same)
            self._set_status(f"Object {run.obj}: {summarize(applied)}; {written_text(applied)}.")
            self.report_changed.emit(run.controller.image_layer, self.report_state())
        else:  # the user switched scans meanwhile: the report is that scan's, kept for when it is shown again
            kinds = {r.index: r.kind for r in applied.reports if r.kind in KEPT} | {k: "key" for k in run.keys}
            self.report_changed.emit(run.controller.image_layer, {
                "result": applied, "last": (run.obj, run.axis, set(run.keys)), "kinds": kinds,
                "summary": summarize(applied),
                "status": f"Object {run.obj}: {summarize(applied)}; {written_text(applied)}.",
                "engine": run.engine, "trackers": run.trackers})
        self.finished.emit(applied)

    def _on_mask_written(self, info: Any) -> None:
        """A new prediction of the last run's object on another slice is a correction: re-propagate from it."""
        from ..segment.propagation.run import slice_index

        axis, index, label = (int(v) for v in info)
        if (not self.repropagate_check.isChecked() or self._run is not None or self._last is None
                or (label, axis) != self._last[:2] or index in self._last[2]):
            return
        labels = self.controller.session.labels
        near = [j for j in (index - 1, index + 1) if 0 <= j < labels.shape[axis]]
        if any((labels[slice_index(axis, j)] == label).any() for j in near):  # inside the run's reach (not undone)
            self.repropagate_from(index)

    # ------------------------------------------------------------------ report and overlay
    def _show(self, result: PropagationResult, keys: set[int], keep: bool = False) -> None:
        from .propagate_run import KEPT, summarize

        self.summary.setText(summarize(result))
        rows = self._fill_table(result)
        self._kinds = {**(self._kinds if keep else {}), **{r.index: r.kind for r in rows if r.kind in KEPT}}
        self._kinds.update({k: "key" for k in keys})
        self._update_overlay()
        self._follow_report()

    def _fill_table(self, result: PropagationResult) -> list:
        """One row per slice of the run's report; returns the reports in slice order."""
        return fill_report_table(self.table, result.reports)

    def _row_clicked(self, row: int, column: int = 0) -> None:
        item = self.table.item(row, 0)
        if item is not None and self.controller is not None and self.last_result is not None:
            self.go_to_slice(self.last_result.axis, int(item.data(Qt.ItemDataRole.UserRole)))

    def go_to_slice(self, axis: int, index: int) -> None:
        """Move the viewer to slice ``index`` along the scan's ``axis``."""
        c = self.controller
        dims = c.viewer.dims
        data = np.asarray(c.image_layer.world_to_data(dims.point), float)[-3:]
        data[axis] = index
        world = np.asarray(c.image_layer.data_to_world(data), float)[-3:]
        dims.set_point(dims.ndim - 3 + axis, float(world[axis]))

    def _on_dims(self, event: Any = None) -> None:
        plane = None if self.controller is None else self.controller.current_plane()
        if plane is not None and plane[0] != self._axis:  # a new axis: the range covers all of it
            self._axis, n = plane[0], int(self.controller.shape[plane[0]])
            self.range_slider.setRange(0, n - 1)
            self.range_slider.setValue((0, n - 1))
        self._update_overlay()

    def _update_overlay(self) -> None:
        """Say on the canvas whether the shown slice is a key slice or a propagated one of the last run's object."""
        from ..segment.propagation.run import slice_index

        c, last = self.controller, self._last
        plane = None if c is None or last is None else c.current_plane()
        kind = None if plane is None or plane[0] != last[1] else self._kinds.get(plane[1])  # type: ignore[index]
        if kind is None or not (c.session.labels[slice_index(*plane)] == last[0]).any():  # type: ignore[index,misc]
            self._hide_overlay()  # nothing known here, or undone / erased since
            return
        overlay = _text_overlay(c.viewer)
        overlay.text = f"object {last[0]}: {'key slice' if kind == 'key' else kind}"  # type: ignore[index]
        overlay.visible = self._overlay_on = True

    def _hide_overlay(self) -> None:
        if self._overlay_on and self.controller is not None:
            _text_overlay(self.controller.viewer).visible = False
        self._overlay_on = False
