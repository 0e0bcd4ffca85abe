"""napari-medsam: Segment Anything family models for 3D CT and MRI in napari.

Importing the package is cheap: it pulls in neither torch nor napari.
"""

__version__ = "0.1.0"

from .errors import MedSamError  # noqa: E402  (cheap, no heavy imports)


def _request_huge_pages() -> None:
    """Ask PyTorch for transparent huge pages behind its large CPU tensors (before torch allocates).

    PyTorch reads ``THP_MEM_ALLOC_ENABLE`` once, at its first CPU allocation; with it, tensors of
    2 MB and more are 2 MB-aligned and advised as huge pages, so the encoders' large temporaries
    (fresh memory maps on every step, see ``models.device.tune_allocator``) fault in 512 times
    less often. A user's own setting wins; ``NAPARI_MEDSAM_MALLOC_TUNING=0`` leaves it unset.
    Linux only (elsewhere the variable means nothing). Cheap: no import.
    """
    import os
    import sys

    if sys.platform.startswith("linux") and os.environ.get("NAPARI_MEDSAM_MALLOC_TUNING", "1").strip() != "0":
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


_request_huge_pages()

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
