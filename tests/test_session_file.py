"""Session files: a segmentation session saved as one file and reopened (segment.session.persist, the panel).

Round trips through real files (labels, objects, prompts, key slices, locks), refusals (another
scan, a corrupt, truncated or newer file: one-line error, nothing loaded), and the dock widget:
segment with clicks on the sample CT, save, remove the labels, open the session, everything is back.
"""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from napari_medsam.errors import MedSamError
from napari_medsam.segment.predictor import SliceMasks
from napari_medsam.segment.session import (
    SegmentationSession, SessionFileError, load_session, read_session, save_session, session_path,
)
from napari_medsam.segment.session.persist import SUFFIX


def scan(seed=0, shape=(6, 20, 30)):
    return np.random.default_rng(seed).integers(-100, 200, shape).astype(np.int16)


def masks(shape=(20, 30)):
    m = np.zeros((3, *shape), bool)
    m[0, 2:5, 3:9] = True
    m[1, 1:3, 1:3] = True
    m[2, 0, 0] = True
    logits = np.random.default_rng(1).normal(size=(3, 256, 256)).astype(np.float32)
    return SliceMasks(m, np.array([0.9, 0.5, 0.1]), logits)


def worked_session():
    labels = np.zeros((6, 20, 30), np.uint16)
    session = SegmentationSession(labels)
    liver = session.add_object("liver").value
    kidney = session.add_object("kidney", (1, 2, 3)).value
    session.add_object("empty one")
    session.add_point(liver, 0, 2, 5, 6)
    session.add_point(liver, 0, 2, 7, 8, positive=False)
    session.apply_prediction(liver, 0, 2, masks())
    session.cycle_candidate(liver, 0, 2)
    session.set_box(kidney, 1, 3, (1, 1, 4, 9))
    session.add_point(kidney, 2, 12, 2.5, 3.5)
    labels[4, 4:6, 4:7] = kidney  # a hand stroke
    session.record_manual_edit(np.nonzero(labels == kidney), np.zeros(6, np.uint16), kidney)
    session.select(kidney)
    return session, liver, kidney


def prompts_of(session):
    return {(o.value, a, i): session.slice_prompts(o.value, a, i)
            for o in session.objects for a in range(3) for i in session.prompted_slices(o.value, a)}


def test_round_trip_keeps_labels_objects_prompts_key_slices_and_locks(tmp_path):
    session, liver, kidney = worked_session()
    image = scan()
    path = save_session(session, None, tmp_path / f"ct{SUFFIX}", scan=image)
    assert path.is_file() and not [p for p in tmp_path.iterdir() if p.name != path.name]  # no temporary left

    back = load_session(path, like=image)
    np.testing.assert_array_equal(back.labels, session.labels)
    assert back.labels is not session.labels and back.labels.dtype == session.labels.dtype
    assert back.objects == session.objects and back.active == kidney
    assert prompts_of(back) == prompts_of(session)
    assert back.slice_prompts(liver, 0, 2).points == ((5.0, 6.0, True), (7.0, 8.0, False))
    assert back.slice_prompts(kidney, 1, 3).box == (1.0, 1.0, 4.0, 9.0)
    # Key slices (kept predictions) with their candidates: cycling goes on where it was.
    assert back.predicted_slices(liver, 0) == [2] and back.current_choice(liver, 0, 2) == 1
    np.testing.assert_array_equal(back.candidate(liver, 0, 2).masks.masks, masks().masks)
    np.testing.assert_array_equal(back.candidate(liver, 0, 2).masks.low_res_logits, masks().low_res_logits)
    np.testing.assert_array_equal(back.locked_mask(), session.locked_mask())
    assert back.locks.count() == 6
    # No undo history, but the session works on.
    assert not back.can_undo(liver) and not back.can_undo(kidney)
    back.add_point(liver, 0, 3, 1, 1)
    assert back.can_undo(liver)

    info = read_session(path)
    assert info.key_slices(liver, 0) == [2] and info.prompted_slices(kidney, 2) == [12]
    manifest = json.loads(zipfile.ZipFile(path).read("manifest.json"))
    assert manifest["version"] == 1 and manifest["scan"]["shape"] == [6, 20, 30]
    assert manifest["history"] == "not saved"


def test_load_into_an_existing_array_in_place(tmp_path):
    session, liver, _ = worked_session()
    image = scan()
    path = save_session(session, None, tmp_path / "a.medsam-session.zip", scan=image)
    target = np.full(session.shape, 7, np.int32)
    back = load_session(path, like=image, into=target)
    assert back.labels is target
    np.testing.assert_array_equal(target, session.labels)


def test_another_scan_is_refused(tmp_path):
    session, _, _ = worked_session()
    image = scan()
    path = save_session(session, None, tmp_path / "a.medsam-session.zip", scan=image)
    other = image.copy()
    other[3, 10, 10] += 1  # same shape, one voxel different
    target = np.zeros(session.shape, np.uint16)
    with pytest.raises(SessionFileError, match="another scan of the same shape"):
        load_session(path, like=other, into=target)
    assert not target.any()
    with pytest.raises(SessionFileError, match="shape"):
        load_session(path, like=scan(shape=(7, 20, 30)))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip", "version", "no labels"])
