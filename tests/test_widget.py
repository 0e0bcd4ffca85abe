"""The whole dock widget on the sample CT: model in, click, objects, undo, precompute, export."""

from __future__ import annotations

import numpy as np
import pytest



@pytest.fixture(scope="module")
def model():
    from test_predictor import tiny_model

    return tiny_model("sam", seed=3)


@pytest.fixture
def workflow(make_napari_viewer, qtbot, model, sample_dir):
    from conftest import start_workflow, stop_workflow

    viewer = make_napari_viewer()
    widget, controller = start_workflow(viewer, model, sample_dir)
    qtbot.addWidget(widget)
    yield viewer, widget, controller
    stop_workflow(qtbot, widget, controller)


def settle(qtbot, controller):
    qtbot.waitUntil(lambda: controller.queue.running is None and not controller.queue.pending, timeout=30000)
    qtbot.wait(20)


def show_slice(viewer, image, index):
    viewer.dims.set_point(0, image.data_to_world([index, 0, 0])[0])


def test_loading_a_model_starts_segmentation_on_a_new_label_layer(workflow):
    viewer, widget, controller = workflow
    image = widget.image_layer
    assert controller.image_layer is image
    assert controller.labels_layer.data.shape == image.data.shape
    np.testing.assert_allclose(controller.labels_layer.scale, image.scale)
    names = [layer.name for layer in viewer.layers]
    assert f"{image.name} points" in names and f"{image.name} boxes" in names
    assert widget.segment_panel.isEnabled() and widget.objects_panel.isEnabled()
    # Unloading the model stops segmentation; the layers stay.
    widget.model_panel.set_model(None, "mobile_sam")
    assert widget.controller is None and f"{image.name} points" in [layer.name for layer in viewer.layers]


def test_click_objects_undo_through_the_panels(workflow, qtbot):
    viewer, widget, controller = workflow
    image, labels = controller.image_layer, controller.labels_layer
    middle = image.data.shape[0] // 2
    show_slice(viewer, image, middle)
    settle(qtbot, controller)
    assert "ready" in widget.segment_panel.state.text()
    controller.points_layer.add([middle, 84, 84])
    settle(qtbot, controller)
    assert (labels.data[middle] == 1).any() and not np.delete(labels.data, middle, axis=0).any()
    assert "predicted IoU" in widget.segment_panel.iou.text() and "3 masks" in widget.segment_panel.iou.text()
    # Second object from the objects panel, renamed in the table.
    value = widget.objects_panel.add_object()
    assert value == 2 and labels.selected_label == 2
    widget.objects_panel.table.item(1, 1).setText("liver")
    assert controller.session.object(2).name == "liver"
    assert labels.metadata["napari_medsam"]["names"][2] == "liver"
    widget.segment_panel.overwrite.setChecked(True)
    controller.points_layer.add([middle, 40, 40])
    settle(qtbot, controller)
    assert (labels.data[middle] == 2).any()
    widget.segment_panel.undo_button.click()
    assert not (labels.data == 2).any() and (labels.data == 1).any()
    widget.segment_panel.redo_button.click()
    assert (labels.data == 2).any()
    # Selecting the first row makes object 1 active; its undo leaves object 2 alone.
    widget.objects_panel.table.selectRow(0)
    assert controller.session.active == 1 and labels.selected_label == 1
    widget.segment_panel.cycle_button.click()
    assert "predicted IoU" in widget.segment_panel.iou.text()


def test_precompute_runs_in_background_and_can_be_cancelled(workflow, qtbot, model, monkeypatch):
    import time

    viewer, widget, controller = workflow
    settle(qtbot, controller)
    original = model.encode
    monkeypatch.setattr(model, "encode", lambda rgb: (time.sleep(0.2), original(rgb))[1])
    panel = widget.segment_panel
    panel.first.setValue(10)
    panel.last.setValue(40)
    worker = panel.precompute()
    assert worker is not None and panel.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: "Precomputing" in panel.state.text(), timeout=10000)
    panel.cancel_button.click()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=30000)
    assert "cancelled" in panel.state.text()
    done = [i for i in range(10, 41) if controller.is_embedded(0, i)]
    assert 0 < len(done) < 31
    # A second run resumes: the slices done are not embedded again.
    calls = []
    monkeypatch.setattr(model, "encode", lambda rgb: (calls.append(1), original(rgb))[1])
    panel.precompute()
    qtbot.waitUntil(lambda: panel.worker is None, timeout=60000)
    assert "done: 31/31" in panel.state.text()
    assert len(calls) == 31 - len(done)


