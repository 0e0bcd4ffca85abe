"""A stand-in for SAM built from a phantom's ground truth, for propagation tests and measurements.

Given prompts on slice k, :class:`GroundTruthPredictor` finds the labelled structure the prompts
point at (box: the structure filling the box best; mask prompt: best Dice with the mask; points:
positive points inside it) and answers with its ground-truth mask on that slice, degraded the
way a real model errs, all seeded by (seed, slice, structure) so runs are reproducible:

* wavy boundaries: a smooth random field of about ``boundary_px`` pixels moves the edge;
* dropouts: with probability ``dropout`` an empty mask with a low score;
* leaks: with probability ``leak`` a band of a touching structure is added;
* prompts only partly on the structure give a lower score; prompts on nothing (past an organ's
  end) give an EMPTY mask with a low score;
* a box clips the mask (a box that is too tight cuts the object), a mask prompt without a box
  lets the answer grow only ``mask_reach_px`` beyond it, points alone select only the connected
  pieces they touch, and negative points that fall on the structure carve a hole around them.

Its low-res logits are the answer's signed distance on a 256x256 grid stretched over the slice,
so the "mask" prompt mode works.

Built with ``image=`` (the volume's array, the same shape as ``gt``), it also has the optional
protocol method ``image(index)``: the slice's intensities as a float32 2D array, oriented like the
masks. Built without one, it has no ``image`` attribute at all (``getattr(predictor, "image",
None)`` is None), like a predictor that cannot offer image evidence.

This predictor is KIND: past an organ's end it answers with an empty mask. ``SamLikePredictor``
in tests/sam_like_predictor.py errs like SAM instead (another structure, confidently).

Run ``python tests/gt_predictor.py`` to print the measurements
behind the defaults of docs/propagation.md.
"""

from __future__ import annotations

import threading

import numpy as np
from scipy import ndimage

from napari_medsam.segment.predictor import Prompts, SliceMasks

LOW_RES = 256