def test_corrupt_truncated_or_other_version_files_are_refused(tmp_path, damage):
    session, _, _ = worked_session()
    image = scan()
    path = save_session(session, None, tmp_path / "a.medsam-session.zip", scan=image)
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a zip at all")
    elif damage == "flip":  # a byte inside the compressed labels
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo("labels.npy")
        data = bytearray(raw)
        at = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
        data[at] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        with zipfile.ZipFile(path) as archive:
            members = {name: archive.read(name) for name in archive.namelist()}
        manifest = json.loads(members["manifest.json"])
        if damage == "version":
            manifest["version"] = 99
        else:
            del members["labels.npy"]
        members["manifest.json"] = json.dumps(manifest).encode()
        with zipfile.ZipFile(path, "w") as archive:
            for name, blob in members.items():
                archive.writestr(name, blob)
    target = np.zeros(session.shape, np.uint16)
    with pytest.raises(SessionFileError) as caught:
        load_session(path, like=image, into=target)
    assert isinstance(caught.value, MedSamError) and "\n" not in str(caught.value)
    assert ("version 99" in str(caught.value)) == (damage == "version")
    assert not target.any(), "a refused file wrote into the labels"


def test_saving_is_atomic(tmp_path, monkeypatch):
    session, _, _ = worked_session()
    image = scan()
    path = save_session(session, None, tmp_path / "a.medsam-session.zip", scan=image)
    before = path.read_bytes()
    monkeypatch.setattr(np, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left")))  # mid-write
    with pytest.raises(MedSamError):
        save_session(session, None, path, scan=image)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_default_file_lies_beside_the_scan(tmp_path):
    assert session_path(tmp_path / "ct.nii.gz", "ct phantom") == tmp_path / "ct_phantom.medsam-session.zip"


# ------------------------------------------------------------------------------------------------ the widget
@pytest.fixture(scope="module")
def model():
    from test_predictor import tiny_model

    return tiny_model("sam", seed=3)


def test_widget_saves_and_reopens_a_session(make_napari_viewer, qtbot, model, sample_dir, tmp_path):
    from test_several_scans import click, settle, start

    viewer, widget = start(make_napari_viewer, qtbot, model, sample_dir / "ct_phantom.nii.gz")
    image = widget.image_layer
    middle = image.data.shape[0] // 2
    click(qtbot, widget, middle)
    controller = widget.controller
    controller.new_object()
    click(qtbot, widget, middle + 4, row=60, col=100)
    labels = controller.labels_layer
    saved_labels = labels.data.copy()
    session = controller.session
    objects = session.objects
    prompts = prompts_of(session)
    assert len(objects) == 2 and len(prompts) == 2 and saved_labels.any()
    assert widget.session_suggestion().name.endswith(SUFFIX)

    path = widget.save_session(tmp_path / f"ct{SUFFIX}")
    assert path is not None and path.is_file(), widget.status.text()
    assert widget.session_suggestion() == path

    # The labels layer goes away (and with it the objects and prompts of the scan).
    settle(qtbot, widget)
    viewer.layers.remove(labels)
    qtbot.wait(50)
    points = widget.scan.points
    if points is not None:  # the user clears the clicks too
        points.selected_data = set(range(len(points.data)))
        points.remove_selected()

    engine = widget.open_session(path)
    assert engine is not None, widget.status.text()
    settle(qtbot, widget)
    scan = widget.scan
    new_labels = scan.labels
    assert new_labels in viewer.layers and widget.labels_layer is new_labels
    np.testing.assert_array_equal(new_labels.data, saved_labels)
    assert widget.controller is not None and widget.controller.session is engine
    assert widget.controller.labels_layer is new_labels
    assert engine.objects == objects and prompts_of(engine) == prompts
    assert widget.objects_panel.table.rowCount() == 2
    # The prompt layers show the restored prompts on their slices.
    pts = widget.controller.points_layer
    assert pts in viewer.layers and pts.visible
    got = sorted((int(a), int(round(c[int(a)])), int(lab)) for c, a, lab in
                 zip(pts.data, pts.features["axis"], pts.features["label"]))
    assert got == sorted((a, i, o) for (o, a, i), p in prompts.items() for _ in p.points)
    # The names reach the layer's metadata (Export names segments after them).
    from napari_medsam._napari.layers import META_KEY

    assert new_labels.metadata[META_KEY]["names"] == {o.value: o.name for o in objects}

    # A session of this scan is refused on a scan of another shape (nothing changes).
    mr = viewer.open(str(sample_dir / "mr_phantom.nii.gz"), plugin="napari-medsam")[0]
    settle(qtbot, widget)
    if mr.data.shape != image.data.shape:
        widget.image_combo.setCurrentText(mr.name)
        before = [layer.name for layer in viewer.layers]
        assert widget.open_session(path) is None
        assert "shape" in widget.status.toolTip() + widget.status.text()
        assert [layer.name for layer in viewer.layers] == before
    settle(qtbot, widget)
    widget.stop_segmentation()
