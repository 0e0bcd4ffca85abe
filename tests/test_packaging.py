"""The wheel carries the manifest and napari finds the plugin when installed from it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def test_package_manifest_is_a_link_to_the_top_level_file():
    inner = REPO / "src" / "napari_medsam" / "napari.yaml"
    assert inner.is_symlink()
    assert inner.resolve() == (REPO / "napari.yaml").resolve()


@pytest.mark.slow
def test_wheel_install_is_discovered_by_napari(tmp_path):
    pytest.importorskip("build")
    pytest.importorskip("hatchling")
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(wheel_dir), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )
    wheel = next(wheel_dir.glob("napari_medsam-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert "napari_medsam/napari.yaml" in names
        assert archive.read("napari_medsam/napari.yaml") == (REPO / "napari.yaml").read_bytes()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "napari_medsam:napari.yaml" in archive.read(entry_points).decode()

    # A scratch environment that reuses the installed dependencies but not this checkout.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    validate = subprocess.run([str(python), "-m", "npe2", "validate", "napari-medsam"],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert validate.returncode == 0, validate.stdout + validate.stderr
    assert "valid" in validate.stdout

    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.full((20, 20, 6), -1000, np.int16), np.diag([0.9, 0.9, 3.0, 1.0])), str(scan))
    code = textwrap.dedent(
        f"""
        import napari, napari_medsam
        assert napari_medsam.__file__.startswith({str(venv)!r}), napari_medsam.__file__
        viewer = napari.Viewer(show=False)
        layer = viewer.open({str(scan)!r}, plugin="napari-medsam")[0]
        print("OPENED", layer.data.shape, tuple(round(float(s), 3) for s in layer.scale))
        viewer.close()
        """
    )
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=180,
                            cwd=tmp_path, env={**os.environ})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OPENED (6, 20, 20) (3.0, 0.9, 0.9)" in result.stdout