def resample(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resampling of a 2D array onto ``shape``, pixel centres onto pixel centres."""
    grids = [(np.arange(n) + 0.5) * (m / n) - 0.5 for n, m in zip(shape, array.shape)]
    rr, cc = np.meshgrid(*grids, indexing="ij")
    return ndimage.map_coordinates(np.asarray(array, np.float32), [rr, cc], order=1, mode="nearest")


def signed_distance(mask: np.ndarray) -> np.ndarray:
    """Positive inside, negative outside, in pixels (+-1000 for an all-in or all-out mask)."""
    if not mask.any():
        return np.full(mask.shape, -1000.0)
    if mask.all():
        return np.full(mask.shape, 1000.0)
    return ndimage.distance_transform_edt(mask) - ndimage.distance_transform_edt(~mask)


def point_rules(region: np.ndarray, prompts: Prompts, pixel, carve_px: int, points_only: bool) -> np.ndarray:
    """How points cut an answer: points alone keep only the pieces their positive points touch;
    a negative point that lands on the region carves a hole of ``carve_px`` around it."""
    if prompts.points is not None and points_only:
        pieces, _ = ndimage.label(region, np.ones((3, 3)))
        hit = {pieces[pixel(p)] for p in prompts.points[prompts.positive]} - {0}
        region = np.isin(pieces, list(hit))
    if prompts.points is not None:
        for p in prompts.points[~prompts.positive]:
            if region[pixel(p)]:
                carve = np.zeros_like(region)
                carve[pixel(p)] = True
                region &= ~ndimage.binary_dilation(carve, disk(carve_px))
    return region


def disk(radius: int) -> np.ndarray:
    """A disk-shaped structuring element."""
    r = np.arange(-radius, radius + 1)
    return r[:, None] ** 2 + r[None, :] ** 2 <= radius**2


class GroundTruthPredictor:
    """Implements the predictor protocol from a ground-truth label volume (see the module docstring)."""

    def __init__(self, gt: np.ndarray, axis: int = 0, *, seed: int = 0, spacing_mm=None, boundary_px: float = 1.0,
                 dropout: float = 0.05, leak: float = 0.08, min_evidence: float = 0.3, carve_px: int = 3,
                 mask_reach_px: int = 4, leak_px: int = 4, image=None) -> None:
        self.gt, self.axis, self.seed = gt, axis, seed
        self.spacing_mm = spacing_mm
        self.boundary_px, self.dropout, self.leak, self.leak_px = boundary_px, dropout, leak, leak_px
        self.min_evidence, self.carve_px, self.mask_reach_px = min_evidence, carve_px, mask_reach_px
        self.embed_calls: list[int] = []
        self.predict_calls: list[int] = []
        self._lock = threading.Lock()
        if image is not None:
            array = np.asarray(getattr(image, "array", image))
            if array.shape != gt.shape:
                raise ValueError(f"image shape {array.shape} differs from the labels' {gt.shape}")
            self._image = array
            self.image = self._image_slice  # only then: the engine probes getattr(predictor, "image", None)

    def _image_slice(self, index: int) -> np.ndarray:
        """Slice ``index``'s intensities (float32, the masks' orientation); bound as ``image`` when given one."""
        if not 0 <= index < self.n_slices:
            raise IndexError(f"slice {index} outside the volume")
        return np.take(self._image, int(index), axis=self.axis).astype(np.float32)

    @property
    def n_slices(self) -> int:
        return int(self.gt.shape[self.axis])

    @property
    def slice_shape(self) -> tuple[int, int]:
        return tuple(s for a, s in enumerate(self.gt.shape) if a != self.axis)  # type: ignore[return-value]

    def embed(self, index: int) -> np.ndarray:
        if not 0 <= index < self.n_slices:
            raise IndexError(f"slice {index} outside the volume")
        with self._lock:
            self.embed_calls.append(int(index))
        return np.zeros((1, 4, 4, 4), np.float32)

    def to_low_res(self, mask: np.ndarray) -> np.ndarray:
        """(256, 256) logits of a slice mask: its signed distance, clipped to +-8 pixels."""
        return np.clip(resample(signed_distance(mask), (LOW_RES, LOW_RES)), -8, 8).astype(np.float32)

    def from_low_res(self, logits: np.ndarray) -> np.ndarray:
        """The slice mask of (256, 256) logits."""
        return resample(logits, self.slice_shape) > 0

    # ------------------------------------------------------------------ prediction
    def predict(self, index: int, prompts: Prompts, multimask: bool = False) -> SliceMasks:
        with self._lock:
            self.predict_calls.append(int(index))
        truth = np.take(self.gt, index, axis=self.axis)
        mask, score = self._answer(index, truth, prompts)
        masks = [mask]
        scores = [score]
        if multimask:
            masks += [ndimage.binary_erosion(mask), ndimage.binary_dilation(mask)]
            scores += [score - 0.05, score - 0.1]
        return SliceMasks(np.stack(masks), np.array(scores, np.float32),
                          np.stack([self.to_low_res(m) for m in masks]), index=index, axis=self.axis)

    def _evidence(self, region: np.ndarray, box: np.ndarray | None, prompt_mask: np.ndarray | None,
                  prompts: Prompts) -> float:
        terms = []
        if box is not None:
            inter = np.count_nonzero(region & box)
            terms.append(inter / np.sqrt(np.count_nonzero(region) * max(np.count_nonzero(box), 1)))
        if prompt_mask is not None:
            total = np.count_nonzero(region) + np.count_nonzero(prompt_mask)
            terms.append(2 * np.count_nonzero(region & prompt_mask) / max(total, 1))
        if prompts.points is not None:
            hits = np.array([region[self._pixel(p)] for p in prompts.points])
            pos, neg = prompts.positive, ~prompts.positive
            value = hits[pos].mean() if pos.any() else 0.0
            value -= 0.5 * hits[neg].mean() if neg.any() else 0.0
            terms.append(float(np.clip(value, 0.0, 1.0)))
        return float(np.mean(terms))

    def _pixel(self, point: np.ndarray) -> tuple[int, int]:
        h, w = self.slice_shape
        return int(np.clip(round(point[0]), 0, h - 1)), int(np.clip(round(point[1]), 0, w - 1))

    def _answer(self, index: int, truth: np.ndarray, prompts: Prompts) -> tuple[np.ndarray, float]:
        h, w = truth.shape
        box = None
        if prompts.box is not None:
            r0, c0, r1, c1 = prompts.box
            rr, cc = np.ogrid[:h, :w]
            box = (rr >= r0 - 0.5) & (rr <= r1 + 0.5) & (cc >= c0 - 0.5) & (cc <= c1 + 0.5)
        prompt_mask = self.from_low_res(prompts.mask_logits) if prompts.mask_logits is not None else None
        candidates = [int(v) for v in np.unique(truth) if v != 0]
        evidence = {v: self._evidence(truth == v, box, prompt_mask, prompts) for v in candidates}
        best = max(evidence, key=evidence.get) if evidence else 0
        ev = evidence.get(best, 0.0)
        rng = np.random.default_rng([self.seed, int(index), best])
        u_drop, u_leak, u_pick = rng.random(3)
        field = ndimage.gaussian_filter(rng.standard_normal(truth.shape), 3.0)
        field *= self.boundary_px / max(float(field.std()), 1e-6)
        score = float(np.clip(0.45 + 0.5 * ev + rng.normal(0, 0.03), 0.0, 0.99))
        if best == 0 or ev < self.min_evidence:
            return np.zeros(truth.shape, bool), float(0.1 + 0.5 * ev)
        region = truth == best
        if box is not None:
            region &= ndimage.binary_dilation(box)
        elif prompt_mask is not None:
            region &= ndimage.binary_dilation(prompt_mask, disk(self.mask_reach_px))
        region = point_rules(region, prompts, self._pixel, self.carve_px, box is None and prompt_mask is None)
        if u_leak < self.leak:
            near = ndimage.binary_dilation(region, disk(2))
            neighbours = sorted({int(v) for v in np.unique(truth[near]) if v not in (0, best)})
            if neighbours:
                other = neighbours[int(u_pick * len(neighbours))]
                band = (truth == other) & ndimage.binary_dilation(region, disk(self.leak_px))
            else:
                band = ndimage.binary_dilation(region, disk(2))
            region |= band & ndimage.binary_dilation(box) if box is not None else band
        mask = (signed_distance(region) + field > 0) if region.any() else region
        if u_drop < self.dropout:
            return np.zeros(truth.shape, bool), float(0.05 + 0.25 * u_pick)
        return mask, score


def box_of(mask: np.ndarray, margin: float = 2.0) -> np.ndarray:
    """(row0, col0, row1, col1) around a 2D mask with a margin, as a user would draw it."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    h, w = mask.shape
    return np.array([max(rows[0] - margin, 0), max(cols[0] - margin, 0), min(rows[-1] + margin, h - 1),
                     min(cols[-1] + margin, w - 1)], float)


