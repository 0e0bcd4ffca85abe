"""Take the documentation screenshots of the real napari window (run under xvfb-run).

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshots.py docs/images [SCENE ...]

SCENE names limit the run to some scenes (``workflow``: demo.png and the workflow-*.png,
``propagate-memory``); without, every scene is taken.

No real SAM weights can be downloaded on the build machines, so the masks in the workflow
screenshots come from a ground-truth stand-in predictor (``tests/gt_predictor.py``: the
phantom's own labels, degraded the way a model errs) plugged into the real controller; the
window, panel, layers, prompts, propagation and report are the plugin's own. The memory
engine needs a real SAM 2 network: ``propagate-memory.png`` (the Propagate box at napari's
default dock width, the memory engine chosen, its report with object scores) runs the reduced
MedSAM2 of ``shared/golden/sam2`` (random weights, so its masks mean nothing; only the panel is
shown).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _settle(app, seconds: float = 0.3) -> None:
    import time

    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.01)


def _phantom_viewer():
    """A 1600x1000 napari window with the CT phantom sample and the panel docked at napari's default width."""
    import napari
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(title="napari-medsam")
    image, truth = viewer.open_sample("napari-medsam", "ct_phantom")
    dock, widget = viewer.window.add_plugin_dock_widget("napari-medsam", "MedSAM")  # napari's default width
    viewer.window._qt_window.resize(1600, 1000)
    return app, viewer, image, truth, dock, widget


def _shoot(app, viewer, widget, visible, path: Path) -> None:
    """Scroll the panel to ``visible``, save the whole window to ``path`` and close the viewer."""
    widget.scroll.ensureWidgetVisible(visible)
    _settle(app)
    viewer.screenshot(str(path), canvas_only=False)
    widget.stop_segmentation()
    viewer.close()
    from qtpy.QtCore import QThreadPool

    # A background embedding still running would finish after its Qt objects are gone (napari's own
    # quit waits for its workers; a script that only closes the viewer has to).
    QThreadPool.globalInstance().waitForDone(60000)


def _stand_in(controller, truth) -> None:
    """Answer the controller's predictions from the phantom's ground truth (see the module docstring)."""
    sys.path.insert(0, str(REPO / "tests"))
    from gt_predictor import GroundTruthPredictor

    spacing = controller.spacing_mm
    predictors = {axis: GroundTruthPredictor(truth, axis, spacing_mm=spacing, dropout=0.0, leak=0.0, seed=2)
                  for axis in range(3)}
    controller.predictor = lambda axis: predictors[axis]
    controller.is_embedded = lambda axis, index: True
    controller.scan_signature = lambda: "stand-in"
    controller.queue.close()
    controller._set_status("ready (stand-in predictor)")


def _reduced_medsam2():
    """The reduced MedSAM2 of shared/golden/sam2 as a loaded model, or None when the file is absent."""
    import dataclasses

    from napari_medsam.models.registry import MODELS
    from napari_medsam.segment.model import SamModel

    path = REPO.parent / "shared" / "golden" / "sam2" / "sam2_t512_reduced_random.pt"
    if not path.is_file():
        return None
    spec = dataclasses.replace(MODELS["medsam2"], name="medsam2_reduced", display_name="MedSAM2 (reduced)",
                               arch_options=(("embed_dim", 16), ("stages", (1, 1, 3, 2)), ("global_att_blocks", (4,)),
                                             ("memory_ffn", 1024), ("memory_layers", 2)))
    MODELS.setdefault(spec.name, spec)
    return SamModel.from_checkpoint(spec.name, path, device="cpu", download=False)


def propagate_memory_scene(out: Path) -> None:
    """propagate-memory.png: the Propagate box with the memory engine, after a run over a few slices."""
    import numpy as np

    model = _reduced_medsam2()
    if model is None:
        print("propagate-memory.png: the reduced SAM 2 checkpoint (shared/golden/sam2) is missing; skipped")
        return
    app, viewer, image, truth, dock, widget = _phantom_viewer()
    key = 26
    viewer.dims.set_point(0, image.data_to_world([key, 0, 0])[0])
    widget.model_panel.set_model(model, "medsam2")
    controller = widget.controller
    controller.session.rename(1, "liver")
    rows, cols = np.nonzero(np.asarray(truth.data)[key] == 1)
    r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
    controller.boxes_layer.add_rectangles(np.array([[key, r0, c0], [key, r0, c1], [key, r1, c1], [key, r1, c0]],
                                                   float))
    while controller.queue.running is not None or controller.queue.pending:
        _settle(app, 0.1)
    _settle(app)
    panel = widget.propagate_panel
    panel.limit_check.setChecked(True)
    panel.range_slider.setValue((key - 4, key + 4))
    panel.propagate("both")
    while panel.busy:
        _settle(app, 0.1)
    widget.scroll.ensureWidgetVisible(panel.report_button)
    _settle(app)
    dock.grab().save(str(out / "propagate-memory.png"))
    widget.stop_segmentation()
    viewer.close()


