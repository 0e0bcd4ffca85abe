"""What a slice's new mask looks like next to the object it should continue: image and shape evidence.

The stop rule's first checks (score, overlap, area ratio) compare masks only, and a model
prompted past an organ's end answers with another structure of similar size in the same box
(a vessel, a bowel loop, the next vertebra's disc, the neighbouring organ) with a confident
score. A reader tells the two apart by looking: does the new region have the object's
intensities, does it lie where the object was, or does it reach far beyond it? This module
measures that.

* :class:`Appearance`: the intensities a mask has on its slice, as a histogram whose bins are
  2 % of the slice's 1st-99th percentile range wide (about 30 HU on a CT; it scales with an
  MR's arbitrary units). A bin is the object's when it and its two neighbours hold at least 2 %
  of the pixels, plus one bin of slack on each side. A mixture stays a mixture: a kidney's
  cortex and medulla, a vertebra's cortex and marrow are both the object's, whatever their
  proportions on the next slice, while a disc between two vertebrae is not. Masks are eroded
  by a pixel first, so partial-volume edges count less.
* Two references: the *key slices* (trusted: the user prompted and saw them) and the
  *previous accepted slice*. A key that leaked into a neighbour makes the neighbour's
  intensities the object's; the previous slice, which the front accepted, usually has not
  leaked, so a different tissue still shows against it.
* :func:`measure`: for a new mask and the mask that prompted it, the fraction of the new mask
  inside each band, its mean, how much of the previous mask it keeps, how much of it lies
  farther than ``outside_mm`` from the previous mask, how far its centroid moved relative to
  the previous mask's radius, and how much of the previous mask it leaves out although that
  part still looks like the object (a vessel that divided and was followed into one branch).

Predictors offer the image through an optional ``image(index)`` method (the raw intensities
of slice ``index``, the masks' grid) and an optional ``intensity_unit`` ("HU" for CT) used in
the report; without ``image`` only the shape evidence is used. A predictor with a network may
also offer ``pooled_embedding(index, mask)`` (the image embedding averaged over the mask):
:func:`cosine` of the new mask's to the key slices' is :attr:`Evidence.similarity`, reported,
and a rejection criterion only when ``StopRule.min_embedding_similarity`` is set (no default:
with no real weights on our machines it could not be calibrated).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

_SAMPLE = 50_000  # pixels kept (evenly spaced) per appearance
BIN = 0.02  # histogram bin width: this fraction of the slice's 1st-99th percentile range
MIN_SHARE = 0.02  # a bin (with its two neighbours) holding this share of the pixels is the object's


def _core(mask: np.ndarray) -> np.ndarray:
    """The mask eroded by one pixel when that leaves at least half of it, else the mask."""
    eroded = ndimage.binary_erosion(mask)
    return eroded if np.count_nonzero(eroded) * 2 >= np.count_nonzero(mask) else mask


@dataclass(frozen=True)
class Appearance:
    """The intensities an object has (see the module docstring)."""

    start: float  # left edge of bin 0
    width: float  # bin width
    supported: np.ndarray  # bool per bin: intensities of the object
    mean: float
    unit: str = ""

    @classmethod
    def of(cls, images: list[np.ndarray], masks: list[np.ndarray], unit: str = "",
           width: float | None = None) -> Appearance | None:
        """The appearance of ``masks`` on ``images``; None when no mask has pixels.

        ``width`` reuses another appearance's bin width (same scan: the slices' percentile
        range need not be computed again).
        """
        values, ranges = [], []
        for image, mask in zip(images, masks):
            mask = np.asarray(mask, bool)
            if not mask.any():
                continue
            image = np.asarray(image, np.float32)
            values.append(image[_core(mask)])
            if width is None:
                lo, hi = np.percentile(image, (1, 99))
                ranges.append(float(hi - lo))
        if not values:
            return None
        pixels = np.concatenate(values)
        if pixels.size > _SAMPLE:
            pixels = pixels[:: pixels.size // _SAMPLE]
        width = max(BIN * max(ranges), 1e-6) if width is None else width
        start = float(pixels.min()) - width
        counts = np.bincount(((pixels - start) // width).astype(np.int64))
        counts = np.concatenate([counts, [0]])
        # A bin counts with its neighbours, so noise between two populated bins is not foreign.
        near = np.convolve(counts, np.ones(3), mode="same")
        supported = near >= max(MIN_SHARE * pixels.size, 3)
        supported = np.convolve(supported, np.ones(3), mode="same") > 0  # one bin of slack each side
        return cls(start, width, supported, float(pixels.mean()), unit)

    def inside(self, pixels: np.ndarray) -> float:
        """Fraction of ``pixels`` with an intensity the object has (1.0 for no pixels)."""
        return float(self.looks(pixels).mean()) if np.size(pixels) else 1.0

    def looks(self, image: np.ndarray) -> np.ndarray:
        """Which pixels of ``image`` (any shape) have an intensity the object has."""
        bins = np.floor((np.asarray(image, np.float64) - self.start) / self.width).astype(np.int64)
        valid = (bins >= 0) & (bins < self.supported.size)
        out = np.zeros(np.shape(image), bool)
        out[valid] = self.supported[bins[valid]]
        return out


@dataclass(frozen=True)
class Evidence:
    """How a new mask relates to the previous accepted mask and to the key slices' appearance."""

    kept: float  # fraction of the previous mask that the new mask covers
    outside: float  # fraction of the new mask farther than ``outside_mm`` from the previous mask
    shift: float  # centroid shift / equivalent radius of the previous mask
    match: float | None = None  # fraction of the new mask inside the appearance band (None: no image)
    core_match: float | None = None  # the part on the previous mask: the lower of its key and previous matches
    mean: float | None = None  # mean intensity of the new mask
    reference: float | None = None  # mean intensity of the object on its key slices
    lost: float | None = None  # fraction of the previous mask left out although it still looks like the object
    gap: int = 1  # slices between the previous mask and this one
    previous_match: float | None = None  # fraction of the new mask inside the previous slice's band
    previous_mean: float | None = None  # mean intensity of the previous mask on its slice
    merged: float | None = None  # fraction of the new mask on a look-alike piece beside the previous mask
    similarity: float | None = None  # cosine similarity of mask-pooled image embeddings to the key slices'
    footprint: float | None = None  # fraction of the previous mask's place that still looks like the object
    steady_area: float | None = None  # the front's area over its last slices when it hardly changed (a tube)


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


