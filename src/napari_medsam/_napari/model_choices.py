"""The Model box's two choosers that are not about weights: the compute device and the input mapping.

The device list comes from torch, and importing torch takes seconds: the plugin must not do it
when napari starts. So :class:`DeviceCombo` offers "auto", "cpu" and the remembered device at
first and asks torch in a worker the first time it is opened (at once if torch is loaded).
:class:`MappingCombo` turns the chosen entry into an :class:`IntensityMapping` for a layer.
"""

from __future__ import annotations

import os
import shutil
import sys
import weakref
from typing import Any

import numpy as np
from qtpy.QtWidgets import QComboBox

from ..errors import MedSamError
from ..segment.intensity import IntensityMapping, contrast_limits, ct_window, percentile_mapping
from ..windows import CT_WINDOWS

__all__ = ["DEFAULT_MAPPING", "MAPPING_LABELS", "MAPPING_LIMITS", "MAPPING_PERCENTILE", "DeviceCombo",
           "MappingCombo", "gpu_likely"]

MAPPING_LIMITS = "contrast limits"
MAPPING_PERCENTILE = "percentile"
MAPPING_LABELS: dict[str, str] = {
    **{name: f"CT window: {name} (L{lw[0]:g}/W{lw[1]:g})" for name, lw in CT_WINDOWS.items()},
    MAPPING_LIMITS: "current contrast limits",
    MAPPING_PERCENTILE: "MR percentile (0.5-99.5)",
}
DEFAULT_MAPPING = MAPPING_LIMITS  # what the user sees is what the model sees, for CT and MR alike


def gpu_likely() -> bool:
    """Whether a GPU is likely here, without importing torch (only the default model depends on it)."""
    if "torch" in sys.modules:
        from ..models.device import available_devices

        return available_devices() != ["cpu"]
    apple = sys.platform == "darwin" and os.uname().machine == "arm64"
    return apple or os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi") is not None


class DeviceCombo(QComboBox):
    """ "auto", the machine's devices (learned lazily) and the current choice even where unusable."""

    def __init__(self, current: str = "auto", parent: Any = None) -> None:
        super().__init__(parent)
        self.devices: list[str] | None = None  # None until torch has been asked
        self._probing = False
        self.setToolTip("Where the network runs; auto = CUDA GPU, else Apple GPU, else CPU")
        self._fill(current)
        if "torch" in sys.modules:  # cheap now
            self.probe()

    @property
    def device(self) -> str:
        """The chosen device name ("auto", "cpu", "cuda:0", "mps", ...)."""
        return str(self.currentData())

    def showPopup(self) -> None:  # noqa: N802 - Qt's name
        """Ask for the devices (in the background) the first time the list opens."""
        self.probe()
        super().showPopup()

    def probe(self) -> None:
        """Learn the devices: at once if torch is loaded, else in a napari worker (importing torch takes seconds)."""
        if self.devices is not None or self._probing:
            return
        if "torch" in sys.modules:
            from ..models.device import available_devices

            self._found(available_devices())
            return
        from .workers import start_worker

        self._probing = True
        start_worker(_probe_devices, on_done=self._found, on_error=lambda _exc: self._found(["cpu"]))

    def _found(self, names: list[str]) -> None:
        self.devices, self._probing = list(names), False
        self._fill(self.device)

    def _fill(self, current: str) -> None:
        names = ["auto", *(self.devices or ["cpu"])]
        blocked = self.blockSignals(True)  # refilling is no choice of the user's
        self.clear()
        for name in names:
            self.addItem(name, name)
        if current not in names:  # "cuda" (= cuda:0), or remembered from another machine
            self.addItem(current if self._usable(current) else f"{current} (not available)", current)
        self.setCurrentIndex(self.findData(current))
        self.blockSignals(blocked)

    def _usable(self, device: str) -> bool:
        if self.devices is None:
            return True  # not known yet: loading will tell
        from ..models.device import resolve_device

        try:
            resolve_device(device)
        except MedSamError:
            return False
        return True


class MappingCombo(QComboBox):
    """CT window presets, the layer's contrast limits, or MR percentiles, as the model input mapping."""

    def __init__(self, current: str = DEFAULT_MAPPING, parent: Any = None) -> None:
        super().__init__(parent)
        for key, label in MAPPING_LABELS.items():
            self.addItem(label, key)
        self.setToolTip("How scan intensities become the model's 8-bit input (the voxels are not changed)")
        # Narrower than its longest entry (the popup still shows them whole): the dock is ~400 px.
        self.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(18)
        self.setCurrentIndex(max(0, self.findData(current)))
        self._percentile: tuple[Any, IntensityMapping] | None = None

    @property
    def choice(self) -> str:
        """The chosen key: a CT_WINDOWS name, MAPPING_LIMITS or MAPPING_PERCENTILE."""
        return str(self.currentData())

    def set_choice(self, key: str) -> None:
        """Choose by key; ValueError for an unknown one."""
        index = self.findData(key)
        if index < 0:
            raise ValueError(f"unknown mapping {key!r}; choose one of {', '.join(MAPPING_LABELS)}")
        self.setCurrentIndex(index)

    def mapping_for(self, image_layer: Any) -> IntensityMapping:
        """The chosen entry's mapping for ``image_layer`` (contrast limits and data read now)."""
        key = self.choice
        if key in CT_WINDOWS:
            return ct_window(key)
        if key == MAPPING_LIMITS:
            low, high = (float(v) for v in image_layer.contrast_limits)
            return contrast_limits(low, high if high > low else low + 1.0)
        data = image_layer.data
        if getattr(image_layer, "multiscale", False):
            data = data[-1]  # the smallest level: percentiles hardly change, the cost does
        if self._percentile is not None and self._percentile[0]() is data:
            return self._percentile[1]  # once per volume: it reads every voxel
        mapping = percentile_mapping(np.asarray(data))
        try:
            self._percentile = (weakref.ref(data), mapping)
        except TypeError:  # data that cannot be weakly referenced: not cached
            self._percentile = None
        return mapping


def _probe_devices() -> list[str]:
    """Worker thread: import torch and list the usable devices."""
    from ..models.device import available_devices

    return available_devices()