def main(out: Path, scenes: list[str] | None = None) -> None:
    """Save the screenshots of ``scenes`` (default: all) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    if not scenes or "workflow" in scenes:
        workflow_scene(out)
    if not scenes or "propagate-memory" in scenes:
        propagate_memory_scene(out)
    if not scenes or "everything" in scenes:
        everything_scene(out)
    if not scenes or "finetune" in scenes:
        finetune_scene(out)
    if not scenes or "encoder" in scenes:
        encoder_scene(out)
    if not scenes or "concept" in scenes:
        concept_scene(out)


def concept_scene(out: Path) -> None:
    """concept.png: "Find by name" with the phrase "liver" on an axial slice (golden random-weight EfficientSAM3).

    Random weights give meaningless candidates (a frame along the border, texture): the picture shows the
    panel, the candidates layer and the scores, not what a trained model finds.
    """
    import os

    from napari_medsam._napari.settings import ENV_VAR

    sys.path.insert(0, str(REPO / "tests"))
    from test_predictor import tiny_model

    os.environ[ENV_VAR] = tempfile.mkdtemp()  # the choices below stay out of the user's settings
    golden = REPO.parent / "shared" / "golden" / "efficientsam3"
    app, viewer, image, truth, dock, widget = _phantom_viewer()
    key = 26
    viewer.dims.set_point(0, image.data_to_world([key, 0, 0])[0])
    widget.model_panel.set_model(tiny_model("sam"), "lite_medsam")  # a scan session needs a point/box model
    widget.model_panel.status.setText("stand-in point/box model (screenshots)")
    panel = widget.concept_panel
    panel.use_local_checkpoint(str(golden / "es3_reduced_random.pt"), str(golden / "bpe_simple_vocab_16e6.txt.gz"))
    panel.threshold.setValue(0.2552)  # the golden README's threshold for these weights
    panel.phrase.setText("liver")
    panel.find()
    while panel.worker is not None:
        _settle(app, 0.2)
    _shoot(app, viewer, widget, panel, out / "concept.png")


def encoder_scene(out: Path) -> None:
    """encoder.png: the Model box with LiteMedSAM loaded on the bfloat16 encoder (golden random weights)."""
    import os

    from napari_medsam._napari.settings import ENV_VAR

    os.environ[ENV_VAR] = tempfile.mkdtemp()  # the choices below stay out of the user's settings
    weights = REPO.parent / "shared" / "golden" / "lite_medsam_random.pth"
    app, viewer, image, truth, dock, widget = _phantom_viewer()
    panel = widget.model_panel
    panel.model_combo.setCurrentIndex(panel.model_combo.findData("lite_medsam"))
    panel.set_local_file("lite_medsam", str(weights))
    panel.device_combo.setCurrentIndex(panel.device_combo.findData("cpu"))
    panel.backend_combo.setCurrentIndex(panel.backend_combo.findData("bf16"))
    panel.load()
    while panel.loading:
        _settle(app, 0.2)
    _shoot(app, viewer, widget, panel, out / "encoder.png")


def finetune_scene(out: Path) -> None:
    """finetune.png: the Fine-tune group after a run on the phantom's kidneys (golden random-weight LiteMedSAM)."""
    import os

    import numpy as np

    from napari_medsam.models.local import ENV_VAR
    from napari_medsam.segment.model import SamModel

    os.environ[ENV_VAR] = tempfile.mkdtemp()  # the tuned model is registered there, not in the user's folder
    weights = REPO.parent / "shared" / "golden" / "lite_medsam_random.pth"
    app, viewer, image, truth, dock, widget = _phantom_viewer()
    widget.model_panel.set_local_file("lite_medsam", str(weights))
    widget.model_panel.set_model(SamModel.from_checkpoint("lite_medsam", weights, device="cpu"), "lite_medsam")
    controller = widget.controller
    organs = np.isin(np.asarray(truth.data), (3, 4))  # the kidneys: a short run that visibly learns
    # as objects 1 and 2 (the panel's first two objects, drawn in their colours; raw values 3/4 would
    # be grey, labels without an object)
    controller.labels_layer.data[organs] = np.asarray(truth.data)[organs] - 2
    controller.labels_layer.refresh()
    viewer.dims.set_point(0, image.data_to_world([int(np.argmax(organs.sum(axis=(1, 2)))), 0, 0])[0])
    panel = widget.finetune_panel
    panel.epochs.setValue(20)
    panel.max_slices = 10
    panel.run(out=Path(tempfile.mkdtemp()) / "phantom_tuned.pth")
    while panel.worker is not None:
        _settle(app, 0.2)
    _shoot(app, viewer, widget, panel, out / "finetune.png")


