"""The CLI's small things (issue 8): closed pipes, weight hints, progress, info keys, names of segments."""

from __future__ import annotations

import dataclasses
import fcntl
import io
import json
import os
import pty
import shutil
import struct
import subprocess
import sys
import termios
import threading

import nibabel as nib
import numpy as np
import pydicom
import pytest

from napari_medsam.cli import EXIT_BROKEN_PIPE, _Progress, main
from napari_medsam.errors import WeightsError
from napari_medsam.io import load_volume, read_labels, read_labels_and_segments
from napari_medsam.io.segments import segments_sidecar_path
from napari_medsam.models import registry
from napari_medsam.models.weights import resolve_weights
from napari_medsam.phantoms import CT_LABELS, MR_LABELS
from test_cli import scan  # noqa: F401  (fixture: a small CT-like NIfTI whose file order differs from display order)

CLI = [sys.executable, "-m", "napari_medsam.cli"]




def _prompts(tmp_path, prompts: list, coordinates: str = "voxel"):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps({"coordinates": coordinates, "objects": [{"label": 1, "name": "block",
                                                                        "prompts": prompts}]}))
    return path


BOX = [{"type": "box", "corners": [[4, 4, 5], [21, 21, 5]]}]


# --- 1. a reader that went away ---------------------------------------------------------------


