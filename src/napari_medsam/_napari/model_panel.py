"""The dock widget's "Model" box: which network, its weight file, the device, and the input mapping.

Everything slow (downloading, hashing a weight file, building a network) runs in napari thread
workers; the Qt thread only looks at file names and sizes. Errors never leave a Qt slot: they
become a napari notification and the status line. Choices are remembered in :class:`Settings`.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import QComboBox, QFileDialog, QFormLayout, QGridLayout, QGroupBox, QLabel, QPushButton

from ..errors import DeviceError, DownloadCancelled, MedSamError, WeightsError
from ..models.registry import ModelSpec, list_models, recommended_model
from ..models.weights import cached_path, partial_path, weights_dir
from ..segment.intensity import IntensityMapping
from .messages import MessageLabel
from .model_choices import (  # noqa: F401 - the mapping keys are re-exported
    DEFAULT_MAPPING,
    MAPPING_LIMITS,
    MAPPING_PERCENTILE,
    DeviceCombo,
    MappingCombo,
    gpu_likely,
)
from .settings import Settings

if TYPE_CHECKING:
    from napari.qt.threading import FunctionWorker

__all__ = ["MAPPING_LIMITS", "MAPPING_PERCENTILE", "ModelPanel", "weight_state"]

CHECKPOINT_FILTER = "PyTorch checkpoints (*.pth *.pt *.ckpt *.bin);;All files (*)"
_PROGRESS_EVERY_S = 0.1


# (setting value, shown text, tooltip) of the encoder backends (models/backends.py; not imported
# here because it imports torch, which napari's start must not).
ENCODER_BACKENDS = (
    ("auto", "float32 (exact)", "The networks in float32: the official results (golden tests)."),
    ("bf16", "bfloat16 (fast)",
     "Faster and approximate: bfloat16 matrix products, on CPUs with AMX or AVX512-BF16 and on GPUs. "
     "The embedding differs from float32 by about 1%; masks agree with Dice ~0.99 (docs/performance.md)."),
    ("int8", "int8 (fast)",
     "Faster and approximate: dynamic int8 linear layers on the CPU (SAM 1 family). The embedding "
     "differs from float32 by about 3%; masks agree with Dice ~0.97 (docs/performance.md)."),
)


def _megabytes(size: int) -> str:
    mb = size / 1e6
    return f"{mb:.0f} MB" if mb >= 10 else f"{mb:.1f} MB"


def weight_state(spec: ModelSpec, local: str | None, cache_dir: str | None) -> tuple[str, str]:
    """(state text, tooltip) of a model's weight file: a local file, present in the cache, or missing."""
    if local:
        path = Path(local).expanduser()
        if path.is_file():
            return f"local file: {path.name}", str(path)
        return f"local file missing: {path.name}", f"{path} does not exist; choose another file or forget it"
    target = cached_path(spec, cache_dir)
    if target.is_file():
        return "present", str(target)
    size = _megabytes(spec.size_bytes) if spec.size_bytes else "size unknown"
    tip = f"Download saves it as {target}"
    if partial_path(target).is_file():
        tip += " (a partial download is kept and will be resumed)"
    return f"not downloaded ({size})", tip


def missing_weights_text(spec: ModelSpec) -> str:
    """What the panel says when a model without weights is to be loaded: size, licence, choices."""
    size = _megabytes(spec.size_bytes) if spec.size_bytes else "size unknown"
    return (f"{spec.display_name} has no weights on this computer. Download ({size}, licence {spec.license}, "
            f"{spec.homepage}), or Choose file... / Folder... if you have them.")


def _short(message: str, limit: int = 90) -> str:
    """The first sentence of ``message``, cut to ``limit`` characters: what fits a napari toast."""
    first = message.split(". ", 1)[0].split("\n", 1)[0]
    return first if len(first) <= limit else first[: limit - 3] + "..."


def _message(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, MedSamError) and str(exc) else f"{type(exc).__name__}: {exc}"


def _notify(level: str, message: str) -> None:
    from napari.utils import notifications

    getattr(notifications, f"show_{level}")(message)  # show_error, show_warning or show_info


