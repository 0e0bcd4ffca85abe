"""Same-run figure ``propagate60_lite_medsam``: a 60-slice LiteMedSAM propagation, official vs project.

    python benchmarks/compare_official.py --official-src DIR --propagation [--repeats 3]

Why a figure of its own: it has three sides, timed in turns in one process on the same volume
and weights (the order flips every round, as in ``compare_official.alternate``):

* official: the LiteMedSAM script's own 3D loop, ``MedSAM_infer_npz_3D`` of
  ``CVPR24_LiteMedSAM_infer.py``, called on an ``.npz`` holding the windowed volume and one 3D box
  whose z-extent is the whole volume (z 0..59). Per slice it runs its preprocessing, its
  ``image_encoder`` and ``medsam_inference``; the key slice is the box's middle,
  ``int((59 - 0) / 2) = 29``; going up and then down, each slice is prompted with the bounding box
  (``get_bbox256``, 3 px margin in the 256 frame) of the previous slice's mask, or with the key box
  when that mask is empty. It has no early stop: the box's z-extent is the range, so it processes
  all 60 slices. Its time includes reading the input ``.npz`` (uncompressed) and writing the
  compressed output ``.npz``, which the loop does; the overlay PNG is switched off (module global
  ``save_overlay = False``; the script's flag cannot turn it off, ``store_true`` with default True).
* project cold: a new ``SlicePredictor`` (empty embedding cache; the model is loaded once, as in
  the plugin) and ``propagate`` from the same key box on slice 29, both directions.
* project warm: ``propagate`` again on a predictor whose cache already holds every slice.

Comparable work: the project is told to prompt with the previous mask's box only
(``PromptSettings(mode="box", box_margin_px=6)``, the official 3 px at 256 = 6 px at 512) and to
process every slice of the range: :func:`accept_all_rule` keeps the stop rule's measurements (and
their cost) but accepts every non-empty mask and never ends a front inside the volume, and
``fill_skipped=False`` (the official loop interpolates nothing). Both sides thus encode and decode
each of the 60 slices once. One difference stays: after an empty mask the project prompts from
its last non-empty mask, the official loop from the key box.

What is printed besides the times (with random weights the masks mean nothing; context only):
Dice of the two sides' 3D masks; whether the project's cold and warm masks are identical; on how
many slices both sides prompted with the same box (in the 256 frame) and how many mask pixels
differ there; and a fidelity check, outside the timing: the project's ``SlicePredictor.predict``
given, on every slice, the box the official loop used there, against the official mask.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FIGURE = "propagate60_lite_medsam"
LABEL = "60-slice propagation, LiteMedSAM (official MedSAM_infer_npz_3D loop vs project propagate)"
N_SLICES = 60
SLICE = 512
SPACING_MM = (2.8, 0.7, 0.7)  # the phantom's default field of view at 512x512 in-plane
ORGAN = "liver"  # slices 6-48 of this phantom: the longest abdominal organ
OFFICIAL_SHIFT_256 = 3  # get_bbox256's margin in the 256 frame
SIDES = ("official", "project cold", "project warm")


# ---------------------------------------------------------------------- helpers (no official code)
def official_slice_order(n: int) -> tuple[int, list[int], list[int]]:
    """(key, up, down) of the official 3D loop for a 3D box spanning z 0..n-1.

    The script takes ``z_middle = int((z_max - z_min) / 2 + z_min)``, walks ``range(z_middle,
    min(z_max + 1, n))`` and then ``range(z_middle - 1, max(-1, z_min - 1), -1)``.
    """
    z_min, z_max = 0, n - 1
    key = int((z_max - z_min) / 2 + z_min)
    return key, list(range(key, min(z_max + 1, n))), list(range(key - 1, max(-1, z_min - 1), -1))


def accept_all_rule(n: int) -> Any:
    """A StopRule that measures every slice but accepts each non-empty mask and never ends a front in 0..n-1."""
    from napari_medsam.segment.propagation.stop_rules import StopRule

    return StopRule(z_range=(0, n - 1), min_score=-math.inf, min_overlap=0.0, min_area_ratio=0.0, max_area_ratio=1e9,
                    min_area_px=1, max_empty_slices=n + 1, max_rejected_slices=n + 1, max_leak_slices=n + 1,
                    min_intensity_match=0.0, min_previous_match=0.0, max_outside_fraction=1.0,
                    max_centroid_shift=1e9, max_lost_fraction=1.0, max_merged_fraction=1.0,
                    max_steady_change=float("inf"), min_steady_change=0.0)


def project_prompt_settings() -> Any:
    """Box of the previous mask only, with the official 3 px (256 frame) margin at 512 px."""
    from napari_medsam.segment.prompting import PromptSettings

    return PromptSettings(mode="box", box_margin_px=OFFICIAL_SHIFT_256 * SLICE / 256, box_margin_fraction=0.0)


def box_256_of_rc(box_rc: Sequence[float], size: int = SLICE) -> tuple[int, int, int, int]:
    """A project box (row0, col0, row1, col1) in slice pixels -> the (x0, y0, x1, y1) box LiteMedSAM decodes.

    For a square slice the project's predictor passes the box unchanged to the pipeline, which
    truncates ``box * 256 / size`` like the script's ``resize_box_to_256``.
    """
    r0, c0, r1, c1 = (float(v) for v in box_rc)
    return tuple(int(np.trunc(v * 256 / size)) for v in (c0, r0, c1, r1))  # type: ignore[return-value]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean volumes (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def rounds(sides: dict[str, Callable[[], Any]], repeats: int,
           report: Callable[[str, float], None] | None = None) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Time every side once per round, in the given order in even rounds and reversed in odd ones."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    outputs: dict[str, Any] = {}
    names = list(sides)
    for index in range(repeats):
        for name in names if index % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            outputs[name] = sides[name]()
            times[name].append(time.perf_counter() - start)
            if report is not None:
                report(name, times[name][-1])
    return times, outputs


@dataclass
class PropagationFigure:
    """Times per side (paired by round) and the context measurements."""

    times: dict[str, list[float]]
    n_slices: int
    facts: dict[str, Any] = field(default_factory=dict)
    load: list[tuple[float, float, float]] = field(default_factory=list)

    def ratio(self, side: str) -> float:
        """Median over rounds of official / ``side``."""
        return statistics.median(o / p for o, p in zip(self.times["official"], self.times[side]) if p > 0)

    def table(self) -> str:
        lines = ["| side | median total | per slice | official / side (median of rounds) | rounds |",
                 "|---|---|---|---|---|"]
        for side, values in self.times.items():
            median = statistics.median(values)
            ratio = "-" if side == "official" else f"{self.ratio(side):.2f}"
            lines.append(f"| {side} | {median:.2f} s | {1000 * median / self.n_slices:.1f} ms | {ratio} | "
                         f"{len(values)} |")
        return "\n".join(lines)


# ---------------------------------------------------------------------- the sides
def phantom() -> tuple[Any, np.ndarray, Any]:
    """The 60x512x512 CT phantom, the organ's ground truth and the soft-tissue window."""
    from napari_medsam.phantoms import make_ct_phantom
    from napari_medsam.segment.intensity import ct_window

    volume, labels, names = make_ct_phantom(shape=(N_SLICES, SLICE, SLICE), spacing_mm=SPACING_MM, seed=0)
    value = next(k for k, name in names.items() if name == ORGAN)
    return volume, labels == value, ct_window("soft tissue")


