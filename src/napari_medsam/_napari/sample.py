"""napari sample-data contributions: the project's synthetic CT and MR phantoms."""

from __future__ import annotations


def ct_phantom() -> list[tuple]:
    """Abdominal CT phantom in HU with its ground-truth organ labels."""
    from ..phantoms import make_ct_phantom
    from .layers import image_layer_data, labels_layer_data

    volume, labels, names = make_ct_phantom()
    image = image_layer_data(volume, name="CT phantom")
    truth = labels_layer_data(labels, volume, name="CT phantom ground truth")
    truth[1]["metadata"]["napari_medsam"]["names"] = dict(names)
    truth[1]["visible"] = False
    return [image, truth]


def mr_phantom() -> list[tuple]:
    """Brain-like T1 MR phantom with its tissue labels."""
    from ..phantoms import make_mr_phantom
    from .layers import image_layer_data, labels_layer_data

    volume, labels, names = make_mr_phantom()
    image = image_layer_data(volume, name="MR phantom")
    truth = labels_layer_data(labels, volume, name="MR phantom ground truth")
    truth[1]["metadata"]["napari_medsam"]["names"] = dict(names)
    truth[1]["visible"] = False
    return [image, truth]
