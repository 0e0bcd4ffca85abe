"""napari-medsam: Segment Anything family models for 3D CT and MRI in napari.

Importing the package is cheap: it pulls in neither torch nor napari.
"""

__version__ = "0.1.0"

from .errors import MedSamError  # noqa: E402  (cheap, no heavy imports)

__all__ = ["MedSamError", "__version__", "load_volume", "save_labels", "Volume"]


def __getattr__(name: str):
    # Lazy re-exports keep `import napari_medsam` (done by napari at start-up) light.
    if name == "load_volume":
        from .io import load_volume

        return load_volume
    if name == "save_labels":
        from .io import save_labels

        return save_labels
    if name == "Volume":
        from .volume import Volume

        return Volume
    raise AttributeError(f"module 'napari_medsam' has no attribute {name!r}")