def key_box_rc(gt: np.ndarray, key: int) -> list[float]:
    """The ground truth's bounding box (row0, col0, row1, col1) on the key slice."""
    rows = np.flatnonzero(gt[key].any(axis=1))
    cols = np.flatnonzero(gt[key].any(axis=0))
    if rows.size == 0:
        raise ValueError(f"the organ is not on key slice {key}")
    return [float(rows[0]), float(cols[0]), float(rows[-1]), float(cols[-1])]


class _Recorder:
    """Wraps a predictor's ``predict`` to note each slice's box while ``log`` is a dict."""

    def __init__(self, predictor: Any) -> None:
        self.log: dict[int, Any] | None = None
        inner = predictor.predict

        def predict(index: int, prompts: Any, *args: Any, **kwargs: Any) -> Any:
            if self.log is not None and prompts.box is not None:
                self.log[int(index)] = np.asarray(prompts.box, float).copy()
            return inner(index, prompts, *args, **kwargs)

        predictor.predict = predict


def official_boxes(script: Any, segs: np.ndarray, key: int, key_xyxy: np.ndarray) -> dict[int, np.ndarray]:
    """The 256-frame box the official loop used on each slice, rebuilt from its output with its functions."""
    n = segs.shape[0]
    _, up, down = official_slice_order(n)
    boxes = {key: script.resize_box_to_256(key_xyxy, original_size=segs.shape[1:])}
    for z, prev in [(z, z - 1) for z in up[1:]] + [(z, z + 1) for z in down]:
        pre = script.resize_longest_side(segs[prev].astype(np.uint8))
        boxes[z] = (script.get_bbox256(script.pad_image(pre)) if np.max(pre) > 0
                    else script.resize_box_to_256(key_xyxy, original_size=segs.shape[1:]))
    return boxes


