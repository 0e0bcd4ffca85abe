"""The Propagate box with a SAM 2 model: the memory engine in a real napari viewer.

The model is the reduced MedSAM2 (SAM 2.1 t512) of ``shared/golden/sam2`` with seeded random
weights, loaded through the registry like any model; the scan is a small CT phantom. A box is
drawn on one slice through the scan's Shapes prompt layer, the controller predicts it, and the
panel propagates both ways with ``propagate_memory``: the labels grow over several slices, the
report rows carry object scores (and the table an "object score" column), one undo removes the
run, and a correction re-propagates with ``repropagate_memory`` on the scan's tracker.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_controller import go_to, settle  # noqa: F401  (helpers)

from napari_medsam._napari.propagate_panel import OBJECT_SCORE
from napari_medsam.models import registry
from napari_medsam.models.registry import MODELS

SHAPE = (12, 64, 64)
KEY = 6
# The reduced model's builder values (shared/golden/sam2/README.md, "The reduced model").
REDUCED = (("embed_dim", 16), ("stages", (1, 1, 3, 2)), ("global_att_blocks", (4,)), ("memory_ffn", 1024),
           ("memory_layers", 2))


def reduced_spec() -> registry.ModelSpec:
    """The registry's reduced MedSAM2 test spec when there is one, else one made here from ``medsam2``."""
    for spec in MODELS.values():
        if spec.family == "sam2" and dict(spec.arch_options).get("embed_dim") == 16:
            return spec
    return dataclasses.replace(MODELS["medsam2"], name="medsam2_reduced_test", display_name="MedSAM2 (reduced test)",
                               arch_options=REDUCED, size_bytes=None, sha256=None)


@pytest.fixture(scope="module")
def sam2_spec():
    """The reduced spec, registered for the module (the CLI and the model panel look models up by name)."""
    spec = reduced_spec()
    added = spec.name not in MODELS
    if added:
        MODELS[spec.name] = spec
    yield spec
    if added:
        MODELS.pop(spec.name, None)


@pytest.fixture(scope="module")
def sam2_weights(golden_dir):
    path = golden_dir / "sam2" / "sam2_t512_reduced_random.pt"
    if not path.is_file():
        pytest.skip(f"the reduced SAM 2 golden checkpoint is missing: {path}")
    return path


@pytest.fixture(scope="module")
def sam2_model(sam2_spec, sam2_weights):
    from napari_medsam.segment.model import SamModel

    model = SamModel.from_checkpoint(sam2_spec.name, sam2_weights, device="cpu", download=False)
    assert model.family == "sam2" and hasattr(model.network, "track_frame")
    return model


def phantom():
    from napari_medsam.phantoms import make_ct_phantom

    volume, truth, names = make_ct_phantom(shape=SHAPE, spacing_mm=(8.0, 5.0, 5.0))
    assert names[1] == "liver" and (truth[KEY] == 1).any()
    return volume, truth


@pytest.fixture
def docked(make_napari_viewer, qtbot, sam2_spec, sam2_model):
    """The dock widget on the phantom with the reduced MedSAM2 loaded; yields (viewer, widget, controller, truth)."""
    from napari_medsam._napari.layers import image_layer_data
    from napari_medsam._napari.widget import MedSamWidget
    from napari_medsam.segment.cache import EmbeddingCache, MemoryCache

    viewer = make_napari_viewer()
    volume, truth = phantom()
    data, kwargs, _ = image_layer_data(volume, name="phantom")
    viewer.add_image(data, **kwargs)
    widget = MedSamWidget(viewer)
    widget.cache = EmbeddingCache(MemoryCache())
    widget.model_panel.set_model(sam2_model, sam2_spec.name)
    controller = widget.controller
    assert controller is not None, widget.status.text()
    yield viewer, widget, controller, truth
    qtbot.waitUntil(lambda: not widget.propagate_panel.busy, timeout=60000)
    qtbot.waitUntil(lambda: controller.queue.running is None and widget.segment_panel.worker is None, timeout=60000)
    widget.stop_segmentation()