def key_from_box(predictor: GroundTruthPredictor, gt: np.ndarray, organ: int, index: int) -> tuple[int, SliceMasks]:
    """The user's first step: a box around ``organ`` on slice ``index`` (the next slice if that one drops out)."""
    for k in (index, index + 1, index - 1, index + 2):
        truth = np.take(gt, k, axis=predictor.axis) == organ
        if truth.any():
            result = predictor.predict(k, Prompts(box=box_of(truth)))
            if result.masks[0].any():
                return k, result
    raise AssertionError(f"organ {organ} could not be prompted near slice {index}")


def dice3d(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean volumes."""
    total = np.count_nonzero(a) + np.count_nonzero(b)
    return 1.0 if total == 0 else 2.0 * np.count_nonzero(a & b) / total


# ---------------------------------------------------------------------- measurements
ORGANS = (1, 2, 3, 4)
MODES = ("box", "points", "mask", "box+mask", "box+points", "points+mask", "box+points+mask")


def measure(mode: str = "box+mask", *, seeds=(0, 1, 2), shape=(40, 96, 96), spacing=(4.0, 3.6, 3.6),
            keys: int = 1, **options) -> dict:
    """Per-organ mean Dice, worst overshoot past the true z-extent and reach, over phantom seeds.

    ``keys=1``: one box on the middle slice; ``keys=n``: the true masks on n evenly spread slices.
    """
    from napari_medsam.phantoms import make_ct_phantom
    from napari_medsam.segment.propagation import propagate

    out: dict = {o: {"dice": [], "overshoot": 0, "short": 0, "calls": []} for o in ORGANS}
    for seed in seeds:
        volume, gt, _ = make_ct_phantom(shape=shape, spacing_mm=spacing, seed=seed)
        for organ in ORGANS:
            predictor = GroundTruthPredictor(gt, spacing_mm=volume.spacing_mm, seed=seed)
            z = np.flatnonzero((gt == organ).any(axis=(1, 2)))
            if keys == 1:
                key_slices = dict([key_from_box(predictor, gt, organ, (z[0] + z[-1]) // 2)])
            else:  # key slices as the user left them after checking: the true masks
                marks = [z[0] + (2 * i + 1) * len(z) // (2 * keys) for i in range(keys)]
                key_slices = {m: gt[m] == organ for m in marks}
            labels = np.zeros(gt.shape, np.uint8)
            predictor.predict_calls.clear()
            propagate(predictor, labels, organ, key_slices, prompt_mode=mode, **options)
            got = np.flatnonzero((labels == organ).any(axis=(1, 2)))
            row = out[organ]
            row["dice"].append(dice3d(labels == organ, gt == organ))
            row["calls"].append(len(predictor.predict_calls))
            row["overshoot"] = max(row["overshoot"], z[0] - got[0], got[-1] - z[-1])
            row["short"] = max(row["short"], got[0] - z[0], z[-1] - got[-1])
    return {o: {**v, "dice": float(np.mean(v["dice"])), "calls": float(np.mean(v["calls"]))} for o, v in out.items()}


def _table(rows: dict[str, dict]) -> str:
    from napari_medsam.phantoms import CT_LABELS

    head = "| setting | " + " | ".join(CT_LABELS[o] for o in ORGANS) + " | mean | overshoot | short | predictions |"
    lines = [head, "|" + " --- |" * (len(ORGANS) + 5)]
    for name, res in rows.items():
        dices = [res[o]["dice"] for o in ORGANS]
        over = max(res[o]["overshoot"] for o in ORGANS)
        short = max(res[o]["short"] for o in ORGANS)
        calls = np.mean([res[o]["calls"] for o in ORGANS])
        cells = " | ".join(f"{d:.3f}" for d in dices)
        lines.append(f"| {name} | {cells} | {np.mean(dices):.3f} | {over} | {short} | {calls:.1f} |")
    return "\n".join(lines)


def main() -> None:
    """Print the tables of docs/propagation.md."""
    import sys

    from napari_medsam.segment.propagation.stop_rules import StopRule

    small = dict(shape=(40, 96, 96), spacing=(4.0, 3.6, 3.6))
    large = dict(shape=(56, 168, 168), spacing=(2.8, 2.1, 2.1))
    what = sys.argv[1:] or ["modes", "settings", "stop", "keys"]
    if "modes" in what:
        for name, grid in (("40x96x96, 4 mm slices", small), ("56x168x168, 2.8 mm slices", large)):
            print(f"\nPrompt modes, one key slice, {name}, seeds 0-4:")
            print(_table({m: measure(m, seeds=range(5), **grid) for m in MODES}))
    if "settings" in what:
        from napari_medsam.segment.prompting import PromptSettings

        variants = {
            "box+mask, margin 2 px + 5 % (default)": ("box+mask", PromptSettings()),
            "box+mask, margin 0": ("box+mask", PromptSettings(box_margin_px=0, box_margin_fraction=0)),
            "box+mask, margin 5 px + 10 %": ("box+mask", PromptSettings(box_margin_px=5, box_margin_fraction=0.1)),
            "points, ring 5 px (default)": ("points", PromptSettings()),
            "points, ring 3 px": ("points", PromptSettings(negative_ring_px=3)),
            "points, ring 8 px": ("points", PromptSettings(negative_ring_px=8)),
            "points, no negatives": ("points", PromptSettings(n_negative=0)),
        }
        print("\nPrompt settings, 40x96x96, seeds 0-4:")
        print(_table({n: measure(m, seeds=range(5), prompt=p, **small) for n, (m, p) in variants.items()}))
    if "stop" in what:
        rules = {
            "default": StopRule(),
            "min_overlap 0.4": StopRule(min_overlap=0.4),
            "min_overlap 0.6": StopRule(min_overlap=0.6),
            "max_area_ratio 2.0": StopRule(max_area_ratio=2.0),
            "max_area_ratio 4.0": StopRule(max_area_ratio=4.0),
            "min_score 0.6": StopRule(min_score=0.6),
            "max_rejected 1": StopRule(max_rejected_slices=1),
            "max_empty 2": StopRule(max_empty_slices=2),
            "max_empty 3": StopRule(max_empty_slices=3),
        }
        for name, grid in (("40x96x96", small), ("56x168x168", large)):
            print(f"\nStop rule variants, box+mask, {name}, seeds 0-4:")
            print(_table({n: measure("box+mask", seeds=range(5), stop=r, **grid) for n, r in rules.items()}))
    if "keys" in what:
        for n in (2, 3):
            print(f"\n{n} key slices (true masks, evenly spread), box+mask, 40x96x96, seeds 0-4:")
            print(_table({r: measure("box+mask", seeds=range(5), keys=n, reconcile=r, **small)
                          for r in ("meet", "best_score")}))

if __name__ == "__main__":
    main()