def measure(mask: np.ndarray, previous: np.ndarray, *, pixel_mm: tuple[float, float] = (1.0, 1.0),
            outside_mm: float = 5.0, image: np.ndarray | None = None,
            appearance: Appearance | None = None, gap: int = 1,
            previous_image: np.ndarray | None = None) -> Evidence:
    """The :class:`Evidence` of ``mask`` (the new slice) against ``previous`` (the mask that prompted it).

    ``gap`` is the number of slices between the two (more than 1 after missed slices; the stop
    rule allows the centre to move further over several slices). ``previous_image`` (the
    previous mask's slice) gives :attr:`Evidence.previous_match` and the checks that compare
    the two slices. Everything is computed in a window around the two masks (wide enough for
    ``outside_mm``), so the cost follows the object's size, not the slice's.
    """
    gap = max(int(gap), 1)
    mask, previous = np.asarray(mask, bool), np.asarray(previous, bool)
    area, prev_area = int(np.count_nonzero(mask)), int(np.count_nonzero(previous))
    if not area or not prev_area:
        return Evidence(0.0, 1.0 if area else 0.0, 0.0, gap=gap)
    window = _window(mask | previous, int(np.ceil(outside_mm / max(min(pixel_mm), 1e-6))) + 4)
    mask, previous = mask[window], previous[window]
    overlap = mask & previous
    kept = np.count_nonzero(overlap) / prev_area
    # Distance in mm from the previous mask (anisotropic pixels allowed); the window holds all of it.
    distance = ndimage.distance_transform_edt(~previous, sampling=pixel_mm)
    outside = np.count_nonzero(mask & (distance > outside_mm)) / area
    scale = np.asarray(pixel_mm, float)
    radius_mm = np.sqrt(prev_area * scale.prod() / np.pi)
    shift = float(np.linalg.norm((_centroid(mask) - _centroid(previous)) * scale)) / max(radius_mm, 1e-6)
    match = core_match = mean = reference = lost = previous_match = previous_mean = merged = footprint = None
    if image is not None and appearance is not None:
        reference = appearance.mean
        image = np.asarray(image[window], np.float32)
        pixels = image[_core(mask)]
        match, mean = appearance.inside(pixels), float(pixels.mean())
        core_match = appearance.inside(image[overlap]) if overlap.any() else 0.0
        # Pieces of the previous mask that look like the object and like the new mask, but lie
        # beside the new mask, not under it: a vessel that divided and was followed into one
        # branch, an organ whose other part was dropped. Looking like the new mask too keeps a
        # key slice that leaked into a neighbour (the neighbour is in the key's intensities)
        # from counting its leak as a lost part.
        found = Appearance.of([image], [mask], width=appearance.width)
        place = _core(previous)  # where the object was, its partial-volume edge left out
        looks = place & appearance.looks(image)
        if found is not None:
            looks &= found.looks(image)
        pieces, n = ndimage.label(looks)
        under = np.unique(pieces[mask & looks])
        apart = np.isin(pieces, under[under > 0], invert=True) & looks
        lost = np.count_nonzero(apart) / prev_area
        if previous_image is not None:
            previous_image = np.asarray(previous_image[window], np.float32)
            merged = _merged(mask, previous, previous_image, appearance, found)
            before = Appearance.of([previous_image], [previous], width=appearance.width)
            if before is not None:
                previous_match, previous_mean = before.inside(pixels), before.mean
                # Is the object still where it was? (A model that dropped it answers elsewhere.)
                footprint = float(np.count_nonzero(place & appearance.looks(image) & before.looks(image))
                                  / max(int(np.count_nonzero(place)), 1))
                if overlap.any():  # where it overlaps the previous mask it must look like it too
                    core_match = min(core_match, before.inside(image[overlap]))
    return Evidence(float(kept), float(outside), shift, match, core_match, mean, reference,
                    None if lost is None else float(lost), gap, previous_match, previous_mean, merged,
                    footprint=footprint)


