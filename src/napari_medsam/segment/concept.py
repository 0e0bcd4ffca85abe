"""Concept (text) prompts on a scan: every instance of a phrase on a slice, and one instance through slices.

A concept model (EfficientSAM3, :mod:`napari_medsam.models.networks.es3`) answers "liver" on one image
with *candidates*: every detection whose score ``sigmoid(class) * sigmoid(presence)`` exceeds a threshold,
each with a mask and a box. This module puts that on a :class:`~napari_medsam.volume.Volume`:

* :class:`ConceptModel` holds the network and its device. ``encode(rgb)`` runs the image encoder once per
  slice and returns its three feature levels packed into one float32 vector, so that the project's
  embedding cache (:mod:`.cache`, LRU bounded by bytes) keeps them like SAM embeddings; the text features
  of each phrase are kept in a small LRU of their own. ``detect`` runs the detector on cached features.
* :class:`ConceptSegmenter` is the slice side, one per scan, model and plane. The image a slice becomes is
  the one the SAM path builds (:class:`~.predictor.SlicePredictor`: the user's intensity mapping to uint8
  grey on three channels, square pixels); the model then stretches it to 1008 x 1008 itself. ``find``
  returns :class:`Candidates` (best first); ``find_in_slices`` follows one instance through a slice range.
* Following (:meth:`ConceptSegmenter.find_in_slices`): from a seed slice (the candidate the user accepted,
  or else the best-scoring candidate of the range), each neighbour slice keeps the candidate whose mask
  overlaps the last accepted mask best (Dice, or IoU), if that overlap reaches ``min_overlap``. A slice
  where none does is a miss; ``max_misses`` misses in a row end the front (SAM-family detectors happily
  return confident masks of *other* structures past an organ's end: only the overlap tells them apart).
  A :class:`ConceptTrack` is the outcome; :meth:`ConceptTrack.write` puts it into a label volume through
  propagation's own run (:class:`~.propagation.run.PropagationRun`), so the result is a
  :class:`~.propagation.run.PropagationResult` with the per-slice report and the undo record, and slices
  missed between two accepted ones are interpolated as propagation does.

Boxes are ``(x0, y0, x1, y1)`` in slice pixels, x along columns and y along rows, pixel edges (the slice
spans ``0..W`` by ``0..H``), both for exemplar boxes given to ``find`` and for candidate boxes returned:
a candidate's box can be handed back as an exemplar. The model takes them normalised as (cx, cy, w, h).

The default score threshold is the official one, 0.5. Checkpoints with other score ranges need another
(the golden random-weight model: 0.2552); it is a parameter everywhere.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..errors import MedSamError
from ..volume import Volume
from .cache import EmbeddingCache
from .cache.memory import MemoryCache
from .intensity import IntensityMapping
from .predictor import SlicePredictor

__all__ = [
    "DEFAULT_THRESHOLD",
    "Candidates",
    "ConceptModel",
    "ConceptSegmenter",
    "ConceptError",
    "ConceptTrack",
    "Detected",
]

DEFAULT_THRESHOLD = 0.5  # the official Sam3Processor's confidence threshold
DEFAULT_CACHE_BYTES = 1 << 30  # image features of about 9 full-size slices (111 MiB each), 36 reduced
_TEXT_CACHE = 32  # phrases whose text features are kept
_BOX_ONLY_PHRASE = "visual"  # the official processor's text for a prompt of boxes only

ProgressCallback = Callable[[int, int, str], None]


class ConceptError(MedSamError):
    """A concept prompt that cannot run: empty phrase, wrong checkpoint, boxes outside the slice, ..."""


@dataclass
class Detected:
    """A concept model's answer on one image, in the model's query order (what :meth:`ConceptModel.detect` gives)."""

    scores: np.ndarray  # (K,) float
    boxes: np.ndarray  # (K, 4) x0, y0, x1, y1 in pixels of the image size asked for
    masks: np.ndarray  # (K, H, W) bool
    queries: np.ndarray  # (K,) the detector's query index of each detection


@dataclass
class Candidates:
    """Every detection of ``phrase`` on slice ``index`` above ``threshold``, best score first."""

    index: int
    phrase: str
    masks: np.ndarray  # (K, H, W) bool on the slice grid
    scores: np.ndarray  # (K,) sigmoid(class) * sigmoid(presence)
    boxes: np.ndarray  # (K, 4) x0, y0, x1, y1 in slice pixels (x = column, y = row; pixel edges)
    threshold: float = DEFAULT_THRESHOLD
    axis: int = 0
    queries: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __len__(self) -> int:
        return int(len(self.scores))

    @property
    def best(self) -> np.ndarray | None:
        """The highest-scoring mask, or None when nothing scored above the threshold."""
        return self.masks[0] if len(self) else None


# --- the model -------------------------------------------------------------------------------------


def _sam_family_keys(state: Mapping[str, Any]) -> bool:
    return any(k.split(".", 1)[0] in ("image_encoder", "mask_decoder", "sam_mask_decoder", "prompt_encoder")
               for k in state)


class ConceptModel:
    """An EfficientSAM3 image model on a device, with per-phrase text features kept (see the module docstring)."""

    family = "es3"
    pipeline = "es3"  # read by SlicePredictor's mapping choice: no model-specific windowing

    def __init__(self, network: Any, *, name: str = "efficientsam3", signature: str = "",
                 device: Any = "cpu") -> None:
        import torch

        from ..models.device import tune_allocator

        self.network = network.eval()
        self.device = torch.device(device)
        if self.device.type == "cpu":
            tune_allocator()  # large temporaries reused instead of faulted in again (device.py)
        self.network.to(self.device)
        self.name = name
        self.signature = signature or f"{name}:unsigned:{id(network)}"
        config = network.config
        g, d = int(config.vision.embed_size), int(config.d_model)
        self.level_shapes = [(d, 4 * g, 4 * g), (d, 2 * g, 2 * g), (d, g, g)][-config.vision.kept_levels:]
        self._texts: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        from ..models.device import ThreadChooser

        self._threads = ThreadChooser()

    @classmethod
    def from_checkpoint(cls, name: str | None = None, weights: str | Path | None = None,
                        vocabulary: str | Path | None = None, *, device: Any = "auto", download: bool = True,
                        progress=None, cancel=None, threads: int | None = None, cache_dir=None,
                        own_file_hint: str | None = None, vocabulary_hint: str | None = None) -> "ConceptModel":
        """Load a registry concept model (``name``, default EfficientSAM3 EV-M) or a local checkpoint
        (``weights``: e.g. a medical fine-tune with the official layout), with the CLIP vocabulary
        (``vocabulary``, else the cache or a download). Strict loading; a SAM-family checkpoint or another
        architecture raises :class:`~napari_medsam.errors.WeightsError` saying so."""
        from ..models.checkpoint import load_state_dict
        from ..models.device import resolve_device, set_cpu_threads
        from ..models.networks.es3.model import Es3CheckpointError, build_es3_model, infer_es3_config
        from ..models.networks.es3.tokenizer import ClipTokenizer
        from ..models.registry import CLIP_VOCABULARY, DEFAULT_CONCEPT_MODEL, get_concept_model
        from ..models.weights import resolve_file
        from ..errors import WeightsError
        from .cache.keys import file_signature

        if threads is not None:
            set_cpu_threads(threads)
        spec = get_concept_model(name or DEFAULT_CONCEPT_MODEL) if (name or weights is None) else None
        owner = spec or SimpleNamespace(display_name=f"the concept model {Path(str(weights)).name}")
        path = resolve_file(owner, weights, download=download, progress=progress, cancel=cancel,
                            cache_dir=cache_dir, own_file_hint=own_file_hint)
        bpe = resolve_file(CLIP_VOCABULARY, vocabulary, download=download, progress=progress, cancel=cancel,
                           cache_dir=cache_dir, own_file_hint=vocabulary_hint, checkpoint=False)
        state = load_state_dict(path)
        if _sam_family_keys(state):
            raise WeightsError(f"{path.name} is a SAM-family (point/box) checkpoint, not an EfficientSAM3 concept "
                               "model; text prompts need an EfficientSAM3 checkpoint (e.g. efficientsam3_efficientvit)")
        try:
            config = infer_es3_config(state)
        except Es3CheckpointError as exc:
            raise WeightsError(f"{path.name} cannot be loaded as an EfficientSAM3 concept model: {exc}") from exc
        try:
            tokenizer = ClipTokenizer(bpe, context_length=config.text.context_length)
        except (OSError, EOFError, ValueError, UnicodeDecodeError) as exc:  # unreadable, not gzip, not merges
            raise WeightsError(f"cannot read the CLIP vocabulary {bpe}: {exc}") from exc
        try:
            network = build_es3_model(config, state, tokenizer)
        except Es3CheckpointError as exc:
            raise WeightsError(f"{path.name} cannot be loaded as an EfficientSAM3 concept model: {exc}") from exc
        label = spec.name if spec else Path(path).stem
        return cls(network, name=label, signature=f"{label}:{file_signature(path)}", device=resolve_device(device))

    @property
    def resolution(self) -> int:
        return int(self.network.config.resolution)

    # ------------------------------------------------------------------ encoders
    def encode(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 image -> the kept feature levels, flattened and concatenated (float32, on the CPU)."""
        import torch

        with torch.inference_mode():
            x = self.network.preprocess(np.asarray(rgb, np.uint8))
            with _heavy_threads(self):
                out = self.network.encode_image(x)
            return torch.cat([level[0].reshape(-1) for level in out.fpn]).float().cpu().numpy()

    def features(self, packed: np.ndarray) -> Any:
        """The :class:`~napari_medsam.models.networks.es3.vision.VisionOutput` of an :meth:`encode` result."""
        import torch

        from ..models.networks.es3.vision import VisionOutput

        flat = torch.as_tensor(np.asarray(packed, np.float32).reshape(-1), device=self.device)
        sizes = [int(np.prod(s)) for s in self.level_shapes]
        if flat.numel() != sum(sizes):
            raise ValueError(f"packed features of {flat.numel()} values do not fit this model ({sum(sizes)})")
        fpn = [chunk.view(1, *shape) for chunk, shape in zip(torch.split(flat, sizes), self.level_shapes)]
        code = self.network.backbone.vision_backbone.position_encoding
        pos = [code.grid(s[1], s[2], self.device)[None] for s in self.level_shapes]
        return VisionOutput(fpn=fpn, pos=pos)

    def text(self, phrase: str) -> Any:
        """The text features of ``phrase`` (computed once, then kept while among the last 32 used)."""
        import torch

        with self._lock:
            cached = self._texts.get(phrase)
            if cached is not None:
                self._texts.move_to_end(phrase)
                return cached
        if self.network.tokenizer is None:
            raise ConceptError("the concept model has no tokenizer: load it with its CLIP vocabulary")
        with torch.inference_mode():
            out = self.network.encode_text([phrase])
        with self._lock:
            self._texts[phrase] = out
            while len(self._texts) > _TEXT_CACHE:
                self._texts.popitem(last=False)
        return out

    # ------------------------------------------------------------------ detector
    def detect(self, embedding: np.ndarray, phrase: str | None, boxes: np.ndarray | None, box_labels: np.ndarray | None,
               out_hw: tuple[int, int], threshold: float = DEFAULT_THRESHOLD) -> Detected:
        """Detections on one encoded image: ``boxes`` (N, 4) normalised cx, cy, w, h; masks at ``out_hw``."""
        import torch

        features = self.features(embedding)
        text = self.text(phrase if phrase else _BOX_ONLY_PHRASE)
        with torch.inference_mode():
            box_t = label_t = None
            if boxes is not None and len(boxes):
                box_t = torch.as_tensor(np.asarray(boxes, np.float32).reshape(1, -1, 4), device=self.device)
                flags = np.ones(len(boxes), bool) if box_labels is None else np.asarray(box_labels, bool)
                label_t = torch.as_tensor(flags.reshape(1, -1), device=self.device)
            with _heavy_threads(self):
                # masks only for the queries postprocess keeps (none found: the pixel decoder is skipped)
                outputs = self.network.ground(features, text, box_t, label_t, mask_threshold=float(threshold))
            found = self.network.postprocess(outputs, out_hw, float(threshold))
        return Detected(found.scores.float().cpu().numpy(), found.boxes.float().cpu().numpy(),
                        found.masks.cpu().numpy(), found.indices.cpu().numpy())


