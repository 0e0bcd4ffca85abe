"""The dock widget's Model box: weight state, local files, downloads (with cancel), loading, mapping."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from napari.utils.notifications import notification_manager
from test_weights import server  # noqa: F401  (the local HTTP server fixture)

from napari_medsam._napari import progress as progress_module
from napari_medsam._napari.model_panel import MAPPING_LIMITS, MAPPING_PERCENTILE, ModelPanel, _megabytes, weight_state
from napari_medsam._napari.settings import Settings
from napari_medsam.models.registry import MODELS
from napari_medsam.models.weights import cached_path
from napari_medsam.segment.intensity import contrast_limits, ct_window, percentile_mapping
from napari_medsam.segment.model import SamModel
from napari_medsam.windows import CT_WINDOWS

MiB = 1 << 20


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty weight cache folder, via the environment variable weights.py honours."""
    folder = tmp_path / "weights"
    monkeypatch.setenv("NAPARI_MEDSAM_WEIGHTS_DIR", str(folder))
    return folder


@pytest.fixture
def make_panel(qtbot, cache):
    """Build panels on fresh Settings; at the end wait for their workers to finish."""
    panels = []

    def make(model: str | None = None) -> ModelPanel:
        panel = ModelPanel(Settings())
        if model is not None:
            panel.model_combo.setCurrentIndex(panel.model_combo.findData(model))
        panels.append(panel)
        return panel

    yield make
    for panel in panels:
        panel.shutdown()
        qtbot.waitUntil(lambda p=panel: not p.downloading and not p.loading, timeout=60000)
        panel.close()
        panel.deleteLater()
    qtbot.wait(10)


def _messages(since: int) -> list[str]:
    return [str(n.message) for n in notification_manager.records[since:]]


def _test_spec(url: str, data: bytes, name: str = "test_model", like: str = "mobile_sam"):
    return dataclasses.replace(
        MODELS[like], name=name, display_name="Test Model", urls=(url,), filename=f"{name}.pth",
        size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
    )


def test_combo_lists_every_model_with_its_input_size(make_panel):
    panel = make_panel()
    items = [panel.model_combo.itemText(i) for i in range(panel.model_combo.count())]
    assert [panel.model_combo.itemData(i) for i in range(panel.model_combo.count())] == list(MODELS)
    assert "LiteMedSAM (256 px)" in items and "SAM ViT-H (1024 px)" in items
    assert panel.device_combo.itemData(0) == "auto" and "cpu" in [
        panel.device_combo.itemData(i) for i in range(panel.device_combo.count())]
    assert panel.model is None and panel.model_name is None and panel.status.text() == "no model loaded"


def test_weight_state_missing_then_present(make_panel, cache, tmp_path):
    panel = make_panel("mobile_sam")
    assert panel.weights_label.text() == "not downloaded (41 MB)"
    assert not panel.download_button.isHidden() and panel.cancel_button.isHidden()
    assert not panel.weights_available()
    target = cached_path("mobile_sam")
    assert target.parent == cache
    cache.mkdir()
    target.write_bytes(b"PK\x03\x04 not hashed on the Qt thread")
    panel.refresh()
    assert panel.weights_label.text() == "present" and panel.weights_label.toolTip() == str(target)
    assert panel.download_button.isHidden() and panel.weights_available()
    panel.model_combo.setCurrentIndex(panel.model_combo.findData("lite_medsam"))
    assert panel.weights_label.text() == "not downloaded (size unknown)"
    # the "cache_dir" setting wins over the environment variable
    panel.settings.set("cache_dir", str(tmp_path / "elsewhere"))
    panel.model_combo.setCurrentIndex(panel.model_combo.findData("mobile_sam"))
    assert panel.weights_label.text().startswith("not downloaded")
    assert str(tmp_path / "elsewhere") in panel.weights_label.toolTip()
    text, tip = weight_state(MODELS["mobile_sam"], str(tmp_path / "gone.pt"), None)
    assert text == "local file missing: gone.pt"


