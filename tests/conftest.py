"""Shared fixtures: paths to the golden data and to generated sample scans."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """../shared/golden beside the repository (or $NAPARI_MEDSAM_GOLDEN)."""
    path = Path(os.environ.get("NAPARI_MEDSAM_GOLDEN", REPO.parent / "shared" / "golden"))
    if not path.is_dir():
        pytest.skip(f"golden data not found at {path}")
    return path


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The committed sample_data/ folder."""
    return REPO / "sample_data"


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path_factory, monkeypatch) -> Path:
    """Every test reads and writes the dock widget's settings in its own empty folder."""
    folder = tmp_path_factory.mktemp("medsam-config")
    monkeypatch.setenv("NAPARI_MEDSAM_CONFIG_DIR", str(folder))
    return folder


@pytest.fixture
def calls(monkeypatch):
    """Every SlicePredictor.predict call: (axis, index, Prompts, multimask)."""
    from napari_medsam.segment.predictor import SlicePredictor

    recorded = []
    original = SlicePredictor.predict

    def spy(self, index, prompts, multimask=False, **kwargs):
        recorded.append((self.axis, int(index), prompts, multimask))
        return original(self, index, prompts, multimask, **kwargs)

    monkeypatch.setattr(SlicePredictor, "predict", spy)
    return recorded


def start_workflow(viewer, model, sample_dir, *, dock: bool = False):
    """The dock widget on the sample CT with ``model`` loaded (memory cache only); returns (widget, controller)."""
    from napari_medsam._napari.widget import MedSamWidget
    from napari_medsam.segment.cache import EmbeddingCache, MemoryCache

    viewer.open(str(sample_dir / "ct_phantom.nii.gz"), plugin="napari-medsam")
    widget = MedSamWidget(viewer)
    widget.cache = EmbeddingCache(MemoryCache())  # keep the tests off the user's disk cache
    if dock:
        viewer.window.add_dock_widget(widget, name="MedSAM")
    widget.model_panel.set_model(model, "mobile_sam")
    assert widget.controller is not None, widget.status.text()
    return widget, widget.controller


def stop_workflow(qtbot, widget, controller) -> None:
    qtbot.waitUntil(lambda: controller.queue.running is None and widget.segment_panel.worker is None, timeout=30000)
    widget.stop_segmentation()
