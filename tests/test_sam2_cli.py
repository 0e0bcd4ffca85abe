"""`napari-medsam segment --propagate` with a SAM 2 model: the memory engine from the command line.

The model is the reduced MedSAM2 of ``shared/golden/sam2`` (seeded random weights), registered
for these tests and given as a local file with ``--weights``, as a user gives their own file.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_cli_segment import _display_index, liver_prompts  # noqa: F401  (fixture)
from test_sam2_ui import sam2_spec, sam2_weights  # noqa: F401  (fixtures)

from napari_medsam.cli import main
from napari_medsam.io import load_volume, read_labels


@pytest.fixture(scope="module")
def scan(sample_dir):
    return sample_dir / "ct_phantom.nii.gz"


def _segment(tmp_path, scan, prompts, model, weights, *extra):
    prompt_file = tmp_path / "prompts.json"
    prompt_file.write_text(json.dumps(prompts))
    out = tmp_path / "labels.nii.gz"
    code = main(["segment", str(scan), "--prompts", str(prompt_file), "--out", str(out), "--model", model,
                 "--weights", str(weights), "--device", "cpu", *extra])
    return code, out


def _key_slice(volume, prompts) -> int:
    """The display slice of the liver's box (the prompt file gives file voxel indices)."""
    return _display_index(volume, prompts["objects"][0]["prompts"][0]["corners"][0])[0]


def test_propagate_uses_the_memory_engine_and_prints_object_scores(tmp_path, scan, liver_prompts, sam2_spec,
                                                                   sam2_weights, capsys):
    _, prompts = liver_prompts
    volume = load_volume(scan)
    z = _key_slice(volume, prompts)
    code, out = _segment(tmp_path, scan, prompts, sam2_spec.name, sam2_weights, "--propagate",
                         "--zrange", str(z - 2), str(z + 2))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["engine"] == "memory" and summary["model"] == sam2_spec.name
    labels = read_labels(out, like=volume)
    for obj in summary["objects"]:
        assert obj["engine"] == "memory"
        scores = obj["object_scores"]
        assert scores["min"] <= scores["mean"] <= scores["max"]
        assert all(z - 2 <= k <= z + 2 for k in scores["absent_slices"])
        reached = np.flatnonzero((labels == obj["label"]).any(axis=(1, 2))).tolist()
        assert reached and set(reached) <= set(range(z - 2, z + 3))
        assert obj["slices_reached"] == len(reached) and obj["voxels"] == int((labels == obj["label"]).sum())
    assert len(np.flatnonzero((labels == 1).any(axis=(1, 2)))) > 1  # the liver went beyond its key slice
    assert "with propagation (memory engine)" in captured.err
    assert "liver: object score " in captured.err and "spleen: object score " in captured.err


def test_engine_slice_with_a_sam2_model(tmp_path, scan, liver_prompts, sam2_spec, sam2_weights, capsys):
    _, prompts = liver_prompts
    volume = load_volume(scan)
    z = _key_slice(volume, prompts)
    liver_only = {**prompts, "objects": prompts["objects"][:1]}
    code, _ = _segment(tmp_path, scan, liver_only, sam2_spec.name, sam2_weights, "--propagate", "--engine", "slice",
                       "--zrange", str(z - 1), str(z + 1), "-q")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["engine"] == "slice" and summary["objects"][0]["engine"] == "slice"
    assert "object_scores" not in summary["objects"][0]


def test_engine_memory_is_refused_for_a_sam1_model_before_reading_weights(tmp_path, scan, liver_prompts, capsys):
    _, prompts = liver_prompts
    code, out = _segment(tmp_path, scan, prompts, "lite_medsam", tmp_path / "absent.pth", "--propagate",
                         "--engine", "memory", "-q")
    captured = capsys.readouterr()
    assert code == 1 and not out.exists() and captured.out == ""
    assert captured.err.count("\n") == 1 and "--engine memory needs a SAM 2.1 or MedSAM2 model" in captured.err
