"""A stand-in for SAM/MedSAM that errs the way they do, built from a phantom's ground truth.

:class:`~gt_predictor.GroundTruthPredictor` is kind: past an organ's end it answers with an empty
mask and a low score, so a stop rule that waits for empty slices looks perfect against it. Real
SAM-family models do not behave like that (issue 10): given a box where the organ has ended they
segment the most prominent other structure inside the box, with a confident predicted IoU; they
leak into touching neighbours on a fair share of slices and occasionally drop out.
:class:`SamLikePredictor` implements the same predictor protocol (``n_slices``, ``slice_shape``,
``embed``, ``predict``, ``to_low_res``/``from_low_res``, ``embed_calls``/``predict_calls``, and
``image(index)`` when built with ``image=``) with these behaviours.

How it answers a prompt on slice ``k`` (box, mask and points as in GroundTruthPredictor):

1. The *target* is the labelled structure the prompts point at best (the GroundTruthPredictor
   evidence: box fit ``|S & B| / sqrt(|S| |B|)``, Dice with a mask prompt, positive points on it).
2. **Past the end** (the target's evidence is below ``min_evidence``: the prompt covers none or
   almost none of it on this slice): the answer is the labelled structure OTHER than the target
   with the most pixels inside the prompt's window (the box; for a mask prompt without a box the
   mask grown by ``mask_reach_px``; for points alone the structure under the positive points),
   if it has at least ``min_other_px`` there: its mask restricted to the window grown by
   ``box_grow_px``, with a confident score drawn uniformly from ``wrong_score``. When only the
   target's remnant lies there, the remnant (a correct answer) with the kind score
   ``0.45 + 0.5 * evidence``. When no labelled structure lies in the window: an empty mask with
   the low score ``0.1 + 0.5 * evidence``.
3. **Dropout** (probability ``dropout`` on a slice where the target is present): answered as if
   past the end, but never with the target: the other structure in the window, confident, or an
   empty mask with a low score (0.05-0.30) when there is none.
4. **Leak** (probability ``leak`` on a slice where the target is present and touches another
   labelled structure inside the window): the answer adds the part of one touching neighbour
   (picked with probability proportional to the contact length) lying within
   ``leak_reach * sqrt(neighbour area in the window)`` (at least ``leak_min_px``) pixels of the
   target: a sizeable part of the neighbour next to the shared boundary, not a thin band. The
   score stays confident (the normal score minus ``leak_score_drop``).
5. Otherwise the target's mask (clipped to the window grown by ``box_grow_px``, as a box clips
   SAM's answer) with the normal score ``0.45 + 0.5 * evidence + N(0, 0.03)``.
6. **Boundary noise** on every non-empty answer: a smooth random field of ``boundary_px`` pixels
   (Gaussian, sigma 3 px) moves the edge, as in GroundTruthPredictor.

``multimask=True`` returns three candidates, best first (scores strictly decreasing, so the best
one always follows the rules above), like SAM's three granularity levels:

* normal slice: the answer; its core (eroded by 2 px, score -0.06); the answer plus a band of
  the nearest touching neighbour (``leak_min_px``), or the answer dilated when none (score -0.10);
* leak slice: the leaking answer; the answer without the leak (score -0.03: a rule that compares
  candidates with the previous slice can recover); the core without the leak (score -0.10);
* dropout: the other structure (or the empty mask); with probability 0.5 the true mask at a
  lower score (-0.05 to -0.15), otherwise the other structure dilated; the other's core (-0.18);
* past the end: the other structure; its core (-0.06); the union of the two most prominent
  other structures in the window (-0.10). Never the target, which is absent.

Every random draw comes from ``numpy.random.default_rng([seed, slice, target])``, made afresh in
each call, so runs are reproducible and calls from several threads do not interfere.

Parameters and defaults (the rates and score range come from issue 10, which measured them
against SAM/MedSAM on real abdominal CT):

``seed=0``
    the stand-in's seed (with the slice and the target it seeds every draw).
``leak=0.15``
    leaks on ~15 % of the slices that have a touching labelled neighbour.
``dropout=0.03``
    dropouts on ~3 % of the slices inside the structure.
``wrong_score=(0.65, 0.85)``
    predicted IoU of a confident wrong answer (past the end, dropout): drawn uniformly, mean 0.75.
``boundary_px=1.0``
    standard deviation of the boundary displacement, as GroundTruthPredictor.
``min_evidence=0.3``
    the target's evidence under which the prompt is "past its end" (GroundTruthPredictor's value:
    a box whose structure fills under ~9 % of it).
``min_other_px=10``
    an other structure needs this many pixels in the window to be segmented (SAM does not return
    a 3-pixel sliver with confidence).
``box_grow_px=3``
    answers reach at most this far outside the box (SAM's masks hug the box).
``mask_reach_px=4``
    a mask prompt without a box lets the answer grow this far beyond it (GroundTruthPredictor).
``leak_reach=0.5``, ``leak_min_px=3``
    how deep a leak goes into the neighbour: ``leak_reach * sqrt(area)`` pixels, at least
    ``leak_min_px`` (0.5: about 0.9 of a round neighbour's radius, so its near half leaks).
``leak_score_drop=0.02``
    a leaking answer is barely less confident than a clean one.
``image=None``
    the volume's array (same shape as ``gt``); when given, ``image(index)`` returns the slice's
    intensities (see GroundTruthPredictor).

``events`` records what happened on each prediction, ``(slice, kind, target, answered)`` with
kind one of ``"normal"``, ``"leak"``, ``"dropout"``, ``"past_end"``, ``"remnant"``, ``"empty"``:
for tests and benchmarks only (a real predictor has nothing like it).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from gt_predictor import GroundTruthPredictor, disk, point_rules, signed_distance
from napari_medsam.segment.predictor import Prompts, SliceMasks


class SamLikePredictor(GroundTruthPredictor):
    """The predictor protocol from a ground-truth label volume, erring like SAM (see the module docstring)."""

    def __init__(self, gt: np.ndarray, axis: int = 0, *, seed: int = 0, spacing_mm=None, image=None,
                 leak: float = 0.15, dropout: float = 0.03, wrong_score: tuple[float, float] = (0.65, 0.85),
                 boundary_px: float = 1.0, min_evidence: float = 0.3, min_other_px: int = 10,
                 box_grow_px: int = 3, mask_reach_px: int = 4, leak_reach: float = 0.5, leak_min_px: int = 3,
                 leak_score_drop: float = 0.02, carve_px: int = 3) -> None:
        super().__init__(gt, axis, seed=seed, spacing_mm=spacing_mm, boundary_px=boundary_px, dropout=dropout,
                         leak=leak, min_evidence=min_evidence, carve_px=carve_px, mask_reach_px=mask_reach_px,
                         leak_px=leak_min_px, image=image)
        lo, hi = wrong_score
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"wrong_score {wrong_score}: need 0 <= low <= high <= 1")
        self.wrong_score = (float(lo), float(hi))
        self.min_other_px, self.box_grow_px = int(min_other_px), int(box_grow_px)
        self.leak_reach, self.leak_min_px, self.leak_score_drop = float(leak_reach), int(leak_min_px), leak_score_drop
        self.events: list[tuple[int, str, int, int]] = []

    # ------------------------------------------------------------------ prediction
    def predict(self, index: int, prompts: Prompts, multimask: bool = False) -> SliceMasks:
        if not 0 <= index < self.n_slices:
            raise IndexError(f"slice {index} outside the volume")
        with self._lock:
            self.predict_calls.append(int(index))
        truth = np.take(self.gt, index, axis=self.axis)
        candidates, event = self._respond(int(index), truth, prompts)
        with self._lock:
            self.events.append((int(index), *event))
        if not multimask:
            candidates = candidates[:1]
        masks = np.stack([m for m, _ in candidates])
        scores = np.array([float(np.clip(s, 0.0, 0.99)) for _, s in candidates], np.float32)
        return SliceMasks(masks, scores, np.stack([self.to_low_res(m) for m in masks]), index=index, axis=self.axis)

    def _windows(self, truth: np.ndarray, prompts: Prompts):
        """(box, prompt mask, counting window, reach window) of the prompts on this slice."""
        h, w = truth.shape
        box = prompt_mask = None
        if prompts.box is not None:
            r0, c0, r1, c1 = prompts.box
            rr, cc = np.ogrid[:h, :w]
            box = (rr >= r0 - 0.5) & (rr <= r1 + 0.5) & (cc >= c0 - 0.5) & (cc <= c1 + 0.5)
        if prompts.mask_logits is not None:
            prompt_mask = self.from_low_res(prompts.mask_logits)
        if box is not None:
            count = box
            reach = ndimage.binary_dilation(box, iterations=self.box_grow_px)
        elif prompt_mask is not None:
            count = reach = ndimage.binary_dilation(prompt_mask, disk(self.mask_reach_px))
        else:  # points alone: what lies under the positive points, anywhere on the slice
            count = np.zeros(truth.shape, bool)
            for p in prompts.points[prompts.positive]:
                count[self._pixel(p)] = True
            reach = np.ones(truth.shape, bool)
        return box, prompt_mask, count, reach

    def _others(self, truth: np.ndarray, count: np.ndarray, exclude: int) -> list[int]:
        """Labelled structures other than ``exclude`` in the window, most pixels first (ties: lower label)."""
        values, counts = np.unique(truth[count], return_counts=True)
        found = [(int(c), int(v)) for v, c in zip(values, counts) if v not in (0, exclude) and c >= self.min_other_px]
        if count.sum() < self.min_other_px:  # points: a single pixel says which structure
            found = [(int(c), int(v)) for v, c in zip(values, counts) if v not in (0, exclude)]
        return [v for _, v in sorted(found, key=lambda cv: (-cv[0], cv[1]))]

    def _noisy(self, region: np.ndarray, field: np.ndarray) -> np.ndarray:
        return (signed_distance(region) + field > 0) if region.any() else region

    def _respond(self, index: int, truth: np.ndarray, prompts: Prompts):
        box, prompt_mask, count, reach = self._windows(truth, prompts)
        labels = [int(v) for v in np.unique(truth) if v != 0]
        evidence = {v: self._evidence(truth == v, box, prompt_mask, prompts) for v in labels}
        target = max(evidence, key=evidence.get) if evidence else 0
        ev = evidence.get(target, 0.0)
        rng = np.random.default_rng([self.seed, index, target])
        u_drop, u_leak, u_pick, u_alt = rng.random(4)
        wrong = float(rng.uniform(*self.wrong_score))
        noise = float(rng.normal(0, 0.03))
        field = ndimage.gaussian_filter(rng.standard_normal(truth.shape), 3.0)
        field *= self.boundary_px / max(float(field.std()), 1e-6)
        empty = np.zeros(truth.shape, bool)
        present = target != 0 and ev >= self.min_evidence

        def other_answer(kind: str, low: float):
            others = self._others(truth, count, target)
            if not others:
                return [(empty, low), (empty, low - 0.02), (empty, low - 0.04)], None
            main = (truth == others[0]) & reach
            core = ndimage.binary_erosion(main, iterations=2)
            if kind == "dropout":
                if u_alt < 0.5:
                    second = (self._noisy(self._target_region(truth, target, reach, prompts), field),
                              wrong - 0.05 - 0.1 * u_pick)
                else:
                    second = (self._noisy(ndimage.binary_dilation(main, iterations=2), field), wrong - 0.1)
                third = (self._noisy(core, field), wrong - 0.18)
            else:
                second = (self._noisy(core, field), wrong - 0.06)
                union = np.isin(truth, others[:2]) & reach
                third = (self._noisy(union, field), wrong - 0.1)
            return [(self._noisy(main, field), wrong), second, third], others[0]

        if not present:
            answer, other = other_answer("past_end", float(0.1 + 0.5 * ev))
            if other is not None:
                return answer, ("past_end", target, other)
            remnant = (truth == target) & reach if target else empty
            if np.count_nonzero(remnant) >= 1:
                score = float(0.45 + 0.5 * ev + noise)
                mask = self._noisy(remnant, field)
                return [(mask, score), (self._noisy(ndimage.binary_erosion(remnant), field), score - 0.05),
                        (self._noisy(ndimage.binary_dilation(remnant), field), score - 0.1)], \
                    ("remnant", target, target)
            return answer, ("empty", target, 0)

        if u_drop < self.dropout:
            answer, other = other_answer("dropout", float(0.05 + 0.25 * u_pick))
            if other is None and u_alt < 0.5:  # the true mask as a weaker candidate
                true = self._noisy(self._target_region(truth, target, reach, prompts), field)
                answer[1] = (true, answer[0][1] - 0.03)
            return answer, ("dropout", target, other or 0)

        region = self._target_region(truth, target, reach, prompts)
        score = float(0.45 + 0.5 * ev + noise)
        core = ndimage.binary_erosion(region, iterations=2)
        neighbours = self._touching(truth, region, target, reach)
        if neighbours and u_leak < self.leak:
            weights = np.array([n for _, n in neighbours], float)
            pick = int(np.searchsorted(np.cumsum(weights / weights.sum()), u_pick, side="right"))
            other = neighbours[min(pick, len(neighbours) - 1)][0]
            spill = self._spill(truth, region, other, reach)
            leaked = region | spill
            return [(self._noisy(leaked, field), score - self.leak_score_drop),
                    (self._noisy(region, field), score - self.leak_score_drop - 0.03),
                    (self._noisy(core, field), score - 0.1)], ("leak", target, other)
        if neighbours:
            near = neighbours[0][0]
            band = (truth == near) & reach & (ndimage.distance_transform_edt(~region) <= self.leak_min_px)
            third = region | band
        else:
            third = ndimage.binary_dilation(region, iterations=2)
        return [(self._noisy(region, field), score), (self._noisy(core, field), score - 0.06),
                (self._noisy(third, field), score - 0.1)], ("normal", target, target)

    def _target_region(self, truth: np.ndarray, target: int, reach: np.ndarray, prompts: Prompts) -> np.ndarray:
        """The target's true mask as SAM would cut it: within the window, points rules as GroundTruthPredictor."""
        region = (truth == target) & reach
        points_only = prompts.box is None and prompts.mask_logits is None
        return point_rules(region, prompts, self._pixel, self.carve_px, points_only)

    def _touching(self, truth: np.ndarray, region: np.ndarray, target: int, reach: np.ndarray) -> list[tuple[int, int]]:
        """Labelled neighbours touching ``region`` inside the window, with their contact lengths, longest first."""
        if not region.any():
            return []
        ring = ndimage.binary_dilation(region, disk(2)) & ~region & reach
        values, counts = np.unique(truth[ring], return_counts=True)
        found = [(int(v), int(c)) for v, c in zip(values, counts) if v not in (0, target)]
        return sorted(found, key=lambda vc: (-vc[1], vc[0]))

    def _spill(self, truth: np.ndarray, region: np.ndarray, other: int, reach: np.ndarray) -> np.ndarray:
        """The part of neighbour ``other`` a leak takes: its pixels in the window near the shared boundary."""
        theirs = (truth == other) & reach
        depth = max(float(self.leak_min_px), self.leak_reach * float(np.sqrt(np.count_nonzero(theirs))))
        return theirs & (ndimage.distance_transform_edt(~region) <= depth)
