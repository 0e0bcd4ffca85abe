"""Decode the stored pixels of one DICOM file and turn them into modality values.

:func:`decode_planes` yields each plane's stored pixels, naming the file and the package a
compressed transfer syntax needs when decoding fails; files without a file meta header (read
with ``force=True``) are decoded with the encoding pydicom found. :func:`modality_values`
applies the rescale (or the Modality LUT).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pydicom.pixels
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ...errors import DicomSeriesError, MedSamError
from .._text import short_path, short_text
from .planes import Plane

__all__ = ["decode_planes", "modality_values", "fits_int16", "transfer_syntax"]


_DECODERS = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg-libjpeg (or Pillow)",
    "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg (or Pillow)",
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pylibjpeg-libjpeg or pyjpegls",
    "1.2.840.10008.1.2.4.81": "pylibjpeg-libjpeg or pyjpegls",
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg-rle (pydicom also decodes it on its own)",
}


def decode_planes(plane_group: list[Plane]) -> Iterator[tuple[Plane, np.ndarray]]:
    """Yield (plane, stored pixels) for the planes of one file, naming the file and codec on failure."""
    path = plane_group[0].path
    syntax = transfer_syntax(plane_group[0].header)
    try:
        if not _has_meta_syntax(plane_group[0].header):
            yield from _decode_without_meta(plane_group, syntax)
        elif plane_group[0].frame is None:
            yield plane_group[0], pydicom.pixels.pixel_array(path)
        else:
            by_frame = {p.frame: p for p in plane_group}
            for frame, pixels in enumerate(pydicom.pixels.iter_pixels(path)):
                if frame in by_frame:
                    yield by_frame[frame], pixels
    except MedSamError:
        raise
    except Exception as exc:  # pydicom raises many types for damaged or undecodable data
        reason = short_text(f"{type(exc).__name__}: {exc}", 60)
        shown = short_path(path)
        if not syntax.is_transfer_syntax:
            raise DicomSeriesError(
                f"Could not read the pixel data of {shown}: it has no file meta header and its encoding "
                f"could not be recognised ({reason})."
            ) from exc
        if syntax.is_compressed and str(syntax) in _DECODERS:
            raise DicomSeriesError(
                f"Could not decode {shown}: {syntax.name} needs the package {_DECODERS[str(syntax)]}; "
                f"install it, or check the file ({reason})."
            ) from exc
        if syntax.is_compressed:
            raise DicomSeriesError(
                f"Could not decode {shown}: transfer syntax {syntax.name} is not supported ({reason})."
            ) from exc
        raise DicomSeriesError(
            f"Could not read the pixel data of {shown}: the file is truncated or damaged ({reason}). "
            "Remove it or copy the series again."
        ) from exc


def _has_meta_syntax(header: Dataset) -> bool:
    meta = getattr(header, "file_meta", None)
    return meta is not None and bool(str(meta.get("TransferSyntaxUID", "") or ""))


def transfer_syntax(header: Dataset) -> UID:
    """The file's transfer syntax; for a bare stream without file meta, the encoding pydicom found."""
    if _has_meta_syntax(header):
        return UID(str(header.file_meta.TransferSyntaxUID))
    implicit, little = getattr(header, "original_encoding", (None, None))
    if implicit is None:
        return UID("")
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _decode_without_meta(plane_group: list[Plane], syntax: UID) -> Iterator[tuple[Plane, np.ndarray]]:
    """Pixels of a file without file meta (read forced): pydicom needs the syntax it was parsed with."""
    data = pydicom.dcmread(plane_group[0].path, force=True)
    data.file_meta = FileMetaDataset()
    data.file_meta.TransferSyntaxUID = syntax
    pixels = data.pixel_array
    for plane in plane_group:
        yield plane, pixels if plane.frame is None else pixels[plane.frame]


def modality_values(pixels: np.ndarray, plane: Plane) -> np.ndarray:
    """Modality values (int64 when the rescale keeps integers, float64 otherwise)."""
    if "ModalityLUTSequence" in plane.header and plane.frame is None:
        return np.asarray(pydicom.pixels.apply_modality_lut(pixels, plane.header))
    if plane.slope == int(plane.slope) and plane.intercept == int(plane.intercept):
        return pixels.astype(np.int64) * int(plane.slope) + int(plane.intercept)
    return pixels.astype(np.float64) * plane.slope + plane.intercept


def fits_int16(values: np.ndarray) -> bool:
    if values.size == 0:
        return True
    if values.min() < -32768 or values.max() > 32767:
        return False
    return bool(np.issubdtype(values.dtype, np.integer) or np.array_equal(values, np.round(values)))
