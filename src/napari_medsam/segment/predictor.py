"""Slice predictor: embed a slice of a volume (cached) and turn prompts into masks.

Coordinates are the slice's own pixels, ``(row, column)``, where the slice is the 2D array
``np.take(volume, index, axis)``: for ``axis=0`` (axial in display order) rows and columns are
the volume's rows and columns; for ``axis=1`` the slice's rows are the volume's slices, etc.

When the slice's pixels are not square (a coronal or sagittal slice of a CT with 2.5 mm
slices and 0.8 mm pixels), the image given to the model is first resampled to square pixels,
so the model sees anatomy in its true proportions; prompts are mapped in and masks come back
on the slice's own grid.

The intensity mapping is the user's (window, percentiles, ...); a model trained on its own CT
windowing (MedSAM2) is fed that mapping's variant instead (:func:`intensity.pipeline_mapping`),
and the embedding cache keys carry the variant's signature.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..volume import Volume
from .cache import EmbeddingCache
from .cache.keys import EmbeddingKey, volume_signature
from .cache.memory import MemoryCache
from .intensity import IntensityMapping, default_mapping, pipeline_mapping
from .model import Decoded, ImageGeometry, SamModel

# In-plane pixel aspect ratios closer to 1 than this are treated as square.
ASPECT_TOLERANCE = 0.01


@dataclass
class Prompts:
    """Prompts on one slice, in that slice's pixel coordinates (row, column)."""

    points: np.ndarray | None = None  # (N, 2) row, column
    positive: np.ndarray | None = None  # (N,) bool: True = include, False = exclude
    box: np.ndarray | None = None  # (4,) row_min, col_min, row_max, col_max
    mask_logits: np.ndarray | None = None  # (L, L) low-res logits of an earlier prediction (L = 256; 128 MedSAM2)

    def __post_init__(self) -> None:
        if self.points is not None:
            self.points = np.asarray(self.points, dtype=np.float64).reshape(-1, 2)
            if self.positive is None:
                self.positive = np.ones(len(self.points), bool)
            self.positive = np.asarray(self.positive, dtype=bool).reshape(-1)
            if len(self.positive) != len(self.points):
                raise ValueError(f"{len(self.points)} points but {len(self.positive)} positive/negative flags")
            if len(self.points) == 0:
                self.points = self.positive = None
        if self.box is not None:
            box = np.asarray(self.box, dtype=np.float64).reshape(4)
            # Corners may come in any order (a box dragged up-left).
            self.box = np.array([min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3])])
        if self.mask_logits is not None:
            logits = np.asarray(self.mask_logits, dtype=np.float32)
            side = int(round(np.sqrt(logits.size)))
            if side * side != logits.size:
                raise ValueError(f"mask logits must be a square low-res array, got shape {logits.shape}")
            self.mask_logits = logits.reshape(side, side)

    @property
    def empty(self) -> bool:
        """True when there is nothing to prompt with."""
        return self.points is None and self.box is None and self.mask_logits is None


@dataclass
class SliceMasks:
    """Masks for one slice, best first, with the model's predicted IoU."""

    masks: np.ndarray  # (K, H, W) bool on the slice grid
    scores: np.ndarray  # (K,)
    low_res_logits: np.ndarray  # (K, L, L): feed one back as Prompts.mask_logits
    index: int = 0
    axis: int = 0
    logits: np.ndarray | None = field(default=None, repr=False)

    @property
    def best(self) -> np.ndarray:
        """The highest-scoring mask (H, W)."""
        return self.masks[0]


class SlicePredictorProtocol(Protocol):
    """What propagation and the UI need from a predictor (see docs/api.md)."""

    def embed(self, index: int) -> np.ndarray: ...

    def predict(self, index: int, prompts: Prompts, multimask: bool = False) -> SliceMasks: ...


