"""Memory tracking through a scan's slices with a SAM 2 network (SAM 2.1, MedSAM2).

A volume is treated as a video whose frames are the slices. For each object the user gives one
or more *key slices* (points, a box or a mask); :class:`Walk` then follows the object slice by
slice in one direction, conditioning each slice on a memory bank:

* the memories of all key slices of the object (temporal position 0);
* the memories of the 6 slices the walk handled last (positions 1..6, 6 = the adjacent one);
* the object pointers of the key slices on the walk's side (signed distance) and of up to 15
  slices the walk handled (distance 1, 2, ...).

This is the official SAM 2 video predictor's choice for one object with the default settings
(no temporal stride, all key slices in attention, pointers only from slices already passed), and
the numbers equal it: ``tests/test_sam2_golden.py`` compares every step with MedSAM2's own code.
Two differences of organisation, not of results: each walk keeps its own memory of the slices it
handled (the official predictor shares one dictionary, which the MedSAM2 script empties between
the forward and the reverse pass, as the two walks here never see each other's slices), and the
memory of a slice is encoded right after it is tracked, once, and kept (features of slices come
from the caller, which caches them like the SAM engine's embeddings).

Coordinates: prompts and masks are given on the slice grid (rows, columns of the scan); the model
frame is the S x S square the slice is stretched to (aspect ratio not kept, as the official frame
loader does); masks come back on the slice grid by bilinear resizing of the S/4 logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ...models.networks.sam2.model import FrameFeatures, FrameOutput, Sam2Network

__all__ = ["MemoryTracker", "TrackedSlice", "Walk"]

FeatureSource = Callable[[int], "np.ndarray | torch.Tensor | FrameFeatures"]


@dataclass
class TrackedSlice:
    """One object on one slice, on the slice grid."""

    index: int
    mask: np.ndarray  # (H, W) bool
    logits: np.ndarray  # (H, W) float32 mask logits (> 0 = object)
    low_res_logits: np.ndarray  # (L, L) float32, the model's own output
    object_score: float  # logit of "the object is on this slice" (> 0 = present)
    iou: float  # the model's predicted IoU of the mask (1.0 for a mask the user gave)
    key: bool = False

    @property
    def present(self) -> bool:
        return self.object_score > 0


@dataclass
class _Object:
    keys: dict[int, FrameOutput] = field(default_factory=dict)  # key slices' outputs (memory added lazily)


class MemoryTracker:
    """Objects tracked through one scan by one SAM 2 network.

    ``features(index)`` returns the slice's backbone features, packed (as
    :meth:`Sam2Network.pack` makes them, numpy or torch) or as :class:`FrameFeatures`;
    ``slice_shape`` is the (H, W) of a slice and ``n_slices`` their number.
    """

    def __init__(self, network: Sam2Network, features: FeatureSource, n_slices: int,
                 slice_shape: tuple[int, int], device: torch.device | str = "cpu") -> None:
        if n_slices < 1:
            raise ValueError("a scan needs at least one slice")
        self.network = network
        self._features = features
        self.n_slices = int(n_slices)
        self.slice_shape = (int(slice_shape[0]), int(slice_shape[1]))
        self.device = torch.device(device)
        self._objects: dict[int, _Object] = {}
        self._last_features: tuple[int, FrameFeatures] | None = None

    # ------------------------------------------------------------------ features
    def features(self, index: int) -> FrameFeatures:
        """Backbone features of slice ``index`` (the last one is kept: a walk asks twice per slice)."""
        self._check_index(index)
        if self._last_features is not None and self._last_features[0] == index:
            return self._last_features[1]
        value = self._features(index)
        if not isinstance(value, FrameFeatures):
            tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
            value = self.network.unpack(tensor.to(self.device, torch.float32))
        self._last_features = (index, value)
        return value

    def _check_index(self, index: int) -> None:
        if not 0 <= int(index) < self.n_slices:
            raise IndexError(f"slice {index} is outside 0..{self.n_slices - 1}")

    # ------------------------------------------------------------------ geometry
    def to_model_points(self, points_xy: np.ndarray) -> torch.Tensor:
        """(N, 2) x, y on the slice grid -> (1, N, 2) model-frame coordinates (float32 as official)."""
        height, width = self.slice_shape
        pts = torch.as_tensor(np.asarray(points_xy, np.float32).reshape(-1, 2))
        scaled = pts / torch.tensor([width, height]) * self.network.image_size
        return scaled[None].to(self.device)

    def to_model_mask(self, mask: np.ndarray) -> torch.Tensor:
        """(H, W) bool -> (1, 1, S, S) binary mask in the model frame (official add_new_mask resizing)."""
        tensor = torch.as_tensor(np.asarray(mask, bool))[None, None].float().to(self.device)
        size = self.network.image_size
        if tuple(tensor.shape[-2:]) == (size, size):
            return tensor
        resized = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return (resized >= 0.5).float()

    def to_slice(self, output: FrameOutput, index: int, key: bool = False) -> TrackedSlice:
        """A model output brought back to the slice grid."""
        logits = F.interpolate(output.low_res, size=self.slice_shape, mode="bilinear", align_corners=False)[0, 0]
        logits_np = logits.float().cpu().numpy()
        return TrackedSlice(index, logits_np > 0, logits_np, output.low_res[0, 0].float().cpu().numpy(),
                            float(output.object_score.item()), float(output.iou), key)

    # ------------------------------------------------------------------ objects and key slices
    def _object(self, obj: int) -> _Object:
        return self._objects.setdefault(int(obj), _Object())

    @property
    def objects(self) -> list[int]:
        return sorted(self._objects)

    def key_slices(self, obj: int) -> list[int]:
        return sorted(self._objects[obj].keys) if obj in self._objects else []

    @torch.inference_mode()
    def add_prompts(self, obj: int, index: int, points_xy: np.ndarray | None = None,
                    labels: np.ndarray | None = None, box_xyxy: np.ndarray | None = None,
                    previous_logits: np.ndarray | None = None) -> TrackedSlice:
        """Prompt ``obj`` on slice ``index`` (points x, y with labels 1/0; a box x0, y0, x1, y1) -> its mask.

        The slice becomes a key slice of the object (replacing an earlier one there);
        ``previous_logits`` (L, L) refine an earlier output of this slice.
        """
        self._check_index(index)
        parts, part_labels = [], []
        if box_xyxy is not None:
            parts.append(np.asarray(box_xyxy, np.float32).reshape(2, 2))
            part_labels.append(np.array([2, 3], np.int32))
        if points_xy is not None and len(points_xy):
            parts.append(np.asarray(points_xy, np.float32).reshape(-1, 2))
            part_labels.append(np.asarray(labels, np.int32).reshape(-1))
        if not parts:
            raise ValueError("give at least one point or a box")
        coords = self.to_model_points(np.concatenate(parts))
        point_labels = torch.as_tensor(np.concatenate(part_labels))[None].to(self.device)
        previous = None
        if previous_logits is not None:
            previous = torch.as_tensor(np.asarray(previous_logits, np.float32))[None, None].to(self.device)
        output = self.network.prompt_frame(self.features(index), coords, point_labels, previous)
        self._object(obj).keys[int(index)] = output
        return self.to_slice(output, index, key=True)

    @torch.inference_mode()
    def add_mask(self, obj: int, index: int, mask: np.ndarray) -> TrackedSlice:
        """Give ``obj``'s mask on slice ``index`` (H, W bool); the slice becomes a key slice."""
        self._check_index(index)
        mask = np.asarray(mask)
        if mask.shape != self.slice_shape:
            raise ValueError(f"the mask is {mask.shape}, but slices are {self.slice_shape}")
        output = self.network.mask_frame(self.features(index), self.to_model_mask(mask))
        self._object(obj).keys[int(index)] = output
        return self.to_slice(output, index, key=True)

    def remove_key(self, obj: int, index: int) -> None:
        """Forget one key slice of ``obj`` (no error when there is none)."""
        if obj in self._objects:
            self._objects[obj].keys.pop(int(index), None)

    def remove_object(self, obj: int) -> None:
        self._objects.pop(int(obj), None)

    def reset(self) -> None:
        """Forget every object and prompt (the feature source keeps its cache)."""
        self._objects.clear()

    # ------------------------------------------------------------------ walking
    @torch.inference_mode()
    def key_memory(self, obj: int, index: int) -> torch.Tensor:
        """The memory of key slice ``index`` of ``obj`` (encoded on first use, then kept)."""
        output = self._objects[obj].keys[index]
        if output.memory is None:
            output.memory = self.network.encode_memory(self.features(index), output)
        return output.memory

    def walk(self, obj: int, step: int) -> "Walk":
        """A new walk of ``obj`` in direction ``step`` (+1: increasing slice index, -1: decreasing)."""
        if obj not in self._objects or not self._objects[obj].keys:
            raise ValueError(f"object {obj} has no key slice: prompt it on a slice first")
        if step not in (1, -1):
            raise ValueError("step must be +1 or -1")
        return Walk(self, int(obj), step)

    @property
    def max_pointer_frames(self) -> int:
        """How many slices' object pointers a slice may attend to (official: min(slices, 16))."""
        return min(self.n_slices, self.network.config.max_obj_ptrs)


