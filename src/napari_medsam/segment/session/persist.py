"""Saving a segmentation session to one file and opening it again (see docs/session.md).

A session file (``NAME.medsam-session.zip``) is a zip archive holding:

* ``manifest.json``: the format name and version, the scan it belongs to (shape, spacing and a
  content signature, :func:`~napari_medsam.segment.cache.keys.volume_signature`), the objects
  (value, name, colour) in table order and the active one, the prompts per (object, axis,
  slice) with their include/exclude points and box, the key slices (slices with a kept
  prediction) and the slices with hand-painted voxels, and an index of the arrays below;
* ``labels.npy``: the label volume (deflated);
* ``locks.npy``: the hand-painted (locked) voxels, a packed bit volume;
* ``predictions/N.npy``: the kept predictions of the prompted slices (every candidate mask
  packed to bits, their scores and low-resolution logits), so candidate cycling, refinement
  and the key slices of propagation work as before.

The undo history is not saved: a reopened session starts with empty undo stacks. Writing is
atomic (the old file stays if anything fails); reading checks everything before anything is
returned, so a truncated, corrupt or newer file raises :class:`SessionFileError` and leaves the
caller's labels untouched.
"""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ...errors import MedSamError, SessionError
from ...io._text import short_file_stem
from ...io.atomic import atomic_output
from ..cache.keys import volume_signature
from ..predictor import SliceMasks
from .core import SegmentationSession
from .state import Candidate, SegObject, SlicePrompts

__all__ = ["FORMAT", "FORMAT_VERSION", "SUFFIX", "ScanInfo", "SessionFile", "SessionFileError", "load_session",
           "read_session", "save_session", "scan_info", "session_path"]

FORMAT = "napari-medsam segmentation session"
FORMAT_VERSION = 1
SUFFIX = ".medsam-session.zip"

PromptKey = tuple[int, int, int]  # (object, axis, slice index)


class SessionFileError(SessionError):
    """A session file cannot be written or read back (corrupt, truncated, another version, another scan)."""