def build(ctx: Any, co: Any) -> tuple[dict[str, Callable[[], Any]], Callable[[dict[str, Any]], dict[str, Any]]]:
    """The three timed sides and the function that measures their outputs (``co``: compare_official)."""
    import torch

    from napari_medsam.models.networks.sam import load_network
    from napari_medsam.segment.model import SamModel
    from napari_medsam.segment.predictor import Prompts, SlicePredictor
    from napari_medsam.segment.propagation import propagate

    checkpoint = co._golden(ctx.golden, "lite_medsam_random.pth")
    script = co.import_lite_medsam(ctx.src, checkpoint, ctx.workdir)
    script.save_overlay = False
    start = time.perf_counter()
    volume, gt, mapping = phantom()
    print(f"# {FIGURE}: phantom {volume.shape} in {time.perf_counter() - start:.0f} s", flush=True)
    key, _, _ = official_slice_order(N_SLICES)
    box_rc = key_box_rc(gt, key)
    key_xyxy = np.array([box_rc[1], box_rc[0], box_rc[3], box_rc[2]]).astype(np.int64)

    model = SamModel(load_network("lite_tiny_vit", torch.load(checkpoint, map_location="cpu")), "lite_medsam",
                     name="bench-lite_medsam", signature="bench-lite_medsam",
                     backend=getattr(co, "PROJECT_BACKEND", "float32"))  # compare_official --backend
    grey = np.stack([mapping.to_uint8(volume.array[z]) for z in range(N_SLICES)])
    npz_in = ctx.workdir / "3D_phantom.npz"
    np.savez(npz_in, imgs=grey, spacing=np.array(SPACING_MM),
             boxes=np.array([[key_xyxy[0], key_xyxy[1], 0, key_xyxy[2], key_xyxy[3], N_SLICES - 1]]))
    npz_out = Path(script.pred_save_dir) / npz_in.name

    def official() -> np.ndarray:
        script.MedSAM_infer_npz_3D(str(npz_in))
        return np.load(npz_out)["segs"]

    def run_project(predictor: Any) -> np.ndarray:
        labels = np.zeros(volume.shape, np.uint8)
        propagate(predictor, labels, 1, {key: Prompts(box=box_rc)}, stop=accept_all_rule(N_SLICES),
                  prompt=project_prompt_settings(), fill_skipped=False, spacing_mm=volume.spacing_mm)
        return labels

    def cold() -> np.ndarray:
        return run_project(SlicePredictor(model, volume, mapping=mapping))

    warm_predictor = SlicePredictor(model, volume, mapping=mapping)
    recorder = _Recorder(warm_predictor)
    recorder.log = {}
    start = time.perf_counter()
    first = run_project(warm_predictor)  # fills the warm cache; also the first-call warm-up of the project
    project_boxes, recorder.log = recorder.log, None
    print(f"# {FIGURE}: warm cache filled ({len(project_boxes)} slices) in {time.perf_counter() - start:.0f} s",
          flush=True)
    with torch.no_grad():  # first-call warm-up of the official encoder and decoder (one slice)
        embedding, size = co._lite_embed(script, np.repeat(grey[key][:, :, None], 3, axis=2))
        script.medsam_inference(script.medsam_lite_model, embedding, script.resize_box_to_256(
            key_xyxy, original_size=grey.shape[1:])[None], size, grey.shape[1:])

    def measure(outputs: dict[str, Any]) -> dict[str, Any]:
        segs, labels = outputs["official"] > 0, outputs["project cold"] > 0
        boxes_o = official_boxes(script, segs, key, key_xyxy)
        same = [z for z in range(N_SLICES) if z in project_boxes
                and tuple(int(v) for v in boxes_o[z]) == box_256_of_rc(project_boxes[z])]
        # The project's decoder on the official boxes: through SamModel.decode, because an official
        # box may reach x = 256 (its margin is clipped at the 256 frame's size, outside the slice),
        # which SlicePredictor.predict refuses as a box outside the 512x512 slice.
        geometry = model.geometry(SLICE, SLICE)
        forced = [int(np.count_nonzero(model.decode(warm_predictor.embed(z), geometry, out_size=(SLICE, SLICE),
                                                    box_xyxy=np.asarray(boxes_o[z], float) * SLICE / 256).masks[0]
                                       != segs[z])) for z in range(N_SLICES)]
        start = time.perf_counter()
        np.load(npz_in)["imgs"]
        np.savez_compressed(ctx.workdir / "io_check.npz", segs=outputs["official"])
        io_s = time.perf_counter() - start
        return {
            "dice_3d": dice(segs, labels),
            "official_voxels": int(segs.sum()), "project_voxels": int(labels.sum()),
            "official_empty_slices": int(sum(not s.any() for s in segs)),
            "project_empty_slices": int(sum(not s.any() for s in labels)),
            "project_cold_warm_identical": bool(np.array_equal(labels, outputs["project warm"] > 0)
                                                and np.array_equal(labels, first > 0)),
            "same_box_slices": len(same),
            "same_box_px_differing": int(sum(np.count_nonzero(segs[z] != labels[z]) for z in same)),
            "forced_box_slices": len(forced),
            "forced_box_px_differing": int(sum(forced)),
            "forced_box_slices_identical": int(sum(d == 0 for d in forced)),
            "official_npz_io_s": io_s,
        }

    sides = {"official": official, "project cold": cold, "project warm": lambda: run_project(warm_predictor)}
    return sides, measure


