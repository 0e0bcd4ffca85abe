"""The Objects table through the real dock widget and napari layers: volumes, slice extents,
visibility, the structure-name picker, Copy table / Save CSV, and its width at the default dock size."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest


@pytest.fixture(scope="module")
def model():
    from test_predictor import tiny_model

    return tiny_model("sam", seed=3)


def _workflow(make_napari_viewer, qtbot, model, sample_dir, *, show: bool):
    from conftest import start_workflow, stop_workflow

    viewer = make_napari_viewer(show=show)
    widget, controller = start_workflow(viewer, model, sample_dir)
    qtbot.addWidget(widget)
    yield viewer, widget, controller
    stop_workflow(qtbot, widget, controller)


@pytest.fixture
def workflow(make_napari_viewer, qtbot, model, sample_dir):
    """The widget on the sample CT (56x168x168, 2.8 x 2.1 x 2.1 mm) with a tiny random SAM."""
    yield from _workflow(make_napari_viewer, qtbot, model, sample_dir, show=False)


@pytest.fixture
def shown_workflow(make_napari_viewer, qtbot, model, sample_dir):
    """The same in a shown window: its canvas renders (screenshots)."""
    yield from _workflow(make_napari_viewer, qtbot, model, sample_dir, show=True)


def settle(qtbot, controller):
    qtbot.waitUntil(lambda: controller.queue.running is None and not controller.queue.pending, timeout=30000)
    qtbot.wait(20)


def show_slice(viewer, image, index):
    viewer.dims.set_point(0, image.data_to_world([index, 0, 0])[0])


def cells(panel, value):
    """(volume text, slices text) of object ``value``'s row."""
    from napari_medsam._napari.objects_panel import SLICES, VOLUME

    row = [panel.value_at(r) for r in range(panel.table.rowCount())].index(value)
    return panel.table.item(row, VOLUME).text(), panel.table.item(row, SLICES).text()


def expected(labels, value, spacing):
    count = int(np.count_nonzero(labels.data == value))
    slices = np.flatnonzero((labels.data == value).any(axis=(1, 2)))
    extent = (int(slices[0]), int(slices[-1])) if slices.size else (None, None)
    return count, count * float(np.prod(spacing)) / 1000.0, extent


def check_rows(panel, labels, spacing):
    for line in panel.rows():
        count, ml, (first, last) = expected(labels, line.value, spacing)
        assert line.voxels == count
        assert line.volume_ml == pytest.approx(ml, rel=1e-12)
        assert (line.first, line.last) == (first, last)


def test_volumes_and_extents_follow_paint_prediction_and_undo(workflow, qtbot, monkeypatch):
    from napari_medsam._napari.layers import volume_from_layer_meta
    from napari_medsam._napari.objects_measure import ObjectMeasures

    viewer, widget, controller = workflow
    panel, image, labels = widget.objects_panel, controller.image_layer, controller.labels_layer
    spacing = volume_from_layer_meta(image.metadata).spacing_mm
    np.testing.assert_allclose(np.abs(labels.scale), spacing)
    assert cells(panel, 1) == ("0", "-")
    # Hand paint: a disk on slice 12; only that slice is counted again.
    counted = []
    original = ObjectMeasures._count
    spy = lambda self, planes, values, **kw: (counted.append(list(planes)), original(self, planes, values, **kw))[1]
    with monkeypatch.context() as patch:
        patch.setattr(ObjectMeasures, "_count", spy)
        labels.brush_size = 9
        labels.paint((12, 60, 60), 1)
    assert counted == [[12]]
    count, ml, extent = expected(labels, 1, spacing)
    assert count > 40 and extent == (12, 12)
    assert panel.rows()[0].voxels == count
    assert cells(panel, 1) == (f"{ml:.2f}", "12-12")
    # A prediction on slice 30 for the same object widens its extent.
    show_slice(viewer, image, 30)
    settle(qtbot, controller)
    controller.points_layer.add([30, 84, 84])
    settle(qtbot, controller)
    assert (labels.data[30] == 1).any()
    check_rows(panel, labels, spacing)
    assert cells(panel, 1)[1] == "12-30"
    # A second object painted by hand on slice 20; then undo of object 1's prediction.
    value = panel.add_object()
    labels.paint((20, 120, 120), value)
    check_rows(panel, labels, spacing)
    assert cells(panel, value)[1] == "20-20"
    panel.table.selectRow(0)
    widget.segment_panel.undo_button.click()
    check_rows(panel, labels, spacing)
    assert cells(panel, 1)[1] == "12-12" and cells(panel, value)[1] == "20-20"
    # Deleting object 1 (undoable) drops its row; undo brings back its numbers.
    controller.delete_object()
    assert [line.value for line in panel.rows()] == [value]
    controller.session.undo(1)
    check_rows(panel, labels, spacing)
    assert cells(panel, 1)[1] == "12-12"


