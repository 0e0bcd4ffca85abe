"""One scan's working state in the dock widget: its layers, objects, history, report and export defaults.

The dock widget keeps a :class:`ScanSession` per image layer (``MedSamWidget.sessions``, keyed by
the layer). Each one owns the scan's Labels layer, its two prompt layers, the
:class:`~napari_medsam.segment.session.SegmentationSession` on those labels (objects, prompts and
undo history), the last propagation report and where the scan's labels were last exported. Only
the current scan has a :class:`~.controller.SegmentationController`; switching scans closes it
and starts one on the other scan's session, reusing that scan's layers, so nothing of one scan is
ever written into another's layers. Removing a scan's image layer ends its session.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ScanSession"]


@dataclass(eq=False)
class ScanSession:
    """What the panel remembers of one scan (an image layer) between switches."""

    image: Any
    labels: Any = None  # the scan's own Labels layer (made once, reused when switching back)
    points: Any = None  # "<scan> points" and "<scan> boxes": hidden while another scan is current
    boxes: Any = None
    engine: Any = None  # the SegmentationSession on ``labels``: objects, prompts, undo history
    controller: Any = None  # only while the scan is current and a model is loaded
    signature: str | None = None  # the scan's embedding-cache signature, once hashed
    report: dict | None = None  # the Propagate box's last report of this scan (PropagatePanel.report_state)
    export_path: Path | None = None  # where this scan's labels were last exported (the dialog's default)

    def layers(self) -> list:
        """The layers the session made or adopted (labels and prompt layers), those that exist."""
        return [layer for layer in (self.labels, self.points, self.boxes) if layer is not None]

    def owns(self, layer: Any) -> bool:
        """True for the scan's image, labels or prompt layers."""
        return layer is self.image or any(layer is own for own in self.layers())

    def show_prompts(self, visible: bool) -> None:
        """Show the prompt layers (current scan) or hide them (another scan is current); never deletes them."""
        for layer in (self.points, self.boxes):
            if layer is not None:
                layer.visible = visible

    def forget_labels(self) -> None:
        """The Labels layer went away: so do the objects and history recorded on it."""
        self.labels = None
        self.engine = None