def test_choose_local_file_is_remembered_per_model(make_panel, golden_dir, tmp_path, monkeypatch):
    from qtpy.QtWidgets import QFileDialog

    panel = make_panel("mobile_sam")
    chosen = golden_dir / "mobile_sam_random.pt"
    asked = []
    monkeypatch.setattr(QFileDialog, "getOpenFileName",
                        lambda *args, **kw: (asked.append(args), (str(chosen), ""))[1])
    panel.choose_button.click()
    assert asked and panel.weights_label.text() == "local file: mobile_sam_random.pt"
    assert panel.weights_label.toolTip() == str(chosen)
    assert panel.download_button.isHidden() and not panel.forget_button.isHidden()
    assert Settings().get("checkpoints") == {"mobile_sam": str(chosen)}
    # another model keeps its own state
    panel.model_combo.setCurrentIndex(panel.model_combo.findData("medsam"))
    assert panel.weights_label.text().startswith("not downloaded")
    # a file that is not a checkpoint is refused with a notification, the old choice is kept
    page = tmp_path / "page.pth"
    page.write_text("<!DOCTYPE html><html>Sign in</html>")
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *args, **kw: (str(page), ""))
    panel.model_combo.setCurrentIndex(panel.model_combo.findData("mobile_sam"))
    before = len(notification_manager.records)
    panel.choose_button.click()
    assert any("page.pth cannot be used as MobileSAM weights" in m for m in _messages(before))
    assert "page.pth" in panel.status.toolTip()
    assert Settings().get("checkpoints") == {"mobile_sam": str(chosen)}
    # a cancelled dialog changes nothing; "Forget file" goes back to the cache
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *args, **kw: ("", ""))
    panel.choose_button.click()
    assert panel.weights_label.text() == "local file: mobile_sam_random.pt"
    panel.forget_button.click()
    assert panel.weights_label.text().startswith("not downloaded") and Settings().get("checkpoints") == {}