def box_on(controller, truth, index: int, label: int = 1) -> np.ndarray:
    """Draw a box around ``label`` on slice ``index`` through the Shapes prompt layer; return its corners."""
    rows, cols = np.nonzero(truth[index] == label)
    r0, r1, c0, c1 = rows.min() - 1, rows.max() + 1, cols.min() - 1, cols.max() + 1
    corners = np.array([[index, r0, c0], [index, r0, c1], [index, r1, c1], [index, r1, c0]], float)
    controller.boxes_layer.add_rectangles(corners)
    return corners


def segmented_slices(labels: np.ndarray, value: int = 1) -> list[int]:
    return np.flatnonzero((labels == value).any(axis=(1, 2))).tolist()


def propagate_both(qtbot, panel) -> None:
    # Random weights track no organ: a lenient overlap rule lets the fronts go on (the rule still judges).
    panel.stop_spins["min_overlap"].setValue(0.1)
    panel.both_button.click()
    assert panel.busy
    qtbot.waitUntil(lambda: not panel.busy, timeout=120000)


def test_memory_engine_propagates_reports_object_scores_and_undoes(docked, qtbot, monkeypatch):
    from napari_medsam.segment.memory import engine as memory_engine
    import napari_medsam.segment.propagation as slice_engine  # where the panel imports it from

    viewer, widget, controller, truth = docked
    panel = widget.propagate_panel
    # A SAM 2 model: the memory engine is offered and chosen; the prompt mode is the slice engine's only.
    item = panel.engine_combo.model().item(panel.engine_combo.findData("memory"))
    assert item.isEnabled() and panel.engine == "memory" and not panel.prompt_combo.isEnabled()
    calls = []
    monkeypatch.setattr(slice_engine, "propagate", lambda *a, **k: calls.append("slice"))  # must not run
    real = memory_engine.propagate_memory

    def spy(*args, **kwargs):
        calls.append(("memory", kwargs["tracker"], kwargs["direction"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(memory_engine, "propagate_memory", spy)

    go_to(viewer, controller.image_layer, 0, KEY)
    box_on(controller, truth, KEY)
    settle(qtbot, controller)
    data = controller.labels_layer.data
    assert segmented_slices(data) == [KEY]  # the model's answer to the box, on its slice only
    before = data.copy()
    grown = []  # slices holding the object on screen after each finished slice, while the run goes
    panel._tick.connect(lambda run, _payload: grown.append(len(segmented_slices(data))))  # after the panel's merge

    propagate_both(qtbot, panel)
    assert [c[0] for c in calls] == ["memory"] and calls[0][2] == "both"
    assert grown and max(grown) > 1  # the tracked slices reached the live labels during the run
    tracker = calls[0][1]
    assert tracker.key_slices(1) == [KEY]  # the scan's tracker keeps the object's key slice
    result = panel.last_result
    assert result is not None and not result.cancelled, panel.status_label.text()
    reached = segmented_slices(data)
    assert len(reached) >= 4 and min(reached) < KEY < max(reached), [(r.index, r.status) for r in result.reports]
    assert set(result.written_slices) == {k for k in range(SHAPE[0]) if not np.array_equal(data[k], before[k])}
    # Every tracked slice (and the key slice) reports the model's object score.
    tracked = [r for r in result.reports if r.kind in ("key", "propagated")]
    assert len(tracked) >= 4 and all(isinstance(r.object_score, float) for r in tracked)
    assert {r.front for r in tracked} >= {"key", "up", "down"}
    headers = [panel.table.horizontalHeaderItem(j).text() for j in range(panel.table.columnCount())]
    assert headers == ["slice", "kind", "area px", "IoU", OBJECT_SCORE, "overlap", "status"]
    assert OBJECT_SCORE.split() == ["object", "score"]
    row = next(i for i in range(panel.table.rowCount()) if panel.table.item(i, 0).text() == str(KEY + 1))
    score = next(r.object_score for r in result.reports if r.index == KEY + 1)
    assert panel.table.item(row, 4).text() == f"{score:.2f}"
    window = panel.open_report()  # the report's own window shows the column too
    assert OBJECT_SCORE in [window.table.horizontalHeaderItem(j).text() for j in range(window.table.columnCount())]
    window.close()
    assert panel.status_label.text().startswith("Object 1: propagated over slices")

    controller.undo()  # one step removes the whole run; the key slice stays
    np.testing.assert_array_equal(data, before)
    controller.redo()
    assert segmented_slices(data) == reached


def test_a_correction_repropagates_with_the_scans_tracker(docked, qtbot, monkeypatch):
    from napari_medsam.segment.memory import engine as memory_engine

    viewer, widget, controller, truth = docked
    panel = widget.propagate_panel
    go_to(viewer, controller.image_layer, 0, KEY)
    box_on(controller, truth, KEY)
    settle(qtbot, controller)
    propagate_both(qtbot, panel)
    first, data = panel.last_result, controller.labels_layer.data
    after = data.copy()
    target = next(k for k in (KEY + 2, KEY - 2) if (data[k] == 1).any())
    seen = []
    real = memory_engine.repropagate_memory

    def spy(*args, **kwargs):
        seen.append((args[3], kwargs["tracker"], tuple(kwargs["other_keys"])))
        return real(*args, **kwargs)

    monkeypatch.setattr(memory_engine, "repropagate_memory", spy)
    go_to(viewer, controller.image_layer, 0, target)
    rows, cols = np.nonzero(data[target] == 1)
    r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), (cols.min() + cols.max()) // 2 + 1  # the left half
    controller.boxes_layer.add_rectangles(np.array([[target, r0, c0], [target, r0, c1], [target, r1, c1],
                                                    [target, r1, c0]], float))
    qtbot.waitUntil(lambda: panel.last_result is not first and not panel.busy, timeout=120000)
    assert len(seen) == 1 and seen[0][0] == target and seen[0][2] == (KEY,)
    tracker = seen[0][1]
    assert sorted(tracker.key_slices(1)) == sorted({KEY, target})  # the correction became a key slice
    fronts = {r.front for r in panel.last_result.reports}
    assert fronts & {"correction up", "correction down"}
    assert all(r.object_score is not None for r in panel.last_result.reports if r.kind == "propagated")
    # Undo: the re-propagation (one step, when it changed a slice), then the correction.
    for _ in range(1 + bool(panel.last_result.written_slices)):
        controller.undo()
    np.testing.assert_array_equal(data, after)


def test_memory_is_offered_only_for_sam2_models_and_the_choice_is_remembered(docked, sam2_model, sam2_spec):
    from test_predictor import tiny_model

    _, widget, controller, _ = docked
    panel, combo = widget.propagate_panel, widget.propagate_panel.engine_combo
    memory = combo.model().item(combo.findData("memory"))
    combo.setCurrentIndex(combo.findData("slice"))  # the user's choice: remembered
    assert widget.settings.get("propagation_engine") == "slice" and panel.prompt_combo.isEnabled()
    combo.setCurrentIndex(combo.findData("memory"))
    assert widget.settings.get("propagation_engine") == "memory" and not panel.prompt_combo.isEnabled()
    widget.model_panel.set_model(tiny_model("sam", seed=1), "mobile_sam")  # a SAM 1 model: no memory engine
    assert widget.controller is controller and controller.model.family == "sam"
    assert not memory.isEnabled() and panel.engine == "slice" and panel.prompt_combo.isEnabled()
    assert widget.settings.get("propagation_engine") == "memory"  # the forced choice is not the user's
    widget.model_panel.set_model(sam2_model, sam2_spec.name)
    assert memory.isEnabled() and panel.engine == "memory"