def _button(text: str, slot: Any, tip: str = "") -> QPushButton:
    button = QPushButton(text)
    button.setToolTip(tip)
    button.clicked.connect(slot)
    return button


class ModelPanel(QGroupBox):
    """Model chooser with weight download/choice, device, loading in a worker and the input mapping."""

    model_changed = Signal(object)  # the loaded SamModel, or None (unloaded / loading failed)
    mapping_changed = Signal()
    _progress = Signal(object, object)  # (done bytes, total bytes or None), emitted from the download thread

    def __init__(self, settings: Settings, parent: Any = None) -> None:
        super().__init__("Model", parent)
        self.settings = settings
        self.model = None  # the loaded SamModel
        self.model_name: str | None = None  # registry name (or set_model's name) of the loaded model
        self._specs = {spec.name: spec for spec in list_models()}
        self._download: dict[str, Any] | None = None  # the running download: spec, cancel, bar, text
        self._load_after = None
        self._load_worker = None
        self._loading: ModelSpec | None = None  # the model being loaded (None: result unwanted)

        self.model_combo = QComboBox()
        for spec in self._specs.values():
            self.model_combo.addItem(f"{spec.display_name} ({spec.input_size} px)", spec.name)
            self.model_combo.setItemData(self.model_combo.count() - 1, spec.notes, Qt.ToolTipRole)
        self.weights_label = QLabel(wordWrap=True)
        self.download_button = _button("Download", self.download)
        self.cancel_button = _button("Cancel", self.cancel_download, "Stop the download; the next one resumes")
        self.choose_button = _button("Choose file...", self.choose_file, "Use a weight file from disk instead")
        self.forget_button = _button("Forget file", lambda: self.set_local_file(self.selected_model, None),
                                     "Stop using the chosen file; use the downloaded weights again")
        self.folder_button = _button("Folder...", self.choose_folder,
                                     "The folder that holds downloaded weights (remembered; empty = the user cache)")
        self.device_combo = DeviceCombo(self.settings.get("device", "auto"))
        self.backend_combo = QComboBox()
        for key, text, tip in ENCODER_BACKENDS:
            self.backend_combo.addItem(text, key)
            self.backend_combo.setItemData(self.backend_combo.count() - 1, tip, Qt.ToolTipRole)
        self.backend_combo.setToolTip("How the image encoder runs; takes effect at the next Load model")
        self.backend_combo.setCurrentIndex(max(0, self.backend_combo.findData(self.settings.get("backend", "auto"))))
        self.load_button = _button("Load model", self.load, "Build the model on the device (in the background)")
        self.status = MessageLabel("no model loaded")  # wraps, elides; the whole text in its tooltip
        self.mapping_combo = MappingCombo(self.settings.get("mapping", DEFAULT_MAPPING))

        # The buttons under the state, two per row: one row of five is wider than napari's dock.
        weights_row = QGridLayout()
        weights_row.addWidget(self.download_button, 0, 0)
        weights_row.addWidget(self.choose_button, 0, 1)
        weights_row.addWidget(self.folder_button, 1, 0)
        weights_row.addWidget(self.forget_button, 1, 1)
        weights_row.addWidget(self.cancel_button, 2, 0, 1, 2)  # only while downloading
        form = QFormLayout(self)
        form.addRow("Model", self.model_combo)
        form.addRow("Weights", self.weights_label)
        form.addRow("", weights_row)
        form.addRow("Device", self.device_combo)
        form.addRow("Encoder", self.backend_combo)
        form.addRow(self.load_button, self.status)
        form.addRow("Input", self.mapping_combo)

        saved = self.settings.get("model", "")
        if saved not in self._specs:
            saved = recommended_model(has_gpu=gpu_likely()).name
        self.model_combo.setCurrentIndex(max(0, self.model_combo.findData(saved)))
        self.model_combo.currentIndexChanged.connect(lambda: self._picked("model", self.selected_model))
        self.device_combo.currentIndexChanged.connect(lambda: self._picked("device", self.device))
        self.backend_combo.currentIndexChanged.connect(lambda: self._picked("backend", self.backend))
        self.mapping_combo.currentIndexChanged.connect(lambda: self._picked("mapping", self.mapping_choice))
        self._progress.connect(self._on_progress)
        self.refresh()

    def refresh_models(self) -> None:
        """Add models registered since the panel was built (fine-tuned local models) to the chooser."""
        for spec in list_models():
            if spec.name not in self._specs:
                self._specs[spec.name] = spec
                self.model_combo.addItem(f"{spec.display_name} ({spec.input_size} px)", spec.name)
                self.model_combo.setItemData(self.model_combo.count() - 1, spec.notes, Qt.ToolTipRole)

    def choose_folder(self) -> None:
        """Ask for the weights folder (cache) and remember it."""
        folder = QFileDialog.getExistingDirectory(self, "Folder for model weights", str(weights_dir(self._cache_dir())))
        if folder:
            self.set_cache_dir(folder)

    def set_cache_dir(self, folder: str | None) -> None:
        """Keep downloaded weights in ``folder`` from now on (None or "": the default user cache)."""
        self.settings.set("cache_dir", str(folder or ""))
        self.refresh()

    def _picked(self, key: str, value: str) -> None:
        self.settings.set(key, value)
        self.refresh()
        if key == "mapping":
            self.mapping_changed.emit()

    @property
    def selected_model(self) -> str:
        """Registry name of the model chosen in the combo (not necessarily loaded)."""
        return str(self.model_combo.currentData())

    @property
    def selected_spec(self) -> ModelSpec:
        """The registry spec of the chosen model."""
        return self._specs[self.selected_model]

    @property
    def device(self) -> str:
        """The chosen device: "auto", "cpu", "cuda:N" or "mps" (the loaded model's is ``model.device``)."""
        return self.device_combo.device

    @property
    def backend(self) -> str:
        """The chosen encoder backend: "auto", "float32", "bf16" or "int8" (models/backends.py)."""
        return str(self.backend_combo.currentData())

    @property
    def mapping_choice(self) -> str:
        """The chosen mapping key: a CT_WINDOWS name, MAPPING_LIMITS or MAPPING_PERCENTILE."""
        return self.mapping_combo.choice

    @property
    def downloading(self) -> bool:
        """Whether a weight download is running."""
        return self._download is not None

    @property
    def loading(self) -> bool:
        """Whether a model is being loaded."""
        return self._load_worker is not None

    def _cache_dir(self) -> str | None:
        return self.settings.get("cache_dir", "") or None

    def local_file(self, name: str) -> str | None:
        """The weight file the user chose for model ``name``, or None (use the cache)."""
        value = self.settings.get("checkpoints", {}).get(name)
        return value if isinstance(value, str) and value else None

    def weights_available(self) -> bool:
        """Whether the chosen model's weights are on disk (a chosen file or the cache; no hashing)."""
        spec = self.selected_spec
        local = self.local_file(spec.name)
        return Path(local).expanduser().is_file() if local else cached_path(spec, self._cache_dir()).is_file()

    def refresh(self) -> None:
        """Update the weight state, buttons and status (cheap: looks at files, does not read them)."""
        spec = self.selected_spec
        local = self.local_file(spec.name)
        text, tip = weight_state(spec, local, self._cache_dir())
        busy = self._download is not None
        if busy and self._download["spec"].name == spec.name:
            text, tip = self._download["text"], "Cancel stops the download; the next one resumes from there"
        self.weights_label.setText(text)
        self.weights_label.setToolTip(tip)
        self.download_button.setVisible(local is None and text != "present")
        self.download_button.setEnabled(not busy)
        self.cancel_button.setVisible(busy)
        self.cancel_button.setEnabled(busy and not self._download["cancel"].is_set())
        self.forget_button.setVisible(local is not None)
        self.load_button.setEnabled(self._load_worker is None)
        if self._load_worker is None and self.model is not None:
            ready = self._ready_text(self.model_name, self.model)
            other = self.model_name in self._specs and self.model_name != spec.name
            switch = f"; Load model switches to {spec.display_name}" if other else ""
            self._set_status(ready + switch)

    def _ready_text(self, name: str | None, model: Any) -> str:
        """The status of a loaded model: its name, the device it runs on and the torch build."""
        from ..models.device import describe_runtime, torch_build

        backend = getattr(model, "backend", "float32")
        approximate = "" if backend == "float32" else f", {backend} encoder"
        return f"ready: {self._display(name)} on {describe_runtime(model.device)}{approximate}; {torch_build()}"

    def _display(self, name: str | None) -> str:
        spec = self._specs.get(name or "")
        return spec.display_name if spec is not None else str(name)

    def _set_status(self, text: str) -> None:
        self.status.setText(text)

    def _fail(self, message: str, level: str = "error") -> None:
        """The whole message in the panel (wrapped, with a tooltip); its first sentence in a toast."""
        self._set_status(message)
        short = _short(message)
        # napari's toast shows the first line; the whole text follows it (the toast's expander)
        _notify(level, short if short == message else f"{short} (details in the Model box)\n{message}")

    def choose_file(self) -> None:
        """Ask for a local weight file for the chosen model and remember it."""
        spec = self.selected_spec
        start = self.local_file(spec.name) or str(weights_dir(self._cache_dir()))
        path, _ = QFileDialog.getOpenFileName(self, f"Weight file for {spec.display_name}", start, CHECKPOINT_FILTER)
        if path:
            self.set_local_file(spec.name, path)

    def set_local_file(self, name: str, path: str | None) -> bool:
        """Use ``path`` as model ``name``'s weights (None: the cache again); False if it is no checkpoint."""
        from ..models.weights import resolve_weights

        checkpoints = self.settings.get("checkpoints", {})
        if path:
            try:  # exists and looks like a checkpoint (reads 64 bytes; the layout is checked on loading)
                checkpoints[name] = str(resolve_weights(self._specs[name], path, download=False))
            except (WeightsError, OSError) as exc:
                self._fail(_message(exc))
                return False
        else:
            checkpoints.pop(name, None)
        self.settings.set("checkpoints", checkpoints)
        self.refresh()
        return True

    def download(self) -> FunctionWorker | None:
        """Download the chosen model's weights in a worker (napari progress bar); return the worker."""
        from .workers import start_worker

        from ..models.weights import download_weights
        from .progress import download_progress

        spec = self.selected_spec
        target = cached_path(spec, self._cache_dir())
        if self._download is not None or target.is_file():
            self.refresh()
            return None
        cancel = threading.Event()
        emit, last = self._progress.emit, [0.0]

        def report(done: int, total: int | None) -> None:
            now = time.monotonic()
            if now - last[0] >= _PROGRESS_EVERY_S or (total is not None and done >= total):
                last[0] = now
                try:
                    emit(done, total)
                except RuntimeError:  # the panel was deleted while downloading
                    cancel.set()

        self._download = {"spec": spec, "cancel": cancel,
                          "bar": download_progress(f"Downloading {spec.display_name}"), "text": "downloading..."}
        self._set_status(f"downloading {spec.display_name} weights...")
        self.refresh()
        return start_worker(download_weights, spec, target, progress=report, cancel=cancel, on_done=self._downloaded,
                            on_error=self._download_failed, on_finished=self._download_finished)

    def cancel_download(self) -> None:
        """Stop the running download (the partial file is kept; the next download resumes)."""
        if self._download is not None:
            self._download["cancel"].set()
            self._load_after, self._download["text"] = None, "cancelling..."
            self.refresh()

    def _on_progress(self, done: int, total: int | None) -> None:
        state = self._download
        if state is None or state["cancel"].is_set():
            return
        state["bar"](done, total)
        state["text"] = (f"downloading {int(100 * done / total)}%..." if total
                         else f"downloading {_megabytes(done)}...")
        self.refresh()

    def _downloaded(self, path: Path) -> None:
        name = self._download["spec"].display_name if self._download else "the model"
        self._set_status(f"downloaded {name} weights")
        _notify("info", f"Downloaded the {name} weights to {path}")

    def _download_failed(self, exc: BaseException) -> None:
        self._load_after = None
        if isinstance(exc, DownloadCancelled):
            self._fail("download cancelled; the next download resumes where it stopped", "info")
        else:
            self._fail(f"Download failed: {_message(exc)}")

    def _download_finished(self) -> None:
        if self._download is not None:
            self._download["bar"].close()
        self._download = None
        self.refresh()
        name, self._load_after = self._load_after, None
        if name is not None and name == self.selected_model and self.weights_available():
            self.load()

    def load(self) -> FunctionWorker | None:
        """Build the chosen model on the chosen device in a worker; without weights, say what is missing."""
        from .workers import start_worker

        if self._load_worker is not None:
            return None
        spec, device, cache, backend = self.selected_spec, self.device, self._cache_dir(), self.backend
        local = self.local_file(spec.name)
        if local is None and not cached_path(spec, cache).is_file():
            # Never download behind the user's back: say what is missing and what to do.
            if self._download is not None and self._download["spec"].name == spec.name:
                self._load_after = spec.name  # loads when the running download ends
                self._set_status(f"{spec.display_name} loads when its download has finished")
                return None
            self._load_after = spec.name  # a Download pressed next loads it afterwards
            self._set_status(missing_weights_text(spec))
            _notify("warning", f"{spec.display_name} has no weights yet: see the Model box")
            return None

        def job():
            from ..models.device import resolve_device
            from ..models.weights import resolve_weights
            from ..segment.model import SamModel

            resolve_device(device)  # an unusable device fails before a large file is hashed
            path = resolve_weights(spec, local, download=False, cache_dir=cache)  # hashes a new file once
            return SamModel.from_checkpoint(spec.name, path, device=device, download=False, backend=backend)

        self._loading = spec
        self._set_status(f"loading {spec.display_name} on {self._device_text(device)}...")
        worker = start_worker(job, on_done=self._loaded, on_error=self._load_failed, on_finished=self._load_done)
        self._load_worker = worker
        self.refresh()
        return worker

    @staticmethod
    def _device_text(device: str) -> str:
        if device != "auto" or "torch" not in sys.modules:
            return device if device != "auto" else "the best device"
        from ..models.device import resolve_device

        return str(resolve_device("auto"))

    def _loaded(self, model: Any) -> None:
        if self._loading is not None:  # None: set_model() or shutdown() came first
            self.set_model(model, self._loading.name)

    def _load_failed(self, exc: BaseException) -> None:
        spec, self._loading = self._loading, None
        if spec is None:
            return
        self.model, self.model_name = None, None
        if isinstance(exc, (WeightsError, DeviceError)):
            self._fail(f"Cannot load {spec.display_name}: {exc}")
        else:
            self._fail(f"Loading {spec.display_name} failed: {_message(exc)}")
        self.model_changed.emit(None)

    def _load_done(self) -> None:
        self._load_worker, self._loading = None, None
        self.device_combo.probe()  # torch is loaded now: the device list costs nothing
        self.refresh()

    def set_model(self, model: Any, name: str) -> None:
        """Use an already built SamModel (or None to unload) under registry name ``name``."""
        self._loading = None  # a load still running is now out of date
        self.model, self.model_name = model, (name if model is not None else None)
        self._set_status("no model loaded" if model is None else self._ready_text(name, model))
        self.refresh()
        self.model_changed.emit(model)

    def unload(self) -> None:
        """Forget the loaded model (its memory is freed once nothing else holds it)."""
        self.set_model(None, "")

    def set_mapping_choice(self, key: str) -> None:
        """Choose the mapping by key (a CT_WINDOWS name, MAPPING_LIMITS or MAPPING_PERCENTILE)."""
        self.mapping_combo.set_choice(key)

    def mapping_for(self, image_layer: Any) -> IntensityMapping:
        """The model input mapping of the chosen entry for ``image_layer`` (read from the layer now)."""
        return self.mapping_combo.mapping_for(image_layer)

    def shutdown(self) -> None:
        """Cancel a running download and ignore a running load's result (call when the widget closes)."""
        self._loading, self._load_after = None, None
        if self._download is not None:
            self._download["cancel"].set()
