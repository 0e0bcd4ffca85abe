"""File > Open in napari: scans go to napari-medsam without the "Choose reader" dialog.

These tests open files the way napari's GUI does (``viewer.open(path, plugin=None)``, which is
what File > Open, drag-and-drop and ``napari <path>`` call through ``QtViewer._qt_open``). Note
that a bare ``viewer.open(path)`` is not that path: in napari 0.9 its ``plugin`` argument
defaults to ``'napari'`` (the builtin reader), whatever the preferences say.

Every test runs on its own napari settings file under ``tmp_path`` (``napari_settings``), never
on the user's, and on its own napari-medsam config folder (``tests/conftest.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from napari_medsam._napari import preferences
from napari_medsam.io import load_volume

PLUGIN = "napari-medsam"
CORNERS = np.array([[0, 0, 0], [1, 2, 3], [4, 7, 9]])


@pytest.fixture
def napari_settings(tmp_path, monkeypatch):
    """napari's global settings replaced by a fresh instance saved under tmp_path."""
    import napari.settings
    from napari.settings import NapariSettings, get_settings

    settings = NapariSettings(config_path=tmp_path / "napari" / "settings.yaml")
    monkeypatch.setattr(napari.settings, "_SETTINGS", settings)
    assert get_settings() is settings
    assert Path(settings.config_path).is_relative_to(tmp_path)
    return settings


@pytest.fixture
def viewer(napari_settings, make_napari_viewer):
    """A viewer created after the settings were isolated (make_napari_viewer resets them)."""
    return make_napari_viewer()


@pytest.fixture
def no_reader_dialog(monkeypatch):
    """Fail the test if napari would show its "Choose reader" dialog."""

    def refuse(paths, *args, **kwargs):
        raise AssertionError(f"napari asked which reader should open {paths}")

    monkeypatch.setattr("napari._qt.qt_viewer.handle_gui_reading", refuse)


def _write_itk(path: Path) -> Path:
    """A small volume with non-trivial spacing and origin, written by SimpleITK."""
    import SimpleITK as sitk

    data = np.arange(8 * 10 * 12, dtype=np.int16).reshape(8, 10, 12)
    image = sitk.GetImageFromArray(data)
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetOrigin((-20.0, 15.0, 30.0))
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(params=["nifti", "dicom-file", "nrrd", "mha"])
def scan(request, sample_dir, tmp_path) -> Path:
    if request.param == "nifti":
        return sample_dir / "ct_phantom.nii.gz"
    if request.param == "dicom-file":
        return sorted((sample_dir / "ct_phantom_dicom").glob("*.dcm"))[0]
    return _write_itk(tmp_path / f"scan.{request.param}")


def _assert_true_geometry(layer, source: Path) -> None:
    """The layer was read by napari-medsam and sits where load_volume says the voxels are."""
    assert layer.source.reader_plugin == PLUGIN
    volume = load_volume(source)
    assert layer.data.shape == volume.shape
    np.testing.assert_array_equal(np.asarray(layer.data), volume.array)
    expected = volume.index_to_world(CORNERS)[:, ::-1]  # napari world axes are (z, y, x)
    np.testing.assert_allclose([layer.data_to_world(c) for c in CORNERS], expected, atol=1e-4)


def test_scans_open_with_the_plugin_without_a_dialog(viewer, napari_settings, no_reader_dialog, scan):
    from napari.components.viewer_model import MultipleReaderError

    # Before the plugin is activated, napari cannot choose: two readers claim the file.
    with pytest.raises(MultipleReaderError):
        viewer.open(str(scan), plugin=None)

    preferences.activate()  # what npe2 calls the first time a napari-medsam command runs

    layers = viewer.open(str(scan), plugin=None)
    assert len(layers) == 1
    _assert_true_geometry(layers[0], scan)
    # The GUI path (File > Open, drag-and-drop): no dialog either.
    viewer.window._qt_viewer._qt_open([str(scan)], stack=False)
    assert len(viewer.layers) == 2
    _assert_true_geometry(viewer.layers[-1], scan)


def test_dicom_folder_opens_through_a_folder_rule(viewer, napari_settings, no_reader_dialog, sample_dir, tmp_path):
    from napari.components.viewer_model import MultipleReaderError
    from napari.plugins.utils import get_preferred_reader

    folder = sample_dir / "ct_phantom_dicom"
    preferences.activate()
    # No catch-all folder rule: any folder still goes to napari's choice, not to us.
    assert get_preferred_reader(str(tmp_path)) is None
    assert get_preferred_reader(str(folder)) is None
    with pytest.raises(MultipleReaderError):
        viewer.open(str(folder), plugin=None)

    # The documented way: a folder rule in Preferences > Plugins (here: every folder in sample_data).
    rule = os.path.join(os.path.realpath(sample_dir), "*") + os.sep
    napari_settings.plugins.extension2reader = {**napari_settings.plugins.extension2reader, rule: PLUGIN}
    layers = viewer.open(str(folder), plugin=None)
    assert len(layers) == 1
    _assert_true_geometry(layers[0], folder)