def _heavy_threads(model: ConceptModel):
    """The contention-aware thread count of ``model``'s CPU calls (models/device.py), else nothing."""
    from ..models.device import heavy_work_threads

    return heavy_work_threads(model._threads) if model.device.type == "cpu" else _null()


def _null():
    import contextlib

    return contextlib.nullcontext()


# --- the slice side --------------------------------------------------------------------------------


class ConceptSegmenter:
    """Concept prompts on one scan, one model and one plane (``axis``), with cached image features."""

    def __init__(self, model: ConceptModel, volume: Volume | np.ndarray, *, mapping: IntensityMapping | None = None,
                 axis: int = 0, spacing_mm: tuple[float, float, float] | None = None,
                 cache: EmbeddingCache | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 signature: str | None = None, modality: str | None = None,
                 threshold: float = DEFAULT_THRESHOLD) -> None:
        self.model = model
        self.threshold = float(threshold)
        # The SAM path's slice side: intensity mapping, square pixels, cache keys, the volume signature.
        self.slices = SlicePredictor(model, volume, mapping=mapping, axis=axis,  # type: ignore[arg-type]
                                     spacing_mm=spacing_mm,
                                     cache=cache or EmbeddingCache(MemoryCache(max_bytes=cache_bytes)),
                                     signature=signature, modality=modality)
        self.axis = self.slices.axis
        self.spacing_mm = self.slices.spacing_mm
        self.intensity_unit = self.slices.intensity_unit

    # the few SlicePredictor facts a UI or propagation asks for
    @property
    def n_slices(self) -> int:
        return self.slices.n_slices

    @property
    def slice_shape(self) -> tuple[int, int]:
        return self.slices.slice_shape

    @property
    def mapping(self) -> IntensityMapping:
        return self.slices.mapping

    @property
    def cache(self) -> EmbeddingCache:
        return self.slices.cache

    def set_mapping(self, mapping: IntensityMapping) -> None:
        """Use another intensity mapping (features made with the old one stay cached under it)."""
        self.slices.set_mapping(mapping)

    def image(self, index: int) -> np.ndarray:
        """The raw slice (the masks' grid)."""
        return self.slices.image(index)

    def is_embedded(self, index: int) -> bool:
        """Whether slice ``index``'s image features are cached."""
        return self.slices.is_embedded(index)

    def embed(self, index: int) -> np.ndarray:
        """Slice ``index``'s packed image features, from the cache or the encoder (a precompute step)."""
        return self.slices.embed(index)

    # ------------------------------------------------------------------ one slice
    def find(self, index: int, phrase: str | None, boxes: Sequence[Sequence[float]] | np.ndarray | None = None, *,
             box_labels: Sequence[bool] | None = None, threshold: float | None = None) -> Candidates:
        """Every instance of ``phrase`` on slice ``index`` scoring above ``threshold`` (default: the segmenter's).

        ``boxes``: exemplar boxes (x0, y0, x1, y1 in slice pixels), positive unless ``box_labels`` says False;
        with boxes the phrase may be None (the official box-only prompt).
        """
        text = _clean_phrase(phrase, allow_empty=boxes is not None and len(boxes) > 0)
        rows, cols = self.slice_shape
        normalised = None if boxes is None or not len(boxes) else _normalise_boxes(boxes, rows, cols)
        labels = None if box_labels is None else np.asarray(box_labels, bool).reshape(-1)
        if labels is not None and (normalised is None or len(labels) != len(normalised)):
            raise ConceptError(f"{len(labels)} box labels for {0 if normalised is None else len(normalised)} boxes")
        limit = self.threshold if threshold is None else float(threshold)
        found = self.model.detect(self.embed(index), text, normalised, labels, (rows, cols), limit)
        order = np.argsort(-np.asarray(found.scores), kind="stable")
        return Candidates(int(index), text or "", np.asarray(found.masks, bool)[order],
                          np.asarray(found.scores, np.float64)[order], np.asarray(found.boxes, np.float64)[order],
                          limit, self.axis, np.asarray(found.queries, np.int64)[order])

    # ------------------------------------------------------------------ through slices
    def find_in_slices(self, slices: Iterable[int], phrase: str | None, *,
                       seed: tuple[int, np.ndarray] | None = None,
                       boxes: Mapping[int, Sequence[Sequence[float]]] | None = None,
                       threshold: float | None = None, min_overlap: float = 0.5, metric: str = "dice",
                       max_misses: int = 1, progress: ProgressCallback | None = None,
                       cancel: Callable[[], bool] | threading.Event | None = None) -> "ConceptTrack":
        """Follow one instance of ``phrase`` through ``slices`` (see the module docstring).

        ``seed``: (slice index, accepted mask) the walk starts from; without it every slice of the range is
        searched first and the best-scoring candidate seeds the walk. ``boxes``: exemplar boxes per slice.
        ``progress(done, total, message)`` after each slice; ``cancel`` (callable or Event) stops after the
        current slice, keeping what was found.
        """
        from .propagation.run import as_cancel_check
        from .propagation.stop_rules import dice, iou

        if metric not in ("dice", "iou"):
            raise ConceptError(f"metric must be 'dice' or 'iou', not {metric!r}")
        if max_misses < 0:
            raise ConceptError("max_misses must be 0 or more")
        overlap_of = dice if metric == "dice" else iou
        text = _clean_phrase(phrase, allow_empty=bool(boxes))
        order = sorted({int(i) for i in slices} | ({int(seed[0])} if seed is not None else set()))
        if not order:
            raise ConceptError("no slices to search")
        for i in (order[0], order[-1]):
            if not 0 <= i < self.n_slices:
                raise ConceptError(f"slice {i} is outside 0..{self.n_slices - 1} along axis {self.axis}")
        stopped = as_cancel_check(cancel)
        track = ConceptTrack(text, self.axis, order, threshold=self.threshold if threshold is None else threshold,
                             metric=metric)
        per_slice = dict(boxes or {})

        def search(i: int) -> Candidates:
            if i not in track.candidates:
                track.candidates[i] = self.find(i, text, per_slice.get(i), threshold=threshold)
                if progress is not None:
                    progress(len(track.candidates), len(order), f"'{text}': slice {i}")
            return track.candidates[i]

        if seed is None:
            for i in order:
                if stopped():
                    track.cancelled = True
                    return track
                search(i)
            scored = [(c.scores[0], i) for i, c in track.candidates.items() if len(c)]
            if not scored:
                track.stop_reasons["search"] = (f"nothing scored above {track.threshold:g} on slices "
                                                f"{order[0]}-{order[-1]}")
                return track
            _, first = max(scored)
            track.set_seed(first, track.candidates[first].masks[0], track.candidates[first].scores[0], 0)
        else:
            mask = np.asarray(seed[1], bool)
            if mask.shape != self.slice_shape:
                raise ConceptError(f"the seed mask has shape {mask.shape}, the slices {self.slice_shape}")
            track.set_seed(int(seed[0]), mask, None, None)
        for name, step in (("down", -1), ("up", 1)):
            self._walk(track, name, step, search, overlap_of, min_overlap, max_misses, stopped)
        return track

    def _walk(self, track: "ConceptTrack", name: str, step: int, search, overlap_of, min_overlap: float,
              max_misses: int, stopped) -> None:
        pos = track.order.index(track.seed)
        previous, previous_index, misses = track.masks[track.seed], track.seed, 0
        while True:
            pos += step
            if not 0 <= pos < len(track.order):
                track.stop_reasons[name] = "reached the end of the slice range"
                return
            if stopped():
                track.cancelled = True
                track.stop_reasons[name] = "cancelled"
                return
            index = track.order[pos]
            found = search(index)
            overlaps = [overlap_of(previous, m) for m in found.masks]
            best = int(np.argmax(overlaps)) if overlaps else -1
            if best >= 0 and overlaps[best] >= min_overlap:
                track.accept(name, index, found, best, overlaps[best])
                previous, previous_index, misses = found.masks[best], index, 0
                continue
            misses += 1
            why = (f"nothing scored above {track.threshold:g}" if best < 0 else
                   f"no candidate overlaps slice {previous_index} ({track.metric} {overlaps[best]:.2f} "
                   f"< {min_overlap:g})")
            track.miss(name, index, why, None if best < 0 else found.scores[best],
                       None if best < 0 else overlaps[best], final=misses > max_misses)
            if misses > max_misses:
                track.stop_reasons[name] = f"slice {index}: {why}"
                return