def test_download_shows_progress_cancel_stops_it_and_next_resumes(make_panel, server, cache, qtbot, monkeypatch):  # noqa: F811
    payload = bytes(range(256)) * (4 * MiB // 256)
    server.state.files["/w.pth"] = payload
    server.state.delay = 0.1  # 0.1 s per 256 KiB: about 1.6 s for the whole file
    spec = _test_spec(server.url + "/w.pth", payload)
    monkeypatch.setitem(MODELS, spec.name, spec)
    bars = []
    real = progress_module.download_progress

    def spy(desc):
        bar = real(desc)
        bars.append((desc, bar))
        return bar

    monkeypatch.setattr(progress_module, "download_progress", spy)
    panel = make_panel(spec.name)
    assert panel.weights_label.text() == "not downloaded (4.2 MB)"
    panel.download_button.click()
    assert panel.downloading and not panel.cancel_button.isHidden() and not panel.download_button.isEnabled()
    qtbot.waitUntil(lambda: bool(re.fullmatch(r"downloading \d+%\.\.\.", panel.weights_label.text())), timeout=20000)
    assert bars and bars[0][0] == "Downloading Test Model" and bars[0][1]._bar is not None
    before = len(notification_manager.records)
    panel.cancel_button.click()
    qtbot.waitUntil(lambda: not panel.downloading, timeout=20000)
    assert any("cancelled" in m for m in _messages(before)) and "cancelled" in panel.status.text()
    part = cache / "test_model.pth.part"
    kept = part.stat().st_size
    assert 0 < kept < len(payload) and not (cache / "test_model.pth").exists()
    assert panel.weights_label.text() == "not downloaded (4.2 MB)" and "resumed" in panel.weights_label.toolTip()
    assert bars[0][1]._bar is None  # the napari progress bar was closed
    # the next download resumes with a Range request and ends with the file in the cache
    server.state.delay = 0.0
    panel.download_button.click()
    qtbot.waitUntil(lambda: not panel.downloading, timeout=20000)
    assert (cache / "test_model.pth").read_bytes() == payload
    assert server.state.requests[-1] == ("/w.pth", f"bytes={kept}-")
    assert panel.weights_label.text() == "present" and panel.download_button.isHidden()
    assert panel.status.text() == "downloaded Test Model weights"


def test_download_failure_is_a_notification(make_panel, server, monkeypatch, qtbot):  # noqa: F811
    spec = _test_spec(server.url + "/missing.pth", b"x" * 100)
    monkeypatch.setitem(MODELS, spec.name, spec)
    panel = make_panel(spec.name)
    before = len(notification_manager.records)
    panel.download_button.click()
    qtbot.waitUntil(lambda: not panel.downloading, timeout=20000)
    assert any("Download failed" in m and "HTTP 404" in m for m in _messages(before))
    assert panel.status.text().startswith("Download failed") and panel.model is None


def test_load_golden_checkpoint_in_a_worker(make_panel, golden_dir, qtbot):
    panel = make_panel("mobile_sam")
    assert panel.set_local_file("mobile_sam", str(golden_dir / "mobile_sam_random.pt"))
    panel.device_combo.setCurrentIndex(panel.device_combo.findData("cpu"))
    with qtbot.waitSignal(panel.model_changed, timeout=60000) as blocker:
        panel.load_button.click()
        assert panel.status.text() == "loading MobileSAM on cpu..." and not panel.load_button.isEnabled()
    model = blocker.args[0]
    assert isinstance(model, SamModel) and model is panel.model
    assert model.name == "mobile_sam" and panel.model_name == "mobile_sam" and str(model.device) == "cpu"
    assert panel.status.text() == ready_text("MobileSAM")
    qtbot.waitUntil(lambda: panel.load_button.isEnabled())
    # picking another model keeps the loaded one until Load model is pressed
    panel.model_combo.setCurrentIndex(panel.model_combo.findData("medsam"))
    assert panel.model is model and "switches to MedSAM ViT-B" in panel.status.text()


def test_wrong_architecture_gives_notification_and_no_model(make_panel, golden_dir, qtbot):
    from test_predictor import tiny_model

    panel = make_panel("mobile_sam")
    panel.set_model(tiny_model(), "tiny")
    panel.set_local_file("mobile_sam", str(golden_dir / "lite_medsam_random.pth"))
    before = len(notification_manager.records)
    with qtbot.waitSignal(panel.model_changed, timeout=60000) as blocker:
        panel.load()
    assert blocker.args == [None] and panel.model is None and panel.model_name is None
    messages = _messages(before)
    assert any("these weights do not fit MobileSAM" in m and "LiteMedSAM" in m for m in messages)
    assert panel.status.text().startswith("Cannot load MobileSAM: these weights do not fit MobileSAM")


def test_unavailable_device_gives_notification(make_panel, golden_dir, qtbot):
    Settings().set("device", "cuda:7")
    panel = make_panel("mobile_sam")
    assert panel.device == "cuda:7" and panel.device_combo.currentText() == "cuda:7 (not available)"
    panel.set_local_file("mobile_sam", str(golden_dir / "mobile_sam_random.pt"))
    before = len(notification_manager.records)
    with qtbot.waitSignal(panel.model_changed, timeout=60000) as blocker:
        panel.load()
    assert blocker.args == [None]
    assert any("cuda:7" in m for m in _messages(before)) and "cuda:7" in panel.status.text()
    Settings().set("device", "CPU")  # works but is not in the list: kept as it is
    assert make_panel().device_combo.currentText() == "CPU"


def test_load_without_weights_says_what_is_missing_and_download_then_loads(make_panel, server, golden_dir,
                                                                          monkeypatch, qtbot):  # noqa: F811
    """Load model never starts a download by itself: it names the file, its size and licence."""
    data = (golden_dir / "mobile_sam_random.pt").read_bytes()
    server.state.files["/m.pt"] = data
    spec = _test_spec(server.url + "/m.pt", data, name="test_mobile")
    monkeypatch.setitem(MODELS, spec.name, spec)
    panel = make_panel(spec.name)
    panel.device_combo.setCurrentIndex(panel.device_combo.findData("cpu"))
    before = len(notification_manager.records)
    panel.load_button.click()
    assert not panel.downloading and panel.model is None and not panel.loading
    text = panel.status.text()
    assert "has no weights on this computer" in text and _megabytes(len(data)) in text and spec.license in text
    assert any(m == "Test Model has no weights yet: see the Model box" for m in _messages(before))
    # the user chooses Download: the file comes, then the model loads (what Load asked for)
    with qtbot.waitSignal(panel.model_changed, timeout=60000) as blocker:
        panel.download_button.click()
        assert panel.downloading
    assert isinstance(blocker.args[0], SamModel) and panel.model_name == "test_mobile"
    assert panel.weights_label.text() == "present" and panel.status.text() == ready_text("Test Model")


def test_a_long_failure_is_short_in_the_toast_and_whole_in_the_panel(make_panel, monkeypatch):
    panel = make_panel()
    before = len(notification_manager.records)
    long = ("Download failed: could not download the weights from any of 2 addresses. "
            + "https://example.invalid/" + "x" * 150 + " answered HTTP 404; "
            + "https://mirror.invalid/" + "y" * 150 + " timed out.")
    panel._fail(long)
    (toast,) = _messages(before)
    headline, rest = toast.split("\n", 1)
    assert len(headline) < 140 and headline.endswith("(details in the Model box)") and rest == long
    assert panel.status.toolTip() == long and panel.status.wordWrap()


def test_the_model_box_fits_napari_default_dock(make_panel):
    panel = make_panel()
    panel.show()
    assert panel.minimumSizeHint().width() <= 380, panel.minimumSizeHint().width()


def test_set_model_and_unload(make_panel, qtbot):
    from test_predictor import tiny_model

    panel = make_panel()
    model = tiny_model()
    with qtbot.waitSignal(panel.model_changed) as blocker:
        panel.set_model(model, "tiny-sam")
    assert blocker.args == [model] and panel.model is model and panel.model_name == "tiny-sam"
    assert panel.status.text() == ready_text("tiny-sam")
    with qtbot.waitSignal(panel.model_changed) as blocker:
        panel.unload()
    assert blocker.args == [None] and panel.model is None and panel.model_name is None


def test_settings_are_persisted_and_restored(make_panel, golden_dir):
    panel = make_panel("mobile_sam")
    panel.device_combo.setCurrentIndex(panel.device_combo.findData("cpu"))
    panel.set_mapping_choice("lung")
    panel.set_local_file("mobile_sam", str(golden_dir / "mobile_sam_random.pt"))
    again = make_panel()
    assert again.selected_model == "mobile_sam" and again.device == "cpu" and again.mapping_choice == "lung"
    assert again.weights_label.text() == "local file: mobile_sam_random.pt"
    assert Settings().as_dict() == {"model": "mobile_sam", "device": "cpu", "mapping": "lung",
                                    "checkpoints": {"mobile_sam": str(golden_dir / "mobile_sam_random.pt")}}


def test_defaults_and_a_corrupt_settings_file(make_panel, _isolated_settings):
    (_isolated_settings / "settings.json").write_text("{oops", encoding="utf-8")
    panel = make_panel()
    assert panel.device == "auto" and panel.mapping_choice == MAPPING_LIMITS
    assert panel.selected_model in ("lite_medsam", "medsam")  # the recommended model for this machine
    assert (_isolated_settings / "settings.json").read_text(encoding="utf-8") == "{oops"


def test_mapping_for_every_entry(make_panel, qtbot):
    from napari.layers import Image

    rng = np.random.default_rng(0)
    data = rng.normal(300.0, 80.0, (6, 32, 32)).astype(np.float32)
    layer = Image(data, contrast_limits=(-100.0, 400.0))
    panel = make_panel()
    keys = [panel.mapping_combo.itemData(i) for i in range(panel.mapping_combo.count())]
    labels = [panel.mapping_combo.itemText(i) for i in range(panel.mapping_combo.count())]
    assert keys == [*CT_WINDOWS, MAPPING_LIMITS, MAPPING_PERCENTILE]
    assert labels[-2:] == ["current contrast limits", "MR percentile (0.5-99.5)"]
    assert labels[0] == "CT window: soft tissue (L40/W400)"
    for name in CT_WINDOWS:
        with qtbot.waitSignal(panel.mapping_changed, timeout=1000, raising=False):
            panel.set_mapping_choice(name)
        assert panel.mapping_for(layer) == ct_window(name)
    with qtbot.waitSignal(panel.mapping_changed, timeout=1000):
        panel.set_mapping_choice(MAPPING_LIMITS)
    assert panel.mapping_for(layer) == contrast_limits(-100.0, 400.0)
    layer.contrast_limits = (0.0, 250.0)  # read at call time
    assert panel.mapping_for(layer) == contrast_limits(0.0, 250.0)
    panel.set_mapping_choice(MAPPING_PERCENTILE)
    mapping = panel.mapping_for(layer)
    assert mapping == percentile_mapping(data) and mapping.kind == "percentile"
    assert panel.mapping_for(layer) is mapping  # computed once per volume
    layer.data = data * 2
    assert panel.mapping_for(layer) == percentile_mapping(data * 2)
    assert Settings().get("mapping") == MAPPING_PERCENTILE
    with pytest.raises(ValueError, match="unknown mapping"):
        panel.set_mapping_choice("rainbow")


def test_no_exception_leaves_a_slot_when_the_cache_folder_is_unusable(make_panel, tmp_path, qtbot, monkeypatch):  # noqa: E501
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("NAPARI_MEDSAM_WEIGHTS_DIR", str(blocker / "weights"))
    panel = make_panel("mobile_sam")
    before = len(notification_manager.records)
    panel.download_button.click()
    qtbot.waitUntil(lambda: not panel.downloading, timeout=20000)
    assert any("cannot create the weights folder" in m for m in _messages(before))
    shutil.rmtree(tmp_path / "weights", ignore_errors=True)


def test_deleting_the_panel_while_workers_run_is_safe(server, cache, golden_dir, qtbot, monkeypatch):  # noqa: F811
    payload = bytes(range(256)) * (4 * MiB // 256)
    server.state.files["/w.pth"] = payload
    server.state.delay = 0.1
    spec = _test_spec(server.url + "/w.pth", payload)
    monkeypatch.setitem(MODELS, spec.name, spec)
    panel = ModelPanel(Settings())
    panel.model_combo.setCurrentIndex(panel.model_combo.findData(spec.name))
    download = panel.download()
    qtbot.wait(300)
    with qtbot.waitSignal(download.finished, timeout=20000):
        panel.deleteLater()  # the widget closes while the download runs: it stops, nothing raises
    assert (cache / "test_model.pth.part").exists() and not (cache / "test_model.pth").exists()

    panel = ModelPanel(Settings())
    panel.model_combo.setCurrentIndex(panel.model_combo.findData("mobile_sam"))
    panel.set_local_file("mobile_sam", str(golden_dir / "mobile_sam_random.pt"))
    load = panel.load()
    with qtbot.waitSignal(load.finished, timeout=60000):
        panel.deleteLater()


def test_panel_does_not_import_torch_until_the_device_list_opens(tmp_path):
    # A fresh interpreter: building the panel must not import torch (napari start-up stays fast);
    # opening the device list asks torch in a worker and fills in the machine's devices.
    code = textwrap.dedent(
        """
        import sys, time
        from qtpy.QtWidgets import QApplication
        app = QApplication([])
        from napari_medsam._napari.model_panel import ModelPanel
        from napari_medsam._napari.settings import Settings
        panel = ModelPanel(Settings())
        print("BEFORE", "torch" in sys.modules, panel.device_combo.count(), panel.status.text())
        panel.device_combo.showPopup()
        panel.device_combo.hidePopup()
        deadline = time.monotonic() + 120
        while panel.device_combo.devices is None and time.monotonic() < deadline:
            app.processEvents()
            time.sleep(0.02)
        items = [panel.device_combo.itemData(i) for i in range(panel.device_combo.count())]
        print("AFTER", "torch" in sys.modules, items[0], items[-1], panel.device)
        """
    )
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "NAPARI_MEDSAM_WEIGHTS_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "BEFORE False 2 no model loaded" in result.stdout, result.stdout
    assert "AFTER True auto cpu auto" in result.stdout, result.stdout


def test_weights_folder_is_chosen_and_remembered(qtbot, tmp_path, monkeypatch):
    from qtpy.QtWidgets import QFileDialog

    from napari_medsam._napari.model_panel import ModelPanel
    from napari_medsam._napari.settings import Settings
    from napari_medsam.models.weights import cached_path

    folder = tmp_path / "weights"
    folder.mkdir()
    panel = ModelPanel(Settings())
    qtbot.addWidget(panel)
    spec = panel.selected_spec
    assert not panel.weights_available()
    cached_path(spec, folder).write_bytes(b"not really weights")  # present is all the state label checks
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: str(folder))
    panel.folder_button.click()
    assert panel.weights_available() and panel.weights_label.text().startswith("present")
    again = ModelPanel(Settings())
    qtbot.addWidget(again)
    assert again.settings.get("cache_dir") == str(folder) and again.weights_available()


def ready_text(name: str) -> str:
    """What the panel says once a model runs on this CPU: the device, its threads and the torch build."""
    import torch

    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    from napari_medsam.models.device import cpu_threads

    n = cpu_threads()  # the encoder's count, whatever the Qt thread decodes with
    return f"ready: {name} on cpu, {n} thread{'' if n == 1 else 's'}; torch {torch.__version__} ({build})"
