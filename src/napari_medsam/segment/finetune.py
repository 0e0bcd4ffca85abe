"""Fine-tune a SAM-family mask decoder on the user's own label volumes, on the CPU.

The image encoder stays frozen, so every slice is embedded once, through the ordinary
:meth:`SlicePredictor.embed` and its memory/disk cache; only the mask decoder (and, if asked,
the prompt encoder) learns, which takes seconds per step on a laptop CPU. The training samples
are (slice, object) pairs of the label volumes. Each step shows the decoder prompts a user
would give (:mod:`.finetune_prompts`): a box a few percent off, or a few clicks inside and
outside, then, if asked (``corrections``), a correction click on the largest error of its own
first answer together with that answer's logits (the iterative scheme of RITM and SAM). The loss is Dice + binary cross
entropy (or focal) on the low-resolution logits, against the label resampled onto the part of
the L x L logit grid that covers the slice in the pipeline's geometry (:meth:`SamModel.geometry`:
top-left for SAM/LiteMedSAM, the whole square for MedSAM), plus the usual mean-squared error of
the IoU head.

Held-out slices (blocks of neighbouring slices, so a held-out slice's neighbours do not leak
into training) or held-out scans measure box-prompt Dice through the ordinary predictor, before
training and after each epoch (then on an evenly spread part, ``eval_samples``); the best state
is kept, also when the run is cancelled. From random weights the decoder needs a few hundred
steps: AdamW with a linear warm-up and cosine decay over the planned steps, gradient clipping,
and, by default, the prompt encoder learning too (its box-corner embeddings), reach a held-out
Dice of ~0.7 on the phantoms within minutes on 2 CPU cores (docs/performance.md).
SAM 2 networks are not supported (their decoder takes multi-level features).
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MedSamError
from ..models import pipelines
from ..volume import Volume
from .cache import EmbeddingCache
from .cache.memory import MemoryCache
from .finetune_prompts import bounding_box, correction_click, jittered_box, sample_points
from .intensity import IntensityMapping
from .model import SamModel
from .predictor import Prompts, SlicePredictor

__all__ = ["EpochRecord", "FinetuneConfig", "FinetuneResult", "Sample", "build_samples", "evaluate", "finetune",
           "split_samples", "tuned_copy"]

Pair = tuple[Volume, np.ndarray]
ProgressFn = Callable[[int, int, float, "float | None"], None]
CancelFn = Callable[[], bool] | threading.Event | None


@dataclass
class FinetuneConfig:
    """How to train; the defaults learn within minutes on a 2-core CPU (docs/performance.md)."""

    epochs: int = 20
    batch_size: int = 4
    learning_rate: float = 1e-3  # the peak, after the linear warm-up; cosine decay to 0 over the planned steps
    warmup: float = 0.05  # share of the planned steps with a linear warm-up
    weight_decay: float = 0.01
    grad_clip: float | None = 1.0  # gradient norm limit (None: no clipping)
    val_fraction: float = 0.25
    split: str = "slice"  # "slice" (blocks of slices of every scan) or "scan" (whole scans held out)
    block: int = 4  # neighbouring slices held out together in the slice split
    objects: tuple[int, ...] | None = None  # label values to learn (None: every value in the labels)
    axis: int = 0
    min_pixels: int = 16  # smaller cross-sections are skipped (no meaningful box)
    max_slices: int | None = None  # per scan and object, evenly spaced (quick runs)
    eval_samples: int | None = 48  # held-out samples of the per-epoch curve (all of them before and after)
    box_jitter: float = 0.05
    point_fraction: float = 0.2  # share of steps prompted with clicks instead of a box
    corrections: int = 0  # correction clicks after the first answer (each one costs another pass)
    loss: str = "dice_bce"  # or "dice_focal"
    train_prompt_encoder: bool = True  # learns much faster from random weights (docs/performance.md)
    seed: int = 0


@dataclass
class Sample:
    """One (slice, object) of a scan: the mask on the slice grid and its low-res target."""

    scan: int
    index: int
    label: int
    mask: np.ndarray  # (rows, cols) bool
    target: np.ndarray  # (hl, wl) float32 in {0, 1}


@dataclass
class EpochRecord:
    """One point of the learning curve (epoch 0 = before training)."""

    epoch: int
    loss: float | None
    dice: float
    seconds: float


@dataclass
class FinetuneResult:
    """What a run did: held-out Dice before and after, the curve, and the tuned model."""

    dice_before: float
    dice_after: float
    curve: list[EpochRecord]
    seconds: float
    train_samples: int
    val_samples: int
    best_epoch: int
    cancelled: bool
    per_object_before: dict[int, float] = field(default_factory=dict)
    per_object_after: dict[int, float] = field(default_factory=dict)
    model: SamModel | None = field(default=None, repr=False)
    trained: tuple[str, ...] = ("mask_decoder",)
    embed_seconds: float = 0.0  # the frozen encoder's share of ``seconds`` (0 when the cache held every slice)


# --------------------------------------------------------------------------- geometry and samples
class _Scan:
    """A scan's predictor and the mapping between its slice grid, the model frame and the low-res grid."""

    def __init__(self, model: SamModel, volume: Volume, mapping: IntensityMapping | None, axis: int,
                 cache: EmbeddingCache) -> None:
        self.predictor = SlicePredictor(model, volume, mapping=mapping, axis=axis, cache=cache)
        self.model = model
        rows, cols = self.predictor.slice_shape
        self.model_size = self.predictor._model_image_size()  # square pixels, as predict() feeds the model
        self.geometry = model.geometry(*self.model_size)
        side, size = model.low_res, model.image_size
        h, w = self.geometry.input_size
        self.low_shape = (max(1, round(h * side / size)), max(1, round(w * side / size)))
        self.scale = (self.model_size[0] / rows, self.model_size[1] / cols)

    def low_res_target(self, mask: np.ndarray) -> np.ndarray:
        """The mask resampled onto the low-res cells that cover the slice (area-weighted, then >= 0.5)."""
        import cv2

        hl, wl = self.low_shape
        area = cv2.resize(mask.astype(np.float32), (wl, hl), interpolation=cv2.INTER_AREA)
        return (area >= 0.5).astype(np.float32)

    def model_points(self, points_rc: np.ndarray) -> np.ndarray:
        """(N, 2) slice (row, col) -> (N, 2) model-frame (x, y), as :meth:`SlicePredictor.predict` maps them."""
        sy, sx = self.scale
        xy = np.stack([(points_rc[:, 1] + 0.5) * sx - 0.5, (points_rc[:, 0] + 0.5) * sy - 0.5], 1)
        return pipelines.scale_points(self.model.pipeline, xy, self.geometry.original_size, self.model.image_size)

    def model_box(self, box_rc: np.ndarray) -> np.ndarray:
        """Slice box (r0, c0, r1, c1) -> model-frame (x0, y0, x1, y1)."""
        corners = self.model_points(box_rc.reshape(2, 2))
        return corners.reshape(4)

    def low_res_points(self, points_rc: np.ndarray) -> np.ndarray:
        """Low-res cell (row, col) -> model-frame (x, y) of the cell's centre."""
        step = self.model.image_size / self.model.low_res
        return np.stack([(points_rc[:, 1] + 0.5) * step - 0.5, (points_rc[:, 0] + 0.5) * step - 0.5], 1)


