"""Propagation from one box per structure, no z-range: Dice and slices past each end, per structure.

    python benchmarks/bench_propagation.py [--seeds 3] [--predictor sam|kind] [--rule KEY=VALUE ...] [--only NAME]

For every labelled structure of both phantoms (``make_ct_phantom``, ``make_mr_phantom``, default
grids, phantom seeds 0..N-1, the stand-in seeded alike) it draws one box (2 px margin) around the
structure on its largest axial slice (axis 0), propagates with no z-range (``propagate``, default
settings, the StopRule given by ``--rule``) and prints, per structure and averaged over seeds:
the 3D Dice; the slices written past each true end (the larger of the two ends, worst seed, and
the mean over the ends that lie inside the volume); the slices missed inside the true extent;
the predictions made (the key's included). A second table is the per-slice true-box ceiling: the
same stand-in given the true box (2 px margin) on every slice of the true extent, no
propagation. The targets of issue 10 are printed next to the result. Prints; asserts nothing.

Structures that are not one compact object (the largest 3D connected piece under 95 % of the
voxels: the two lungs, the folded cortex) are skipped, and the skipped ones are listed.
The stand-ins are tests/sam_like_predictor.py (SAM-like: answers another structure past the
end, leaks, dropouts) and tests/gt_predictor.py (kind: empty past the end); both are given the
volume's intensities (``image=``), so a stop rule may use image evidence.

From Python: ``run_benchmark(seeds=3, predictor_kind="sam", rule=None) -> (rows, ceiling, skipped)``.
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from gt_predictor import GroundTruthPredictor, box_of, dice3d  # noqa: E402
from sam_like_predictor import SamLikePredictor  # noqa: E402

from napari_medsam.phantoms import make_ct_phantom, make_mr_phantom  # noqa: E402
from napari_medsam.segment.predictor import Prompts  # noqa: E402
from napari_medsam.segment.propagation import StopRule, propagate  # noqa: E402

BOX_MARGIN_PX = 2.0
COMPACT_FRACTION = 0.95  # the largest connected piece must hold this share of the voxels
TARGET_DICE_FRACTION = 0.97  # of the ceiling's mean Dice
TARGET_MEAN_PAST = 1.0  # slices past the end, mean over structures
TARGET_MAX_PAST = 3  # slices past the end, on any structure
PHANTOMS = {"CT": make_ct_phantom, "MR": make_mr_phantom}


@dataclass
class Row:
    """One structure's figures, averaged over seeds (``past_max``: worst seed)."""

    phantom: str
    name: str
    dice: list[float] = field(default_factory=list)
    past_max: list[int] = field(default_factory=list)  # per seed: the larger of the two ends
    past_mean: list[float] = field(default_factory=list)  # per seed: mean over the ends inside the volume
    missed: list[int] = field(default_factory=list)
    predictions: list[int] = field(default_factory=list)

    def summary(self) -> dict:
        return {"phantom": self.phantom, "structure": self.name, "dice": float(np.mean(self.dice)),
                "past_max": int(max(self.past_max)), "past_mean": float(np.mean(self.past_mean)),
                "missed": float(np.mean(self.missed)), "predictions": float(np.mean(self.predictions))}


def make_predictor(kind: str, gt: np.ndarray, volume, seed: int):
    """The stand-in: ``"sam"`` (errs like SAM) or ``"kind"`` (empty past the end)."""
    cls = {"sam": SamLikePredictor, "kind": GroundTruthPredictor}[kind]
    return cls(gt, seed=seed, spacing_mm=volume.spacing_mm, image=volume.array)


def compact(gt: np.ndarray, value: int) -> float:
    """The share of the structure's voxels in its largest 26-connected piece."""
    pieces, n = ndimage.label(gt == value, np.ones((3, 3, 3)))
    if n == 0:
        return 0.0
    sizes = np.bincount(pieces.ravel())[1:]
    return float(sizes.max() / sizes.sum())


