"""A Labels layer of candidates on one slice: what "Segment everything" and "Find by name" show.

The layer is one slice thick and placed where that slice lies in the scan's world (the image layer's
scale, translation, rotation, shear and affine, shifted by the slice index along its axis), so it
never stands in for the scan's labels: the Labels picker offers only layers of the scan's shape.
Each candidate is a label value (1-based); a click on one is turned into that value here.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np


def add_slice_labels(controller: Any, labels: np.ndarray, axis: int, index: int, name: str, metadata: dict,
                     on_click: Callable[[Any, Any], None]) -> Any:
    """Add ``labels`` (the slice's 2D label image) as a one-slice layer on slice ``index`` of ``axis``."""
    image = controller.image_layer
    if np.ndim(image.data) >= 3:
        shape = [int(s) for s in np.shape(image.data)[-3:]]
        shape[axis] = 1
        data = np.expand_dims(labels, axis).reshape(shape)
        offset = np.zeros(len(image.scale))
        offset[len(offset) - 3 + axis] = index
    else:  # a 2D image: its only slice
        data, offset = labels, np.zeros(len(image.scale))
    linear = image._transforms["data2physical"].linear_matrix  # the slice's place in the scan's world
    layer = controller.viewer.add_labels(
        data, name=name, scale=image.scale, translate=np.asarray(image.translate) + linear @ offset,
        rotate=image.rotate, shear=image.shear, affine=image.affine.affine_matrix, opacity=0.6,
        metadata={"napari_medsam": metadata})
    layer.mouse_drag_callbacks.append(on_click)
    controller.viewer.layers.selection.active = layer
    return layer


def clicked_label(layer: Any, event: Any) -> int:
    """The candidate (label value) under a mouse press on ``layer``; 0 for none or another event."""
    if event.type != "mouse_press":
        return 0
    value = layer.get_value(event.position, view_direction=event.view_direction,
                            dims_displayed=event.dims_displayed, world=True)
    return int(value) if value else 0


def remove_slice_labels(controller: Any, layer: Any, on_click: Callable[[Any, Any], None]) -> None:
    """Take a candidates layer out of the viewer (and its click handler off it)."""
    if layer is None:
        return
    try:
        layer.mouse_drag_callbacks.remove(on_click)
    except ValueError:
        pass
    viewer = getattr(controller, "viewer", None)
    if viewer is not None and layer in viewer.layers:
        viewer.layers.remove(layer)


def drop_label(layer: Any, label: int) -> None:
    """Remove candidate ``label`` from the layer (it was accepted)."""
    if layer is not None:
        data = layer.data
        data[data == label] = 0
        layer.data = data


class CandidatesLayerMixin:
    """What a panel showing a candidates layer shares: a click accepts, Clear removes the layer.

    The panel has ``controller``, ``layer``, ``result``, ``accepted``, ``_where``, ``accept(label)`` and
    ``_update_buttons()``.
    """

    controller: Any
    layer: Any
    result: Any
    accepted: dict
    _where: Any

    def _make_candidate_controls(self) -> None:
        """Cancel, Accept all, Clear, the progress bar and the status line of a candidates group."""
        from qtpy.QtWidgets import QProgressBar, QPushButton

        from .messages import MessageLabel

        self.cancel_button = QPushButton("Cancel")
        self.accept_all_button = QPushButton("Accept all")
        self.accept_all_button.setToolTip("Add every candidate left as a new object (one undo step each)")
        self.clear_button = QPushButton("Clear")
        self.clear_button.setToolTip("Remove the candidates layer (accepted objects stay)")
        self.progress = QProgressBar()
        self.progress.setVisible(False)
        self.state = MessageLabel("")

    def _on_click(self, layer: Any, event: Any) -> None:
        """A click on the candidates layer accepts the candidate under the mouse."""
        value = clicked_label(layer, event) if layer is self.layer else 0
        if value:
            self.accept(value)  # type: ignore[attr-defined]

    def clear(self) -> None:
        """Remove the candidates layer (objects accepted from it stay)."""
        layer, self.layer, self.result, self._where = self.layer, None, None, None
        self.accepted = {}
        remove_slice_labels(self.controller, layer, self._on_click)
        if hasattr(self, "clear_button"):
            self._update_buttons()  # type: ignore[attr-defined]