@dataclass(frozen=True)
class ScanInfo:
    """What identifies the scan a session belongs to."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float] | None = None
    signature: str | None = None  # volume_signature(array, spacing)
    name: str = ""

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "spacing": None if self.spacing is None else list(self.spacing),
                "signature": self.signature, "name": self.name}

    @classmethod
    def from_json(cls, data: Mapping) -> "ScanInfo":
        spacing = data.get("spacing")
        return cls(tuple(int(s) for s in data["shape"]),  # type: ignore[arg-type]
                   None if spacing is None else tuple(float(s) for s in spacing),  # type: ignore[arg-type]
                   data.get("signature"), str(data.get("name") or ""))


def scan_info(scan: Any, *, spacing: Any = None, name: str | None = None, signature: str | None = None) -> ScanInfo:
    """The :class:`ScanInfo` of ``scan``: a Volume, a 3D image array or a ScanInfo (returned as is).

    For an array, ``spacing`` (mm per display axis) joins the signature when given; a known
    ``signature`` (computed the same way) saves hashing the voxels again.
    """
    if isinstance(scan, ScanInfo):
        return scan
    array = getattr(scan, "array", scan)
    if spacing is None:
        spacing = getattr(scan, "spacing_mm", None)
    if name is None:
        source = getattr(scan, "source_path", None)
        name = Path(source).name if source is not None else ""
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise SessionFileError(f"A session belongs to a 3D (or 2D) scan, got an array of shape {array.shape}.")
    spacing_t = None if spacing is None else tuple(float(s) for s in np.ravel(spacing))[-3:]
    if spacing_t is not None and len(spacing_t) == 2:
        spacing_t = (1.0, *spacing_t)
    if signature is None:
        signature = volume_signature(array, spacing_t)
    return ScanInfo(tuple(int(s) for s in array.shape), spacing_t, signature, name)  # type: ignore[arg-type]


def session_path(scan_path: Any, name: str) -> Path:
    """The default session file beside a scan: ``<folder of the scan>/<name>.medsam-session.zip``."""
    safe = short_file_stem(name) if str(name).strip() else "segmentation"
    folder = Path.home()
    if scan_path is not None:
        folder = Path(scan_path).parent
    return folder / f"{safe}{SUFFIX}"


@dataclass
class SessionFile:
    """Everything a session file holds, checked and in memory (nothing applied to a viewer yet)."""

    scan: ScanInfo
    labels: np.ndarray
    objects: list[SegObject]
    active: int | None
    prompts: dict[PromptKey, SlicePrompts]
    predictions: dict[PromptKey, Candidate]
    locks: np.ndarray  # boolean volume of hand-painted voxels
    version: int = FORMAT_VERSION
    saved: str = ""
    extra: dict = field(default_factory=dict)

    def key_slices(self, obj: int, axis: int = 0) -> list[int]:
        """Slices along ``axis`` where ``obj`` has a kept prediction (propagation's key slices)."""
        return sorted(i for o, a, i in self.predictions if o == obj and a == axis)

    def prompted_slices(self, obj: int, axis: int = 0) -> list[int]:
        """Slices along ``axis`` where ``obj`` has prompts."""
        return sorted(i for o, a, i in self.prompts if o == obj and a == axis)

    def check_scan(self, like: Any) -> None:
        """Raise SessionFileError unless ``like`` (a Volume, an image array or a ScanInfo) is the saved scan."""
        check_scan(self.scan, like)

    def session(self, into: np.ndarray | None = None, **kwargs: Any) -> SegmentationSession:
        """A SegmentationSession with the saved objects, prompts, predictions and locks (empty history).

        ``into`` is the label array to fill in place (e.g. a Labels layer's data, of the scan's
        shape and an integer type wide enough); by default a copy of the saved labels. Checks
        come first: on an error ``into`` is unchanged.
        """
        if into is None:
            labels = self.labels.copy()
        else:
            if not isinstance(into, np.ndarray) or into.shape != self.labels.shape:
                raise SessionFileError(f"The session's labels are {self.labels.shape}, but the target labels are "
                                       f"{getattr(into, 'shape', type(into))}.")
            if not np.issubdtype(into.dtype, np.integer) or into.dtype == bool:
                raise SessionFileError(f"The target labels must have an integer type, not {into.dtype}.")
            top = max([o.value for o in self.objects] + [int(self.labels.max()) if self.labels.size else 0])
            if top > np.iinfo(into.dtype).max:
                raise SessionFileError(f"Label value {top} does not fit the target labels of type {into.dtype}.")
            if not into.flags.writeable:
                raise SessionFileError("The target labels are read-only.")
            labels = into
            into[...] = self.labels  # every check passed: nothing below can fail on the array
        session = SegmentationSession(labels, **kwargs)
        _restore(session, self)
        return session


def check_scan(saved: ScanInfo, like: Any) -> None:
    """Raise SessionFileError unless ``like`` is the scan described by ``saved``."""
    if not isinstance(like, ScanInfo) and getattr(like, "spacing_mm", None) is None:
        here = scan_info(like, spacing=saved.spacing)  # a bare array: hashed with the saved spacing
    else:
        here = scan_info(like)
    where = f" ({saved.name})" if saved.name else ""
    if tuple(here.shape) != tuple(saved.shape):
        raise SessionFileError(f"This session belongs to a scan of shape {tuple(saved.shape)}{where}, not "
                               f"{tuple(here.shape)}: open it on the scan it was saved from.")
    if saved.spacing is not None and here.spacing is not None \
            and not np.allclose(saved.spacing, here.spacing, rtol=0, atol=1e-4):
        raise SessionFileError(f"This session belongs to a scan with spacing {tuple(saved.spacing)} mm{where}, not "
                               f"{tuple(here.spacing)} mm: open it on the scan it was saved from.")
    if saved.signature and here.signature and saved.signature != here.signature:
        raise SessionFileError(f"This session belongs to another scan of the same shape{where} (its voxels "
                               "differ): open it on the scan it was saved from.")


# ---------------------------------------------------------------------------------------------- writing
def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def save_session(session: SegmentationSession, labels: np.ndarray | None = None, path: Any = None, *,
                 scan: Any = None, name: str | None = None) -> Path:
    """Write ``session`` and its ``labels`` (default: ``session.labels``) to one file at ``path``; return it.

    ``scan`` is the scan the session belongs to: a Volume, the image array (display order) or a
    :class:`ScanInfo`; its shape, spacing and content signature are stored so the file is
    refused on another scan. The file is written atomically. The undo history is not saved.
    """
    if path is None:
        raise SessionFileError("Give the path of the session file to write.")
    if not isinstance(session, SegmentationSession):
        raise SessionFileError(f"save_session needs a SegmentationSession, got {type(session).__name__}.")
    labels = session.labels if labels is None else np.asarray(labels)
    if labels.ndim == 2:
        labels = labels[None]
    if labels.shape != session.shape:
        raise SessionFileError(f"The labels are {labels.shape} but the session's are {session.shape}.")
    if scan is None:
        raise SessionFileError("Give the scan the session belongs to (scan=Volume, image array or ScanInfo).")
    info = scan_info(scan, name=name)
    if tuple(info.shape) != tuple(labels.shape):
        raise SessionFileError(f"The scan is {tuple(info.shape)} but the labels are {labels.shape}.")
    objects = session.objects
    prompts, predictions, arrays = [], [], {}
    for obj in objects:
        for axis in range(3):
            for index in session.prompted_slices(obj.value, axis):
                record = session.slice_prompts(obj.value, axis, index)
                prompts.append({"object": obj.value, "axis": axis, "index": index,
                                "points": [[float(r), float(c), bool(p)] for r, c, p in record.points],
                                "box": None if record.box is None else [float(v) for v in record.box]})
            for index in session.predicted_slices(obj.value, axis):
                cand = session.candidate(obj.value, axis, index)
                masks = np.asarray(cand.masks.masks, bool)
                n = len(predictions)
                arrays[f"predictions/{n}.masks.npy"] = np.packbits(masks, axis=None)
                arrays[f"predictions/{n}.scores.npy"] = np.asarray(cand.masks.scores, np.float32).reshape(-1)
                arrays[f"predictions/{n}.logits.npy"] = np.asarray(cand.masks.low_res_logits, np.float32)
                predictions.append({"object": obj.value, "axis": axis, "index": index, "choice": int(cand.choice),
                                    "masks_shape": list(masks.shape), "id": n})
    locks = session.locked_mask()
    key_slices = [{"object": o.value, "axis": a, "slices": session.predicted_slices(o.value, a)}
                  for o in objects for a in range(3) if session.predicted_slices(o.value, a)]
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "saved": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "scan": info.to_json(),
        "labels": {"shape": list(labels.shape), "dtype": np.dtype(labels.dtype).str},
        "objects": [{"value": o.value, "name": o.name, "color": list(o.color)} for o in objects],
        "active": session.active,
        "prompts": prompts,
        "predictions": predictions,
        "key_slices": key_slices,
        "painted_slices": session.locks.slices(),
        "history": "not saved",
    }
    arrays["labels.npy"] = labels
    arrays["locks.npy"] = np.packbits(locks, axis=None)
    try:
        with atomic_output(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
            archive.writestr("manifest.json", json.dumps(manifest, indent=1))
            for member, array in arrays.items():
                with archive.open(member, "w", force_zip64=True) as out:
                    np.save(out, np.ascontiguousarray(array), allow_pickle=False)
    except MedSamError:
        raise
    except (OSError, ValueError) as exc:
        raise SessionFileError(f"Could not write the session file {Path(path).name}: {exc}") from exc
    return Path(path)


# ---------------------------------------------------------------------------------------------- reading
def _bad(path: Path, why: str) -> SessionFileError:
    return SessionFileError(f"{path.name} is not a readable napari-medsam session file ({why}); nothing was loaded.")


def read_session(path: Any) -> SessionFile:
    """Read and check a session file completely; SessionFileError (one line) if anything is wrong."""
    path = Path(path)
    if not path.is_file():
        raise SessionFileError(f"There is no session file {path}.")
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if "manifest.json" not in names:
                raise _bad(path, "no manifest")
            manifest = json.loads(archive.read("manifest.json").decode("utf-8"))
            if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
                raise _bad(path, "not a session manifest")
            version = manifest.get("version")
            if version != FORMAT_VERSION:
                raise SessionFileError(f"{path.name} is a session file of format version {version!r}; this "
                                       f"napari-medsam reads version {FORMAT_VERSION} only. Nothing was loaded.")

            def array(member: str) -> np.ndarray:
                if member not in names:
                    raise _bad(path, f"{member} is missing")
                with archive.open(member) as stream:
                    return np.load(io.BytesIO(stream.read()), allow_pickle=False)

            return _parse(path, manifest, array)
    except SessionFileError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError, TypeError, IndexError,
            UnicodeDecodeError, AttributeError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _bad(path, f"{type(exc).__name__}: {text}"[:200]) from exc


def _parse(path: Path, manifest: dict, array: Any) -> SessionFile:
    scan = ScanInfo.from_json(manifest["scan"])
    shape = tuple(int(s) for s in manifest["labels"]["shape"])
    labels = array("labels.npy")
    if labels.shape != shape or labels.shape != tuple(scan.shape) or labels.ndim != 3:
        raise _bad(path, f"labels of shape {labels.shape}, expected {shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool:
        raise _bad(path, f"labels of type {labels.dtype}")
    size = int(np.prod(shape))
    packed = array("locks.npy")
    if packed.dtype != np.uint8 or packed.size != (size + 7) // 8:
        raise _bad(path, "lock volume of the wrong size")
    locks = np.unpackbits(packed, count=size).astype(bool).reshape(shape)
    objects, seen = [], set()
    for item in manifest["objects"]:
        value = int(item["value"])
        color = tuple(int(c) for c in item["color"])
        if value < 1 or value in seen or len(color) != 3 or not all(0 <= c <= 255 for c in color):
            raise _bad(path, f"object {item!r}")
        seen.add(value)
        objects.append(SegObject(value, str(item["name"]), color))  # type: ignore[arg-type]
    active = manifest.get("active")
    active = int(active) if active is not None and int(active) in seen else (objects[0].value if objects else None)

    def key(item: Mapping) -> PromptKey:
        obj, axis, index = int(item["object"]), int(item["axis"]), int(item["index"])
        if obj not in seen or axis not in (0, 1, 2) or not 0 <= index < shape[axis]:
            raise _bad(path, f"a prompt or prediction on object {obj}, axis {axis}, slice {index}")
        return obj, axis, index

    prompts = {}
    for item in manifest["prompts"]:
        k = key(item)
        points = tuple((float(r), float(c), bool(p)) for r, c, p in item["points"])
        box = None if item.get("box") is None else tuple(float(v) for v in item["box"])
        if box is not None and len(box) != 4:
            raise _bad(path, f"a box of {len(box)} values")
        prompts[k] = SlicePrompts(points, box)  # type: ignore[arg-type]
    predictions = {}
    for item in manifest["predictions"]:
        k = key(item)
        n = int(item["id"])
        mshape = tuple(int(s) for s in item["masks_shape"])
        plane = tuple(s for a, s in enumerate(shape) if a != k[1])
        if len(mshape) != 3 or mshape[1:] != plane or mshape[0] < 1:
            raise _bad(path, f"prediction masks of shape {mshape} on a {plane} slice")
        bits = array(f"predictions/{n}.masks.npy")
        count = int(np.prod(mshape))
        if bits.dtype != np.uint8 or bits.size != (count + 7) // 8:
            raise _bad(path, "prediction masks of the wrong size")
        masks = np.unpackbits(bits, count=count).astype(bool).reshape(mshape)
        scores = array(f"predictions/{n}.scores.npy").astype(np.float32).reshape(-1)
        logits = array(f"predictions/{n}.logits.npy").astype(np.float32)
        choice = int(item["choice"])
        if scores.size != mshape[0] or logits.ndim != 3 or logits.shape[0] != mshape[0] or not 0 <= choice < mshape[0]:
            raise _bad(path, "a prediction whose scores, logits or choice do not fit its masks")
        predictions[k] = Candidate(SliceMasks(masks, scores, logits, index=k[2], axis=k[1]), choice)
    return SessionFile(scan, labels, objects, active, prompts, predictions, locks, int(manifest["version"]),
                       str(manifest.get("saved", "")))


def load_session(path: Any, like: Any = None, *, into: np.ndarray | None = None, **kwargs: Any) -> SegmentationSession:
    """Open a session file as a SegmentationSession (labels, objects, prompts, predictions, locks; no history).

    ``like`` is the scan it must belong to (a Volume, the image array in display order or a
    :class:`ScanInfo`): another shape, spacing or content raises SessionFileError. ``into`` is
    a label array to fill in place (default: a new array, ``session.labels``). Everything is
    read and checked before anything is written. ``kwargs`` go to SegmentationSession.
    """
    saved = read_session(path)
    if like is not None:
        saved.check_scan(like)
    return saved.session(into, **kwargs)


def _restore(session: SegmentationSession, saved: SessionFile) -> None:
    """Give a fresh session (on the saved labels) the saved object table, prompts, predictions and locks."""
    session._objects = {o.value: o for o in saved.objects}
    session._prompts = {o.value: {} for o in saved.objects}
    session._predictions = {o.value: {} for o in saved.objects}
    for (obj, axis, index), record in saved.prompts.items():
        if not record.empty:
            session._prompts[obj][(axis, index)] = record
    for (obj, axis, index), cand in saved.predictions.items():
        session._predictions[obj][(axis, index)] = cand
    session.locks.clear()
    if saved.locks.any():
        session.locks.put((slice(0, session.shape[0]), slice(0, session.shape[1]), slice(0, session.shape[2])),
                          saved.locks, where=saved.locks)
    session._active = saved.active
    session.adopt()  # values in the labels that the table lacked (should not happen) get an object