def extent_figures(written: np.ndarray, truth: np.ndarray) -> tuple[int, float, int]:
    """(slices past the farther end, mean past over the ends inside the volume, slices missed inside)."""
    n = truth.shape[0]
    z = np.flatnonzero(truth.any(axis=(1, 2)))
    got = written.any(axis=(1, 2))
    below = int(np.count_nonzero(got[: z[0]]))
    above = int(np.count_nonzero(got[z[-1] + 1:]))
    inner = [p for p, edge in ((below, z[0] == 0), (above, z[-1] == n - 1)) if not edge]
    inside = truth.any(axis=(1, 2))
    missed = int(np.count_nonzero(inside & ~got))
    return max(below, above), float(np.mean(inner)) if inner else 0.0, missed


def first_key(predictor, gt: np.ndarray, value: int):
    """The user's box on the largest slice; if the answer is not the structure (a dropout), the next best slice."""
    areas = (gt == value).sum(axis=(1, 2))
    for k in np.argsort(-areas, kind="stable")[:4]:
        truth = gt[k] == value
        result = predictor.predict(int(k), Prompts(box=box_of(truth, BOX_MARGIN_PX)))
        if dice3d(result.masks[0], truth) >= 0.5:
            return int(k), result
    return int(np.argmax(areas)), result


def run_one(predictor, gt: np.ndarray, value: int, rule: StopRule | None) -> tuple[float, int, float, int, int]:
    """Propagate one structure from one box; (Dice, past max, past mean, missed, predictions)."""
    predictor.predict_calls.clear()
    k, key = first_key(predictor, gt, value)
    labels = np.zeros(gt.shape, np.uint8)
    propagate(predictor, labels, value, {k: key}, stop=rule)
    written, truth = labels == value, gt == value
    past_max, past_mean, missed = extent_figures(written, truth)
    return dice3d(written, truth), past_max, past_mean, missed, len(predictor.predict_calls)


def run_ceiling(predictor, gt: np.ndarray, value: int) -> tuple[float, int, float, int, int]:
    """The true box (2 px margin) on every slice of the true extent, no propagation."""
    predictor.predict_calls.clear()
    written = np.zeros(gt.shape, bool)
    for k in np.flatnonzero((gt == value).any(axis=(1, 2))):
        truth = gt[k] == value
        written[k] = predictor.predict(int(k), Prompts(box=box_of(truth, BOX_MARGIN_PX))).masks[0]
    truth = gt == value
    past_max, past_mean, missed = extent_figures(written, truth)
    return dice3d(written, truth), past_max, past_mean, missed, len(predictor.predict_calls)


def run_benchmark(seeds: int | list[int] = 3, predictor_kind: str = "sam", rule: StopRule | None = None,
                  only: str | None = None, ceiling: bool = True) -> tuple[list[dict], list[dict], list[str]]:
    """Rows (one dict per structure), the ceiling's rows, and the skipped structures with why."""
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    rows: dict[tuple[str, int], Row] = {}
    tops: dict[tuple[str, int], Row] = {}
    skipped: dict[str, str] = {}
    for phantom, make in PHANTOMS.items():
        for seed in seeds:
            volume, gt, names = make(seed=seed)
            for value, name in names.items():
                if only and only.lower() not in name.lower():
                    continue
                if not (gt == value).any():
                    skipped[f"{phantom} {name}"] = "absent from the volume"
                    continue
                share = compact(gt, value)
                if share < COMPACT_FRACTION:
                    skipped[f"{phantom} {name}"] = (f"not one compact object (largest connected piece "
                                                    f"{100 * share:.0f} % of it, seed {seed})")
                    continue
                predictor = make_predictor(predictor_kind, gt, volume, seed)
                row = rows.setdefault((phantom, value), Row(phantom, name))
                for target, figures in ((row, run_one(predictor, gt, value, rule)),):
                    d, pmax, pmean, missed, calls = figures
                    target.dice.append(d)
                    target.past_max.append(pmax)
                    target.past_mean.append(pmean)
                    target.missed.append(missed)
                    target.predictions.append(calls)
                if ceiling:
                    top = tops.setdefault((phantom, value), Row(phantom, name))
                    d, pmax, pmean, missed, calls = run_ceiling(make_predictor(predictor_kind, gt, volume, seed), gt,
                                                                value)
                    top.dice.append(d)
                    top.past_max.append(pmax)
                    top.past_mean.append(pmean)
                    top.missed.append(missed)
                    top.predictions.append(calls)
    # A structure skipped on any seed is skipped on all: the rows must compare like with like.
    keep = [key for key in rows if f"{key[0]} {rows[key].name}" not in skipped]
    return ([rows[k].summary() for k in keep], [tops[k].summary() for k in keep if k in tops],
            [f"{n}: {why}" for n, why in skipped.items()])