def _pixel(viewer, labels, coord):
    """RGB of the canvas at data coordinate ``coord`` of ``labels`` on the shown slice."""
    from canvas_events import canvas_pos

    shot = viewer.screenshot(canvas_only=True, flash=False)
    x, y = canvas_pos(viewer, labels, coord)
    scale = shot.shape[0] / viewer.window._qt_viewer.canvas.size[0]  # screenshot pixels per canvas pixel (size: h, w)
    return shot[int(round(y * scale)), int(round(x * scale)), :3].astype(int)


def test_visibility_toggle_hides_one_object_on_the_canvas(shown_workflow, qtbot):
    from napari_medsam._napari.objects_panel import SWATCH
    from qtpy.QtCore import Qt

    viewer, widget, controller = shown_workflow
    panel, image, labels = widget.objects_panel, controller.image_layer, controller.labels_layer
    show_slice(viewer, image, 20)
    labels.brush_size = 30
    labels.paint((20, 60, 60), 1)
    two = panel.add_object()
    labels.paint((20, 110, 110), two)
    labels.opacity = 1.0
    shown = _pixel(viewer, labels, (20, 60, 60))
    labels.visible = False
    bare = _pixel(viewer, labels, (20, 60, 60))
    labels.visible = True
    assert np.abs(shown - bare).max() > 30  # the object is drawn over the scan
    other = _pixel(viewer, labels, (20, 110, 110))
    # Untick object 1's box in the table, as a user does.
    item = panel.table.item(0, SWATCH)
    assert item.checkState() == Qt.Checked
    item.setCheckState(Qt.Unchecked)
    assert not panel.is_visible(1) and panel.is_visible(two)
    assert labels.colormap.map(np.array([1]))[0, 3] == 0 and labels.colormap.map(np.array([two]))[0, 3] == 1
    np.testing.assert_allclose(_pixel(viewer, labels, (20, 60, 60)), bare, atol=2)  # gone from the canvas
    np.testing.assert_allclose(_pixel(viewer, labels, (20, 110, 110)), other, atol=2)  # the other stays
    assert (labels.data == 1).any()  # hidden, not erased
    # A rename or recolour rebuilds the layer's colours: the hidden object stays hidden.
    controller.session.rename(1, "liver")
    controller.session.recolor(two, (10, 200, 30))
    assert labels.colormap.map(np.array([1]))[0, 3] == 0
    assert panel.table.item(0, SWATCH).checkState() == Qt.Unchecked
    panel.table.item(0, SWATCH).setCheckState(Qt.Checked)
    assert panel.is_visible(1) and labels.colormap.map(np.array([1]))[0, 3] == 1
    np.testing.assert_allclose(_pixel(viewer, labels, (20, 60, 60)), shown, atol=2)


def _editor(qtbot, panel, row):
    from napari_medsam._napari.objects_panel import NAME
    from qtpy.QtWidgets import QComboBox

    index = panel.table.model().index(row, NAME)
    panel.table.edit(index)
    combo = panel.table.indexWidget(index)
    assert isinstance(combo, QComboBox) and combo.isEditable()
    return combo


def test_name_picker_offers_the_coded_structures_and_free_text(workflow, qtbot):
    from napari_medsam._napari.objects_panel import NAME, STRUCTURE_NAMES
    from napari_medsam.io.segments import KNOWN_STRUCTURES, LEFT, default_segment
    from qtpy.QtCore import Qt

    viewer, widget, controller = workflow
    panel, labels = widget.objects_panel, controller.labels_layer
    widget.show()
    combo = _editor(qtbot, panel, 0)
    offered = [combo.itemText(i) for i in range(combo.count())]
    assert offered == sorted(KNOWN_STRUCTURES) == list(STRUCTURE_NAMES)
    # Pick "left kidney" from the list: the object's name, the segment metadata and its codes follow.
    combo.setCurrentIndex(offered.index("left kidney"))
    combo.activated.emit(combo.currentIndex())
    qtbot.waitUntil(lambda: controller.session.object(1).name == "left kidney", timeout=2000)
    segment = labels.metadata["napari_medsam"]["segments"][0]
    assert segment.name == "left kidney" and segment.type.value == "64033007" and segment.type_modifier == LEFT
    assert segment == default_segment(1, "left kidney", controller.session.object(1).color)
    assert "SNOMED CT 64033007" in panel.table.item(0, NAME).toolTip()
    # Free text is kept as typed: an unknown name exports as Tissue.
    combo = _editor(qtbot, panel, 0)
    combo.lineEdit().selectAll()
    qtbot.keyClicks(combo.lineEdit(), "Lesion 3b (segment VI)")
    qtbot.keyClick(combo.lineEdit(), Qt.Key_Return)
    qtbot.waitUntil(lambda: controller.session.object(1).name == "Lesion 3b (segment VI)", timeout=2000)
    segment = labels.metadata["napari_medsam"]["segments"][0]
    assert segment.type.meaning == "Lesion"  # the name holds a known lesion word
    combo = _editor(qtbot, panel, 0)
    combo.lineEdit().selectAll()
    qtbot.keyClicks(combo.lineEdit(), "blob")
    qtbot.keyClick(combo.lineEdit(), Qt.Key_Return)
    qtbot.waitUntil(lambda: controller.session.object(1).name == "blob", timeout=2000)
    assert labels.metadata["napari_medsam"]["segments"][0].type.meaning == "Tissue"
    assert "not a known structure" in panel.table.item(0, NAME).toolTip()


