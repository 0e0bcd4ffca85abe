"""PROMPTS.json for the headless `napari-medsam segment` command: parsing and coordinates.

Format::

    {"coordinates": "voxel" | "world",
     "objects": [{"label": 1, "name": "liver", "prompts": [
         {"type": "box", "corners": [[a, b, c], [a, b, c]]},
         {"type": "point", "position": [a, b, c], "positive": true}]},
       {"label": 2, "name": "liver", "prompts": [
         {"type": "text", "phrase": "liver", "slices": [z0, z1], "threshold": 0.5}]}]}

"voxel" coordinates are indices in the input FILE's own voxel order (NIfTI: nibabel's i, j, k;
DICOM: column, row, slice index along the sorted series; NRRD/MHA: ITK's i, j, k). "world"
coordinates are millimetres in RAS+ (the NIfTI convention; for DICOM input the same physical
point expressed in RAS). Both corners of a box must lie on one slice; the plane of an object's
box (axial, or another display plane when the corners share another axis) is the plane all of
that object's prompts are applied on.

A ``"text"`` prompt (issue 18) asks a concept model for every instance of a phrase and follows the best
one through the slices: ``"slices"`` is an optional inclusive range of display slice indices along the
object's plane (default: all), ``"threshold"`` an optional detection score threshold. One text prompt per
object; its boxes, if any, are exemplar boxes on their slices; points do not go with a text prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import MedSamError
from ..volume import Volume
from .predictor import Prompts

class PromptFileError(MedSamError):
    """PROMPTS.json is missing, not JSON, or describes prompts that do not fit the image."""


@dataclass
class TextPrompt:
    """A concept prompt: find ``phrase`` on the slices ``slices`` (inclusive, None = all) of the object's plane."""

    phrase: str
    slices: tuple[int, int] | None = None
    threshold: float | None = None


@dataclass
class ObjectPrompts:
    """All prompts of one object, grouped by slice on one plane (display axis)."""

    label: int
    name: str
    axis: int = 0
    slices: dict[int, Prompts] = field(default_factory=dict)
    text: TextPrompt | None = None  # a concept prompt; ``slices`` then holds its exemplar boxes


