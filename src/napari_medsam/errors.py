"""The project's exception types: one base class, one subclass per kind of user error.

Every error a user can cause (a bad file, a wrong series, a label volume that does not fit)
raises a subclass of :class:`MedSamError` with a message that says what was wrong and what to
do. The napari layer shows these as notifications; the CLI prints them on one line.
"""

from __future__ import annotations


class MedSamError(Exception):
    """Base class of every error napari-medsam raises on purpose."""


class VolumeReadError(MedSamError):
    """A file or folder could not be read as a 3D volume (corrupt, truncated, unsupported)."""


class UnsupportedFormatError(VolumeReadError):
    """The path is not in a format napari-medsam reads."""


class DicomSeriesError(VolumeReadError):
    """A DICOM folder or file does not form one usable image series."""


class NotAVolumeError(VolumeReadError):
    """The data are 2D, RGB or otherwise not a scalar 3D volume."""


class MultipleVolumesError(NotAVolumeError):
    """A 4D file holds several volumes; the caller must choose one with ``volume_index``."""

    def __init__(self, message: str, n_volumes: int) -> None:
        super().__init__(message)
        self.n_volumes = n_volumes


class LabelsWriteError(MedSamError):
    """A label volume could not be written (bad path, full disk, wrong format for the source)."""


class LabelsMismatchError(LabelsWriteError):
    """A label volume does not fit the source image (shape, grid or value range)."""


class DicomWriteError(MedSamError):
    """An image volume could not be written as a DICOM series (bad folder, unsupported values)."""


class WeightsError(MedSamError):
    """A weight file is missing, not a checkpoint, corrupt, or for a different model."""


class DownloadCancelled(WeightsError):
    """The user cancelled a download; the partial file is kept so the next try resumes."""


class DeviceError(MedSamError):
    """The requested compute device does not exist or is not usable on this machine."""


class PropagationError(MedSamError):
    """Propagation cannot start: no usable key slice, or labels/locked mask that do not fit the image."""


class SessionError(MedSamError):
    """An interactive-segmentation request does not fit the session (unknown object, slice or prompt)."""
