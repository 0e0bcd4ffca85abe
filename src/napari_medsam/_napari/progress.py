"""napari progress bars for the engine's long operations (weight downloads, precompute)."""

from __future__ import annotations


def download_progress(desc: str):
    """A ``progress(done_bytes, total_bytes)`` callback shown as a napari progress bar."""
    from napari.utils import progress

    from ..models.weights import _TqdmProgress

    return _TqdmProgress(desc, factory=progress)
