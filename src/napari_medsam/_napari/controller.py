"""Interactive segmentation in napari: prompt layers in, masks into a Labels layer out.

A :class:`SegmentationController` adds two prompt layers on the scan's grid (see
:mod:`.prompt_layers`): "<scan> points" (click = include, right-, Shift- or Alt-click = exclude) and
"<scan> boxes" (rectangles). Every prompt remembers the plane it was made in and the object
(label value) selected then. Prompts of one (axis, slice, object) form a group; whenever a group
changes, that slice is predicted again and written through a
:class:`~napari_medsam.segment.session.SegmentationSession`, which keeps the objects table,
protects hand-painted voxels and gives per-object undo/redo. After an undo, the prompt layers
are rewritten from the session, so markers and masks always agree.

The encoder never runs on the Qt thread: a slice without a cached embedding is embedded by
an :class:`~.workers.EmbeddingQueue` worker and predicted when it returns; landing on a slice
starts embedding it ahead of the first click. The decoder (a few ms) runs on the Qt thread.

Prefetch: once the slice shown is embedded, its neighbours (i+1, i-1, i+2, ... up to
:data:`PREFETCH_RADIUS` each side) are embedded while the queue is idle, so scrolling one slice
and clicking gives a mask at once. They go last in the queue, are re-centred whenever the view
moves, never evict the slice shown from the memory cache, wait while another background job
(precompute, propagation, a model loading) uses the CPU, and leave the status line alone
("ready": the slice shown is). The "prefetch" setting switches it off.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import numpy as np
from psygnal import Signal

from ..errors import LabelsMismatchError, NotAVolumeError
from ..segment.cache import EmbeddingCache, volume_signature
from ..segment.cache.memory import MemoryCache
from ..segment.intensity import IntensityMapping, default_mapping
from ..segment.model import SamModel
from ..segment.predictor import SliceMasks, SlicePredictor
from ..segment.session import SegmentationSession
from ..segment.session.state import SlicePrompts
from .layers import known_segments, volume_from_layer_meta
from .prompt_layers import NEGATIVE_COLOR, POSITIVE_COLOR, Key, add_prompt_layers
from .controller_input import NEGATIVE_MODIFIERS, PromptInputMixin
from .controller_session import SessionEditsMixin
from .keys import AXIS_NAMES, MOUSE_ACTIONS, SHORTCUTS, load_shortcuts
from .settings import Settings
from .workers import EmbeddingQueue, start_worker

log = logging.getLogger(__name__)

__all__ = ["AXIS_NAMES", "MOUSE_ACTIONS", "NEGATIVE_COLOR", "NEGATIVE_MODIFIERS", "POSITIVE_COLOR",
           "SegmentationController", "SHORTCUTS", "TEXT_OVERLAY_POSITION", "canvas_text_overlay",
           "place_text_overlay"]

# Where the canvas text the plugin shows ("object 1: key slice") goes: napari puts it bottom-right
# by default, under its notification toasts (and beside the scale bar and slice counter there).
TEXT_OVERLAY_POSITION = "top_left"

# Slices embedded ahead on each side of the one shown (fewer when the memory cache holds fewer).
PREFETCH_RADIUS = 2


def canvas_text_overlay(viewer: Any) -> Any:
    """The viewer's text overlay (napari >= 0.9 keeps it on the canvas)."""
    overlays = getattr(getattr(viewer, "canvas", None), "overlays", None)
    return overlays["text"] if overlays is not None and "text" in overlays else viewer.text_overlay


def place_text_overlay(viewer: Any) -> None:
    """Move the canvas text overlay out of the toasts' corner, unless the user placed it elsewhere already."""
    overlay = canvas_text_overlay(viewer)
    if str(getattr(overlay.position, "value", overlay.position)) == "bottom_right":  # napari's default
        overlay.position = TEXT_OVERLAY_POSITION


