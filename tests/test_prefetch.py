"""Prefetch: the neighbours of the slice shown are embedded while the queue is idle, in a real napari viewer.

The encoder is a tiny random ViT slowed down by a sleep per slice (a stand-in for a CPU
encoder), so the tests can act while a prefetch runs; the order the slices were embedded in is
recorded.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

SHAPE = (12, 24, 32)


@pytest.fixture(scope="module")
def model():
    from test_predictor import tiny_model

    return tiny_model("sam", seed=1)


@pytest.fixture
def scene(make_napari_viewer, model, qtbot, monkeypatch):
    """(viewer, controller, embedded): a 12-slice scan shown at slice 0 (embedded), a slow encoder from now on."""
    from napari_medsam._napari.controller import SegmentationController
    from napari_medsam.segment.cache import EmbeddingCache, MemoryCache

    viewer = make_napari_viewer()
    volume = (np.random.default_rng(0).normal(size=SHAPE) * 200).astype(np.float32)
    image = viewer.add_image(volume, name="scan")
    labels = viewer.add_labels(np.zeros(SHAPE, np.uint8), name="seg")
    labels.selected_label = 1
    show(viewer, 0)
    controller = SegmentationController(viewer, image, labels, model, cache=EmbeddingCache(MemoryCache()))
    controller.prefetch = False  # the first slice without its neighbours; each test switches it on
    settle(qtbot, controller)
    assert [i for i in range(SHAPE[0]) if controller.is_embedded(0, i)] == [0]
    embedded: list[int] = []
    original = controller.embed_slices

    def slow_embed(axis, indices):
        for index in indices:
            embedded.append(int(index))
            yield from original(axis, [index])
            time.sleep(0.15)

    monkeypatch.setattr(controller, "embed_slices", slow_embed)
    controller.queue.prefetch_delay_ms = 300  # shorter than the panel's: quicker tests
    controller.prefetch = True
    yield viewer, controller, embedded
    controller.close()
    qtbot.waitUntil(lambda: controller.queue.running is None, timeout=30000)


def settle(qtbot, controller) -> None:
    """Wait until nothing is running or queued, prefetch included."""
    queue = controller.queue
    qtbot.waitUntil(lambda: queue.running is None and not queue.pending and not queue.prefetch_pending,
                    timeout=30000)


def show(viewer, index: int) -> None:
    viewer.dims.set_point(0, index)


def test_landing_embeds_the_slice_shown_then_its_neighbours_nearest_first(scene, qtbot):
    viewer, controller, embedded = scene
    statuses: list[str] = []
    controller.status_changed.connect(statuses.append)
    show(viewer, 5)
    qtbot.waitUntil(lambda: controller.is_embedded(0, 5), timeout=10000)
    qtbot.waitUntil(lambda: controller.queue.prefetching, timeout=10000)
    assert controller.status == "ready"  # the slice shown is: a prefetch does not say otherwise
    settle(qtbot, controller)
    assert embedded == [5, 6, 4, 7, 3]
    assert [i for i in range(SHAPE[0]) if controller.is_embedded(0, i)] == [0, 3, 4, 5, 6, 7]
    assert statuses == ["embedding slice 5 (axial)...", "ready"]  # no flashing for the prefetches
    # A neighbour is ready at once: its click predicts without a new encoder run.
    show(viewer, 6)
    assert controller.queue.running is None and controller.queue.pending == []
    controller.points_layer.add([6, 12, 16])
    assert np.any(controller.labels_layer.data[6] == 1)


def test_requests_go_before_queued_prefetches(scene, qtbot):
    viewer, controller, embedded = scene
    show(viewer, 5)
    qtbot.waitUntil(lambda: controller.queue.running == (0, 6), timeout=10000)  # the first prefetch
    assert controller.queue.prefetching and controller.queue.prefetch_pending == [(0, 4), (0, 7), (0, 3)]
    # A click on the slice shown predicts at once, while the encoder prefetches.
    controller.points_layer.add([5, 12, 16])
    assert np.any(controller.labels_layer.data[5] == 1) and controller.queue.running == (0, 6)
    # A prompt on an unembedded slice (an urgent request) runs before the queued prefetches.
    controller.queue.request(0, 10, urgent=True)
    settle(qtbot, controller)
    assert embedded == [5, 6, 10, 4, 7, 3]


def test_moving_re_centres_the_prefetch(scene, qtbot):
    viewer, controller, embedded = scene
    show(viewer, 5)
    qtbot.waitUntil(lambda: controller.queue.running == (0, 6), timeout=10000)
    show(viewer, 9)  # the queued 4, 7, 3 are dropped; 9 comes next, then its own neighbours
    assert controller.queue.prefetch_pending == [] and controller.status.startswith("prefetching slice 6")
    settle(qtbot, controller)
    assert embedded == [5, 6, 9, 10, 8, 11, 7]
    # Onto a slice being prefetched: it is the user's now, and the status says so.
    show(viewer, 4)
    qtbot.waitUntil(lambda: controller.queue.running == (0, 3), timeout=10000)  # 4 landed, 3 prefetched
    show(viewer, 3)
    assert not controller.queue.prefetching and controller.status == "embedding slice 3 (axial)..."
    settle(qtbot, controller)
    assert embedded == [5, 6, 9, 10, 8, 11, 7, 4, 3, 2, 1]


def test_the_setting_switches_prefetch_off_and_on(scene, qtbot):
    from napari_medsam._napari.settings import Settings

    viewer, controller, embedded = scene
    controller.prefetch = False
    assert Settings().get("prefetch") is False  # kept in the settings file
    show(viewer, 5)
    settle(qtbot, controller)
    qtbot.wait(2 * controller.queue.prefetch_delay_ms)
    assert embedded == [5] and controller.queue.prefetch_pending == [] and controller.queue.running is None
    controller.prefetch = True  # on again: the neighbours of the slice shown
    settle(qtbot, controller)
    assert embedded == [5, 6, 4, 7, 3]


def test_prefetch_never_evicts_the_slice_shown_from_a_small_memory_cache(scene, qtbot):
    viewer, controller, embedded = scene
    memory = controller.cache.memory
    memory.set_max_bytes(3 * memory.nbytes)  # slice 0 is cached: room for three slices in all
    show(viewer, 5)
    settle(qtbot, controller)
    assert embedded == [5, 6, 4]  # one each side: the slice shown and two neighbours fill the cache
    assert all(memory.peek(controller.predictor(0).key(i)) for i in (4, 5, 6))
    show(viewer, 6)  # 7 is prefetched and takes the place of the least recently used slice (5), never of 6;
    settle(qtbot, controller)  # then 5, a neighbour again, takes 4's
    assert embedded == [5, 6, 4, 7, 5]
    assert [i for i in range(SHAPE[0]) if memory.peek(controller.predictor(0).key(i))] == [5, 6, 7]


def test_prefetch_waits_for_other_background_work_and_stops_when_the_controller_closes(scene, qtbot):
    from napari_medsam._napari.workers import start_worker

    viewer, controller, embedded = scene
    finished: list[bool] = []
    start_worker(time.sleep, 1.0, on_done=lambda _: finished.append(True))  # say, a precompute
    show(viewer, 5)
    qtbot.waitUntil(lambda: controller.is_embedded(0, 5), timeout=10000)
    qtbot.wait(3 * controller.queue.prefetch_delay_ms)
    if not finished:  # the other job still runs: no prefetch has started beside it
        assert embedded == [5] and controller.queue.running is None
    qtbot.waitUntil(lambda: controller.queue.running == (0, 6), timeout=10000)
    assert finished
    controller.close()  # the running prefetch ends; nothing else starts
    qtbot.waitUntil(lambda: controller.queue.running is None, timeout=10000)
    qtbot.wait(2 * controller.queue.prefetch_delay_ms)
    assert embedded == [5, 6] and controller.queue.prefetch_pending == []


def test_a_new_model_drops_the_old_models_prefetch(scene, qtbot):
    from test_predictor import tiny_model

    viewer, controller, embedded = scene
    show(viewer, 5)
    qtbot.waitUntil(lambda: controller.queue.running == (0, 6), timeout=10000)
    controller.set_model(tiny_model("sam", seed=2))
    assert controller.queue.prefetch_pending == [] and controller.queue.pending == [(0, 5)]
    settle(qtbot, controller)
    # The slice shown first under the new model, then its neighbours. The running job was started
    # for the old model; its worker thread may have begun only after set_model, embedding 6 for
    # the new one: then 6 is not prefetched again.
    assert embedded[:3] == [5, 6, 5] and embedded[3:] in ([6, 4, 7, 3], [4, 7, 3])
    assert [i for i in range(SHAPE[0]) if controller.is_embedded(0, i)] == [3, 4, 5, 6, 7]


def test_the_segment_panel_checkbox_switches_prefetch(scene, qtbot):
    from napari_medsam._napari.segment_panel import SegmentPanel
    from napari_medsam._napari.settings import Settings

    viewer, controller, embedded = scene
    panel = SegmentPanel()
    qtbot.addWidget(panel)
    assert not panel.prefetch.isEnabled()  # no controller yet
    panel.set_controller(controller)
    assert panel.prefetch.isEnabled() and panel.prefetch.isChecked()
    panel.prefetch.setChecked(False)
    assert controller.prefetch is False and Settings().get("prefetch") is False
    show(viewer, 5)
    settle(qtbot, controller)
    qtbot.wait(2 * controller.queue.prefetch_delay_ms)
    assert embedded == [5]
    panel.prefetch.setChecked(True)
    settle(qtbot, controller)
    assert controller.prefetch is True and embedded == [5, 6, 4, 7, 3]
    panel.set_controller(None)


def test_the_slice_shown_is_prepared_for_prompting_not_the_prefetched_ones(scene, qtbot):
    viewer, controller, embedded = scene
    model = controller.model
    qtbot.waitUntil(lambda: controller.is_prepared(0, 0), timeout=10000)  # the first slice, once embedded
    show(viewer, 5)
    qtbot.waitUntil(lambda: controller.is_prepared(0, 5), timeout=10000)
    settle(qtbot, controller)
    assert embedded == [5, 6, 4, 7, 3]
    assert [i for i in range(SHAPE[0]) if controller.is_prepared(0, i)] == [0, 5]
    # Onto an embedded neighbour: prepared in a short worker of its own, no encoder run queued.
    show(viewer, 6)
    assert controller.queue.running is None and controller.queue.pending == []
    qtbot.waitUntil(lambda: controller.is_prepared(0, 6), timeout=10000)
    assert not controller.is_prepared(0, 0)  # only the last few slices are kept
    controller.points_layer.add([6, 12, 16])
    prepared_mask = controller.labels_layer.data[6] == 1
    # The same click through the plain decoder gives the same mask.
    from napari_medsam.segment.predictor import Prompts

    key = controller.predictor(0).key(6)
    with model._prepared_lock:
        model._prepared.pop(key)
    plain = controller.predictor(0).predict(6, Prompts(points=np.array([[12.0, 16.0]]), positive=np.array([True])),
                                            multimask=True)
    assert prepared_mask.any() and np.array_equal(prepared_mask, plain.best)