def table(rows: list[dict]) -> str:
    """A markdown table of the rows with a mean row."""
    lines = ["| structure | Dice | past end (max) | past end (mean) | missed inside | predictions |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['phantom']} {r['structure']} | {r['dice']:.3f} | {r['past_max']} | {r['past_mean']:.2f} "
                     f"| {r['missed']:.1f} | {r['predictions']:.1f} |")
    if rows:
        mean = {k: float(np.mean([r[k] for r in rows])) for k in ("dice", "past_mean", "missed", "predictions")}
        worst = max(r["past_max"] for r in rows)
        lines.append(f"| **mean** | **{mean['dice']:.3f}** | **{worst}** (worst) | **{mean['past_mean']:.2f}** "
                     f"| **{mean['missed']:.1f}** | **{mean['predictions']:.1f}** |")
    return "\n".join(lines)


def targets(rows: list[dict], ceiling: list[dict]) -> str:
    """The issue's targets against these rows."""
    dice = float(np.mean([r["dice"] for r in rows]))
    top = float(np.mean([r["dice"] for r in ceiling])) if ceiling else float("nan")
    past = float(np.mean([r["past_mean"] for r in rows]))
    worst = max(r["past_max"] for r in rows)
    over = [f"{r['phantom']} {r['structure']} ({r['past_max']})" for r in rows if r["past_max"] > TARGET_MAX_PAST]

    def mark(ok: bool) -> str:
        return "met" if ok else "NOT met"

    return "\n".join([
        f"- mean Dice >= {TARGET_DICE_FRACTION:.0%} of the ceiling: {dice:.3f} vs {TARGET_DICE_FRACTION} x {top:.3f} "
        f"= {TARGET_DICE_FRACTION * top:.3f} ({dice / top:.1%} of the ceiling): "
        f"{mark(dice >= TARGET_DICE_FRACTION * top)}",
        f"- mean slices past the end <= {TARGET_MEAN_PAST:g}: {past:.2f}: {mark(past <= TARGET_MEAN_PAST)}",
        f"- no structure more than {TARGET_MAX_PAST} slices past an end: worst {worst}"
        + (f" ({', '.join(over)})" if over else "") + f": {mark(worst <= TARGET_MAX_PAST)}",
    ])


def parse_rule(items: list[str]) -> StopRule:
    """``KEY=VALUE`` pairs (Python literals, else strings) into a StopRule."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--rule {item!r}: use KEY=VALUE")
        try:
            options[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = value.strip()
    try:
        return StopRule(**options)
    except TypeError as exc:
        raise SystemExit(f"--rule: {exc}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="phantom and stand-in seeds 0..N-1 (default 3)")
    parser.add_argument("--predictor", choices=("sam", "kind"), default="sam",
                        help="sam: errs like SAM (tests/sam_like_predictor.py); kind: tests/gt_predictor.py")
    parser.add_argument("--rule", action="append", default=[], metavar="KEY=VALUE",
                        help="a StopRule field, repeatable (e.g. --rule min_score=0.6)")
    parser.add_argument("--only", default=None, help="only structures whose name contains this")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the true-box ceiling table")
    args = parser.parse_args()
    rule = parse_rule(args.rule)
    start = time.perf_counter()
    rows, ceiling, skipped = run_benchmark(args.seeds, args.predictor, rule, args.only, not args.no_ceiling)
    changed = {k: v for k, v in vars(rule).items() if v != getattr(StopRule(), k)}
    print(f"Stand-in: {args.predictor}; seeds 0-{args.seeds - 1}; one box ({BOX_MARGIN_PX:g} px margin) on the "
          f"largest axial slice; no z-range; StopRule {changed or 'defaults'}\n")
    print(table(rows))
    if ceiling:
        print("\nCeiling: the true box on every slice of the true extent, no propagation\n")
        print(table(ceiling))
        print("\nTargets (issue 10):")
        print(targets(rows, ceiling))
    if skipped:
        print("\nSkipped:")
        for line in skipped:
            print(f"- {line}")
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
