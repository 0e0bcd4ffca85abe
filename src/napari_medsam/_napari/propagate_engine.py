"""The Propagate box's engine choice: "slice prompts" or, with a SAM 2 family model, "memory".

A mixin of :class:`~napari_medsam._napari.propagate_panel.PropagatePanel` (it uses the panel's
``engine_combo``, ``settings``, ``controller`` and ``_update_enabled``). The memory engine is
offered only while the controller's model is a SAM 2 family model (SAM 2.1, MedSAM2) and is then
the default; a choice the user makes between both is kept in the settings
(``propagation_engine``). The scan's memory trackers (one per axis, keeping each object's key
slices for corrections) are made on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .propagate_run import MemoryTrackers

__all__ = ["ENGINES", "ENGINE_TIPS", "EngineChoiceMixin", "is_memory_model"]

# engine -> its name in the combo box; "memory" needs a SAM 2 family model
ENGINES = {"slice": "slice prompts", "memory": "memory (SAM 2)"}  # short: fits the default dock width
ENGINE_TIPS = {
    "slice": "Each slice is prompted from the mask found on the previous one (any model)",
    "memory": "SAM 2's video tracking: each slice is segmented from the model's memory of the key slices "
              "and of the last slices it tracked (SAM 2 family models only: SAM 2.1, MedSAM2)",
}


def is_memory_model(model: Any) -> bool:
    """True for a SAM 2 family model (SAM 2.1, MedSAM2): the memory engine can track with it."""
    return getattr(model, "family", "sam") == "sam2" and hasattr(getattr(model, "network", None), "track_frame")


class EngineChoiceMixin:
    """Engine choice and memory trackers of the Propagate box."""

    @property
    def engine(self) -> str:
        """The chosen engine: "slice" or "memory" (see :data:`ENGINES`)."""
        return str(self.engine_combo.currentData())

    def memory_available(self) -> bool:
        """True when the controller's model is a SAM 2 family model (the memory engine can run)."""
        return self.controller is not None and is_memory_model(self.controller.model)

    def update_engine_choices(self) -> None:
        """Offer the memory engine only with a SAM 2 family model; choose the remembered engine (memory by default).

        Call it when the controller's model changes (the dock widget does).
        """
        available = self.memory_available()
        index = self.engine_combo.findData("memory")
        item = self.engine_combo.model().item(index)
        item.setEnabled(available)
        item.setToolTip(ENGINE_TIPS["memory"] if available else
                        "Needs a SAM 2.1 or MedSAM2 model: load one in the Model box")
        wanted = self.settings.get("propagation_engine") or "memory"
        choice = wanted if available and wanted in ENGINES else "slice"
        self.engine_combo.blockSignals(True)  # a choice made here is not the user's: not saved
        self.engine_combo.setCurrentIndex(self.engine_combo.findData(choice))
        self.engine_combo.blockSignals(False)
        self._update_enabled()

    def _on_engine_chosen(self, _index: int = 0) -> None:
        if self.memory_available():  # the user chose between both: remembered for SAM 2 models
            self.settings.set("propagation_engine", self.engine)
        self._update_enabled()

    def _memory_trackers(self) -> "MemoryTrackers":
        from .propagate_run import MemoryTrackers

        if self._trackers is None:
            self._trackers = MemoryTrackers()
        return self._trackers
