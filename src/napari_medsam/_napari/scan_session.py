"""One scan's working state in the dock widget: its layers, objects, history, report and export defaults.

The dock widget keeps a :class:`ScanSession` per image layer (``MedSamWidget.sessions``, keyed by
the layer). Each one owns the scan's Labels layer, its two prompt layers, the
:class:`~napari_medsam.segment.session.SegmentationSession` on those labels (objects, prompts and
undo history), the last propagation report and where the scan's labels were last exported. Only
the current scan has a :class:`~.controller.SegmentationController`; switching scans closes it
and starts one on the other scan's session, reusing that scan's layers, so nothing of one scan is
ever written into another's layers. Removing a scan's image layer ends its session.

:class:`ScanSwitchMixin` holds the dock widget's side of that life cycle: making the session of
the scan picked, switching to it (hiding the other scan's prompt layers, raising its own layers,
offering its label layers only), and ending a session when its image goes away.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qtpy.QtWidgets import QComboBox

from .layers import volume_from_layer_meta

__all__ = ["ScanSession", "ScanSwitchMixin"]


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
    session_path: Path | None = None  # the session file last saved or opened for this scan (the dialogs' default)
    prepared: bool = False  # its layers were made before a model (once: a layer the user deletes stays deleted)
    started: bool = False  # a controller has segmented it (its first start puts the points layer in "add" mode)

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


class ScanSwitchMixin:
    """Per-scan sessions in the dock widget: which scan is current, switching, ending.

    :class:`~.widget.MedSamWidget` mixes it in; the methods use the widget's ``viewer``,
    ``sessions``, ``_current``, ``controller``, ``labels_combo``, ``image_layer``,
    ``propagate_panel``, ``stop_segmentation``, ``_sync_controller``, ``_refresh_layers``,
    ``_image_layers``, ``_removal_timer`` and ``_updating``.
    """

    # ----------------------------------------------------------------- layer pickers
    def _refresh_layers(self, event=None) -> None:
        from napari.layers import Image

        if self._updating:  # the panel itself adds, removes or moves layers: it refreshes once at the end
            return
        kind, value = getattr(event, "type", None), getattr(event, "value", None)
        if kind == "removed" and value is not None:
            self._layer_removed(value)
        for layer in self.viewer.layers:
            # Renames must show up in the pickers; connecting twice is harmless (same slot).
            layer.events.name.connect(self._refresh_layers)
        # A scan being opened becomes the current one.
        added_image = kind == "inserted" and isinstance(value, Image) and value.ndim >= 2
        self._fill(self.image_combo, self._image_layers(), prefer=value if added_image else None)
        self._fill_labels()
        # Only a scan being added (or picked by the user) starts segmentation; layers being
        # removed, renamed or reordered (e.g. napari closing) never do at once. Once the removals
        # are over, a scan whose session kept all its layers resumes (see _after_removal).
        self._on_image_changed(may_start=added_image)
        if kind == "removed":
            self._removal_timer.start()

    def _image_layers(self) -> list:
        from napari.layers import Image

        return [layer for layer in self.viewer.layers if isinstance(layer, Image) and layer.ndim >= 2]

    @staticmethod
    def _fill(combo: QComboBox, layers: list, prefer=None) -> None:
        current = combo.currentText()
        names = [layer.name for layer in layers]
        combo.blockSignals(True)
        combo.clear()
        combo.addItems(names)
        if prefer is not None and prefer.name in names:
            combo.setCurrentText(prefer.name)
        elif current in names:
            combo.setCurrentText(current)
        combo.blockSignals(False)

    def _after_removal(self) -> None:
        """After layers were removed (in the next event loop turn, not inside napari's removal).

        Removes the prompt layers of the scans that ended, and resumes the current scan when its
        session still has all its layers (the scan shown after the current one was closed).
        """
        doomed, self._doomed = self._doomed, []
        self._updating = True
        try:
            for layer in doomed:
                if layer in self.viewer.layers:
                    self.viewer.layers.remove(layer)
        finally:
            self._updating = False
        if doomed:
            self._refresh_layers()
        scan = self.scan
        if self.controller is None and scan is not None and self._complete(scan):
            self._sync_controller(may_start=True)

    def _complete(self, scan: ScanSession) -> bool:
        """True when the scan's labels and prompt layers are all still in the viewer."""
        return all(layer is not None and layer in self.viewer.layers for layer in (scan.labels, scan.points, scan.boxes))

    def _fill_labels(self) -> None:
        """The Labels picker offers the current scan's label layers only, its own first and chosen."""
        image = self.image_layer
        labels = self.labels_for(image)
        scan = self.sessions.get(image) if image is not None else None
        own = scan.labels if scan is not None and scan.labels in labels else None
        names = [layer.name for layer in labels]
        current = self.labels_combo.currentText()
        self.labels_combo.blockSignals(True)
        self.labels_combo.clear()
        self.labels_combo.addItems(names)
        if own is not None:
            self.labels_combo.setCurrentText(own.name)
        elif current in names and self.viewer.layers[current].visible:
            self.labels_combo.setCurrentText(current)
        else:  # never a hidden layer (e.g. a sample's ground truth) when a visible one fits
            visible = [layer for layer in labels if layer.visible]
            if visible:
                self.labels_combo.setCurrentText(visible[0].name)
        self.labels_combo.blockSignals(False)

    def labels_for(self, image) -> list:
        """The label layers that may hold ``image``'s segmentation: on its grid, and not another scan's.

        A label layer belongs to another scan when that scan's session made or adopted it, or when
        it carries the other scan's Volume (e.g. a sample's ground truth). With no scan chosen,
        every label layer is offered (export of a hand-made layer).
        """
        from napari.layers import Labels

        layers = [layer for layer in self.viewer.layers if isinstance(layer, Labels)]
        if image is None:
            return layers
        shape = tuple(np.shape(image.data))
        return [layer for layer in layers
                if tuple(np.shape(layer.data)) == shape and self._labels_owner(layer) in (None, image)]

    def _labels_owner(self, labels):
        """The image layer a label layer belongs to, or None when it is not linked to an open scan."""
        for image, scan in self.sessions.items():
            if scan.labels is labels:
                return image
        volume = volume_from_layer_meta(labels.metadata)
        if volume is not None:
            for image in self._image_layers():
                if volume_from_layer_meta(image.metadata) is volume:
                    return image
        return None

    @property
    def scan(self) -> "ScanSession | None":
        """The current scan's session (made when the scan is first chosen), or None without a scan."""
        layer = self.image_layer
        if layer is None:
            return None
        scan = self.sessions.get(layer)
        if scan is None:
            scan = self.sessions[layer] = ScanSession(layer)
        return scan

    def _switch_to(self, image, raise_layers: bool = False) -> None:
        """Make ``image`` the current scan: the other scan's controller stops, its prompt layers hide.

        The previous scan keeps its labels, objects, history and report in its session; the new
        one's prompt layers show again, its own layers are drawn on top of the other scans' (when
        the user picked it: ``raise_layers``), and the Labels picker offers its label layers only.
        """
        previous = self._current
        if previous is image:
            return
        self._current = image
        if self.controller is not None and self.controller.image_layer is not image:
            self.stop_segmentation()
        old = self.sessions.get(previous) if previous is not None else None
        if old is not None:
            old.show_prompts(False)
        self.propagate_panel.show_report(None)
        self._fill_labels()
        if image is None:
            return
        scan = self.scan
        scan.show_prompts(True)
        if raise_layers and previous is not None and previous in self.viewer.layers:
            self._raise(scan)

    def _raise(self, scan: ScanSession) -> None:
        """Draw the scan's image, labels and prompt layers above the other layers (order kept among them)."""
        layers = self.viewer.layers
        own = [i for i, layer in enumerate(layers) if scan.owns(layer)]
        top = list(range(len(layers) - len(own), len(layers)))
        if own == top:
            return
        self._updating = True
        try:
            layers.move_multiple(own, len(layers))
        finally:
            self._updating = False

    def _layer_removed(self, layer) -> None:
        """A layer went away: a scan's image ends its session; its labels or a prompt layer stop its controller."""
        scan = self.sessions.pop(layer, None)
        if scan is not None:
            self._end_session(scan)
            return
        for scan in self.sessions.values():
            if not scan.owns(layer):
                continue
            if scan.controller is self.controller:
                self.stop_segmentation()
            elif scan.controller is not None:
                scan.controller.close()
                scan.controller = None
            if layer is scan.labels:
                scan.forget_labels()
                scan.report = None
            elif layer is scan.points:
                scan.points = None
            elif layer is scan.boxes:
                scan.boxes = None

    def _end_session(self, scan: ScanSession) -> None:
        """The scan's image was removed: stop its controller and remove its prompt layers (its labels stay)."""
        if scan.controller is not None:
            if scan.controller is self.controller:
                self.stop_segmentation()
            else:
                scan.controller.close()
                scan.controller = None
        if self._current is scan.image:
            self._current = None
            self.propagate_panel.show_report(None)
        # Removed once napari has finished removing the image (not inside its removal event).
        self._doomed += [layer for layer in (scan.points, scan.boxes) if layer is not None]
        scan.points = scan.boxes = scan.engine = None
        self._removal_timer.start()
