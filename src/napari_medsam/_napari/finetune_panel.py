"""The "Fine-tune" group: train the loaded model's mask decoder on this scan's objects.

"Fine-tune" copies the current scan and the objects of its session (the Labels layer as it is
now) and runs :func:`napari_medsam.segment.finetune.finetune` in a napari thread worker, sharing
the widget's embedding cache (slices already embedded are not encoded again). A napari progress
bar shows epoch, loss and held-out Dice; Cancel stops after the current step and keeps the best
state. The result is saved (base-model layout, JSON, learning-curve PNG, shown in the panel) and
registered as a local model; "Use tuned model" picks it in the Model box and loads it. Torch is
imported when a run starts, not when the panel docks.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtGui import QPixmap
from qtpy.QtWidgets import QGroupBox, QHBoxLayout, QLabel, QPushButton, QSpinBox, QVBoxLayout

from .messages import MessageLabel


class FinetunePanel(QGroupBox):
    """Fine-tune the loaded model on the current scan's objects; offer the result as a model."""

    error = Signal(str)
    progressed = Signal(int, int, float, object)  # epoch, step, loss, held-out Dice (from the worker thread)
    finished = Signal()

    def __init__(self, model_panel: Any, parent: Any = None) -> None:
        super().__init__("Fine-tune", parent)
        self.model_panel = model_panel
        self.controller: Any = None
        self.worker: Any = None
        self.saved: Any = None  # the last SavedModel
        self.result: Any = None
        self._bar: Any = None
        self._cancel = threading.Event()
        self.max_slices: int | None = None  # per object (quick runs, tests); None: every slice

        self.epochs = QSpinBox()
        self.epochs.setRange(1, 100)
        self.epochs.setValue(20)  # FinetuneConfig's default (not imported here: it loads torch)
        self.epochs.setToolTip("Passes over the training slices")
        self.run_button = QPushButton("Fine-tune")
        self.run_button.setToolTip("Train the loaded model's mask decoder on this scan's objects (the image encoder "
                                   "stays frozen; a quarter of the slices is held out to measure Dice)")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop after the current step; the best state so far is kept")
        self.use_button = QPushButton("Use tuned model")
        self.use_button.setToolTip("Pick the tuned model in the Model box and load it")
        self.curve = QLabel()
        self.curve.setAlignment(Qt.AlignCenter)
        self.state = MessageLabel("")

        row = QHBoxLayout()
        row.addWidget(QLabel("Epochs"))
        row.addWidget(self.epochs)
        row.addWidget(self.run_button)
        buttons = QHBoxLayout()
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.use_button)
        layout = QVBoxLayout(self)
        layout.addLayout(row)
        layout.addLayout(buttons)
        layout.addWidget(self.curve)
        layout.addWidget(self.state)

        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.use_button.clicked.connect(self.use_tuned)
        self.progressed.connect(self._on_progress)
        self._update()

    # ------------------------------------------------------------------ state
    def set_controller(self, controller: Any) -> None:
        """The current scan's controller (None: no scan or no model)."""
        self.controller = controller
        self._update()

    @property
    def running(self) -> bool:
        return self.worker is not None

    def _update(self) -> None:
        self.run_button.setEnabled(self.controller is not None and not self.running)
        self.cancel_button.setEnabled(self.running)
        self.use_button.setEnabled(self.saved is not None and not self.running)
        if self.controller is None and not self.running and self.saved is None:
            self.state.setText("Load a model and segment some objects; then fine-tune on them.")

    # ------------------------------------------------------------------ run
    def run(self, out: str | Path | None = None) -> Any:
        """Start training in a worker; returns the worker (None when nothing can start)."""
        from .workers import start_worker

        controller = self.controller
        if controller is None or self.running:
            return None
        labels = np.array(controller.session.labels, copy=True)
        named = {o.value: o.name for o in controller.session.objects}
        objects = {int(v): named.get(int(v), f"label {v}") for v in np.unique(labels) if v != 0}
        if not objects:
            self.error.emit("No object on this scan yet: segment (or paint) some objects first.")
            return None
        from .layers import volume_from_layer_meta

        volume = volume_from_layer_meta(controller.image_layer.metadata)
        if volume is None:
            self.error.emit("Fine-tuning needs a scan opened by napari-medsam (it reads its geometry).")
            return None
        spec = self.model_panel.selected_spec
        name = self.model_panel.model_name or spec.name
        model, mapping, cache, epochs = controller.model, controller.mapping, controller.cache, self.epochs.value()
        local = self.model_panel.local_file(name)
        cache_dir = self.model_panel._cache_dir()
        target = Path(out) if out is not None else None
        self._cancel.clear()

        def job():
            from ..models.local import models_dir
            from ..models.registry import get_model
            from ..models.weights import resolve_weights
            from ..segment.finetune import FinetuneConfig, finetune
            from ..segment.finetune_save import save_finetuned

            base = get_model(name)
            weights = resolve_weights(base, local, download=False, cache_dir=cache_dir)
            config = FinetuneConfig(epochs=epochs, objects=tuple(objects), max_slices=self.max_slices)
            result = finetune(model, [(volume, labels)], config=config, mapping=mapping, cache=cache,
                              progress=lambda *a: self.progressed.emit(*a), cancel=self._cancel)
            stem = f"{base.name}_tuned_{Path(volume.source_path or 'scan').name.split('.')[0]}"
            path = target or models_dir() / f"{stem}.pth"
            saved = save_finetuned(result, path, base_spec=base, base_checkpoint=weights,
                                   data=[str(volume.source_path or controller.image_layer.name)], objects=objects,
                                   epochs=epochs)
            return result, saved

        from napari.utils import progress

        self._bar = progress(total=epochs, desc="fine-tuning")
        self.state.setText(f"fine-tuning {spec.display_name} on {len(objects)} object(s)...")
        self.worker = start_worker(job, on_done=self._done, on_error=self._failed, on_finished=self._finished)
        self._update()
        return self.worker

    def cancel(self) -> None:
        """Stop after the current step (the best state so far is kept and saved)."""
        self._cancel.set()
        self.state.setText("stopping after this step; the best state so far is kept...")

    def _on_progress(self, epoch: int, step: int, loss: float, dice: Any) -> None:
        text = f"epoch {epoch}, step {step}: loss {loss:.3f}, held-out Dice {dice:.3f}" if dice is not None else ""
        if self._bar is not None:
            self._bar.set_description(f"fine-tuning: {text}")
            self._bar.n = epoch
            self._bar.refresh()
        self.state.setText(text)

    def _done(self, value: Any) -> None:
        self.result, self.saved = value
        pixmap = QPixmap(str(self.saved.curve))
        if not pixmap.isNull():
            self.curve.setPixmap(pixmap.scaledToWidth(min(320, pixmap.width()), Qt.SmoothTransformation))
        result = self.result
        stopped = " (cancelled: best state kept)" if result.cancelled else ""
        self.state.setText(f"held-out Dice {result.dice_before:.3f} -> {result.dice_after:.3f} in "
                           f"{result.seconds:.0f} s{stopped}; saved as {self.saved.name}")
        self.model_panel.refresh_models()

    def _failed(self, exc: BaseException) -> None:
        self.state.setText(f"fine-tuning failed: {exc}")
        self.error.emit(str(exc))

    def _finished(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.worker = None
        self._update()
        self.finished.emit()

    def use_tuned(self) -> Any:
        """Pick the tuned model in the Model box and load it (returns the load worker)."""
        if self.saved is None:
            return None
        combo = self.model_panel.model_combo
        combo.setCurrentIndex(combo.findData(self.saved.name))
        return self.model_panel.load()