def _spread(indices: np.ndarray, count: int | None) -> np.ndarray:
    if count is None or len(indices) <= count:
        return indices
    return indices[np.round(np.linspace(0, len(indices) - 1, count)).astype(int)]


def build_samples(scans: Sequence[_Scan], labels: Sequence[np.ndarray], config: FinetuneConfig) -> list[Sample]:
    """Every (slice, object) with at least ``min_pixels`` pixels, per scan (``max_slices`` evenly spaced)."""
    samples: list[Sample] = []
    for scan_no, (scan, volume_labels) in enumerate(zip(scans, labels)):
        values = config.objects or tuple(int(v) for v in np.unique(volume_labels) if v != 0)
        moved = np.moveaxis(np.asarray(volume_labels), config.axis, 0)
        for value in values:
            counts = (moved == value).sum(axis=(1, 2))
            for index in _spread(np.flatnonzero(counts >= config.min_pixels), config.max_slices):
                mask = moved[index] == value
                samples.append(Sample(scan_no, int(index), int(value), mask, scan.low_res_target(mask)))
    return samples


def split_samples(samples: Sequence[Sample], config: FinetuneConfig,
                  n_scans: int) -> tuple[list[Sample], list[Sample]]:
    """(train, held-out): whole scans (``split="scan"``: the last ones) or blocks of neighbouring slices."""
    if not samples:
        raise MedSamError("no training samples: the label volumes hold no object of the chosen values "
                          f"with at least {config.min_pixels} pixels on a slice")
    if config.split == "scan":
        if n_scans < 2:
            raise MedSamError("a split by scan needs at least two scans; use the split by slice")
        held = max(1, min(n_scans - 1, round(n_scans * config.val_fraction)))
        val_scans = set(range(n_scans - held, n_scans))
        picked = {id(s) for s in samples if s.scan in val_scans}
    elif config.split == "slice":
        rng = np.random.default_rng(config.seed)
        blocks = sorted({(s.scan, s.index // config.block) for s in samples})
        count = max(1, round(len(blocks) * config.val_fraction)) if config.val_fraction > 0 else 0
        if count >= len(blocks):
            raise MedSamError(f"only {len(blocks)} block(s) of slices hold objects: too few to hold some out; "
                              "label more slices or lower the held-out fraction")
        chosen = {blocks[i] for i in rng.choice(len(blocks), size=count, replace=False)}
        picked = {id(s) for s in samples if (s.scan, s.index // config.block) in chosen}
    else:
        raise MedSamError(f"unknown split {config.split!r}; choose 'slice' or 'scan'")
    return [s for s in samples if id(s) not in picked], [s for s in samples if id(s) in picked]


# --------------------------------------------------------------------------- model copy and evaluation
def tuned_copy(model: SamModel, train_prompt_encoder: bool = False) -> SamModel:
    """A SamModel sharing ``model``'s image encoder, with its own copies of the trainable parts.

    The copy keeps the base model's signature, so cached embeddings (made by the same frozen
    encoder) are shared, and the base model keeps working untouched while the copy trains.
    """
    if model.family != "sam":
        raise MedSamError(f"fine-tuning supports SAM 1 family models (SAM, MedSAM, MobileSAM, LiteMedSAM), "
                          f"not {model.name}")
    network = copy.copy(model.network)
    network._modules = dict(model.network._modules)
    network.mask_decoder = copy.deepcopy(model.network.mask_decoder)
    if train_prompt_encoder:
        network.prompt_encoder = copy.deepcopy(model.network.prompt_encoder)
    return SamModel(network, model.pipeline, name=model.name, signature=model.signature, device=model.device)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def evaluate(scans: Sequence[_Scan], samples: Sequence[Sample]) -> tuple[float, dict[int, float]]:
    """Mean box-prompt Dice over ``samples`` (tight boxes, through the predictor), and per label value."""
    per: dict[int, list[float]] = {}
    for s in samples:
        masks = scans[s.scan].predictor.predict(s.index, Prompts(box=bounding_box(s.mask)))
        per.setdefault(s.label, []).append(_dice(masks.best, s.mask))
    scores = [d for values in per.values() for d in values]
    return (float(np.mean(scores)) if scores else 0.0), {k: float(np.mean(v)) for k, v in per.items()}


# --------------------------------------------------------------------------- training
def _loss(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    prob = torch.sigmoid(logits)
    dice = 1.0 - (2.0 * (prob * target).sum() + 1.0) / (prob.sum() + target.sum() + 1.0)
    if kind == "dice_focal":
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        p_t = prob * target + (1 - prob) * (1 - target)
        alpha = 0.25 * target + 0.75 * (1 - target)
        pixel = (alpha * (1 - p_t) ** 2 * bce).mean() * 20.0
    else:
        # Class-balanced: objects cover a few percent of a slice, and plain cross entropy first
        # teaches a decoder from scratch to answer "nothing" (where the Dice gradient vanishes).
        # Half the weight on the object's pixels, half on the rest.
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        inside = (bce * target).sum() / target.sum().clamp(min=1.0)
        outside = (bce * (1 - target)).sum() / (1 - target).sum().clamp(min=1.0)
        pixel = 0.5 * (inside + outside)
    return dice + pixel


def _schedule(total_steps: int, warmup: float) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up over ``warmup`` of the steps, then cosine decay to 0.

    A decoder trained from scratch needs a high rate to get going within a few hundred CPU
    steps, and the decay lets it settle in the last ones instead of jumping around the minimum.
    """
    total = max(1, int(total_steps))
    ramp = max(1, int(round(total * warmup)))

    def factor(step: int) -> float:
        if step < ramp:
            return (step + 1) / ramp
        done = min(1.0, (step - ramp) / max(1, total - ramp))
        return 0.5 * (1.0 + float(np.cos(np.pi * done)))

    return factor


class _Trainer:
    def __init__(self, model: SamModel, scans: Sequence[_Scan], config: FinetuneConfig, total_steps: int = 1) -> None:
        self.model, self.scans, self.config = model, scans, config
        self.rng = np.random.default_rng(config.seed)
        parts = [model.network.mask_decoder] + ([model.network.prompt_encoder] if config.train_prompt_encoder else [])
        self.params = [p for part in parts for p in part.parameters()]
        for p in model.network.parameters():
            p.requires_grad_(False)
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(total_steps, config.warmup))
        self.device = model.device

    def _forward(self, embeddings: torch.Tensor, points: np.ndarray | None, flags: np.ndarray | None,
                 boxes: np.ndarray | None, masks_in: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        coords = labels = box_t = None
        if points is not None:
            coords = torch.as_tensor(points, dtype=torch.float32, device=self.device)
            labels = torch.as_tensor(flags, dtype=torch.int64, device=self.device)
        if boxes is not None:
            box_t = torch.as_tensor(boxes, dtype=torch.float32, device=self.device)[:, None, :]
        low, iou = self.model.network.decode(embeddings, coords, labels, box_t, masks_in, multimask_output=False)
        return low[:, 0], iou[:, 0]

    def _batch_loss(self, low: torch.Tensor, iou: torch.Tensor, batch: Sequence[Sample]) -> torch.Tensor:
        total = low.new_zeros(())
        for i, s in enumerate(batch):
            hl, wl = self.scans[s.scan].low_shape
            logits = low[i, :hl, :wl]
            target = torch.as_tensor(s.target, device=self.device)
            with torch.no_grad():
                pred = logits > 0
                inter = (pred & (target > 0.5)).sum()
                union = (pred | (target > 0.5)).sum().clamp(min=1)
            total = total + _loss(logits, target, self.config.loss) + (iou[i] - inter / union) ** 2
        return total / len(batch)

    def step(self, batch: Sequence[Sample]) -> float:
        """One optimisation step on ``batch``; returns its loss."""
        cfg, rng = self.config, self.rng
        embeddings = torch.cat([torch.as_tensor(self.scans[s.scan].predictor.embed(s.index)) for s in batch])
        embeddings = embeddings.to(self.device)
        points = flags = boxes = None
        if rng.random() < cfg.point_fraction:
            positive, negative = int(rng.integers(1, 4)), int(rng.integers(0, 3))
            picked = [sample_points(s.mask, rng, positive, negative) for s in batch]
            points = np.stack([self.scans[s.scan].model_points(p) for s, (p, _f) in zip(batch, picked)])
            flags = np.stack([f.astype(np.int64) for _p, f in picked])
        else:
            boxes = np.stack([self.scans[s.scan].model_box(jittered_box(s.mask, rng, cfg.box_jitter)) for s in batch])
        self.optimizer.zero_grad(set_to_none=True)
        low, iou = self._forward(embeddings, points, flags, boxes, None)
        loss = self._batch_loss(low, iou, batch)
        for _ in range(cfg.corrections):
            # The next click goes where the answer so far is most wrong; the answer goes back in as a mask.
            clicks, signs = [], []
            for i, s in enumerate(batch):
                hl, wl = self.scans[s.scan].low_shape
                pred = (low[i, :hl, :wl] > 0).detach().cpu().numpy()
                found = correction_click(pred, s.target > 0.5)
                cell, positive = found if found is not None else (np.argwhere(s.target > 0.5)[0].astype(float), True)
                clicks.append(self.scans[s.scan].low_res_points(cell[None])[0])
                signs.append(1 if positive else 0)
            new = np.asarray(clicks)[:, None, :]
            points = new if points is None else np.concatenate([points, new], 1)
            sign = np.asarray(signs)[:, None]
            flags = sign if flags is None else np.concatenate([flags, sign], 1)
            low, iou = self._forward(embeddings, points, flags, boxes, low.detach()[:, None])
            loss = loss + self._batch_loss(low, iou, batch)
        loss = loss / (1 + cfg.corrections)
        loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return float(loss.detach())

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.network.state_dict().items()
                if k.startswith(self.trained_prefixes())}

    def trained_prefixes(self) -> tuple[str, ...]:
        return ("mask_decoder.",) + (("prompt_encoder.",) if self.config.train_prompt_encoder else ())

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        self.model.network.load_state_dict(state, strict=False)


def _subset(samples: list[Sample], count: int | None) -> list[Sample]:
    """``count`` evenly spread samples (``samples`` itself when it holds no more)."""
    if count is None or len(samples) <= count:
        return samples
    return [samples[i] for i in _spread(np.arange(len(samples)), count)]


def _cancelled(cancel: CancelFn) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def finetune(model: SamModel, pairs: Sequence[Pair], *, config: FinetuneConfig | None = None,
             validation: Sequence[Pair] | None = None, mapping: IntensityMapping | None = None,
             cache: EmbeddingCache | None = None, progress: ProgressFn | None = None,
             cancel: CancelFn = None, status: Callable[[str], Any] | None = None) -> FinetuneResult:
    """Train a copy of ``model``'s decoder on (volume, label volume) ``pairs``; the result holds the tuned model.

    ``validation`` pairs, when given, are the held-out data (no split of ``pairs``). ``progress``
    gets (epoch, step, loss, held-out Dice of the last evaluation) after every step; ``cancel``
    (a callable or an Event) stops after the current step and keeps the best state so far.
    """
    config = config or FinetuneConfig()
    started = time.perf_counter()
    tuned = tuned_copy(model, config.train_prompt_encoder)
    cache = cache or EmbeddingCache(MemoryCache(max_bytes=2 << 30))
    say = status or (lambda _text: None)
    data = list(pairs) + list(validation or [])
    scans = [_Scan(tuned, volume, mapping, config.axis, cache) for volume, _labels in data]
    samples = build_samples(scans, [np.asarray(labels) for _volume, labels in data], config)
    if validation:
        train = [s for s in samples if s.scan < len(pairs)]
        held = [s for s in samples if s.scan >= len(pairs)]
        if not train or not held:
            raise MedSamError("no samples to " + ("train on" if not train else "validate on"))
    else:
        train, held = split_samples(samples, config, len(scans))
    slices = sorted({(s.scan, s.index) for s in samples})
    say(f"embedding {len(slices)} slices")
    for scan_no, index in slices:  # the frozen encoder's share of the time, once per slice (cached)
        scans[scan_no].predictor.embed(index)
    embedded = time.perf_counter() - started
    say(f"embedded {len(slices)} slices in {embedded:.0f} s; training {len(train)} samples, {len(held)} held out")
    steps_per_epoch = -(-len(train) // max(1, config.batch_size))
    trainer = _Trainer(tuned, scans, config, total_steps=steps_per_epoch * config.epochs)
    # The per-epoch curve (and the choice of the best epoch) uses an evenly spread part of the
    # held-out samples; before and after are measured on all of them.
    watched = _subset(held, config.eval_samples)
    before, per_before = evaluate(scans, held)
    seen = before if watched is held else evaluate(scans, watched)[0]
    curve = [EpochRecord(0, None, seen, time.perf_counter() - started)]
    best, best_epoch = seen, 0
    best_state = trainer.state()
    if progress:
        progress(0, 0, float("nan"), before)
    cancelled = False
    rng = np.random.default_rng(config.seed + 1)
    for epoch in range(1, config.epochs + 1):
        order = rng.permutation(len(train))
        losses = []
        for step, start in enumerate(range(0, len(order), config.batch_size), 1):
            batch = [train[i] for i in order[start:start + config.batch_size]]
            losses.append(trainer.step(batch))
            if progress:
                progress(epoch, step, losses[-1], curve[-1].dice)
            if _cancelled(cancel):
                cancelled = True
                break
        if cancelled:
            break
        dice = evaluate(scans, watched)[0]
        curve.append(EpochRecord(epoch, float(np.mean(losses)), dice, time.perf_counter() - started))
        if dice > best:
            best, best_epoch, best_state = dice, epoch, trainer.state()
        if progress:
            progress(epoch, len(losses), float(np.mean(losses)), dice)
    trainer.restore(best_state)
    for p in tuned.network.parameters():
        p.requires_grad_(False)
    tuned.network.eval()
    if best_epoch == 0:
        best, best_per = before, per_before
    else:
        best, best_per = evaluate(scans, held)
    return FinetuneResult(
        dice_before=before, dice_after=best, curve=curve, seconds=time.perf_counter() - started,
        train_samples=len(train), val_samples=len(held), best_epoch=best_epoch, cancelled=cancelled,
        per_object_before=per_before, per_object_after=best_per, model=tuned,
        trained=tuple(p.rstrip(".") for p in trainer.trained_prefixes()), embed_seconds=embedded,
    )