class Walk:
    """One object followed in one direction; remembers the slices it tracked."""

    def __init__(self, tracker: MemoryTracker, obj: int, step: int) -> None:
        self.tracker, self.obj, self.step = tracker, obj, step
        self.outputs: dict[int, FrameOutput] = {}

    def _memory_bank(self, index: int) -> tuple[list, list]:
        tracker, step = self.tracker, self.step
        keys = tracker._objects[self.obj].keys
        memories: list[tuple[int, torch.Tensor]] = [(0, tracker.key_memory(self.obj, k)) for k in sorted(keys)]
        num_maskmem = tracker.network.config.num_maskmem
        for t_pos in range(1, num_maskmem):
            previous = self.outputs.get(index - (num_maskmem - t_pos) * step)
            if previous is not None and previous.memory is not None:
                memories.append((t_pos, previous.memory))
        pointers: list[tuple[int, torch.Tensor]] = [
            ((index - k) * step, out.obj_ptr) for k, out in sorted(keys.items()) if (k - index) * step <= 0]
        for distance in range(1, tracker.max_pointer_frames):
            k = index - distance * step
            if not 0 <= k < tracker.n_slices:
                break
            previous = self.outputs.get(k)
            if previous is not None:
                pointers.append((distance, previous.obj_ptr))
        return memories, pointers

    @torch.inference_mode()
    def track(self, index: int) -> TrackedSlice:
        """Track the object on slice ``index`` (normally the next one in the walk's direction)."""
        tracker = self.tracker
        tracker._check_index(index)
        keys = tracker._objects[self.obj].keys
        if index in keys:  # a key slice: its own output, as the official propagation yields it
            return tracker.to_slice(keys[index], index, key=True)
        memories, pointers = self._memory_bank(index)
        features = tracker.features(index)
        output = tracker.network.track_frame(features, memories, pointers, tracker.max_pointer_frames - 1)
        output.memory = tracker.network.encode_memory(features, output)
        self.outputs[index] = output
        return tracker.to_slice(output, index)

    def forget(self, index: int) -> None:
        """Drop slice ``index`` from this walk's memory (e.g. a slice the stop rule rejected)."""
        self.outputs.pop(int(index), None)
