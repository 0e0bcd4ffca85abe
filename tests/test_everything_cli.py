"""`napari-medsam everything`: candidates of one slice written on the input's grid, with a JSON summary."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from napari_medsam.cli import main
from napari_medsam.io import load_volume, read_labels
from napari_medsam.segment.everything import EverythingSettings, segment_everything
from napari_medsam.segment.intensity import default_mapping
from napari_medsam.segment.model import SamModel
from napari_medsam.segment.predictor import SlicePredictor

# Random weights give noise masks: no filter, no suppression, so every one of the 4 x 4 x 3 masks is written.
LOOSE = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-thresh", "0", "--nms-thresh", "1"]


def _run(tmp_path, golden_dir, image, *extra):
    out = tmp_path / "candidates.nii.gz"
    code = main(["everything", str(image), "--out", str(out), "--model", "lite_medsam", "--checkpoint",
                 str(golden_dir / "lite_medsam_random.pth"), "--device", "cpu", "--quiet", *extra])
    return code, out


@pytest.mark.parametrize("axis,index", [("axial", 20), ("coronal", 80)])
def test_candidates_on_the_input_grid_only_on_the_slice(tmp_path, golden_dir, sample_dir, capsys, axis, index):
    image = sample_dir / "ct_phantom.nii.gz"
    code, out = _run(tmp_path, golden_dir, image, "--slice", str(index), "--axis", axis, *LOOSE)
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    source, written = nib.load(str(image)), nib.load(str(out))
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)
    volume = load_volume(image)
    labels = read_labels(out, like=volume)
    ax = {"axial": 0, "coronal": 1}[axis]
    other = np.delete(labels, index, axis=ax) if labels.shape[ax] > 1 else labels[:0]
    assert not other.any()
    cands = summary["candidates"]
    assert summary["axis"] == axis and summary["slice"] == index and len(cands) > 10
    assert [c["label"] for c in cands] == list(range(1, len(cands) + 1))
    # the same engine run without the CLI paints exactly these labels
    model = SamModel.from_checkpoint("lite_medsam", weights=golden_dir / "lite_medsam_random.pth", device="cpu",
                                     download=False)
    predictor = SlicePredictor(model, volume, mapping=default_mapping(volume.array, volume.modality), axis=ax)
    expected = segment_everything(predictor, index, EverythingSettings(points_per_side=4, pred_iou_thresh=0.0,
                                                                       stability_score_thresh=0.0, box_nms_thresh=1.0))
    np.testing.assert_array_equal(np.take(labels, index, axis=ax), expected.label_image())
    spacing = [s for a, s in enumerate(volume.spacing_mm) if a != ax]
    for cand, mine in zip(cands, expected.candidates):
        assert cand["area_px"] == mine.area_px
        assert cand["area_mm2"] == pytest.approx(mine.area_px * spacing[0] * spacing[1], abs=1e-3)
        assert 0.0 <= cand["stability"] <= 1.0 and len(cand["bbox"]) == 4


def test_bad_slice_and_axis_are_one_line_errors(tmp_path, golden_dir, sample_dir, capsys):
    image = sample_dir / "ct_phantom.nii.gz"
    code, out = _run(tmp_path, golden_dir, image, "--slice", "999")
    err = capsys.readouterr().err
    assert code == 1 and "--slice 999 is outside the scan" in err and not out.exists()
    code, _ = _run(tmp_path, golden_dir, image, "--slice", "3", "--axis", "oblique")
    assert code == 1 and "--axis oblique" in capsys.readouterr().err
