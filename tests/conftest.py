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
