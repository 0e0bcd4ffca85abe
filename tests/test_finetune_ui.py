"""The "Fine-tune" group in a real napari viewer: train on the scan's objects, save, offer the tuned model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_medsam.models.local import ENV_VAR
from napari_medsam.phantoms import make_ct_phantom


@pytest.fixture(autouse=True)
def _models_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "user-models"))


@pytest.fixture
def scene(make_napari_viewer, qtbot, golden_dir):
    from napari_medsam._napari.controller import SegmentationController
    from napari_medsam._napari.finetune_panel import FinetunePanel
    from napari_medsam._napari.layers import image_layer_data
    from napari_medsam._napari.model_panel import ModelPanel
    from napari_medsam._napari.settings import Settings
    from napari_medsam.segment.model import SamModel

    viewer = make_napari_viewer(show=True)
    volume, gt, _ = make_ct_phantom(shape=(20, 96, 96), spacing_mm=(4.0, 3.6, 3.6), seed=0)
    data, kwargs, _kind = image_layer_data(volume, "scan")
    image = viewer.add_image(data, **kwargs)
    organs = np.where(np.isin(gt, (1, 2)), gt, 0).astype(np.uint8)
    labels = viewer.add_labels(organs, name="seg", scale=volume.spacing_mm)
    weights = golden_dir / "lite_medsam_random.pth"
    model = SamModel.from_checkpoint("lite_medsam", weights, device="cpu")
    model_panel = ModelPanel(Settings())
    qtbot.addWidget(model_panel)
    model_panel.set_local_file("lite_medsam", str(weights))
    model_panel.model_combo.setCurrentIndex(model_panel.model_combo.findData("lite_medsam"))
    model_panel.set_model(model, "lite_medsam")
    controller = SegmentationController(viewer, image, labels, model)
    panel = FinetunePanel(model_panel)
    qtbot.addWidget(panel)
    panel.epochs.setValue(1)
    panel.max_slices = 2
    panel.set_controller(controller)
    yield viewer, controller, panel, model_panel, labels
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60000)
    panel.set_controller(None)
    qtbot.waitUntil(lambda: controller.queue.running is None, timeout=30000)
    controller.close()


def test_finetune_from_the_panel_saves_and_offers_the_model(scene, qtbot, tmp_path):
    viewer, controller, panel, model_panel, labels = scene
    before = labels.data.copy()
    steps = []
    panel.progressed.connect(lambda *args: steps.append(args))
    assert panel.run_button.isEnabled() and not panel.use_button.isEnabled()
    panel.run(out=tmp_path / "tuned.pth")
    assert panel.running and panel.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=120000)
    assert panel.saved is not None, panel.state.text()
    assert steps and steps[0][0] == 0 and steps[-1][0] == 1  # epoch 0 (before) ... epoch 1
    info = json.loads((tmp_path / "tuned.json").read_text())
    assert info["base_model"] == "lite_medsam" and set(info["objects"]) == {"1", "2"}
    assert "held-out Dice" in panel.state.text() and not panel.curve.pixmap().isNull()
    assert np.array_equal(labels.data, before)  # training never touches the user's labels
    assert model_panel.model_combo.findData("tuned") >= 0  # listed in the model chooser
    panel.use_button.click()
    qtbot.waitUntil(lambda: model_panel.model_name == "tuned", timeout=60000)
    assert model_panel.model.pipeline == "lite_medsam"


def test_cancel_in_the_panel_keeps_the_best_state(scene, qtbot, tmp_path):
    viewer, controller, panel, model_panel, labels = scene
    panel.epochs.setValue(20)  # far more steps than the cancel needs to arrive
    panel.progressed.connect(lambda epoch, step, loss, dice: panel.cancel() if step >= 1 else None)
    panel.run(out=tmp_path / "stopped.pth")
    qtbot.waitUntil(lambda: panel.worker is None, timeout=120000)
    assert panel.result is not None and panel.result.cancelled
    assert panel.result.best_epoch < 20 and "cancelled" in panel.state.text()