def test_export_names_segments_after_objects(workflow, qtbot, tmp_path):
    import nibabel as nib

    viewer, widget, controller = workflow
    image, labels = controller.image_layer, controller.labels_layer
    show_slice(viewer, image, 20)
    settle(qtbot, controller)
    controller.session.rename(1, "liver")
    controller.points_layer.add([20, 84, 84])
    settle(qtbot, controller)
    # File > Save Layers with the plugin's writer.
    out = tmp_path / "seg.nii.gz"
    viewer.layers.selection.active = labels
    written = labels.save(str(out), plugin="napari-medsam")
    assert written
    saved = np.asarray(nib.load(str(out)).dataobj)
    assert saved.shape[::-1] == labels.data.shape or saved.size == labels.data.size
    assert (saved == 1).sum() == (labels.data == 1).sum()
    # The Export button's suggestion follows the source: NIfTI for a NIfTI scan.
    worker = widget.export_labels(tmp_path / "export.nii.gz")
    qtbot.waitUntil(lambda: widget.last_saved is not None, timeout=30000)
    assert worker is not None and widget.last_saved.name == "export.nii.gz"


def test_settings_persist_between_widgets(make_napari_viewer, qtbot):
    from napari_medsam._napari.widget import MedSamWidget

    viewer = make_napari_viewer()
    first = MedSamWidget(viewer)
    qtbot.addWidget(first)
    first.segment_panel.overwrite.setChecked(True)
    first.window_combo.setCurrentText("bone")
    first._window_picked(0)
    second = MedSamWidget(viewer)
    qtbot.addWidget(second)
    assert second.segment_panel.overwrite.isChecked()
    assert second.settings.get("window") == "bone"


def test_coronal_and_sagittal_views_have_the_head_up(workflow):
    viewer, widget, controller = workflow

    def vertical():
        return str(getattr(viewer.camera.orientation2d[0], "value", viewer.camera.orientation2d[0]))

    assert vertical() == "down"  # axial: anterior at the top, as napari draws rows
    viewer.dims.order = (1, 0, 2)  # coronal: slices (feet -> head) drawn vertically
    assert vertical() == "up"
    viewer.dims.order = (2, 0, 1)  # sagittal
    assert vertical() == "up"
    viewer.dims.order = (0, 1, 2)
    assert vertical() == "down"


def test_removing_layers_stops_and_never_restarts_segmentation(workflow):
    viewer, widget, controller = workflow
    names = [layer.name for layer in viewer.layers]
    viewer.layers.remove(controller.labels_layer)
    assert widget.controller is None
    assert sorted(layer.name for layer in viewer.layers) == sorted(n for n in names if n != controller.labels_layer.name)
    viewer.layers.clear()  # what napari does when it closes
    assert len(viewer.layers) == 0 and widget.controller is None


def test_model_input_follows_the_contrast_slider(workflow, qtbot):
    from napari_medsam._napari.model_choices import MAPPING_LIMITS

    viewer, widget, controller = workflow
    image = controller.image_layer
    assert widget.model_panel.mapping_combo.choice == MAPPING_LIMITS
    show_slice(viewer, image, 20)
    settle(qtbot, controller)
    assert controller.is_embedded(0, 20)
    before = controller.mapping
    # A slider drag: many events; the mapping changes once, when it rests.
    changes = []
    original = controller.set_mapping
    controller.set_mapping = lambda mapping: (changes.append(mapping), original(mapping))
    for high in range(300, 360, 10):
        image.contrast_limits = (-120, high)
    assert controller.mapping == before and not changes
    qtbot.waitUntil(lambda: len(changes) == 1, timeout=5000)
    assert (controller.mapping.low, controller.mapping.high) == (-120, 350)
    settle(qtbot, controller)
    assert controller.is_embedded(0, 20)  # the shown slice, embedded again for what is on screen
    # Back to the first limits: their embeddings are still cached, nothing to embed.
    image.contrast_limits = (before.low, before.high)
    qtbot.waitUntil(lambda: len(changes) == 2, timeout=5000)
    assert controller.is_embedded(0, 20) and controller.queue.running is None
    # With a CT preset chosen, the slider no longer changes the model's input.
    widget.model_panel.mapping_combo.set_choice("soft tissue")
    qtbot.wait(50)
    count = len(changes)
    image.contrast_limits = (-500, 500)
    qtbot.wait(600)
    assert len(changes) == count


