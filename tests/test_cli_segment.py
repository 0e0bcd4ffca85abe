"""`napari-medsam segment`: the headless engine end to end with real (golden-checkpoint) networks."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from napari_medsam.cli import main
from napari_medsam.io import load_volume, read_labels
from napari_medsam.segment.intensity import default_mapping
from napari_medsam.segment.model import SamModel
from napari_medsam.segment.predictor import Prompts, SlicePredictor


@pytest.fixture(scope="module")
def liver_prompts(sample_dir):
    """A box around the liver and a point in the spleen on the middle liver slice, file voxel order."""
    truth = np.asarray(nib.load(str(sample_dir / "ct_phantom_labels.nii.gz")).dataobj)
    ks = np.flatnonzero((truth == 1).any(axis=(0, 1)))
    k = int(ks[len(ks) // 2])
    ii, jj = np.nonzero(truth[:, :, k] == 1)
    si, sj = np.nonzero(truth[:, :, k] == 2)
    return k, {
        "coordinates": "voxel",
        "objects": [
            {"label": 1, "name": "liver", "prompts": [
                {"type": "box", "corners": [[int(ii.min()), int(jj.min()), k], [int(ii.max()), int(jj.max()), k]]}]},
            {"label": 2, "name": "spleen", "prompts": [
                {"type": "point", "position": [int(np.median(si)), int(np.median(sj)), k], "positive": True},
                {"type": "point", "position": [int(ii.min()), int(jj.min()), k], "positive": False}]},
        ],
    }


def _run(tmp_path, golden_dir, image, prompts, out_name="labels.nii.gz", extra=()):
    prompt_file = tmp_path / "prompts.json"
    prompt_file.write_text(json.dumps(prompts) if not isinstance(prompts, str) else prompts)
    out = tmp_path / out_name
    code = main(["segment", str(image), "--prompts", str(prompt_file), "--out", str(out), "--model", "lite_medsam",
                 "--checkpoint", str(golden_dir / "lite_medsam_random.pth"), "--device", "cpu", *extra])
    return code, out


def _display_index(volume, file_index) -> tuple[int, int, int]:
    """Where file voxel (i, j, k) lands in display order, found by moving a marked voxel with the array."""
    marker = np.zeros(volume.file_shape, bool)
    marker[tuple(int(v) for v in file_index)] = True
    return tuple(int(v) for v in np.argwhere(volume.axes.to_display(marker))[0])


def _expected_slice(golden_dir, volume, prompts):
    """The labels the prompts should give on their slice, from a SlicePredictor alone (no CLI).

    Same model file, same default CT window and the same rule as the CLI for several objects on one
    slice (an object takes only voxels no earlier object has taken). Returns (display index, labels).
    """
    model = SamModel.from_checkpoint("lite_medsam", weights=golden_dir / "lite_medsam_random.pth", device="cpu",
                                     download=False)
    predictor = SlicePredictor(model, volume, mapping=default_mapping(volume.array, volume.modality))
    liver, spleen = prompts["objects"]
    (z, r0, c0), (z1, r1, c1) = (_display_index(volume, c) for c in liver["prompts"][0]["corners"])
    assert z1 == z
    points = [_display_index(volume, p["position"]) for p in spleen["prompts"]]
    assert {p[0] for p in points} == {z}
    expected = np.zeros(volume.shape[1:], np.uint8)
    expected[predictor.predict(z, Prompts(box=[r0, c0, r1, c1])).best] = 1
    spleen_mask = predictor.predict(z, Prompts(points=[p[1:] for p in points],
                                                positive=[p["positive"] for p in spleen["prompts"]])).best
    expected[spleen_mask & (expected == 0)] = 2
    return z, expected


def test_segment_nifti_writes_labels_on_the_input_grid(tmp_path, golden_dir, sample_dir, liver_prompts, capsys):
    k, prompts = liver_prompts
    code, out = _run(tmp_path, golden_dir, sample_dir / "ct_phantom.nii.gz", prompts)
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert [o["name"] for o in summary["objects"]] == ["liver", "spleen"]
    written, source = nib.load(str(out)), nib.load(str(sample_dir / "ct_phantom.nii.gz"))
    assert written.shape == source.shape
    np.testing.assert_array_equal(written.affine, source.affine)
    data = np.asarray(written.dataobj)
    # Without --propagate only the prompted slice (file index k) is segmented, and it is.
    assert set(np.flatnonzero(data.any(axis=(0, 1)))) == {k}
    assert summary["objects"][0]["voxels"] == int((data == 1).sum()) > 0
    assert summary["objects"][1]["voxels"] == int((data == 2).sum()) > 0
    # ... with exactly the masks the model gives for these prompts on that slice. (With random
    # weights the masks are not organs, but they are deterministic and, here, not empty.)
    nifti = load_volume(sample_dir / "ct_phantom.nii.gz")
    z, expected = _expected_slice(golden_dir, nifti, prompts)
    assert set(np.unique(expected)) == {0, 1, 2}
    labels = read_labels(out, like=nifti)
    np.testing.assert_array_equal(labels[z], expected)
    assert not np.delete(labels, z, axis=0).any()

    # The same prompts in world (RAS mm) coordinates give the same labels.
    affine = source.affine
    world = json.loads(json.dumps(prompts))
    world["coordinates"] = "world"
    for obj in world["objects"]:
        for p in obj["prompts"]:
            key = "corners" if p["type"] == "box" else None
            if key:
                p[key] = [nib.affines.apply_affine(affine, c).tolist() for c in p[key]]
            else:
                p["position"] = nib.affines.apply_affine(affine, p["position"]).tolist()
    code, out_world = _run(tmp_path, golden_dir, sample_dir / "ct_phantom.nii.gz", world, "world.nii.gz")
    assert code == 0
    np.testing.assert_array_equal(np.asarray(nib.load(str(out_world)).dataobj), data)


def test_segment_dicom_to_dicom_seg_with_propagation(tmp_path, golden_dir, sample_dir, liver_prompts, capsys):
    k, prompts = liver_prompts
    # For the DICOM series the voxel order is (column, row, slice); the phantom's NIfTI is RAS, so
    # column = 167 - i, row = 167 - j and the slice index is the same.
    series = load_volume(sample_dir / "ct_phantom_dicom")
    nifti = load_volume(sample_dir / "ct_phantom.nii.gz")
    converted = json.loads(json.dumps(prompts))
    for obj in converted["objects"]:
        for p in obj["prompts"]:
            points = p["corners"] if p["type"] == "box" else [p["position"]]
            moved = [series.axes.display_index_to_file(nifti.axes.file_index_to_display(np.array([q]), nifti.shape),
                                                       series.shape)[0].tolist() for q in points]
            if p["type"] == "box":
                p["corners"] = moved
            else:
                p["position"] = moved[0]
    # Both runs share a disk cache: its keys hash every voxel and the spacing (and the model and
    # window), so the NIfTI run reuses the DICOM run's embeddings only if the two readers gave the
    # identical volume; otherwise it embeds its own.
    cache = ["--cache", str(tmp_path / "cache")]
    code, out = _run(tmp_path, golden_dir, sample_dir / "ct_phantom_dicom", converted, "organs.dcm",
                     ["--propagate", *cache])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["propagate"] is True
    assert all(set(o["stop_reasons"]) == {"up", "down"} for o in summary["objects"])
    labels = read_labels(out, like=series)
    assert labels.shape == series.shape and labels.max() >= 1
    # Same prompts on the NIfTI copy of the same scan: same labels at the same places.
    code, out_nii = _run(tmp_path, golden_dir, sample_dir / "ct_phantom.nii.gz", prompts, "same.nii.gz",
                         ["--propagate", *cache])
    assert code == 0
    np.testing.assert_array_equal(read_labels(out_nii, like=nifti), labels)


@pytest.mark.parametrize("case, message", [
    ("missing_image", "does not exist"),
    ("bad_json", "not valid JSON"),
    ("outside", "outside the image"),
    ("not_one_slice", "do not lie on one slice"),
    ("unknown_model", "unknown model"),
    ("missing_weights", "does not exist"),
    ("unwritable", "does not exist"),
])
def test_segment_errors_are_one_line_and_write_nothing(tmp_path, golden_dir, sample_dir, liver_prompts, capsys,
                                                       case, message):
    k, prompts = liver_prompts
    image = sample_dir / "ct_phantom.nii.gz"
    prompt_file = tmp_path / "prompts.json"
    out = tmp_path / "labels.nii.gz"
    args = {"model": "lite_medsam", "checkpoint": str(golden_dir / "lite_medsam_random.pth")}
    text = json.dumps(prompts)
    if case == "missing_image":
        image = tmp_path / "nothing.nii.gz"
    elif case == "bad_json":
        text = '{"coordinates": "voxel", "objects": [,]}'
    elif case == "outside":
        text = json.dumps({"objects": [{"label": 1, "prompts": [{"type": "point", "position": [500, 5, 5]}]}]})
    elif case == "not_one_slice":
        text = json.dumps({"objects": [{"label": 1, "prompts": [{"type": "box", "corners": [[10, 10, 3], [40, 40, 9]]}]}]})
    elif case == "unknown_model":
        args["model"] = "sam_vit_z"
    elif case == "missing_weights":
        args["checkpoint"] = str(tmp_path / "missing.pth")
    elif case == "unwritable":
        out = tmp_path / "no" / "folder" / "labels.nii.gz"
    prompt_file.write_text(text)
    code = main(["segment", str(image), "--prompts", str(prompt_file), "--out", str(out), "--model", args["model"],
                 "--checkpoint", args["checkpoint"], "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err and err[-1].startswith("napari-medsam segment: error:") and message in err[-1], err
    assert not out.exists()
