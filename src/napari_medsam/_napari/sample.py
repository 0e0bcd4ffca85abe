"""napari sample-data contributions: the project's synthetic CT and MR phantoms."""

from __future__ import annotations


def _phantom_layers(make, title: str) -> list[tuple]:
    """The phantom image plus its ground truth as a hidden, named Labels layer."""
    from .layers import image_layer_data, labels_layer_data

    volume, labels, names = make()
    image = image_layer_data(volume, name=title)
    truth = labels_layer_data(labels, volume, name=f"{title} ground truth")
    truth[1]["metadata"]["napari_medsam"]["names"] = dict(names)
    truth[1]["visible"] = False
    return [image, truth]


def ct_phantom() -> list[tuple]:
    """Abdominal CT phantom in HU with its ground-truth organ labels."""
    from ..phantoms import make_ct_phantom

    return _phantom_layers(make_ct_phantom, "CT phantom")


def mr_phantom() -> list[tuple]:
    """Brain-like T1 MR phantom with its tissue labels."""
    from ..phantoms import make_mr_phantom

    return _phantom_layers(make_mr_phantom, "MR phantom")