@pytest.mark.parametrize("command", ["models", "models --json", "info", "export"])
def test_closed_stdout_exits_quietly(command, scan, tmp_path):
    args = command.split()
    if command == "info":
        args += [str(scan)]
    elif command == "export":
        labels = tmp_path / "labels.nii.gz"
        nib.save(nib.Nifti1Image(np.ones((30, 26, 10), np.uint8), nib.load(str(scan)).affine), str(labels))
        args += [str(labels), "--source", str(scan), "--out", str(tmp_path / "out.nii.gz"), "--names", "1=liver"]
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will ever read: the first write (or flush) fails with EPIPE
    try:
        result = subprocess.run([*CLI, *args], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert result.stderr == ""  # no BrokenPipeError traceback, no "Exception ignored" message
    assert result.returncode == EXIT_BROKEN_PIPE


# --- 2. missing weights name the CLI's flag -----------------------------------------------------


@pytest.fixture
def offline_lite_medsam(tmp_path, monkeypatch):
    """lite_medsam whose only URL is a missing local file, with an empty weight cache."""
    spec = registry.get_model("lite_medsam")
    missing = (tmp_path / "nowhere" / spec.filename).as_uri()
    monkeypatch.setitem(registry.MODELS, "lite_medsam", dataclasses.replace(spec, urls=(missing,)))
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("NAPARI_MEDSAM_WEIGHTS_DIR", str(cache))
    return cache


def test_missing_weights_through_the_cli_name_checkpoint(offline_lite_medsam, scan, tmp_path, capsys):
    out = tmp_path / "labels.nii.gz"
    code = main(["segment", str(scan), "--prompts", str(_prompts(tmp_path, BOX)), "--out", str(out),
                 "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err
    assert "could not download" in err and "--checkpoint FILE" in err and "path=" not in err
    assert not out.exists()

    assert main(["download", "lite_medsam", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "napari-medsam segment --checkpoint FILE" in err and "path=" not in err


def test_a_foreign_cached_file_names_checkpoint_in_the_cli(offline_lite_medsam, golden_dir, scan, tmp_path,
                                                            monkeypatch, capsys):
    spec = registry.MODELS["lite_medsam"]
    monkeypatch.setitem(registry.MODELS, "lite_medsam", dataclasses.replace(spec, sha256="0" * 64, size_bytes=None))
    shutil.copy(golden_dir / "lite_medsam_random.pth", offline_lite_medsam / spec.filename)
    code = main(["segment", str(scan), "--prompts", str(_prompts(tmp_path, BOX)), "--out",
                 str(tmp_path / "labels.nii.gz"), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "not the official" in err and "(--checkpoint FILE) to use it anyway" in err


def test_missing_weights_through_the_api_name_the_api(offline_lite_medsam):
    with pytest.raises(WeightsError) as caught:
        resolve_weights("lite_medsam", download=False)
    message = str(caught.value)
    assert "weights=FILE in SamModel.from_checkpoint" in message and "path=FILE in resolve_weights" in message
    assert "--checkpoint" not in message
    with pytest.raises(WeightsError, match="could not download.*weights=FILE"):
        resolve_weights("lite_medsam", download=True)


# --- 3. progress on stderr ----------------------------------------------------------------------


def test_plain_progress_lines_are_few_and_complete():
    stream, now = io.StringIO(), [0.0]
    progress = _Progress("napari-medsam segment", stream=stream, tty=False, clock=lambda: now[0])
    callback = progress.slices()
    for done in range(1, 1001):  # a fast phase: 1000 steps within a second
        now[0] += 0.001
        callback(done, 1000, f"slice {done}: accepted")
    for done in range(1, 4):  # the next object: the count starts again, a slow step each
        now[0] += 30.0
        callback(done, 3, f"slice {done}: accepted")
    callback.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert all(line.startswith("napari-medsam segment: ") for line in lines)
    first = [line for line in lines if "/1000 slices" in line]
    assert first[0].endswith("1/1000 slices - slice 1: accepted")
    assert first[-1].endswith("1000/1000 slices - slice 1000: accepted")
    assert 10 <= len(first) <= 12  # the start, each tenth, the end: not a thousand lines
    assert [line.split(": ", 1)[1] for line in lines if "/3 slices" in line] == [
        "1/3 slices - slice 1: accepted", "2/3 slices - slice 2: accepted", "3/3 slices - slice 3: accepted"]


def test_plain_progress_of_repeated_byte_counts_is_rate_limited():
    stream, now = io.StringIO(), [0.0]
    callback = _Progress("napari-medsam download", stream=stream, tty=False, clock=lambda: now[0]).bytes("lite_medsam")
    for _ in range(100):  # waiting for another process's download: the same size over and over
        now[0] += 0.5
        callback(2_000_000, 40_000_000)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "napari-medsam download: lite_medsam: 2.0 of 40.0 MB (5%)"
    assert 9 <= len(lines) <= 11  # one line per 5 s over 50 s


def test_quiet_progress_prints_nothing():
    stream = io.StringIO()
    progress = _Progress("napari-medsam segment", stream=stream, tty=False, quiet=True)
    progress.line("reading")
    progress.slices()(1, 2, "slice 1")
    progress.bytes("x")(5, 10)
    assert stream.getvalue() == ""


def _segment_command(scan, tmp_path, golden_dir, *extra, propagate: bool = True):
    # Propagation from the box's slice 5 to its neighbours 4 and 6 only (--zrange): three slices
    # show the per-slice progress as well as the scan's ten, in a third of the time.
    return [*CLI, "segment", str(scan), "--prompts", str(_prompts(tmp_path, BOX)), "--out",
            str(tmp_path / "labels.nii.gz"), "--checkpoint", str(golden_dir / "lite_medsam_random.pth"),
            "--device", "cpu", "--threads", "1", *(["--propagate", "--zrange", "4", "6"] if propagate else []),
            *extra]


@pytest.mark.slow
def test_segment_progress_when_stderr_is_not_a_terminal(scan, tmp_path, golden_dir):
    result = subprocess.run(_segment_command(scan, tmp_path, golden_dir), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    json.loads(result.stdout)  # stdout holds only the summary
    lines = result.stderr.splitlines()
    assert "\r" not in result.stderr
    assert lines and all(line.startswith("napari-medsam segment: ") for line in lines), lines
    assert any(f"reading {scan}" in line for line in lines)
    assert any(" slices - slice " in line for line in lines)
    assert lines[-1].endswith(f"writing {tmp_path / 'labels.nii.gz'}")

    # --quiet: nothing at all on stderr (one slice is enough to show it; propagation took 15 s more)
    quiet = subprocess.run(_segment_command(scan, tmp_path, golden_dir, "--quiet", propagate=False),
                           capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and quiet.stderr == ""


@pytest.mark.slow
def test_segment_progress_on_a_terminal_is_a_tqdm_bar(scan, tmp_path, golden_dir):
    master, slave = pty.openpty()
    # A terminal 100 columns wide (a fresh pty has 0 columns, where tqdm draws nothing).
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other end was closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        result = subprocess.run(_segment_command(scan, tmp_path, golden_dir), stdout=subprocess.PIPE,
                                stderr=slave, text=True, timeout=300)
    finally:
        os.close(slave)
        reader.join(timeout=10)
        os.close(master)
    shown = b"".join(chunks).decode(errors="replace")
    assert result.returncode == 0, shown[-2000:]
    assert "slice/s" in shown or "s/slice" in shown, shown  # tqdm's rate, in slices
    assert "\r" in shown  # a bar redrawn in place
    assert " slices - slice " not in shown  # no plain step lines on a terminal


# --- 4. info ------------------------------------------------------------------------------------


def test_info_always_has_warnings_and_one_name_per_uid(scan, sample_dir, capsys):
    assert main(["info", str(scan)]) == 0
    assert json.loads(capsys.readouterr().out)["warnings"] == []
    assert main(["info", str(sample_dir / "ct_phantom_dicom")]) == 0
    info = json.loads(capsys.readouterr().out)
    header = pydicom.dcmread(str(sample_dir / "ct_phantom_dicom" / "IM00001.dcm"), stop_before_pixels=True)
    assert info["warnings"] == []
    assert info["series_instance_uid"] == header.SeriesInstanceUID
    assert info["study_instance_uid"] == header.StudyInstanceUID
    assert info["number_of_instances"] == 56
    for duplicate in ("series_uid", "study_uid", "dicom_n_instances"):
        assert duplicate not in info
    (entry,) = info["series_in_folder"]
    assert entry["series_instance_uid"] == header.SeriesInstanceUID and "series_uid" not in entry


def test_info_lists_the_warnings_of_a_folder_with_two_series(tmp_path, capsys):
    from dicom_factory import make_volume, phantom, write_series

    folder = tmp_path / "two"
    write_series(folder, make_volume(phantom()), prefix="a")
    small = write_series(folder, make_volume(phantom()[:4], spacing=(3, 1, 1)), prefix="b", series_number=2)
    assert main(["info", str(folder)]) == 0
    info = json.loads(capsys.readouterr().out)
    (warning,) = info["warnings"]
    assert pydicom.dcmread(str(small[0])).SeriesInstanceUID in warning
    assert len(info["series_in_folder"]) == 2


# --- 5. a prompt outside the volume -------------------------------------------------------------


@pytest.mark.parametrize("coordinates, position, expected", [
    ("voxel", [5, 30, 3], "voxel position [5, 30, 3] (i, j, k) lies outside the image"),
    ("world", [0.0, 0.0, 500.0], "world position [0, 0, 500] (RAS mm) lies outside the image"),
])
def test_a_prompt_outside_the_volume_is_reported_in_file_order(scan, tmp_path, capsys, coordinates, position,
                                                               expected):
    prompts = _prompts(tmp_path, [{"type": "point", "position": position}], coordinates)
    out = tmp_path / "labels.nii.gz"
    assert main(["segment", str(scan), "--prompts", str(prompts), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert expected in err
    # The shape in the prompt's own (file) order, never the display order [10, 26, 30].
    assert "file's voxel order (i, j, k)" in err and "[30, 26, 10]" in err and "[10, 26, 30]" not in err
    assert "i 0..29, j 0..25, k 0..9" in err
    if coordinates == "world":
        k = (500.0 - (-10.0)) / 2.0  # RAS z = 2 k - 10
        assert "falls at voxel [" in err and f"{k:g}]" in err
    assert not out.exists()


# --- 6. and 7. segment names travel with the labels ---------------------------------------------


def _seg_names(path) -> list[str]:
    """SegmentLabel of each segment of a DICOM-SEG in segment-number order (LABELMAP's background 0 left out)."""
    seg = pydicom.dcmread(str(path), stop_before_pixels=True)
    items = sorted((int(item.SegmentNumber), str(item.SegmentLabel)) for item in seg.SegmentSequence)
    return [label for number, label in items if number >= 1]


def test_sample_labels_carry_their_names(sample_dir):
    for stem, names in (("ct_phantom_labels", CT_LABELS), ("mr_phantom_labels", MR_LABELS)):
        labels = sample_dir / f"{stem}.nii.gz"
        assert segments_sidecar_path(labels) == sample_dir / f"{stem}.segments.json"
        volume = load_volume(labels)
        array, segments = read_labels_and_segments(labels, like=volume)
        assert {s.label: s.name for s in segments} == names
        assert set(np.unique(array)) - {0} == set(names)


def test_export_sample_labels_to_dicom_seg_names_the_organs(sample_dir, tmp_path, capsys):
    out = tmp_path / "x.dcm"
    assert main(["export", str(sample_dir / "ct_phantom_labels.nii.gz"), "--source",
                 str(sample_dir / "ct_phantom_dicom"), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [(s["label"], s["name"]) for s in summary["segments"]] == sorted(CT_LABELS.items())
    assert _seg_names(out) == [CT_LABELS[k] for k in sorted(CT_LABELS)]
    assert "segments_file" not in summary


def test_names_given_on_the_command_line_beat_the_sidecar(sample_dir, tmp_path, capsys):
    out = tmp_path / "x.dcm"
    assert main(["export", str(sample_dir / "ct_phantom_labels.nii.gz"), "--source",
                 str(sample_dir / "ct_phantom_dicom"), "--out", str(out), "--names", "2=milt"]) == 0
    names = {s["label"]: s["name"] for s in json.loads(capsys.readouterr().out)["segments"]}
    assert names[2] == "milt" and names[1] == "liver"


def test_seg_to_nifti_summary_uses_the_seg_names(sample_dir, tmp_path, capsys):
    # Labels without a sidecar, named only inside the SEG written from them.
    bare = tmp_path / "bare_labels.nii.gz"
    shutil.copy(sample_dir / "ct_phantom_labels.nii.gz", bare)
    seg = tmp_path / "organs.dcm"
    source = str(sample_dir / "ct_phantom_dicom")
    assert main(["export", str(bare), "--source", source, "--out", str(seg)]) == 0
    default = json.loads(capsys.readouterr().out)["segments"]
    assert default[0]["name"] == "Segment 1"  # the bare NIfTI names nothing
    assert main(["export", str(bare), "--source", source, "--out", str(seg), "--names", "1=liver,2=spleen"]) == 0
    capsys.readouterr()

    nifti = tmp_path / "back.nii.gz"
    assert main(["export", str(seg), "--source", source, "--out", str(nifti)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in summary["segments"]][:3] == ["liver", "spleen", "Segment 3"]
    assert summary["segments_file"] == str(tmp_path / "back.segments.json")
    series = load_volume(source)
    np.testing.assert_array_equal(read_labels(nifti, like=series), read_labels(bare, like=series))

    # ... and back to DICOM-SEG: the names survive the NIfTI step through its sidecar.
    again = tmp_path / "again.dcm"
    assert main(["export", str(nifti), "--source", source, "--out", str(again)]) == 0
    capsys.readouterr()
    assert _seg_names(again)[:2] == ["liver", "spleen"]


def test_a_broken_sidecar_is_an_error_that_names_it(sample_dir, tmp_path, capsys):
    labels = tmp_path / "organs.nii.gz"
    shutil.copy(sample_dir / "ct_phantom_labels.nii.gz", labels)
    (tmp_path / "organs.segments.json").write_text('[{"label": 1, "name": "liver"},')
    out = tmp_path / "x.dcm"
    assert main(["export", str(labels), "--source", str(sample_dir / "ct_phantom_dicom"), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("napari-medsam export: error:") and "organs.segments.json" in err and "\n" not in err
    assert not out.exists()