def run(ctx: Any, co: Any) -> PropagationFigure | None:
    """Build, time (``ctx.repeats`` rounds) and measure the figure; None (reason printed) when skipped."""
    try:
        sides, measure = build(ctx, co)
    except co.Skipped as reason:
        print(f"# {FIGURE}: skipped ({reason})")
        return None

    def report(side: str, seconds: float) -> None:
        print(f"# {FIGURE}: {side} {seconds:.1f} s; load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
              flush=True)

    times, outputs = rounds(sides, ctx.repeats, report)
    return PropagationFigure(times, N_SLICES, measure(outputs), [os.getloadavg()])


def main(args: Any, co: Any) -> int:
    """``compare_official.py --propagation``: load averages, the table and the context lines."""
    import torch

    load = os.getloadavg()
    vision = co.ensure_torchvision()
    print(f"# {FIGURE}: torch {torch.__version__}, torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs; "
          f"torchvision {vision}")
    print(f"# load average before: {' '.join(f'{v:.2f}' for v in load)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="official-propagation-") as tmp:
        ctx = co.Context(args.repeats, args.golden, args.official_src, Path(tmp))
        figure = run(ctx, co)
    if figure is None:
        return 0
    print()
    print(f"{LABEL}; {N_SLICES} slices of {SLICE}x{SLICE}, key slice {official_slice_order(N_SLICES)[0]} ({ORGAN} box)")
    print(figure.table())
    print()
    for name, value in figure.facts.items():
        print(f"# {name}: {value:.4g}" if isinstance(value, float) else f"# {name}: {value}")
    for side, values in figure.times.items():
        print(f"# {side} times: {', '.join(f'{v:.2f}' for v in values)} s")
    print(f"# load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0