def everything_scene(out: Path) -> None:
    """everything.png: "Segment everything" on an axial slice (stand-in predictor), one candidate accepted."""
    import numpy as np

    sys.path.insert(0, str(REPO / "tests"))
    from gt_predictor import GroundTruthPredictor
    from test_predictor import tiny_model

    class Steep(GroundTruthPredictor):  # logits as steep as a trained model's, so the stability filter passes
        def to_low_res(self, mask):
            return np.clip(32.0 * super().to_low_res(mask), -32, 32)

    app, viewer, image, truth, dock, widget = _phantom_viewer()
    key = 26
    viewer.dims.set_point(0, image.data_to_world([key, 0, 0])[0])
    widget.model_panel.set_model(tiny_model("sam"), "lite_medsam")
    widget.model_panel.status.setText("stand-in predictor (screenshots)")
    controller = widget.controller
    _stand_in(controller, np.asarray(truth.data))
    stand_in = Steep(np.asarray(truth.data), 0, spacing_mm=controller.spacing_mm, dropout=0.0, leak=0.0,
                     boundary_px=0.5)
    controller.predictor = lambda axis: stand_in
    panel = widget.everything_panel
    panel.points.setValue(24)
    panel.run()
    while panel.worker is not None:
        _settle(app, 0.1)
    rows, cols = np.nonzero(np.asarray(truth.data)[key] == 1)
    label = int(panel.layer.data[0, int(np.median(rows)), int(np.median(cols))])
    if label:
        panel.accept(label)
    _shoot(app, viewer, widget, panel, out / "everything.png")


def workflow_scene(out: Path) -> None:
    """Save demo.png and the workflow screenshots into ``out``."""
    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    sys.path.insert(0, str(REPO / "tests"))
    from test_predictor import tiny_model

    out.mkdir(parents=True, exist_ok=True)
    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(title="napari-medsam")
    image, truth = viewer.open_sample("napari-medsam", "ct_phantom")
    from qtpy.QtCore import Qt

    dock, widget = viewer.window.add_plugin_dock_widget("napari-medsam", "MedSAM")
    viewer.window._qt_window.resize(1600, 1000)
    viewer.window._qt_window.resizeDocks([dock], [470], Qt.Horizontal)
    viewer.dims.set_point(0, image.data_to_world([30, 0, 0])[0])
    truth.visible = True
    viewer.layers.selection.active = image
    _settle(app)
    viewer.screenshot(str(out / "demo.png"), canvas_only=False)
    truth.visible = False

    # Segmentation with the stand-in: the panel believes a LiteMedSAM-sized model is loaded.
    widget.model_panel.set_model(tiny_model("sam"), "lite_medsam")
    widget.model_panel.status.setText("stand-in predictor (screenshots)")
    controller = widget.controller
    _stand_in(controller, np.asarray(truth.data))
    session = controller.session
    session.rename(1, "liver")
    viewer.dims.set_point(0, image.data_to_world([26, 0, 0])[0])
    widget.scroll.ensureWidgetVisible(widget.segment_panel)
    points = controller.points_layer
    points.add([26, 76, 50])
    points.feature_defaults = {"positive": True, "axis": -1, "label": 0}
    points.add([26, 95, 70])
    spleen = session.add_object("spleen")
    controller.boxes_layer.add_rectangles(np.array([[26, 66, 108], [26, 66, 132], [26, 112, 132], [26, 112, 108]],
                                                   float))
    viewer.layers.selection.active = points
    _settle(app)
    viewer.screenshot(str(out / "workflow-click.png"), canvas_only=False)

    # Propagate the liver through the volume: the mask and the report.
    session.select(1)
    panel = widget.propagate_panel
    panel.propagate("both")
    while panel.busy:
        _settle(app, 0.1)
    session.select(spleen.value)
    panel.propagate("both")
    while panel.busy:
        _settle(app, 0.1)
    viewer.dims.set_point(0, image.data_to_world([34, 0, 0])[0])
    _settle(app)
    widget.scroll.verticalScrollBar().setValue(widget.scroll.verticalScrollBar().maximum())
    _settle(app)
    viewer.screenshot(str(out / "workflow-propagated.png"), canvas_only=False)

    # The same labels on a coronal plane.
    viewer.dims.order = (1, 0, 2)
    viewer.dims.set_point(1, image.data_to_world([0, 90, 0])[1])
    viewer.reset_view()
    _settle(app)
    viewer.screenshot(str(out / "workflow-coronal.png"), canvas_only=False)

    # A box drawn with the mouse on the coronal slice (canvas events, as a user's drag), then
    # drawn again to correct it; the panel's Keys help open.
    from canvas_events import drag

    session.select(1)
    boxes = controller.boxes_layer
    viewer.layers.selection.active = boxes
    boxes.mode = "add_rectangle"
    # In this scripted session napari's camera kept mouse_pan on after the mode change (the
    # layer's mouse_pan event arrived with another Shapes object as its source), so the drag
    # panned; set it as napari does for a drawing mode. Not seen in the tests' viewers.
    viewer.camera.mouse_pan = False
    drag(viewer, boxes, [14, 90, 30], [40, 90, 80])
    _settle(app)
    drag(viewer, boxes, [18, 90, 36], [44, 90, 88])
    _settle(app)
    widget.segment_panel.keys_button.setChecked(True)
    _settle(app)
    widget.scroll.ensureWidgetVisible(widget.segment_panel.help)
    _settle(app)
    viewer.screenshot(str(out / "workflow-keys.png"), canvas_only=False)
    widget.stop_segmentation()
    viewer.close()


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/images"), sys.argv[2:])
