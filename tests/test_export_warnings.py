"""Warnings raised while writing labels reach the user (issue 9 follow-up).

A DICOM source whose StudyInstanceUID is empty gets a new UID in the DICOM-SEG, with a Python
UserWarning: the CLI prints it on stderr and lists it in the summary JSON, napari's writer
shows it as a warning notification.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from dicom_factory import edit, make_volume, phantom, write_series

from napari_medsam.cli import main
from napari_medsam.io import save_labels
from napari_medsam.io.dicom.series import read_dicom_series

SHAPE = (4, 20, 24)


@pytest.fixture
def no_study_uid(tmp_path):
    """A DICOM series whose StudyInstanceUID is empty, and a NIfTI label volume on its grid."""
    files = write_series(tmp_path / "series", make_volume(phantom(SHAPE)))

    def blank(ds, _index):
        ds.StudyInstanceUID = ""

    edit(files, blank)
    source = read_dicom_series(tmp_path / "series")
    labels = np.zeros(source.shape, np.uint8)
    labels[1:3, 5:12, 6:14] = 1
    labels_path = tmp_path / "labels.nii.gz"
    save_labels(labels, like=source, path=labels_path)
    return tmp_path / "series", labels_path, source, labels


def test_cli_export_prints_and_reports_write_warnings(no_study_uid, tmp_path, capsys):
    series, labels_path, _, _ = no_study_uid
    out = tmp_path / "seg.dcm"
    assert main(["export", str(labels_path), "--source", str(series), "--out", str(out), "--names", "1=liver"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    lines = [line for line in captured.err.splitlines() if line.startswith("napari-medsam export: warning: ")]
    assert len(lines) == 1 and "StudyInstanceUID" in lines[0]
    assert summary["warnings"] == [lines[0].removeprefix("napari-medsam export: warning: ")]
    assert out.is_file() and summary["written"] == str(out)


def test_cli_export_without_warnings_has_an_empty_list(tmp_path, capsys):
    files = write_series(tmp_path / "series", make_volume(phantom(SHAPE)))
    source = read_dicom_series(files[0].parent)
    labels = np.zeros(source.shape, np.uint8)
    labels[1:3, 5:12, 6:14] = 1
    save_labels(labels, like=source, path=tmp_path / "labels.nii.gz")
    args = ["export", str(tmp_path / "labels.nii.gz"), "--source", str(files[0].parent),
            "--out", str(tmp_path / "s.dcm")]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["warnings"] == [] and "warning" not in captured.err


def test_napari_writer_shows_write_warnings(no_study_uid, tmp_path, monkeypatch):
    import napari.utils.notifications as notifications

    from napari_medsam._napari.layers import META_KEY
    from napari_medsam._napari.writer import write_labels

    _, _, source, labels = no_study_uid
    shown = []
    monkeypatch.setattr(notifications, "show_warning", shown.append)
    out = tmp_path / "from_napari.dcm"
    assert write_labels(str(out), labels, {"metadata": {META_KEY: {"volume": source}}}) == [str(out)]
    assert len(shown) == 1 and "StudyInstanceUID" in shown[0] and "\n" not in shown[0]
    assert out.is_file()


def test_widget_export_shows_write_warnings(no_study_uid, make_napari_viewer, qtbot, tmp_path, monkeypatch):
    import napari.utils.notifications as notifications

    from napari_medsam._napari.widget import MedSamWidget

    series, _, _, labels = no_study_uid
    shown = []
    monkeypatch.setattr(notifications, "show_warning", shown.append)
    viewer = make_napari_viewer()
    viewer.open(str(series), plugin="napari-medsam")
    widget = MedSamWidget(viewer)
    qtbot.addWidget(widget)
    layer = widget.add_labels_layer("organ")
    layer.data[...] = labels
    out = tmp_path / "organ.dcm"
    worker = widget.export_labels(out)
    with qtbot.waitSignal(worker.finished, timeout=20000):
        pass
    qtbot.waitUntil(lambda: widget.last_saved == out, timeout=5000)
    assert len(shown) == 1 and "StudyInstanceUID" in shown[0]
    assert "1 warning" in widget.status.text()