class SlicePredictor:
    """Cached per-slice embeddings and prompt-to-mask prediction for one volume and one model."""

    def __init__(
        self,
        model: SamModel,
        volume: Volume | np.ndarray,
        *,
        mapping: IntensityMapping | None = None,
        axis: int = 0,
        spacing_mm: tuple[float, float, float] | None = None,
        cache: EmbeddingCache | None = None,
        signature: str | None = None,
        modality: str | None = None,
    ) -> None:
        if isinstance(volume, Volume):
            array, spacing, modality = volume.array, volume.spacing_mm, modality or volume.modality
            unit = volume.intensity_unit or ("HU" if modality == "CT" else "")
        else:
            array, spacing = np.asarray(volume), spacing_mm or (1.0, 1.0, 1.0)
            modality = modality or "OT"
            unit = "HU" if modality.upper() == "CT" else ""
        if array.ndim != 3:
            raise ValueError(f"expected a 3D volume, got shape {array.shape}")
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
        self.model = model
        self.array = array
        self.spacing_mm = tuple(float(s) for s in (spacing_mm or spacing))
        self.axis = axis
        self.intensity_unit = unit  # for propagation's report ("mean 212 vs 65 HU")
        self.modality = modality
        self.mapping = mapping or default_mapping(array, modality)
        self._data_range: tuple[float, float] | None = None  # the volume's (min, max), computed when needed
        self.cache = cache or EmbeddingCache(MemoryCache(max_bytes=1 << 30))
        self._volume_signature = signature
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ properties
    @property
    def n_slices(self) -> int:
        """Number of slices along the predictor's axis."""
        return int(self.array.shape[self.axis])

    @property
    def slice_shape(self) -> tuple[int, int]:
        """(rows, columns) of one slice."""
        return tuple(s for a, s in enumerate(self.array.shape) if a != self.axis)  # type: ignore[return-value]

    @property
    def volume_signature(self) -> str:
        """Content signature of the volume (computed once, on first use)."""
        with self._lock:
            if self._volume_signature is None:
                self._volume_signature = volume_signature(self.array, self.spacing_mm)
            return self._volume_signature

    def set_mapping(self, mapping: IntensityMapping) -> None:
        """Use another intensity mapping; embeddings made with the old one stay cached under it."""
        self.mapping = mapping

    def model_mapping(self, model: SamModel | None = None, mapping: IntensityMapping | None = None) -> IntensityMapping:
        """The mapping ``model`` is fed under the user's ``mapping`` (MedSAM2 on CT: its own windowing)."""
        model = self.model if model is None else model
        mapping = self.mapping if mapping is None else mapping
        if getattr(model, "pipeline", "") != "medsam2" or self.modality.upper() != "CT":
            return mapping
        if self._data_range is None:
            self._data_range = (float(np.min(self.array)), float(np.max(self.array)))
        return pipeline_mapping(mapping, "medsam2", self.modality, self._data_range)

    def key(self, index: int, model: SamModel | None = None, mapping: IntensityMapping | None = None) -> EmbeddingKey:
        """The cache key of slice ``index`` under ``model`` and ``mapping`` (default: the current ones)."""
        model = self.model if model is None else model
        mapping = self.model_mapping(model, mapping)
        return EmbeddingKey(self.volume_signature, model.signature, mapping.signature, self.axis,
                            self._check_index(index))

    def is_embedded(self, index: int) -> bool:
        """True when slice ``index`` has a cached embedding (memory or disk)."""
        return self.key(index) in self.cache

    # ------------------------------------------------------------------ images
    def slice_image(self, index: int) -> np.ndarray:
        """The raw 2D slice (a view of the volume's voxels)."""
        return np.take(self.array, self._check_index(index), axis=self.axis)

    def image(self, index: int) -> np.ndarray:
        """The slice's intensities on the masks' grid: the optional protocol method propagation judges with."""
        return self.slice_image(index)

    def model_image(self, index: int, mapping: IntensityMapping | None = None) -> np.ndarray:
        """The (H', W', 3) uint8 image the model sees: mapped intensities, square pixels.

        ``mapping`` defaults to the current one as this model is fed it (:meth:`model_mapping`);
        :meth:`embed` passes the one it built its cache key from, so a mapping changed meanwhile
        cannot leak in.
        """
        rgb = (self.model_mapping() if mapping is None else mapping).to_rgb(self.slice_image(index))
        size = self._model_image_size()
        if size != rgb.shape[:2]:
            import cv2

            rgb = cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        return rgb

    def _model_image_size(self) -> tuple[int, int]:
        rows, cols = self.slice_shape
        spacing = [s for a, s in enumerate(self.spacing_mm) if a != self.axis]
        aspect = spacing[0] / spacing[1]
        if abs(aspect - 1.0) <= ASPECT_TOLERANCE:
            return rows, cols
        finest = min(spacing)
        return int(round(rows * spacing[0] / finest)), int(round(cols * spacing[1] / finest))

    # ------------------------------------------------------------------ model calls
    def embed(self, index: int) -> np.ndarray:
        """The (1, 256, 64, 64) embedding of slice ``index``, from the cache or the encoder."""
        # Read the model and mapping once: the key and the computation use these same values, so
        # the stored embedding belongs to its key even when another thread swaps either meanwhile.
        model, mapping = self.model, self.mapping
        key = self.key(index, model, mapping)
        fed = self.model_mapping(model, mapping)
        return self.cache.get_or_compute(key, lambda: model.encode(self.model_image(key.index, fed)))

    def prepare(self, index: int) -> bool:
        """Embed slice ``index`` and do the decoder's prompt-independent work for it (``SamModel.prepare_prompts``).

        For a slice that will get several prompts (the one the user is on): its point and box
        prompts then decode faster. False where the model has no such path.
        """
        embedding = self.embed(index)
        prepare = getattr(self.model, "prepare_prompts", None)
        return bool(prepare(self.key(index), embedding)) if callable(prepare) else False

    def pooled_embedding(self, index: int, mask: np.ndarray) -> np.ndarray | None:
        """The slice's image embedding averaged over ``mask`` (a 256-vector), or None for an empty mask.

        The optional protocol method propagation compares key slices and new masks with: each
        embedding cell is weighted by the mask pixels that land in it (slice grid -> square
        pixels -> the model's resized input, top-left in its square -> the embedding grid).
        """
        mask = np.asarray(mask, bool)
        if not mask.any():
            return None
        features = getattr(self.model, "feature_map", None)  # SAM 2 embeddings are packed levels
        raw = self.embed(index)
        embedding = np.asarray(features(raw) if callable(features) else np.asarray(raw)[0])  # (C, G, G)
        grid = embedding.shape[-1]
        rows, cols = self.slice_shape
        h, w = self.model.geometry(*self._model_image_size()).input_size
        cells = (max(1, int(round(h * grid / self.model.image_size))), max(1, int(round(w * grid / self.model.image_size))))
        row_cell = np.minimum(((np.arange(rows) + 0.5) * cells[0] / rows).astype(np.int64), grid - 1)
        col_cell = np.minimum(((np.arange(cols) + 0.5) * cells[1] / cols).astype(np.int64), grid - 1)
        rr, cc = np.nonzero(mask)
        weights = np.zeros((grid, grid), np.float64)
        np.add.at(weights, (row_cell[rr], col_cell[cc]), 1.0)
        return np.tensordot(embedding, weights, axes=([1, 2], [0, 1])) / weights.sum()

    def predict(self, index: int, prompts: Prompts, multimask: bool = False, *, exact: bool = False,
                keep_logits: bool = False) -> SliceMasks:
        """Masks for slice ``index`` from ``prompts`` (embedding computed first if needed)."""
        if prompts.empty:
            raise ValueError("no prompt: give points, a box or a previous mask")
        self._check_prompts(prompts)
        # A prepared slice (``prepare``) decodes point/box prompts without reading the embedding.
        prepared = self.model.prepared(self.key(index)) if getattr(self.model, "can_prepare", False) else None
        embedding = None if prepared is not None and prompts.mask_logits is None else self.embed(index)
        model_size = self._model_image_size()
        rows, cols = self.slice_shape
        # Slice pixel (row, col) -> model image pixel; pixel centres map to pixel centres.
        sy, sx = model_size[0] / rows, model_size[1] / cols
        geometry: ImageGeometry = self.model.geometry(*model_size)
        points_xy = labels = box = None
        if prompts.points is not None:
            points_xy = np.stack([(prompts.points[:, 1] + 0.5) * sx - 0.5, (prompts.points[:, 0] + 0.5) * sy - 0.5], 1)
            labels = prompts.positive.astype(np.int64)
        if prompts.box is not None:
            r0, c0, r1, c1 = prompts.box
            box = np.array([(c0 + 0.5) * sx - 0.5, (r0 + 0.5) * sy - 0.5, (c1 + 0.5) * sx - 0.5, (r1 + 0.5) * sy - 0.5])
        decoded: Decoded = self.model.decode(
            embedding, geometry, points_xy=points_xy, point_labels=labels, box_xyxy=box,
            mask_logits=prompts.mask_logits, multimask=multimask, out_size=(rows, cols), exact=exact,
            keep_logits=keep_logits, **({} if prepared is None else {"prepared": prepared}),
        )
        return SliceMasks(decoded.masks, decoded.scores, decoded.low_res_logits, index=index, axis=self.axis,
                          logits=decoded.logits)

    # ------------------------------------------------------------------ checks
    def _check_index(self, index: int) -> int:
        value = int(index)
        if not 0 <= value < self.n_slices:
            raise IndexError(f"slice {index} is outside 0..{self.n_slices - 1} along axis {self.axis}")
        return value

    def _check_prompts(self, prompts: Prompts) -> None:
        rows, cols = self.slice_shape
        coords = []
        if prompts.points is not None:
            coords.append(prompts.points)
        if prompts.box is not None:
            coords.append(prompts.box.reshape(2, 2))
        for c in coords:
            if np.any(c < -0.5) or np.any(c[:, 0] > rows - 0.5) or np.any(c[:, 1] > cols - 0.5):
                raise ValueError(f"prompt {c.tolist()} lies outside the {rows}x{cols} slice")