def load_prompt_file(path: str | Path, volume: Volume) -> list[ObjectPrompts]:
    """Read PROMPTS.json and convert every prompt to display-slice pixel coordinates."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PromptFileError(f"prompt file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptFileError(f"cannot read prompt file {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise PromptFileError(f"{path.name} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    return parse_prompts(data, volume, source=path.name)


def parse_prompts(data: object, volume: Volume, source: str = "prompts") -> list[ObjectPrompts]:
    """Validate a decoded PROMPTS.json document against ``volume``."""
    if not isinstance(data, dict):
        raise PromptFileError(f"{source}: the top level must be an object with 'coordinates' and 'objects'")
    system = data.get("coordinates", "voxel")
    if system not in ("voxel", "world"):
        raise PromptFileError(f"{source}: 'coordinates' must be \"voxel\" or \"world\", got {system!r}")
    objects = data.get("objects")
    if not isinstance(objects, list) or not objects:
        raise PromptFileError(f"{source}: 'objects' must be a non-empty list")
    result: list[ObjectPrompts] = []
    seen: set[int] = set()
    for n, item in enumerate(objects):
        where = f"{source}: objects[{n}]"
        if not isinstance(item, dict):
            raise PromptFileError(f"{where} must be an object")
        label = item.get("label")
        if isinstance(label, bool) or not isinstance(label, int) or not 1 <= label <= 65535:
            raise PromptFileError(f"{where}: 'label' must be an integer from 1 to 65535, got {label!r}")
        if label in seen:
            raise PromptFileError(f"{where}: label {label} is used by two objects")
        seen.add(label)
        name = str(item.get("name") or f"object {label}")
        prompts = item.get("prompts")
        if not isinstance(prompts, list) or not prompts:
            raise PromptFileError(f"{where} ({name}): 'prompts' must be a non-empty list")
        result.append(_object_prompts(label, name, prompts, volume, system, where))
    return result


def _to_display(values: object, volume: Volume, system: str, where: str) -> np.ndarray:
    """One coordinate triple -> fractional display index (slice, row, column)."""
    try:
        point = np.asarray(values, dtype=float).reshape(3)
    except (TypeError, ValueError):
        raise PromptFileError(f"{where}: expected three numbers, got {values!r}") from None
    if not np.all(np.isfinite(point)):
        raise PromptFileError(f"{where}: coordinates must be finite numbers, got {values!r}")
    if system == "voxel":
        index = volume.axes.file_index_to_display(point[None], volume.shape)[0]
    else:
        lps = point * np.array([-1.0, -1.0, 1.0])
        index = volume.world_to_index(lps[None])[0]
    if np.any(index < -0.5) or np.any(index > np.asarray(volume.shape) - 0.5):
        raise PromptFileError(_outside_message(point, index, volume, system, where))
    return index


def _outside_message(point: np.ndarray, index: np.ndarray, volume: Volume, system: str, where: str) -> str:
    """Say why a position misses the image, entirely in the file's voxel order (the prompt's own)."""
    axes = ", ".join(volume.file_axis_names)
    shape = [int(n) for n in volume.file_shape]
    limits = ", ".join(f"{name} 0..{n - 1}" for name, n in zip(volume.file_axis_names, shape))
    shown = _numbers(point)
    if system == "voxel":
        return (
            f"{where}: voxel position {shown} ({axes}) lies outside the image, whose shape in the "
            f"file's voxel order ({axes}) is {shape}: valid indices are {limits}"
        )
    file_index = volume.axes.display_index_to_file(index[None], volume.shape)[0]
    return (
        f"{where}: world position {shown} (RAS mm) lies outside the image: it falls at voxel "
        f"{_numbers(file_index)} in the file's voxel order ({axes}), where the image has "
        f"shape {shape}: valid indices are {limits}"
    )


def _numbers(values: np.ndarray) -> str:
    """``[500, 5, 2.5]``: at most two decimals, whole numbers without a point."""
    return "[" + ", ".join(f"{round(float(v), 2):g}" for v in values) + "]"


def _object_prompts(label: int, name: str, prompts: list, volume: Volume, system: str, where: str) -> ObjectPrompts:
    boxes: list[tuple[int, np.ndarray, np.ndarray]] = []
    points: list[tuple[np.ndarray, bool, str]] = []
    texts: list[tuple[dict, str]] = []
    for k, prompt in enumerate(prompts):
        here = f"{where}.prompts[{k}]"
        if not isinstance(prompt, dict) or prompt.get("type") not in ("box", "point", "text"):
            raise PromptFileError(f"{here}: each prompt needs \"type\": \"box\", \"point\" or \"text\"")
        if prompt["type"] == "text":
            texts.append((prompt, here))
        elif prompt["type"] == "box":
            corners = prompt.get("corners")
            if not isinstance(corners, list) or len(corners) != 2:
                raise PromptFileError(f"{here}: a box needs 'corners': two [a, b, c] positions")
            a = _to_display(corners[0], volume, system, here)
            b = _to_display(corners[1], volume, system, here)
            # The plane is the display axis along which both corners fall in the same slice
            # (the axial slices first, when a degenerate box would allow several).
            same = [axis for axis in range(3) if np.rint(a[axis]) == np.rint(b[axis]) and abs(a[axis] - b[axis]) < 0.5]
            if not same:
                raise PromptFileError(
                    f"{here}: the box corners {corners} do not lie on one slice (in display order they are "
                    f"{np.round(a, 2).tolist()} and {np.round(b, 2).tolist()})"
                )
            boxes.append((same[0], a, b))
        else:
            positive = prompt.get("positive", True)
            if not isinstance(positive, bool):
                raise PromptFileError(f"{here}: 'positive' must be true or false")
            points.append((_to_display(prompt.get("position"), volume, system, here), positive, here))
    axes = {axis for axis, _, _ in boxes}
    if len(axes) > 1:
        raise PromptFileError(f"{where} ({name}): its boxes lie on different planes; use one plane per object")
    axis = axes.pop() if axes else 0
    plane = [a for a in range(3) if a != axis]
    out = ObjectPrompts(label, name, axis)
    if texts:
        if len(texts) > 1 or points:
            raise PromptFileError(f"{where} ({name}): one text prompt per object, with exemplar boxes at most "
                                  "(no points)")
        out.text = _text_prompt(*texts[0], volume.shape[axis])
    for _, a, b in boxes:
        index = int(np.rint(a[axis]))
        if index in out.slices and out.slices[index].box is not None:
            raise PromptFileError(f"{where} ({name}): two boxes on slice {index}; SAM takes one box per slice")
        box = np.array([a[plane[0]], a[plane[1]], b[plane[0]], b[plane[1]]])
        out.slices[index] = Prompts(box=box)
    for position, positive, here in points:
        index = int(np.rint(position[axis]))
        current = out.slices.get(index) or Prompts()
        coords = position[plane][None]
        points_arr = coords if current.points is None else np.vstack([current.points, coords])
        flags = np.array([positive]) if current.positive is None else np.append(current.positive, positive)
        out.slices[index] = Prompts(points=points_arr, positive=flags, box=current.box)
    return out


def _text_prompt(prompt: dict, here: str, depth: int) -> TextPrompt:
    """A ``{"type": "text", "phrase": ..., "slices": [z0, z1], "threshold": t}`` entry, checked."""
    phrase = prompt.get("phrase")
    if not isinstance(phrase, str) or not phrase.strip():
        raise PromptFileError(f"{here}: a text prompt needs a non-empty 'phrase', e.g. \"liver\"")
    span = prompt.get("slices")
    if span is not None:
        if (not isinstance(span, list) or len(span) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in span)):
            raise PromptFileError(f"{here}: 'slices' must be [first, last] slice indices, got {span!r}")
        if not 0 <= span[0] <= span[1] <= depth - 1:
            raise PromptFileError(f"{here}: 'slices' {span} must be ordered indices within 0..{depth - 1}")
        span = (span[0], span[1])
    threshold = prompt.get("threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0 < threshold < 1):
        raise PromptFileError(f"{here}: 'threshold' must be a number between 0 and 1, got {threshold!r}")
    return TextPrompt(" ".join(phrase.split()), span, None if threshold is None else float(threshold))
