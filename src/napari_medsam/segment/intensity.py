"""From scan intensities to the 8-bit RGB image a SAM-family model sees.

Always applied to a copy of a slice: the scan's voxels are never modified. A mapping is
fixed per volume (CT window bounds, or MR percentiles computed once over the whole volume) so
every slice of the volume is scaled the same way, and it has a ``signature`` that the
embedding cache uses: changing the window invalidates only embeddings made with the old one.

Some models were trained on a particular mapping. MedSAM2 (pipeline ``"medsam2"``) windows CT the
way its inference script ``medsam2_infer_3D_CT.py`` does: clip to the window, then stretch the
*clipped volume's own* minimum and maximum (not the window bounds) to 0..255 and truncate.
:func:`pipeline_mapping` turns the user's window into that mapping (kind ``"window-datarange"``);
the slice predictor applies it, so the user keeps choosing windows as for any other model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..windows import CT_WINDOWS

# Above this many voxels, MR percentiles come from an evenly strided sample: the result
# differs from the exact percentile by far less than one grey level, at a fraction of the time.
PERCENTILE_SAMPLE_VOXELS = 8_000_000


@dataclass(frozen=True)
class IntensityMapping:
    """Linear map of [low, high] to [0, 255] with clipping; ``kind`` says where the bounds came from."""

    kind: str
    low: float
    high: float
    name: str = ""

    def __post_init__(self) -> None:
        if not np.isfinite(self.low) or not np.isfinite(self.high):
            raise ValueError("intensity bounds must be finite numbers")
        if self.high <= self.low:
            raise ValueError(f"intensity mapping needs high > low, got [{self.low}, {self.high}]")

    @property
    def signature(self) -> str:
        """A short string identifying the mapping (part of embedding cache keys)."""
        return f"{self.kind}:{self.low:.6g}:{self.high:.6g}"

    def to_uint8(self, image: np.ndarray) -> np.ndarray:
        """Map a 2D slice (any numeric dtype) to uint8 grey levels; the input is not modified."""
        # float64 and this operation order reproduce MedSAM's pre_CT_MR.py to the grey level.
        values = np.clip(np.asarray(image, dtype=np.float64), self.low, self.high)
        scaled = (values - self.low) / (self.high - self.low) * 255.0
        # Truncation, as the official MedSAM/LiteMedSAM preprocessing does after scaling.
        return scaled.astype(np.uint8)

    def to_rgb(self, image: np.ndarray) -> np.ndarray:
        """Map a 2D slice to an (H, W, 3) uint8 RGB image (grey replicated to 3 channels)."""
        grey = self.to_uint8(image)
        return np.repeat(grey[:, :, None], 3, axis=2)


def ct_window(name: str) -> IntensityMapping:
    """A named CT window preset (soft tissue, liver, lung, mediastinum, bone, brain)."""
    key = name.lower().replace("_", " ")
    if key in ("abdomen", "soft-tissue"):
        key = "soft tissue"
    if key not in CT_WINDOWS:
        raise ValueError(f"unknown CT window {name!r}; choose one of {', '.join(CT_WINDOWS)}")
    level, width = CT_WINDOWS[key]
    return IntensityMapping("window", level - width / 2.0, level + width / 2.0, name=key)


def window_level_width(level: float, width: float) -> IntensityMapping:
    """A CT window given as level/width in HU."""
    return IntensityMapping("window", float(level) - float(width) / 2.0, float(level) + float(width) / 2.0,
                            name=f"L{level:g}/W{width:g}")


def contrast_limits(low: float, high: float) -> IntensityMapping:
    """The display's current contrast limits, as the model input mapping."""
    return IntensityMapping("limits", float(low), float(high), name="display contrast")


def percentile_mapping(volume: np.ndarray, lower: float = 0.5, upper: float = 99.5) -> IntensityMapping:
    """MR scaling: the [lower, upper] percentiles of the volume's non-zero voxels, computed once."""
    data = np.asarray(volume)
    flat = data.reshape(-1)
    if flat.size > PERCENTILE_SAMPLE_VOXELS:
        flat = flat[:: int(np.ceil(flat.size / PERCENTILE_SAMPLE_VOXELS))]
    nonzero = flat[flat != 0]
    if nonzero.size == 0:
        nonzero = flat
    low, high = (float(v) for v in np.percentile(nonzero.astype(np.float64), [lower, upper]))
    if not high > low:
        high = low + 1.0
    return IntensityMapping("percentile", low, high, name=f"{lower:g}-{upper:g} percentile")


def data_range_window(volume: np.ndarray, level: float = 40.0, width: float = 400.0) -> IntensityMapping:
    """MedSAM's own CT preprocessing: clip to the window, then scale by the clipped data's min/max.

    This differs from a fixed window when no voxel reaches a window bound; it is what the
    official MedSAM/LiteMedSAM data preparation does, for users who want its exact input.
    """
    low, high = float(level) - float(width) / 2.0, float(level) + float(width) / 2.0
    data = np.asarray(volume)
    return clipped_data_range(low, high, (float(np.min(data)), float(np.max(data))),
                              name=f"L{level:g}/W{width:g} data range")


def clipped_data_range(low: float, high: float, data_range: tuple[float, float], name: str = "") -> IntensityMapping:
    """The window [low, high] applied as MedSAM/MedSAM2 do: stretch the clipped data's min/max to 0..255.

    ``data_range`` is the (min, max) of the whole volume. After clipping, the volume's minimum is
    ``max(low, min)`` and its maximum ``min(high, max)``; mapping those to 0 and 255 with the usual
    clip-subtract-divide in float64 gives the official scripts' grey levels exactly
    (``(x - x.min()) / (x.max() - x.min()) * 255`` on the clipped volume, truncated to uint8).
    A volume entirely outside the window (nothing to stretch) maps to a constant image.
    """
    lo = max(float(low), float(data_range[0]))
    hi = min(float(high), float(data_range[1]))
    if not hi > lo:  # the official division would be 0/0: map the whole volume to 0 instead
        lo = max(lo, float(data_range[1]))
        hi = lo + 1.0
    return IntensityMapping("window-datarange", lo, hi, name=name or f"[{low:g}, {high:g}] data range")


def pipeline_mapping(mapping: IntensityMapping, pipeline: str, modality: str,
                     data_range: tuple[float, float] | None) -> IntensityMapping:
    """The mapping a model with ``pipeline`` is fed when the user chose ``mapping``.

    For ``"medsam2"`` on CT a window (or display contrast limits) becomes MedSAM2's clipped data
    range (:func:`clipped_data_range`; ``data_range`` = the volume's (min, max)). Every other case
    is unchanged: MR and other modalities already use the 0.5-99.5 percentile scaling of the
    non-zero voxels that MedSAM's ``pre_CT_MR.py`` (the data preparation MedSAM2 refers to) uses.
    """
    if pipeline != "medsam2" or modality.upper() != "CT" or data_range is None:
        return mapping
    if mapping.kind not in ("window", "limits"):
        return mapping
    return clipped_data_range(mapping.low, mapping.high, data_range,
                              name=f"{mapping.name or mapping.kind}, MedSAM2 data range")


def default_mapping(volume_array: np.ndarray, modality: str) -> IntensityMapping:
    """Soft-tissue window for CT, percentile scaling for everything else."""
    if modality.upper() == "CT":
        return ct_window("soft tissue")
    return percentile_mapping(volume_array)
