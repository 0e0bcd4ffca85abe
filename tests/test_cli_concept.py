"""`napari-medsam segment --text` and text prompts in PROMPTS.json, end to end on real NIfTI files.

The concept model is the reduced golden EfficientSAM3 checkpoint (random weights, threshold 0.2552): what
it finds means nothing, but the CLI must write exactly what the engine (segment/concept.py) finds on
the same slices, on the input's grid, and explain every mistake on one line.
"""

from __future__ import annotations

import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest

from napari_medsam.cli import main
from napari_medsam.io import load_volume, read_labels
from napari_medsam.io.segments import segments_sidecar_path
from napari_medsam.segment.cache import DiskCache, EmbeddingCache, MemoryCache
from napari_medsam.segment.concept import ConceptModel, ConceptSegmenter
from napari_medsam.segment.intensity import default_mapping

THRESHOLD = "0.2552"
SLICES = (27, 28)


@pytest.fixture(scope="module")
def files(golden_dir):
    folder = golden_dir / "efficientsam3"
    return folder / "es3_reduced_random.pt", folder / "bpe_simple_vocab_16e6.txt.gz"


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """An on-disk feature cache: the engine fills it, the CLI runs read it (`--cache`), so the image encoder
    runs once per slice in this file (tests/test_concept.py checks its numbers)."""
    return tmp_path_factory.mktemp("es3-features")


@pytest.fixture(scope="module")
def engine(files, sample_dir, features):
    """The engine's own answer on the CLI's slices (same model file, same default CT window)."""
    volume = load_volume(sample_dir / "ct_phantom.nii.gz")
    model = ConceptModel.from_checkpoint(weights=files[0], vocabulary=files[1], device="cpu")
    seg = ConceptSegmenter(model, volume, mapping=default_mapping(volume.array, volume.modality),
                           threshold=float(THRESHOLD), cache=EmbeddingCache(MemoryCache(), DiskCache(features)))
    track = seg.find_in_slices(range(SLICES[0], SLICES[1] + 1), "liver")
    seg.cache.flush()
    return volume, seg, track


def _segment(files, image, out, *extra, cache=None):
    return main(["segment", str(image), "--out", str(out), "--checkpoint", str(files[0]), "--vocabulary",
                 str(files[1]), "--device", "cpu", "--threshold", THRESHOLD, "-q", *extra,
                 *(["--cache", str(cache)] if cache else [])])


def test_text_prompt_writes_the_engines_labels_on_the_input_grid(files, engine, features, sample_dir, tmp_path,
                                                                 capsys):
    volume, _, track = engine
    out = tmp_path / "liver.nii.gz"
    code = _segment(files, sample_dir / "ct_phantom.nii.gz", out, "--text", " liver ", "--slices",
                    f"{SLICES[0]}:{SLICES[1]}", cache=features)
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["engine"] == "concept" and summary["threshold"] == float(THRESHOLD)
    (obj,) = summary["objects"]
    assert obj["name"] == "liver" and obj["key_slices"] == [track.seed] and obj["voxels"] > 0
    written, source = nib.load(str(out)), nib.load(str(sample_dir / "ct_phantom.nii.gz"))
    np.testing.assert_allclose(written.affine, source.affine)
    assert written.shape == source.shape
    labels = read_labels(out, like=volume)
    np.testing.assert_array_equal(labels == 1, track.to_volume(volume.shape))
    assert set(np.flatnonzero(labels.any(axis=(1, 2)))) <= set(range(SLICES[0], SLICES[1] + 1))
    sidecar = segments_sidecar_path(out)
    assert "liver" in sidecar.read_text()