def _window(region: np.ndarray, pad: int) -> tuple[slice, slice]:
    """The bounding box of ``region`` grown by ``pad`` pixels, inside the array."""
    rows, cols = np.flatnonzero(region.any(axis=1)), np.flatnonzero(region.any(axis=0))
    return (slice(max(int(rows[0]) - pad, 0), min(int(rows[-1]) + pad + 1, region.shape[0])),
            slice(max(int(cols[0]) - pad, 0), min(int(cols[-1]) + pad + 1, region.shape[1])))


def _merged(mask: np.ndarray, previous: np.ndarray, previous_image: np.ndarray, appearance: Appearance,
            found: Appearance | None) -> float:
    """Fraction of ``mask`` lying where, on the previous slice, a separate look-alike piece was.

    On the previous slice, pixels that look like the object (and like the new mask) form
    pieces; the pieces under the previous mask are the object, any other is another structure
    of the same look beside it (the other iliac artery beside the one followed). A new mask
    that takes in such a piece has run into the structure the object joins (the aorta above
    the two iliac arteries), not grown.
    """
    looks = appearance.looks(previous_image)
    if found is not None:
        looks &= found.looks(previous_image)
    pieces, n = ndimage.label(looks)
    if n == 0:
        return 0.0
    own = np.unique(pieces[previous & looks])
    other = np.isin(pieces, own[own > 0], invert=True) & looks
    return float(np.count_nonzero(mask & other)) / max(int(np.count_nonzero(mask)), 1)


def cosine(a: np.ndarray | None, b: np.ndarray | None) -> float | None:
    """Cosine similarity of two vectors (None when either is missing or zero)."""
    if a is None or b is None:
        return None
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 or nb == 0:
        return None
    return float(np.dot(a, b) / (na * nb))