def test_user_choices_are_left_alone(napari_settings, tmp_path):
    from napari.plugins.utils import get_preferred_reader

    mine = {"*.nrrd": "napari", "*.gz": "napari", "*.dcm": "napari", "/data/*.mha": "napari"}
    napari_settings.plugins.extension2reader = dict(mine)

    added = preferences.install_reader_preferences()

    after = dict(napari_settings.plugins.extension2reader)
    assert {k: after[k] for k in mine} == mine  # nothing of the user's changed
    # Covered by a user choice: the same pattern, "*.gz" (saved by the dialog for .nii.gz), or
    # the same pattern in another case.
    for covered in ("*.nrrd", "*.nii.gz", "*.DCM"):
        assert covered not in added and after.get(covered) == mine.get(covered)
    assert {"*.nii", "*.mha", "*.mhd", "*.nhdr"} <= set(added)
    assert all(after[p] == PLUGIN for p in added)
    # napari's own lookup agrees.
    assert get_preferred_reader(str(tmp_path / "a.nrrd")) == "napari"
    assert get_preferred_reader(str(tmp_path / "a.nii.gz")) == "napari"
    assert get_preferred_reader(str(tmp_path / "a.nii")) == PLUGIN
    assert get_preferred_reader(str(tmp_path / "a.mha")) == PLUGIN
    assert get_preferred_reader("/data/a.mha") == "napari"  # the user's folder rule is more specific


def test_a_removed_preference_stays_removed(napari_settings, monkeypatch):
    import napari.settings
    from napari.settings import NapariSettings

    added = preferences.install_reader_preferences()
    assert "*.mha" in added
    saved = yaml.safe_load(Path(napari_settings.config_path).read_text())
    assert saved["plugins"]["extension2reader"]["*.mha"] == PLUGIN

    # The user removes the row in Preferences > Plugins (napari stores a new dict without it).
    napari_settings.plugins.extension2reader = {
        k: v for k, v in napari_settings.plugins.extension2reader.items() if k != "*.mha"
    }
    # Next napari session: settings read back from the same file, the plugin activated again.
    next_session = NapariSettings(config_path=napari_settings.config_path)
    monkeypatch.setattr(napari.settings, "_SETTINGS", next_session)
    assert "*.mha" not in next_session.plugins.extension2reader
    assert preferences.install_reader_preferences() == []
    assert "*.mha" not in next_session.plugins.extension2reader
    # A pattern a later version of the plugin adds is still offered once.
    assert preferences.install_reader_preferences(patterns=["*.mha", "*.newscan"]) == ["*.newscan"]
    assert preferences.install_reader_preferences(patterns=["*.mha", "*.newscan"]) == []


def test_first_use_in_one_session_makes_the_next_session_open_scans_directly(tmp_path, sample_dir):
    # Session 1, a fresh interpreter as a user would start napari: opening the panel activates
    # the plugin through the manifest's on_activate, which saves the preferences to disk.
    config = tmp_path / "napari" / "settings.yaml"
    env = {**os.environ, "NAPARI_CONFIG": str(config)}
    code = textwrap.dedent(
        """
        import napari
        viewer = napari.Viewer(show=False)
        viewer.window.add_plugin_dock_widget("napari-medsam", "MedSAM")
        viewer.close()
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert config.is_file(), "napari did not save its settings"

    # Session 2, another fresh interpreter: File > Open of the sample CT, with the dialog forbidden.
    scan = sample_dir / "ct_phantom.nii.gz"
    code = textwrap.dedent(
        f"""
        import json, napari
        import napari._qt.qt_viewer as qt_viewer
        def refuse(*args, **kwargs):
            raise SystemExit("napari showed the Choose reader dialog")
        qt_viewer.handle_gui_reading = refuse
        viewer = napari.Viewer(show=False)
        viewer.window._qt_viewer._qt_open([{str(scan)!r}], stack=False)
        layer = viewer.layers[-1]
        world = [list(map(float, layer.data_to_world(c))) for c in {CORNERS.tolist()!r}]
        print("RESULT", json.dumps({{"plugin": layer.source.reader_plugin,
                                    "shape": list(layer.data.shape), "world": world}}))
        viewer.close()
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stdout[-1000:] + result.stderr[-2000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    opened = json.loads(line[len("RESULT "):])
    volume = load_volume(scan)
    assert opened["plugin"] == PLUGIN
    assert tuple(opened["shape"]) == volume.shape
    np.testing.assert_allclose(opened["world"], volume.index_to_world(CORNERS)[:, ::-1], atol=1e-4)


def test_outside_napari_nothing_is_written(tmp_path):
    # A script that only uses napari-medsam's I/O must not create or change napari's settings.
    code = textwrap.dedent(
        """
        import sys
        from napari_medsam._napari import preferences
        print("ADDED", preferences.install_reader_preferences())
        print("NAPARI", "napari.settings" in sys.modules)
        """
    )
    env = {**os.environ, "NAPARI_CONFIG": str(tmp_path / "napari" / "settings.yaml")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ADDED []" in result.stdout and "NAPARI False" in result.stdout
    assert not (tmp_path / "napari").exists()


@pytest.mark.parametrize("name", ["ct_phantom_dicom", "ct_phantom.nii.gz"])
def test_choose_reader_dialog_preselects_the_plugin(make_napari_viewer, sample_dir, name):
    """Where napari still asks (a DICOM folder, or before the plugin was ever used), OK opens with napari-medsam."""
    from napari._qt.dialogs.qt_reader_dialog import QtReaderDialog
    from napari.plugins import _npe2

    make_napari_viewer()
    path = str(sample_dir / name)
    readers = _npe2.get_readers(path)
    assert {"napari", PLUGIN} <= set(readers)
    dialog = QtReaderDialog(pth=path, readers=readers)
    assert dialog.reader_btn_group.checkedButton().text() == readers[PLUGIN]
