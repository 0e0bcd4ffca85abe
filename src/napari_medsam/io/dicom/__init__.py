"""DICOM: series reading, writing, and DICOM-SEG export and import.

Modules: ``scan`` (find and group the files of a folder into series), ``planes`` (place each
image or frame in patient space), ``dose`` (frame positions of an RT Dose grid), ``series``
(read one series into a Volume), ``write`` (write a Volume as a CT/MR series), ``seg_geometry``
(planes shared by the SEG writer and reader), ``seg_write`` and ``seg_read`` (DICOM-SEG). The
names below are imported on first use, so that
``import napari_medsam.io`` stays free of pydicom and highdicom until DICOM is needed.
"""

from __future__ import annotations

from ..._lazy import lazy_getattr

_NAMES = {
    "scan_dicom": "scan", "DicomSeriesInfo": "scan", "DicomScanResult": "scan",
    "read_dicom_series": "series", "stack_plane": "series",
    "write_dicom_series": "write",
    "dataset_planes": "seg_geometry", "fit_plane": "seg_geometry", "source_uid": "seg_geometry",
    "write_dicom_seg": "seg_write", "SEGMENTATION_TYPES": "seg_write", "SEG_SOP_CLASSES": "seg_geometry",
    "read_dicom_seg": "seg_read", "load_dicom_seg_volume": "seg_read",
}

__all__ = sorted(_NAMES)


__getattr__ = lazy_getattr(__name__, _NAMES, globals())