@dataclass
class _Visit:
    front: str
    index: int
    status: str  # "accepted", "skipped: ...", "stopped: ..."
    candidate: int | None = None
    score: float | None = None
    overlap: float | None = None


@dataclass
class ConceptTrack:
    """One instance of a phrase followed through slices (:meth:`ConceptSegmenter.find_in_slices`)."""

    phrase: str
    axis: int
    order: list[int]  # the slices of the range, sorted
    threshold: float = DEFAULT_THRESHOLD
    metric: str = "dice"
    candidates: dict[int, Candidates] = field(default_factory=dict)  # every slice searched
    chosen: dict[int, int] = field(default_factory=dict)  # slice -> index of the kept candidate
    masks: dict[int, np.ndarray] = field(default_factory=dict)  # slice -> accepted mask (seed included)
    stop_reasons: dict[str, str] = field(default_factory=dict)  # "down" / "up" (/ "search") -> why it ended
    cancelled: bool = False
    seed: int | None = None
    seed_score: float | None = None
    visits: list[_Visit] = field(default_factory=list)

    def set_seed(self, index: int, mask: np.ndarray, score: float | None, candidate: int | None) -> None:
        self.seed, self.seed_score = int(index), None if score is None else float(score)
        self.masks[self.seed] = np.asarray(mask, bool)
        if candidate is not None:
            self.chosen[self.seed] = candidate

    def accept(self, front: str, index: int, found: Candidates, k: int, overlap: float) -> None:
        self.chosen[index], self.masks[index] = k, found.masks[k]
        self.visits.append(_Visit(front, index, "accepted", k, float(found.scores[k]), float(overlap)))

    def miss(self, front: str, index: int, why: str, score, overlap, final: bool) -> None:
        status = f"{'stopped' if final else 'skipped'}: {why}"
        self.visits.append(_Visit(front, index, status, None, None if score is None else float(score),
                                  None if overlap is None else float(overlap)))

    @property
    def found(self) -> bool:
        """Whether the track holds any mask."""
        return self.seed is not None

    @property
    def slices(self) -> list[int]:
        """The slices with an accepted mask, sorted."""
        return sorted(self.masks)

    def to_volume(self, shape: tuple[int, int, int]) -> np.ndarray:
        """The accepted masks as one boolean volume of ``shape`` (other slices empty)."""
        from .propagation.run import slice_index

        volume = np.zeros(shape, bool)
        for index, mask in self.masks.items():
            volume[slice_index(self.axis, index)] = mask
        return volume

    def write(self, labels: np.ndarray, value: int, *, locked: np.ndarray | None = None, overwrite: bool = True,
              spacing_mm: tuple[float, float, float] | None = None, fill_skipped: bool = True) -> Any:
        """Write the track into ``labels`` as object ``value`` with propagation's run: the write rule (locked
        voxels kept; with ``overwrite=False`` other objects' voxels too), the per-slice report, the undo record
        and the interpolation of skipped slices between accepted ones. Returns a ``PropagationResult``."""
        from .propagation.run import PropagationRun
        from .propagation.stop_rules import STATUS_PROPAGATED, StopRule
        from .prompting import PromptSettings

        run = PropagationRun(_AxisOnly(self.axis, spacing_mm), labels, int(value), stop=StopRule(use_image=False),
                             prompt=PromptSettings(), locked=locked, overwrite=overwrite, cancel=None, progress=None,
                             prefetch=False, spacing_mm=spacing_mm)
        if self.seed is not None:
            run.add_key(self.seed, self.masks[self.seed], self.seed_score)
        for visit in self.visits:
            if visit.status == "accepted":
                mask = self.masks[visit.index]
                written = run.write(visit.index, mask)
                run.state[visit.index] = "accepted"
                run.report(visit.index, STATUS_PROPAGATED, visit.front, mask, visit.score, visit.overlap, written)
            else:
                run.state[visit.index] = "skipped" if visit.status.startswith("skipped") else "stopped"
                run.report(visit.index, visit.status, visit.front, None, visit.score, visit.overlap, False)
        if fill_skipped:
            run.fill_skipped()
        run.extra_reasons.update(self.stop_reasons)
        run.cancelled = self.cancelled
        result = run.result()
        run.prefetcher.close()
        return result


