"""The napari-medsam command line: info and export."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from napari_medsam.cli import main


@pytest.fixture
def scan(tmp_path):
    data = np.full((30, 26, 10), -1000, np.int16)
    data[5:20, 5:20, 2:8] = 50
    affine = np.array([[-0.75, 0, 0, 20.0], [0, 0.75, 0, -30.0], [0, 0, 2.0, -10.0], [0, 0, 0, 1]])
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def test_info_prints_geometry_json(scan, capsys):
    assert main(["info", str(scan)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shape"] == [10, 26, 30]
    assert info["spacing_mm"] == [2.0, 0.75, 0.75]
    assert info["source_format"] == "nifti"
    assert info["modality"] == "CT"
    assert info["file_to_display"] == ["slice <- k", "row <- -j", "column <- i"]
    assert np.allclose(np.array(info["direction"]), [[0, 0, 1], [0, 1, 0], [1, 0, 0]])
    # The origin is the LPS position of display voxel (0, 0, 0): file voxel (0, 25, 0).
    ras = nib.load(str(scan)).affine @ [0, 25, 0, 1]
    assert np.allclose(info["origin_mm"], [-ras[0], -ras[1], ras[2]])


def test_export_nifti_to_nifti_on_source_grid(scan, tmp_path, capsys):
    volume_labels = np.zeros((30, 26, 10), np.uint8)
    volume_labels[6:10, 6:10, 3:5] = 2
    foreign = tmp_path / "labels_in.nii.gz"
    nib.save(nib.Nifti1Image(volume_labels, nib.load(str(scan)).affine), str(foreign))
    out = tmp_path / "labels_out.nii"
    assert main(["export", str(foreign), "--source", str(scan), "--out", str(out), "--names", "2=liver"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["segments"] == [{"label": 2, "name": "liver", "voxels": 32}]
    written = nib.load(str(out))
    np.testing.assert_array_equal(written.affine, nib.load(str(scan)).affine)
    np.testing.assert_array_equal(np.asarray(written.dataobj), volume_labels)


def test_export_errors_are_one_line_and_write_nothing(scan, tmp_path, capsys):
    wrong = tmp_path / "wrong.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.eye(4)), str(wrong))
    out = tmp_path / "out.nii.gz"
    assert main(["export", str(wrong), "--source", str(scan), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("napari-medsam export: error:") and "\n" not in err and "grid" in err
    assert not out.exists()
    assert main(["export", str(scan), "--source", str(scan), "--out", str(tmp_path / "x.dcm")]) == 1
    assert "DICOM-SEG must reference a DICOM series" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "nothing.nii")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_console_script_help_for_every_subcommand(capsys):
    # One real process (the module runs as a script and exits 0); the subcommands' help in-process
    # through main(), which argparse leaves by SystemExit(0) after printing the same text.
    result = subprocess.run([sys.executable, "-m", "napari_medsam.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: napari-medsam" in result.stdout
    for args in (["info", "--help"], ["export", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as exited:
            main(args)
        assert exited.value.code == 0
        assert f"usage: napari-medsam {args[0]}" in capsys.readouterr().out


def test_info_on_a_dicom_series(sample_dir, capsys):
    assert main(["info", str(sample_dir / "ct_phantom_dicom")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["source_format"] == "dicom" and info["modality"] == "CT"
    assert info["number_of_instances"] == info["shape"][0]
    assert info["series_instance_uid"].startswith("1.2.") or info["series_instance_uid"][0].isdigit()
    assert info["file_axes"] == ["column", "row", "slice"]
    assert info["file_to_display"] == ["slice <- slice", "row <- row", "column <- column"]


def test_export_nifti_labels_to_dicom_seg(sample_dir, tmp_path, capsys):
    import pydicom

    from napari_medsam.io import load_volume, read_labels
    from napari_medsam.phantoms import CT_LABELS

    out = tmp_path / "organs.dcm"
    args = ["export", str(sample_dir / "ct_phantom_labels.nii.gz"), "--source", str(sample_dir / "ct_phantom_dicom"),
            "--out", str(out), "--names", ",".join(f"{k}={v}" for k, v in CT_LABELS.items())]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in summary["segments"]][:2] == ["liver", "spleen"]
    series = load_volume(sample_dir / "ct_phantom_dicom")
    truth = load_volume(sample_dir / "ct_phantom_labels.nii.gz")
    np.testing.assert_array_equal(read_labels(out, like=series), truth.array)
    seg = pydicom.dcmread(str(out), stop_before_pixels=True)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.metadata["series_uid"]
    assert seg.FrameOfReferenceUID == series.metadata["frame_of_reference_uid"]
    assert seg.SegmentSequence[-1].SegmentLabel == CT_LABELS[max(CT_LABELS)]


@pytest.mark.slow
def test_demo_opens_napari_with_the_panel(tmp_path):
    shot = tmp_path / "demo.png"
    result = subprocess.run([sys.executable, "-m", "napari_medsam.cli", "demo", "--screenshot", str(shot)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size[0] > 800 and image.size[1] > 500


def test_models_lists_the_registry(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_MEDSAM_WEIGHTS_DIR", str(tmp_path))
    (tmp_path / "mobile_sam.pt").write_bytes(b"placeholder")
    assert main(["models", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert {"sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam", "mobile_sam", "lite_medsam"} <= set(rows)
    assert rows["mobile_sam"]["cached"] and not rows["medsam"]["cached"]
    assert rows["medsam"]["path"] == str(tmp_path / "medsam_vit_b.pth")
    # Concept (text-prompt) models are listed too, marked as such.
    concept = rows["efficientsam3_efficientvit"]
    assert concept["prompts"] == "text" and not concept["cached"] and rows["medsam"]["prompts"] == "points/boxes"
    assert concept["path"] == str(tmp_path / "efficientsam3_efficientvit.pt")
    # The table ends with the device and the torch build the models run with.
    import torch

    assert main(["models"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("models run on ") and f"torch {torch.__version__} (" in last


def test_download_from_a_file_url(golden_dir, tmp_path, monkeypatch, capsys):
    import dataclasses

    from napari_medsam.models import registry

    spec = registry.get_model("lite_medsam")
    local = dataclasses.replace(spec, urls=((golden_dir / "lite_medsam_random.pth").as_uri(),), sha256=None,
                                size_bytes=None)
    monkeypatch.setitem(registry.MODELS, "lite_medsam", local)
    assert main(["download", "lite_medsam", "--weights-dir", str(tmp_path)]) == 0
    path = capsys.readouterr().out.strip()
    assert path == str(tmp_path / spec.filename)
    assert (tmp_path / spec.filename).read_bytes() == (golden_dir / "lite_medsam_random.pth").read_bytes()
    assert main(["download", "no_such_model"]) == 1
    assert "no_such_model" in capsys.readouterr().err