def test_copy_table_and_save_csv(workflow, qtbot, tmp_path, monkeypatch):
    from napari_medsam._napari import objects_panel
    from napari_medsam._napari.layers import volume_from_layer_meta
    from qtpy.QtWidgets import QApplication

    viewer, widget, controller = workflow
    panel, labels = widget.objects_panel, controller.labels_layer
    volume = volume_from_layer_meta(controller.image_layer.metadata)
    labels.brush_size = 7
    labels.paint((10, 50, 50), 1)
    labels.paint((14, 50, 50), 1)
    controller.session.rename(1, "liver, right lobe")  # a comma: quoted in the CSV
    two = panel.add_object("spleen")
    panel.copy_button.click()
    text = QApplication.clipboard().text()
    lines = text.splitlines()
    assert lines[0].split("\t") == ["name", "label", "volume_ml", "voxels", "first_slice", "last_slice"]
    count = int(np.count_nonzero(labels.data == 1))
    ml = count * float(np.prod(volume.spacing_mm)) / 1000
    assert lines[1].split("\t") == ["liver, right lobe", "1", f"{ml:.4f}", str(count), "10", "14"]
    assert lines[2].split("\t") == ["spleen", str(two), "0.0000", "0", "", ""]
    # Save CSV...: the dialog suggests a file beside the scan; the file parses back.
    asked = {}

    def dialog(parent, caption, start, filters):
        asked["start"] = start
        return str(tmp_path / "volumes"), "CSV files (*.csv)"

    monkeypatch.setattr(objects_panel.QFileDialog, "getSaveFileName", dialog)
    panel.csv_button.click()
    assert asked["start"].startswith(str(volume.source_path.parent)) and asked["start"].endswith("volumes.csv")
    rows = list(csv.reader(io.StringIO((tmp_path / "volumes.csv").read_text(encoding="utf-8"))))
    assert rows[1] == ["liver, right lobe", "1", f"{ml:.4f}", str(count), "10", "14"]
    assert [r.split("\t") for r in lines] == rows
    # Cancelling the dialog writes nothing.
    monkeypatch.setattr(objects_panel.QFileDialog, "getSaveFileName", lambda *a: ("", ""))
    assert panel.save_csv() is None


def test_table_fits_the_default_dock_width_and_elides_long_names(workflow, qtbot):
    from napari_medsam._napari.objects_panel import NAME

    viewer, widget, controller = workflow
    panel = widget.objects_panel
    long_name = "inferior vena cava, infrarenal segment below the renal veins"
    controller.session.rename(1, long_name)
    for name in ("left kidney", "right kidney", "spleen"):
        panel.add_object(name)
    controller.labels_layer.brush_size = 40
    controller.labels_layer.paint((40, 84, 84), 1)
    widget.resize(400, 900)
    widget.show()
    qtbot.waitExposed(widget)
    qtbot.wait(50)
    table = panel.table
    assert panel.minimumSizeHint().width() <= 380
    assert panel.width() <= widget.width()
    assert table.horizontalHeader().length() <= table.viewport().width()
    assert not table.horizontalScrollBar().isVisible()
    name_width = table.columnWidth(NAME)
    assert name_width >= 100  # the name column keeps a readable width
    assert table.fontMetrics().horizontalAdvance(long_name) > name_width  # elided in the cell...
    assert long_name in table.item(0, NAME).toolTip()  # ...and whole in its tooltip


def test_measures_match_a_full_count_after_random_edits():
    from napari_medsam._napari.objects_measure import ObjectMeasures

    rng = np.random.default_rng(5)
    labels = np.zeros((12, 20, 24), np.uint16)
    measures = ObjectMeasures(labels, (2.5, 0.8, 0.8))
    measures.sync([1, 2, 3])
    for _ in range(40):
        z0, r0, c0 = rng.integers(0, 10), rng.integers(0, 15), rng.integers(0, 20)
        region = (slice(z0, z0 + rng.integers(1, 3)), slice(r0, r0 + 5), slice(c0, c0 + 4))
        labels[region] = rng.integers(0, 4)
        measures.update([region])
    for value in (1, 2, 3):
        mask = labels == value
        assert measures.voxels(value) == np.count_nonzero(mask)
        assert measures.volume_ml(value) == pytest.approx(np.count_nonzero(mask) * 2.5 * 0.8 * 0.8 / 1000)
        hit = np.flatnonzero(mask.any(axis=(1, 2)))
        assert measures.extent(value) == ((int(hit[0]), int(hit[-1])) if hit.size else None)
    assert measures.sync([2, 5]) == [5] and measures.voxels(1) == 0 and measures.voxels(5) == 0