def test_modality_combo_overrides_the_guess_per_layer(workflow, qtbot):
    """The Scan group's Modality combo: CT -> MR -> auto on the sample CT, without reading the file."""
    from napari_medsam._napari.layers import volume_from_layer_meta
    from napari_medsam._napari.widget import AUTO_WINDOW, MODALITY_OVERRIDE
    from napari_medsam.windows import CT_WINDOWS

    viewer, widget, controller = workflow
    image = widget.image_layer
    volume = volume_from_layer_meta(image.metadata)
    assert volume.modality == "CT" and widget.modality_combo.currentText() == "auto"
    assert widget.window_combo.currentText() in CT_WINDOWS
    entry = image.metadata["napari_medsam"]
    settle(qtbot, controller)
    mappings = []
    original = controller.set_mapping
    controller.set_mapping = lambda mapping: (mappings.append(mapping), original(mapping))

    widget.modality_combo.setCurrentText("MR")
    widget.modality_combo.activated.emit(widget.modality_combo.currentIndex())  # as a user's pick
    assert volume.modality == "MR" and volume.intensity_unit == "" and volume.metadata["modality_from"] == "user"
    assert entry[MODALITY_OVERRIDE] == "MR" and volume_from_layer_meta(image.metadata) is volume
    assert "<b>MR</b> (override)" in widget.info.text() and "HU" not in widget.info.text()
    assert widget.window_combo.currentText() == AUTO_WINDOW
    # The percentile window, and the model input ("current contrast limits") follows it.
    assert tuple(image.contrast_limits) != (-160.0, 240.0)
    assert mappings and (mappings[-1].low, mappings[-1].high) == tuple(image.contrast_limits)
    settle(qtbot, controller)

    widget.set_modality("CT")
    assert volume.modality == "CT" and volume.intensity_unit == "HU" and entry[MODALITY_OVERRIDE] == "CT"
    assert "<b>CT</b> (override) HU" in widget.info.text()
    assert widget.window_combo.currentText() in CT_WINDOWS
    settle(qtbot, controller)

    # Remembered per layer: another image resets the combo, coming back shows the override.
    other = viewer.add_image(np.zeros((3, 8, 8), np.float32), name="plain")
    widget.image_combo.setCurrentText("plain")
    assert widget.modality_combo.currentText() == "auto" and not widget.modality_combo.isEnabled()
    widget.image_combo.setCurrentText(image.name)
    assert widget.modality_combo.currentText() == "CT" and widget.modality_combo.isEnabled()
    viewer.layers.remove(other)
    if widget.controller is not None:  # picking the scan again started segmenting it again
        settle(qtbot, widget.controller)

    widget.set_modality(None)
    assert widget.modality_combo.currentText() == "auto" and MODALITY_OVERRIDE not in entry
    assert volume.modality == "CT" and volume.intensity_unit == "HU" and "modality_from" not in volume.metadata
    assert "(override)" not in widget.info.text() and "<b>CT</b> HU" in widget.info.text()
    assert widget.window_combo.currentText() in CT_WINDOWS


def test_export_names_every_segment_as_the_objects_table_shows_it(workflow, qtbot, tmp_path):
    from napari_medsam.io import read_labels_and_segments

    viewer, widget, controller = workflow
    image, labels = controller.image_layer, controller.labels_layer
    show_slice(viewer, image, 20)
    settle(qtbot, controller)
    controller.session.rename(1, "liver")
    controller.points_layer.add([20, 84, 84])
    settle(qtbot, controller)
    # An object added without a name: the table calls it "object 2", and so does the file.
    value = widget.objects_panel.add_object("")
    assert widget.objects_panel.table.item(1, 1).text() == f"object {value}"
    labels.data[20, 2:6, 2:6] = value
    # A value painted by hand, with an empty name in the layer's metadata (e.g. an unnamed DICOM segment).
    labels.data[21, 2:6, 2:6] = 7
    meta = labels.metadata["napari_medsam"]
    labels.metadata["napari_medsam"] = {**meta, "names": {**meta["names"], 7: ""}}
    labels.refresh()
    out = tmp_path / "named.nii.gz"
    widget.export_labels(out)
    qtbot.waitUntil(lambda: widget.last_saved is not None, timeout=30000)
    _, segments = read_labels_and_segments(widget.last_saved, widget.volume)
    names = {int(s.label): s.name for s in segments}
    assert names == {1: "liver", value: f"object {value}", 7: "object 7"}, names


def test_export_default_file_name_is_short_and_beside_the_scan(workflow, sample_dir):
    from napari_medsam.io._text import SHORT_NAME, short_file_stem

    viewer, widget, controller = workflow
    suggestion = widget.export_suggestion()
    assert suggestion.name == "ct_phantom_labels.nii.gz" and suggestion.parent.resolve() == sample_dir.resolve()
    uid = "1.2.840.113619.2.55.3.604688119.969.1268071029.320"
    description = "CT ABDOMEN PELVIS W CONTRAST (PORTAL VENOUS PHASE) 1.25mm STND [1]"
    for name, expected in ((f"{uid} labels", "series-029320_labels"),
                           (f"{description} labels", "CT_ABDOMEN_PELVIS_W_CONTRAST_labels"),
                           ("ct_phantom labels", "ct_phantom_labels"), ("???", "labels")):
        stem = short_file_stem(name)
        assert stem == expected and len(stem) <= SHORT_NAME and all(c.isalnum() or c in "_-." for c in stem), stem
    # Through the widget: the scan's labels named after a long series description.
    controller.labels_layer.name = f"{description} labels"
    suggestion = widget.export_suggestion()
    assert suggestion.name == "CT_ABDOMEN_PELVIS_W_CONTRAST_labels.nii.gz", suggestion
    assert suggestion.parent.resolve() == sample_dir.resolve()