class SegmentationController(PromptInputMixin, SessionEditsMixin):
    """Wires prompt layers, a SAM model, a segmentation session and a Labels layer into click-to-segment."""

    status_changed = Signal(str)
    mask_written = Signal(object)  # (axis, index, label) after a prediction was written
    changed = Signal(object)  # every SessionChange, after the layers show it
    view_changed = Signal()  # the shown plane or slice changed (scrolled, other axis, 2D/3D)

    def __init__(self, viewer: Any, image_layer: Any, labels_layer: Any, model: SamModel, *,
                 mapping: IntensityMapping | None = None, cache: EmbeddingCache | None = None,
                 overwrite: bool = False, bind_keys: bool = True, session: SegmentationSession | None = None,
                 prompt_layers: tuple[Any, Any] | None = None, signature: str | None = None,
                 settings: Settings | None = None, refine_from_logits: bool | None = None) -> None:
        """Segment ``image_layer`` into ``labels_layer``.

        A scan's panel session passes back what an earlier controller of the same scan left:
        ``session`` (the SegmentationSession on ``labels_layer``'s data: objects, prompts and undo
        history), ``prompt_layers`` (its points and boxes layers, rewritten here to hold exactly
        the session's prompts) and ``signature`` (the scan's cache signature), so switching scans
        or reloading the model neither adds layers nor loses history.

        ``settings`` (the panel's; else the settings file) gives the user's keys and whether a
        new click refines the slice's last mask (``refine_from_logits``, unless given here).
        """
        array = np.asarray(image_layer.data)
        if array.ndim not in (2, 3) or image_layer.rgb:
            raise NotAVolumeError(f"layer {image_layer.name!r} has shape {array.shape}"
                                  f"{' (RGB)' if image_layer.rgb else ''}: interactive segmentation needs a "
                                  "scalar 3D (or 2D) image layer")
        if tuple(labels_layer.data.shape) != array.shape:
            raise LabelsMismatchError(f"labels layer {labels_layer.name!r} has shape {tuple(labels_layer.data.shape)} "
                                      f"but the scan has {array.shape}: make a new label layer on the scan's grid")
        if not isinstance(labels_layer.data, np.ndarray):
            raise LabelsMismatchError(f"labels layer {labels_layer.name!r} is not held in memory "
                                      f"({type(labels_layer.data).__name__}): make a new label layer on the scan's grid")
        self.viewer = viewer
        self.image_layer = image_layer
        self.labels_layer = labels_layer
        self.model = model
        self.settings = settings if settings is not None else Settings()
        self._refine = bool(self.settings.get("refine_from_logits") if refine_from_logits is None
                            else refine_from_logits)
        # key -> (method, description): SHORTCUTS with the user's keys; refused ones warn once.
        self.shortcuts, self.key_warnings = load_shortcuts(self.settings)
        volume = volume_from_layer_meta(image_layer.metadata)
        # A 2D image is a volume of one slice; the session edits the 2D labels through a 3D view.
        self.flat = array.ndim == 2
        array = array[None] if self.flat else array
        self._array = array
        scale = np.abs(np.asarray(image_layer.scale, float))
        self._spacing = tuple(float(s) for s in (volume.spacing_mm if volume is not None
                                                 else ([1.0, *scale[-2:]] if self.flat else scale[-3:])))
        self.mapping = mapping or default_mapping(array, volume.modality if volume is not None else "OT")
        self.cache = cache if cache is not None else EmbeddingCache(MemoryCache())
        data = labels_layer.data[None] if self.flat else labels_layer.data
        if session is not None and not np.may_share_memory(session.labels, data):
            raise LabelsMismatchError(f"the segmentation session given does not edit labels layer {labels_layer.name!r}")
        if session is None:
            names, colors = known_segments(labels_layer.metadata)
            session = SegmentationSession(data, names=names, colors=colors, overwrite=overwrite)
        else:
            session.overwrite = bool(overwrite)
        self.session = session
        self._signature: str | None = signature  # else computed by the first worker: hashing a scan is slow
        self._predictors: dict[int, SlicePredictor] = {}
        # predictor() and scan_signature() are called from embedding workers and the Qt thread.
        # _state_lock guards the signature and the predictors (held for microseconds only);
        # _hash_lock makes concurrent scan_signature() callers (workers) hash the scan once.
        self._state_lock = threading.Lock()
        self._hash_lock = threading.Lock()
        self._groups: dict[Key, SlicePrompts] = {}
        self._waiting: set[Key] = set()
        self._preparing: set[tuple[int, int]] = set()  # slices being prepared for prompting (_prepare_shown)
        self._last_key: Key | None = None
        self._own_edit = 0  # >0 while the controller itself edits the session (layers already agree)
        self._syncing = False  # True while prompt layers are rewritten from the session
        self._quiet_selection = False
        self._gestures = 0  # mouse gestures under way on the prompt layers
        self.status = "ready"
        self._closed = False
        self.prefetch_radius = PREFETCH_RADIUS
        self._probe_state: tuple | None = None  # what _probe_predictor was made for
        self._probe_predictor: Any = None
        self.queue = EmbeddingQueue(self._embed_job, on_start=self._on_embed_start, on_done=self._on_embedded,
                                    on_error=self._on_embed_error, may_prefetch=self._may_prefetch)
        if prompt_layers is None or any(layer not in viewer.layers for layer in prompt_layers):
            prompt_layers = add_prompt_layers(viewer, image_layer)
        self.points_layer, self.boxes_layer = prompt_layers
        place_text_overlay(viewer)
        self._connections: list[tuple[Any, Any]] = []
        self._bound: list[tuple[Any, str]] = []
        # Rows each prompt layer had before its current edit: napari appends new prompts at the end.
        self._sizes = {id(self.points_layer): 0, id(self.boxes_layer): 0}
        self._match_prompts_to_session()
        for layer in (self.points_layer, self.boxes_layer):
            self._connect(layer.events.data, lambda event, layer=layer: self._on_prompts_event(layer, event))
            self._connect(layer.events.features, lambda event, layer=layer: self._on_prompts_event(layer, event))
        self._connect(viewer.dims.events.current_step, self._on_view_changed)
        self._connect(viewer.dims.events.order, self._on_view_changed)
        self._connect(viewer.dims.events.ndisplay, self._on_view_changed)
        self._connect(labels_layer.events.paint, self._on_paint)
        self._connect(labels_layer.events.selected_label, self._on_selected_label)
        self._unsubscribe = self.session.on_change(self._on_session_change)
        # First in the lists: runs before napari's mode callbacks, on press and on release.
        for layer in (self.points_layer, self.boxes_layer):
            layer.mouse_drag_callbacks.insert(0, self._on_prompt_press)
        if bind_keys:
            self._bind_keys()
        if self.session.active is None and labels_layer.selected_label > 0:
            self.session.add_object(value=int(labels_layer.selected_label))
        elif self.session.active is not None:
            labels_layer.selected_label = self.session.active
        self._update_colormap()
        self._update_segments()
        self._on_view_changed()

    @property
    def overwrite(self) -> bool:
        """Whether predictions may take voxels of other objects."""
        return self.session.overwrite

    @overwrite.setter
    def overwrite(self, value: bool) -> None:
        self.session.overwrite = bool(value)

    @property
    def refine_from_logits(self) -> bool:
        """Whether a new click refines the slice's last mask: its low-res logits go with the prompts.

        SAM's interactive loop. Only when the new prompts add points to those the slice's mask
        was predicted from (same box); moving or removing a prompt, or a new box, predicts
        afresh. Setting it keeps the choice in the settings file.
        """
        return self._refine

    @refine_from_logits.setter
    def refine_from_logits(self, value: bool) -> None:
        self._refine = bool(value)
        self.settings.set("refine_from_logits", self._refine)

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel spacing (slice, row, column) in mm."""
        return self._spacing  # type: ignore[return-value]

    @property
    def array(self) -> np.ndarray:
        """The scan's voxels as a 3D array (a 2D image is one slice); do not modify."""
        return self._array

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of the scan (slice, row, column)."""
        return tuple(self._array.shape)  # type: ignore[return-value]

    def _connect(self, emitter: Any, callback: Any) -> None:
        emitter.connect(callback)
        self._connections.append((emitter, callback))

    def close(self) -> None:
        """Disconnect from napari and stop background work; every layer stays as it is."""
        if self._closed:
            return
        self._closed = True
        for emitter, callback in self._connections:
            emitter.disconnect(callback)
        self._connections.clear()
        for target, key, previous in reversed(self._bound):
            target.bind_key(key, previous, overwrite=True)
        self._bound.clear()
        self._unsubscribe()
        for layer in (self.points_layer, self.boxes_layer):
            if self._on_prompt_press in layer.mouse_drag_callbacks:
                layer.mouse_drag_callbacks.remove(self._on_prompt_press)
        self.queue.close()

    # ------------------------------------------------------------------ view
    def current_plane(self) -> tuple[int, int] | None:
        """(axis, slice index) of the 2D view in the scan's voxels, or None (3D view, outside the scan)."""
        dims = self.viewer.dims
        if dims.ndisplay != 2:
            return None
        if self.flat:
            return 0, 0
        offset = dims.ndim - 3
        hidden = [a - offset for a in dims.not_displayed if a >= offset]
        if len(hidden) != 1:
            return None
        axis = hidden[0]
        position = self.image_layer.world_to_data(dims.point)
        index = int(round(float(position[-3:][axis])))
        if not 0 <= index < self._array.shape[axis]:
            return None
        return axis, index

    def _on_view_changed(self, event: Any = None) -> None:
        if self._closed:  # an event already on its way when the controller closed
            return
        self.view_changed.emit()
        plane = self.current_plane()
        self.queue.withdraw_prefetch()  # re-centred below, once the slice shown is embedded
        if plane is None:
            self.queue.withdraw_landing()  # a slice scrolled past: not worth an encoder run now
            if self.queue.running is None or self.queue.prefetching:
                self._set_status("switch to a 2D view of the scan to segment")
            return
        if self.is_embedded(*plane):
            self.queue.withdraw_landing()
            if self.queue.running is None:
                self._set_status("ready")
            else:
                self._on_embed_start(*self.queue.running)
            self._schedule_prefetch(plane)
            self._prepare_shown(plane)
        else:
            self.queue.request(*plane)
            if self.queue.running is not None:
                self._on_embed_start(*self.queue.running)

    def _set_status(self, text: str) -> None:
        self.status = text
        self.status_changed.emit(text)

    # ------------------------------------------------------------------ model
    def _make_predictor(self, axis: int, signature: str) -> SlicePredictor:
        return SlicePredictor(self.model, self._array, mapping=self.mapping, axis=axis, spacing_mm=self._spacing,
                              cache=self.cache, signature=signature)

    def predictor(self, axis: int) -> SlicePredictor:
        """The predictor of one plane (all share one cache); only once the scan's signature is known."""
        with self._state_lock:
            if self._signature is None:
                raise RuntimeError("no slice embedded yet: the scan's signature is computed by the first embedding")
            predictor = self._predictors.get(axis)
            if predictor is None:
                predictor = self._predictors[axis] = self._make_predictor(axis, self._signature)
            return predictor

    def scan_signature(self) -> str:
        """The scan's cache signature (hashes the voxels the first time: call it from a worker)."""
        signature = self._signature
        if signature is not None:
            return signature
        with self._hash_lock:  # a second caller waits here for the first one's hash
            if self._signature is None:
                computed = volume_signature(self._array, self._spacing)
                with self._state_lock:
                    if self._signature is None:
                        self._signature = computed
            return self._signature

    def set_model(self, model: SamModel) -> None:
        """Predict with another model from now on (its embeddings are cached apart from the old one's)."""
        with self._state_lock:
            self.model = model
            self._predictors.clear()
        self._on_view_changed()

    def is_embedded(self, axis: int, index: int) -> bool:
        """True when the slice's embedding is cached (never hashes the scan on the Qt thread)."""
        return self._signature is not None and self.predictor(axis).is_embedded(index)

    def set_mapping(self, mapping: IntensityMapping) -> None:
        """Embed with another intensity mapping from now on (cached embeddings of the old one stay)."""
        with self._state_lock:
            self.mapping = mapping
            predictors = list(self._predictors.values())
        for predictor in predictors:
            predictor.set_mapping(mapping)
        self._on_view_changed()

    def embed_slices(self, axis: int, indices: Iterable[int]) -> Iterator[int]:
        """Worker thread: put these slices' embeddings in the cache (cached ones cost nothing); yields each index."""
        predictor = self._make_predictor(axis, self.scan_signature())
        for index in indices:
            predictor.embed(int(index))
            yield int(index)

    def _embed_job(self, axis: int, index: int) -> str:
        """Worker thread: one slice's embedding into the cache; returns the scan's signature."""
        for _ in self.embed_slices(axis, [index]):
            pass
        return self.scan_signature()

    def _preparer(self, axis: int) -> SlicePredictor | None:
        """The plane's predictor when its model can prepare slices for prompting (SAM 1 family), else None."""
        if self._signature is None:
            return None
        predictor = self.predictor(axis)
        model = getattr(predictor, "model", None)
        if not callable(getattr(predictor, "prepare", None)) or not getattr(model, "can_prepare", False):
            return None
        return predictor

    def is_prepared(self, axis: int, index: int) -> bool:
        """True when the slice is embedded and, where the model can, prepared for prompting."""
        if not self.is_embedded(axis, index):
            return False
        predictor = self._preparer(axis)
        return predictor is None or predictor.model.prepared(predictor.key(index)) is not None

    def _prepare_shown(self, plane: tuple[int, int] | None) -> None:
        """Prepare the embedded slice shown for prompting, in a short worker of its own.

        ``SlicePredictor.prepare`` (a few tens of milliseconds, about one and a half decodes): the
        point and box prompts on that slice then decode faster. Not through the embedding queue,
        whose jobs are encoder runs; a click meanwhile decodes at once without it.
        """
        if self._closed or plane is None or plane in self._preparing:
            return
        predictor = self._preparer(plane[0])
        if predictor is None or self.is_prepared(*plane):
            return
        self._preparing.add(plane)

        def finished(_result: object = None) -> None:
            self._preparing.discard(plane)

        start_worker(predictor.prepare, plane[1], on_done=finished, on_error=finished)

    def _on_embed_start(self, axis: int, index: int) -> None:
        """Name the slice being embedded; when it is not the one shown, say so and what comes next.

        A prefetch the user is not waiting for leaves the status as it is ("ready" on the slice shown).
        """
        plane = self.current_plane()
        if self.queue.prefetching:
            if plane is not None and not self._probe(plane[0]).is_embedded(plane[1]):
                self._set_status(f"prefetching slice {index} ({AXIS_NAMES[axis]}); slice {plane[1]} (shown) next...")
            elif plane is not None and self.status != "ready":
                self._set_status("ready")
            return
        text = f"embedding slice {index} ({AXIS_NAMES[axis]})"
        if plane is not None and plane != (axis, index) and not self.is_embedded(*plane):
            text += f", left earlier; slice {plane[1]} (shown) next"
        self._set_status(text + "...")

    # ------------------------------------------------------------------ prefetch
    @property
    def prefetch(self) -> bool:
        """Whether the neighbours of the slice shown are embedded ahead while idle (kept in the settings file)."""
        return bool(self.settings.get("prefetch"))

    @prefetch.setter
    def prefetch(self, value: bool) -> None:
        self.settings.set("prefetch", bool(value))
        self.queue.withdraw_prefetch()
        if value and not self._closed:
            plane = self.current_plane()
            if plane is not None and self.is_embedded(*plane):
                self._schedule_prefetch(plane)

    def prefetch_targets(self, axis: int, index: int) -> list[tuple[int, int]]:
        """The uncached neighbours of slice ``index`` to embed ahead, nearest first (i+1, i-1, i+2, ...).

        At most :attr:`prefetch_radius` each side, and fewer when the memory cache could not hold
        them and the slice shown together.
        """
        return [item for item in self._neighbours(axis, index) if not self.is_embedded(*item)]

    def _neighbours(self, axis: int, index: int) -> list[tuple[int, int]]:
        radius = min(int(self.prefetch_radius), self._prefetch_room())
        count = self._array.shape[axis]
        order = [index + sign * step for step in range(1, radius + 1) for sign in (1, -1)]
        return [(axis, i) for i in order if 0 <= i < count]

    def _prefetch_room(self) -> int:
        """How many slices each side the memory cache holds beside the slice shown (unbounded before the first)."""
        memory = getattr(self.cache, "memory", None)
        entries = len(memory) if memory is not None else 0
        if not entries:
            return int(self.prefetch_radius)
        per_slice = max(1, memory.nbytes // entries)
        return max(0, (memory.max_bytes // per_slice - 1) // 2)

    def _schedule_prefetch(self, plane: tuple[int, int]) -> None:
        """Queue the neighbours of ``plane`` (embedded, shown) for prefetch, replacing the queued ones."""
        if self._closed or not self.prefetch or self.flat:
            return
        # Cached ones are dropped when their turn comes (_may_prefetch): no cache look-ups while scrolling.
        targets = self._neighbours(*plane)
        if targets:
            self.queue.prefetch(targets)

    def _may_prefetch(self, axis: int, index: int) -> bool | None:
        """The queue asks before a prefetch starts: True go, False drop it, None not now."""
        if self._closed or not self.prefetch or self._signature is None or self._probe(axis).is_embedded(index):
            return False
        from qtpy.QtCore import QThreadPool

        # Other work (precompute, propagation, a model loading...) goes first; this controller's own
        # short "prepare the slice shown" jobs (_prepare_shown) do not hold a prefetch back.
        if QThreadPool.globalInstance().activeThreadCount() > len(self._preparing):
            return None
        plane = self.current_plane()
        if plane is not None:
            self._keep_in_memory(plane)
        return True

    def _probe(self, axis: int) -> SlicePredictor:
        """A predictor made as the embedding job makes its own (embed_slices), for looking up its cache keys."""
        with self._state_lock:
            state = (axis, id(self.model), id(self.mapping), self._signature)
        if self._probe_state != state:
            self._probe_state, self._probe_predictor = state, self._make_predictor(axis, str(state[3]))
        return self._probe_predictor

    def _keep_in_memory(self, plane: tuple[int, int]) -> None:
        """Make the slice shown the most recently used memory-cache entry, so a prefetch never evicts it."""
        memory = getattr(self.cache, "memory", None)
        if memory is None:
            return
        key = self._probe(plane[0]).key(plane[1])
        if memory.peek(key):
            memory.get(key)

    def _on_embedded(self, axis: int, index: int, signature: object) -> None:
        with self._state_lock:
            self._signature = self._signature or str(signature)
        landed = []
        for key in sorted(k for k in self._waiting if k[:2] == (axis, index)):
            self._waiting.discard(key)
            self._update_slice(key)
            landed.append(key)
        plane = self.current_plane()
        if plane == (axis, index):
            self._prepare_shown(plane)
        if plane == (axis, index) and not self.queue.prefetch_pending:
            self._schedule_prefetch(plane)  # the slice shown is embedded: its neighbours next, while idle
        off_screen = [k for k in landed if k[:2] != plane and k[2] in self.session]
        if off_screen:
            # The prompt was made before the user left the slice: say where its mask went.
            names = ", ".join(self.session.object(k[2]).name for k in off_screen)
            self._set_status(f"{names}: slice {index} ({AXIS_NAMES[axis]}) segmented from the prompt made there")
        elif self.queue.running is None and self.status != "ready":  # not again after each prefetch
            self._set_status("ready")

    def _on_embed_error(self, axis: int, index: int, error: Exception) -> None:
        self._waiting = {k for k in self._waiting if k[:2] != (axis, index)}
        self._set_status(f"embedding slice {index} ({AXIS_NAMES[axis]}) failed: {error}")
        from napari.utils.notifications import show_error

        show_error(f"Embedding slice {index} failed: {error}. Your labels and prompts are unchanged.")

    @contextmanager
    def _editing(self) -> Iterator[None]:
        self._own_edit += 1
        try:
            yield
        finally:
            self._own_edit -= 1

    def _update_slice(self, key: Key) -> None:
        axis, index, label = key
        group = self._groups.get(key)
        if label <= 0:
            return
        if group is None or group.empty:  # its last prompt was removed: so is the mask it made
            self._waiting.discard(key)
            if label in self.session:
                with self._editing():
                    self.session.clear_slice(label, axis, index)
            return
        if not self.is_embedded(axis, index):
            self._waiting.add(key)
            self.queue.request(axis, index, urgent=True)
            return
        if label not in self.session:
            self.session.add_object(value=label, select=False)
        logits = self._refine_logits(key, group)
        # SAM's rule: one click is ambiguous (not with the earlier mask as a prompt as well).
        multimask = logits is None and group.box is None and len(group.points) == 1
        masks = self.predictor(axis).predict(index, group.to_prompts(logits), multimask=multimask)
        points = [(r, c) for r, c, _ in group.points] or None
        positive = [p for _, _, p in group.points] or None
        with self._editing(), self.session.group():
            self.session.set_prompts(label, axis, index, points, positive, group.box)
            self.session.apply_prediction(label, axis, index, masks)
        self._last_key = key
        self.queue.postpone_prefetch()  # the user is clicking: keep the CPU free for the next decode
        self.mask_written.emit((axis, index, label))

    def _refine_logits(self, key: Key, group: SlicePrompts) -> np.ndarray | None:
        """The low-res logits of the mask shown on that slice, when the new prompts refine it; else None.

        Read from the session's kept prediction, so after an undo or redo they are those of the
        prediction it restored.
        """
        axis, index, label = key
        if not self._refine or label not in self.session:
            return None
        cand = self.session.candidate(label, axis, index)
        if cand is None or not _adds_points(self.session.slice_prompts(label, axis, index), group):
            return None
        return np.array(cand.masks.low_res_logits[cand.choice], np.float32)  # a copy: the record stays intact

    def _focus_key(self) -> Key | None:
        """The (axis, slice, object) the mask buttons act on: the active object on the shown slice, else the last prediction."""
        plane, active = self.current_plane(), self.session.active
        if plane is not None and active is not None and self.session.candidate(active, *plane) is not None:
            return (*plane, active)
        key = self._last_key
        if key is not None and key[2] in self.session and self.session.candidate(key[2], key[0], key[1]) is not None:
            return key
        return None

    @property
    def last_masks(self) -> SliceMasks | None:
        """All candidates of the prediction the mask buttons act on, best first."""
        key = self._focus_key()
        return None if key is None else self.session.candidate(key[2], key[0], key[1]).masks

    @property
    def current_iou(self) -> float | None:
        """The model's predicted IoU of the candidate now shown there."""
        key = self._focus_key()
        return None if key is None else self.session.predicted_iou(key[2], key[0], key[1])

    @property
    def shown_prediction(self) -> tuple[float, int] | None:
        """(predicted IoU, number of candidates) of the active object's prediction on the slice shown, or None.

        Unlike :attr:`current_iou` never another slice's or object's value: this is what the panel shows.
        """
        plane, active = self.current_plane(), self.session.active
        if plane is None or active is None or active not in self.session:
            return None
        cand = self.session.candidate(active, *plane)
        if cand is None:
            return None
        iou = self.session.predicted_iou(active, *plane)
        return None if iou is None else (float(iou), int(cand.count))

    def cycle_mask(self) -> float | None:
        """Show the next candidate mask of that prediction; returns its predicted IoU."""
        key = self._focus_key()
        if key is None:
            return None
        axis, index, label = key
        cand = self.session.candidate(label, axis, index)
        group = self._groups.get(key)
        with self._editing():
            if cand.count == 1 and group is not None and not group.empty:
                # A single-mask prediction: add the three multimask candidates to cycle through.
                extra = self.predictor(axis).predict(index, group.to_prompts(), multimask=True)
                masks = SliceMasks(np.concatenate([cand.masks.masks, extra.masks]),
                                   np.concatenate([cand.masks.scores, extra.scores]),
                                   np.concatenate([cand.masks.low_res_logits, extra.low_res_logits]),
                                   index=index, axis=axis)
                self.session.apply_prediction(label, axis, index, masks, choice=1)
                score = float(masks.scores[1])
            else:
                score = self.session.cycle_candidate(label, axis, index)[1]
        self.mask_written.emit((axis, index, label))  # a corrected slice: propagation may follow it
        return score


def _adds_points(before: SlicePrompts, after: SlicePrompts) -> bool:
    """True when ``after`` is ``before`` with more points (same box, earlier points unmoved)."""
    n = len(before.points)
    if len(after.points) <= n or (before.box is None) != (after.box is None):
        return False
    if before.box is not None and not np.allclose(before.box, after.box, atol=1e-6):
        return False
    return all(p == q or (p[2] == q[2] and np.allclose(p[:2], q[:2], atol=1e-6))
               for p, q in zip(before.points, after.points[:n]))