def test_prompt_file_text_with_an_exemplar_box(files, engine, features, sample_dir, tmp_path, capsys):
    volume, seg, _ = engine
    z = SLICES[1]
    truth = np.asarray(nib.load(str(sample_dir / "ct_phantom_labels.nii.gz")).dataobj)
    marker = np.zeros(volume.shape, bool)  # the liver on display slice z, its box given in file voxel order
    marker[z] = volume.axes.to_display(truth == 1)[z]
    found = np.nonzero(volume.axes.to_file(marker))
    corners = [[int(v.min()) for v in found], [int(v.max()) for v in found]]
    prompts = {"objects": [{"label": 3, "name": "liver", "prompts": [
        {"type": "text", "phrase": "liver", "slices": [z, z]}, {"type": "box", "corners": corners}]}]}
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(prompts))
    out = tmp_path / "labels.nii.gz"
    assert _segment(files, sample_dir / "ct_phantom.nii.gz", out, "--prompts", str(path), cache=features) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["objects"][0]["label"] == 3
    rows, cols = np.nonzero(marker[z])
    expected = seg.find(z, "liver", boxes=[[cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]])
    labels = read_labels(out, like=volume)
    np.testing.assert_array_equal(labels[z] == 3, expected.masks[0] if len(expected) else np.zeros_like(labels[z]))
    assert not labels[:z].any() and not labels[z + 1:].any()


@pytest.mark.parametrize("extra, message", [
    (["--text", "  "], "the phrase is empty"),
    (["--text", "liver", "--model", "lite_medsam"], "lite_medsam is a point/box model"),
    (["--text", "liver", "--prompts", "p.json"], "not both"),
    ([], "say what to segment"),
    (["--text", "liver", "--slices", "30:20"], "--slices 30:20"),
    (["--text", "liver", "--slices", "a:b"], "give A:B"),
    (["--text", "liver", "--threshold", "1.5"], "between 0 and 1"),
])
def test_mistakes_are_explained_on_one_line(files, sample_dir, tmp_path, capsys, extra, message):
    argv = ["segment", str(sample_dir / "ct_phantom.nii.gz"), "--out", str(tmp_path / "x.nii.gz"),
            "--checkpoint", str(files[0]), "--vocabulary", str(files[1]), *extra]
    assert main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x.nii.gz").exists()


def test_a_sam_checkpoint_and_a_missing_vocabulary_without_network(files, golden_dir, sample_dir, tmp_path,
                                                                   capsys, monkeypatch):
    image, out = sample_dir / "ct_phantom.nii.gz", tmp_path / "x.nii.gz"
    sam = main(["segment", str(image), "--text", "liver", "--out", str(out), "--checkpoint",
                str(golden_dir / "mobile_sam_random.pt"), "--vocabulary", str(files[1]), "--slices", "2:2"])
    assert sam == 1 and "SAM-family (point/box) checkpoint" in capsys.readouterr().err
    import napari_medsam.models.registry as registry

    offline = dataclasses.replace(registry.CLIP_VOCABULARY, urls=("http://127.0.0.1:9/bpe_simple_vocab_16e6.txt.gz",))
    monkeypatch.setattr(registry, "CLIP_VOCABULARY", offline)
    monkeypatch.setenv("NAPARI_MEDSAM_WEIGHTS_DIR", str(tmp_path / "cache"))
    code = main(["segment", str(image), "--text", "liver", "--out", str(out), "--checkpoint", str(files[0]), "-q"])
    err = capsys.readouterr().err
    assert code == 1 and "could not download the CLIP BPE vocabulary" in err and "--vocabulary FILE" in err
    assert not out.exists()


def test_download_command_fetches_the_vocabulary(files, tmp_path, capsys, monkeypatch):
    import napari_medsam.models.registry as registry

    local = dataclasses.replace(registry.CLIP_VOCABULARY, urls=(files[1].as_uri(),))
    monkeypatch.setattr(registry, "CLIP_VOCABULARY", local)
    assert main(["download", "clip_bpe_vocab", "--weights-dir", str(tmp_path), "-q"]) == 0
    path = capsys.readouterr().out.strip()
    assert path == str(tmp_path / "bpe_simple_vocab_16e6.txt.gz")
    assert (tmp_path / "bpe_simple_vocab_16e6.txt.gz").read_bytes() == files[1].read_bytes()