@dataclass
class _AxisOnly:
    """What a PropagationRun reads from its predictor when it only writes (no prediction, no image)."""

    axis: int
    spacing_mm: tuple[float, float, float] | None = None


# --- helpers ---------------------------------------------------------------------------------------


def _clean_phrase(phrase: str | None, allow_empty: bool) -> str | None:
    text = " ".join(str(phrase).split()) if phrase is not None else ""
    if not text:
        if allow_empty:
            return None
        raise ConceptError("the phrase is empty: say what to find (e.g. \"liver\"), or give exemplar boxes")
    return text


def _normalise_boxes(boxes: Sequence[Sequence[float]] | np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(N, 4) x0, y0, x1, y1 slice pixels -> (N, 4) normalised cx, cy, w, h (corners in any order)."""
    try:
        b = np.asarray(boxes, np.float64).reshape(-1, 4)
    except ValueError:
        raise ConceptError(f"boxes must be (x0, y0, x1, y1) quadruples, got {np.shape(boxes)}") from None
    x0, x1 = np.minimum(b[:, 0], b[:, 2]), np.maximum(b[:, 0], b[:, 2])
    y0, y1 = np.minimum(b[:, 1], b[:, 3]), np.maximum(b[:, 1], b[:, 3])
    if not np.all(np.isfinite(b)) or np.any(x0 < 0) or np.any(y0 < 0) or np.any(x1 > cols) or np.any(y1 > rows):
        raise ConceptError(f"exemplar boxes {b.tolist()} do not lie inside the {cols} x {rows} slice (x, y)")
    if np.any(x1 - x0 <= 0) or np.any(y1 - y0 <= 0):
        raise ConceptError(f"exemplar boxes {b.tolist()} have no area")
    return np.stack([(x0 + x1) / 2 / cols, (y0 + y1) / 2 / rows, (x1 - x0) / cols, (y1 - y0) / rows], 1)
