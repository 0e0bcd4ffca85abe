"""Save a fine-tuned model so that any SAM tool loads it: the base file's layout, a JSON, a curve.

The checkpoint is the base checkpoint itself with the trained tensors replaced: the same
wrapper (a bare state dict, ``{"model": ...}``, ...), the same keys in the same order, the same
dtypes; so the official ``sam_model_registry[...](checkpoint=...)`` of SAM/MedSAM/MobileSAM,
LiteMedSAM's script and this project's strict loader all read it. Beside it go
``NAME.json`` (base model, data, objects, epochs, held-out Dice before/after, date) and
``NAME.curve.png`` (held-out Dice and loss per epoch, drawn with Pillow: matplotlib is not a
dependency). Registering it (:mod:`napari_medsam.models.local`) lists it as a local model.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..models.checkpoint import _KEY_PREFIXES, _WRAPPER_KEYS, WeightsError
from ..models.local import register_local_model, safe_name
from ..models.registry import ModelSpec
from .finetune import EpochRecord, FinetuneResult

__all__ = ["SavedModel", "draw_curve", "save_finetuned"]


@dataclass
class SavedModel:
    """Where a fine-tuned model went."""

    checkpoint: Path
    info: Path
    curve: Path
    name: str
    registration: Path | None


def _state_level(obj: Any) -> dict:
    """The mapping of tensors inside a checkpoint object (the loader's unwrapping, kept in place)."""
    for _ in range(3):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj  # type: ignore[return-value]
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj, Mapping) and isinstance(obj.get(k), Mapping)),
                     None)
        if inner is None:
            break
        obj = inner
    raise WeightsError("the base checkpoint holds no state dict of tensors")


def tuned_checkpoint(base: Any, trained: Mapping[str, torch.Tensor]) -> Any:
    """``base`` (as torch.load gave it) with the ``trained`` tensors in place of its own, same keys and dtypes."""
    state = _state_level(base)
    prefix = next((p for p in _KEY_PREFIXES if state and all(k.startswith(p) for k in state)), "")
    for key, value in trained.items():
        full = prefix + key
        if full not in state:
            raise WeightsError(f"the base checkpoint has no {full}: it is not the model that was tuned")
        old = state[full]
        if tuple(old.shape) != tuple(value.shape):
            raise WeightsError(f"{full}: shape {list(value.shape)} does not fit the base's {list(old.shape)}")
        state[full] = value.detach().to(dtype=old.dtype, device="cpu").clone()
    return base


def draw_curve(curve: Sequence[EpochRecord], path: str | os.PathLike[str], title: str = "") -> Path:
    """A small PNG: held-out Dice (blue, 0..1) and training loss (orange, scaled) per epoch."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 360, 220, 36, 12, 24, 28
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    plot_w, plot_h = width - left - right, height - top - bottom
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    last = max(1, max((r.epoch for r in curve), default=1))

    def xy(epoch: float, value: float) -> tuple[float, float]:
        return left + plot_w * epoch / last, top + plot_h * (1.0 - min(max(value, 0.0), 1.0))

    for tick in (0.0, 0.5, 1.0):
        x, y = xy(0, tick)
        draw.line([x - 3, y, x, y], fill="black")
        draw.text((4, y - 6), f"{tick:.1f}", fill="black")
    for epoch in range(last + 1):
        x, y = xy(epoch, 0.0)
        draw.text((x - 3, y + 4), str(epoch), fill="black")
    dice = [xy(r.epoch, r.dice) for r in curve]
    losses = [r for r in curve if r.loss is not None]
    peak = max((r.loss for r in losses), default=1.0) or 1.0
    loss = [xy(r.epoch, r.loss / peak) for r in losses]
    for points, colour in ((dice, (31, 119, 180)), (loss, (255, 127, 14))):
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    draw.text((left, 4), title or "held-out Dice (blue), loss / max (orange) per epoch", fill="black")
    path = Path(path)
    image.save(path)
    return path


def save_finetuned(result: FinetuneResult, out: str | os.PathLike[str], *, base_spec: ModelSpec,
                   base_checkpoint: str | os.PathLike[str], data: Sequence[str] = (),
                   objects: Mapping[int, str] | None = None, epochs: int | None = None,
                   name: str | None = None, register: bool = True) -> SavedModel:
    """Write ``out`` (base layout), ``out``.json and ``out``.curve.png; register it as a local model."""
    if result.model is None:
        raise ValueError("the result holds no tuned model")
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    base = torch.load(Path(base_checkpoint).expanduser(), map_location="cpu", weights_only=True)
    trained = {k: v for k, v in result.model.network.state_dict().items() if k.startswith(result.trained)}
    tmp = out.with_name(out.name + ".tmp")
    torch.save(tuned_checkpoint(base, trained), tmp)
    os.replace(tmp, out)
    model_name = safe_name(name or out.stem)
    info = {
        "base_model": base_spec.name,
        "base_checkpoint": str(Path(base_checkpoint).expanduser().resolve()),
        "trained": list(result.trained),
        "data": [str(d) for d in data],
        "objects": {str(k): v for k, v in (objects or {}).items()},
        "epochs": epochs if epochs is not None else max((r.epoch for r in result.curve), default=0),
        "best_epoch": result.best_epoch,
        "cancelled": result.cancelled,
        "dice_before": round(result.dice_before, 4),
        "dice_after": round(result.dice_after, 4),
        "curve": [{"epoch": r.epoch, "loss": r.loss, "dice": round(r.dice, 4)} for r in result.curve],
        "train_samples": result.train_samples,
        "val_samples": result.val_samples,
        "seconds": round(result.seconds, 1),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    info_path = out.with_suffix(".json")
    info_path.write_text(json.dumps({"name": model_name, "checkpoint": out.name, **info}, indent=2), encoding="utf-8")
    curve = draw_curve(result.curve, out.with_suffix(".curve.png"), f"{model_name}: held-out Dice / loss")
    registration = register_local_model(model_name, base_spec.name, out, info) if register else None
    return SavedModel(out, info_path, curve, model_name, registration)
