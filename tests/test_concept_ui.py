"""The "Find by name" group in a real napari viewer with the real EfficientSAM3 network.

The model is the reduced random-weight checkpoint of the golden folder (``efficientsam3/``), so its
candidates mean nothing anatomically (the README: a frame along the border plus texture); what is
checked is the product path: a phrase gives a candidates layer on the right slice with scores, a click
accepts one as an object named after the phrase (coded like a known structure at export), the labels
stay untouched until then, "Find in all slices" runs as a propagation (report, one undo step), and a
checkpoint of the wrong family gives a clear message.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from canvas_events import click
from test_controller import go_to, model, settle  # noqa: F401  (fixtures)

from napari_medsam.phantoms import make_ct_phantom

INDEX = 4
THRESHOLD = 0.25  # random weights score about 0.25 (golden README): keep a few candidates


@pytest.fixture(scope="module")
def es3_files(es3_dir: Path) -> tuple[Path, Path]:
    return es3_dir / "es3_reduced_random.pt", es3_dir / "bpe_simple_vocab_16e6.txt.gz"


@pytest.fixture
def scene(make_napari_viewer, model, qtbot, es3_files, tmp_path, monkeypatch):  # noqa: F811
    from napari_medsam._napari.concept_panel import ConceptPanel
    from napari_medsam._napari.controller import SegmentationController
    from napari_medsam._napari.propagate_panel import PropagatePanel
    from napari_medsam._napari.settings import ENV_VAR, Settings

    monkeypatch.setenv(ENV_VAR, str(tmp_path / "config"))
    viewer = make_napari_viewer(show=True)
    volume, gt, _ = make_ct_phantom(shape=(8, 64, 64), spacing_mm=(4.0, 5.0, 5.0), seed=0)
    image = viewer.add_image(volume.array.astype(np.float32), name="scan", scale=volume.spacing_mm)
    labels = viewer.add_labels(np.zeros(gt.shape, np.uint8), name="seg", scale=volume.spacing_mm)
    controller = SegmentationController(viewer, image, labels, model)
    settings = Settings()
    propagate = PropagatePanel(settings=settings)
    panel = ConceptPanel(settings, propagate)
    qtbot.addWidget(propagate)
    qtbot.addWidget(panel)
    propagate.set_controller(controller)
    panel.set_controller(controller)
    panel.use_local_checkpoint(str(es3_files[0]), str(es3_files[1]))
    panel.threshold.setValue(THRESHOLD)
    go_to(viewer, image, 0, INDEX)
    settle(qtbot, controller)
    yield viewer, controller, panel, propagate
    qtbot.waitUntil(lambda: panel.worker is None and not propagate.busy, timeout=60000)
    panel.set_controller(None)
    propagate.set_controller(None)
    qtbot.waitUntil(lambda: controller.queue.running is None, timeout=30000)
    controller.close()


def _find(qtbot, panel, phrase: str = "liver") -> None:
    panel.phrase.setText(phrase)
    panel.find_button.click()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=120000)


def test_a_phrase_gives_scored_candidates_on_the_slice_and_leaves_the_labels_alone(scene, qtbot):
    viewer, controller, panel, _ = scene
    before = [o.value for o in controller.session.objects]
    _find(qtbot, panel)
    found = panel.result
    assert found is not None and len(found) >= 1, panel.state.text()
    assert np.all(found.scores > THRESHOLD) and np.all(np.diff(found.scores) <= 0)  # best first
    layer = viewer.layers["found: liver"]
    assert layer is panel.layer and layer.data.shape == (1, 64, 64)
    np.testing.assert_allclose(layer.data_to_world([0, 5, 7]), controller.image_layer.data_to_world([INDEX, 5, 7]))
    assert set(np.unique(layer.data)) - {0} <= set(range(1, len(found) + 1))
    assert not controller.labels_layer.data.any() and [o.value for o in controller.session.objects] == before
    assert "candidate(s) for 'liver'" in panel.state.text() and f"1: {found.scores[0]:.3f}" in panel.state.text()
    # The score of the candidate under the mouse is in napari's status bar (the layer's features).
    rows, cols = np.nonzero(layer.data[0] == 1)
    status = layer.get_status(layer.data_to_world([0, rows[0], cols[0]]), world=True)
    assert f"score: {round(float(found.scores[0]), 4)}" in str(status), status


def test_click_accepts_a_candidate_as_an_object_named_after_the_phrase(scene, qtbot):
    viewer, controller, panel, _ = scene
    _find(qtbot, panel)
    layer = panel.layer
    rows, cols = np.nonzero(layer.data[0] == 1)
    assert rows.size, "the best candidate is hidden under others"
    # A click in the canvas on a pixel of candidate 1.
    viewer.layers.selection.active = layer
    click(viewer, layer, [0, rows[rows.size // 2], cols[rows.size // 2]])
    qtbot.waitUntil(lambda: 1 in panel.accepted, timeout=5000)
    obj = panel.accepted[1]
    named = [o for o in controller.session.objects if o.value == obj][0]
    assert named.name == "liver"
    written = controller.session.labels[INDEX] == obj
    np.testing.assert_array_equal(written, panel.result.masks[0] & ~controller.session.locked_mask()[INDEX])
    assert not (layer.data == 1).any()  # gone from the candidates layer
    controller.session.undo()
    assert not (controller.session.labels == obj).any()


def test_find_in_all_slices_runs_as_a_propagation_with_report_and_undo(scene, qtbot):
    viewer, controller, panel, propagate = scene
    _find(qtbot, panel)
    obj = panel.accept(1)
    assert obj is not None
    results = []
    propagate.finished.connect(results.append)
    assert panel.find_in_all_slices()
    qtbot.waitUntil(lambda: bool(results), timeout=180000)
    result = results[0]
    assert result is not None and result.reports, panel.state.text()
    labels = controller.session.labels
    kept = sorted({r.index for r in result.reports if r.kind in ("propagated", "interpolated")})
    for k in kept:
        assert (labels[k] == obj).any(), k
    assert kept and result.written_slices, [(r.index, r.kind, r.front) for r in result.reports]
    assert propagate.last_result is result and "propagated over slices" in propagate.summary.text()
    controller.session.undo()  # one step takes the whole run back
    for k in result.written_slices:
        assert not (controller.session.labels[k] == obj).any()
    assert (controller.session.labels[INDEX] == obj).any()  # the accepted seed stays


def test_a_sam_checkpoint_as_concept_model_says_what_is_wrong(scene, qtbot, golden_dir):
    _, _, panel, _ = scene
    messages = []
    panel.error.connect(messages.append)
    panel.use_local_checkpoint(str(golden_dir / "mobile_sam_random.pt"))
    _find(qtbot, panel)
    assert messages and "SAM-family" in messages[0] and "EfficientSAM3" in messages[0]
    assert panel.layer is None and not panel.busy and panel.find_button.isEnabled()


def test_an_accepted_candidate_exports_with_the_phrase_and_its_codes(scene, qtbot, tmp_path):
    from napari_medsam._napari.layers import export_naming, export_segments
    from napari_medsam.io import read_labels_and_segments, save_labels_named

    _, controller, panel, _ = scene
    _find(qtbot, panel)
    obj = panel.accept(1)
    labels = np.asarray(controller.labels_layer.data).copy()
    like, _, _ = make_ct_phantom(shape=(8, 64, 64), spacing_mm=(4.0, 5.0, 5.0), seed=0)  # the scene's scan
    np.testing.assert_array_equal(like.array.astype(np.float32), controller.image_layer.data)
    segments = export_segments(labels, export_naming(controller.labels_layer.metadata,
                                                     list(controller.session.objects)))
    written, _, _ = save_labels_named(labels, like, tmp_path / "found.nii.gz", segments)
    back, named = read_labels_and_segments(written, like)
    np.testing.assert_array_equal(back, labels)
    liver = [s for s in named if s.label == obj][0]
    assert liver.name == "liver" and liver.type.meaning == "Liver" and liver.type.scheme_designator == "SCT"


def test_find_in_all_slices_keeps_to_the_propagate_range(scene, qtbot):
    _, controller, panel, propagate = scene
    _find(qtbot, panel)
    obj = panel.accept(1)
    propagate.limit_check.setChecked(True)
    propagate.range_slider.setValue((INDEX - 1, INDEX + 1))
    results = []
    propagate.finished.connect(results.append)
    assert panel.find_in_all_slices()
    qtbot.waitUntil(lambda: bool(results), timeout=180000)
    reached = {r.index for r in results[0].reports}
    assert reached and reached <= {INDEX - 1, INDEX, INDEX + 1}, reached
    outside = [k for k in range(controller.shape[0]) if not INDEX - 1 <= k <= INDEX + 1]
    assert not any((controller.session.labels[k] == obj).any() for k in outside)


def test_cancel_in_the_group_stops_a_find_in_all_slices(scene, qtbot):
    _, controller, panel, propagate = scene
    _find(qtbot, panel)
    panel.accept(1)
    results = []
    propagate.finished.connect(results.append)
    assert panel.find_in_all_slices()
    assert panel.cancel_button.isEnabled() and not panel.all_button.isEnabled()
    panel.cancel_button.click()  # stops after the slice under way; what was found stays
    qtbot.waitUntil(lambda: bool(results), timeout=180000)
    result = results[0]
    assert result is not None and result.cancelled
    assert not panel.cancel_button.isEnabled() and panel.all_button.isEnabled()
