"""`napari-medsam everything`: SAM's automatic mask generator on one slice, from the command line.

Kept beside cli.py (which only registers the subcommand and dispatches to :func:`run`) so the
feature's options and output live in one place. The candidates are written as a label volume
on the input's grid, non-zero on the chosen slice only, through the same writer as
`napari-medsam segment` (names in the sidecar or the SEG: "candidate N"); a JSON summary goes to
stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .cli_options import add_model_options
from .errors import MedSamError

AXES = {"0": 0, "1": 1, "2": 2, "axial": 0, "coronal": 1, "sagittal": 2}


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the ``everything`` subcommand on ``sub`` (argparse subparsers)."""
    from .segment.everything import EverythingSettings

    d = EverythingSettings()
    p = sub.add_parser(
        "everything",
        help="propose every object on one slice (SAM's automatic mask generator)",
        description="Run SAM's automatic mask generator on slice K of IMAGE (a grid of point prompts, "
        "filtered by predicted IoU and stability, deduplicated by box NMS) and write the candidates as a "
        "label volume on IMAGE's grid (only slice K non-zero; label N = candidate N, largest first). "
        "A JSON summary (candidates with area in mm², predicted IoU, stability, bounding box) goes to stdout.",
    )
    p.add_argument("image", help="NIfTI file, DICOM series folder or file, NRRD or MHA")
    p.add_argument("--slice", dest="slice_index", type=int, required=True, metavar="K",
                   help="display slice index along --axis (as napari shows the scan)")
    p.add_argument("--axis", default="axial", help="axial (default), coronal, sagittal, or 0/1/2 (display axis)")
    p.add_argument("--out", required=True, help="output label volume: .nii, .nii.gz, .dcm, .nrrd or .mha")
    add_model_options(p)
    p.add_argument("--points-per-side", type=int, default=d.points_per_side,
                   help=f"grid of N x N point prompts (default {d.points_per_side})")
    p.add_argument("--points-per-batch", type=int, default=d.points_per_batch,
                   help=f"points decoded together (default {d.points_per_batch})")
    p.add_argument("--pred-iou-thresh", type=float, default=d.pred_iou_thresh,
                   help=f"keep masks with predicted IoU above this (default {d.pred_iou_thresh})")
    p.add_argument("--stability-thresh", type=float, default=d.stability_score_thresh,
                   help=f"keep masks with stability score at least this (default {d.stability_score_thresh})")
    p.add_argument("--stability-offset", type=float, default=d.stability_score_offset,
                   help=f"logit offset of the stability score (default {d.stability_score_offset})")
    p.add_argument("--nms-thresh", type=float, default=d.box_nms_thresh,
                   help=f"box IoU above which the lower-scoring mask is dropped (default {d.box_nms_thresh})")
    p.add_argument("--crop-layers", type=int, default=d.crop_n_layers,
                   help="extra layers of overlapping crops for small structures (default 0)")
    p.add_argument("--min-region-mm2", type=float, default=d.min_region_mm2,
                   help="fill holes and drop islands smaller than this many mm² (default 0: off)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--series-uid", help="DICOM: which series, when the folder holds several")
    p.add_argument("--volume-index", type=int, help="4D NIfTI: which volume")
    p.add_argument("--modality", help="override the modality (CT, MR, ...)")
    return p


def run(args: argparse.Namespace) -> int:
    """Run the generator and write the candidates (see the module docstring)."""
    import numpy as np

    from .cli import CHECKPOINT_HINT, _mapping
    from .cli_progress import Progress
    from .io import labels_format, load_volume, require_dicom_source, save_labels_named
    from .io.atomic import check_writable_target
    from .io.segments import segments_for_labels
    from .models.weights import resolve_weights
    from .segment.everything import EverythingSettings, segment_everything
    from .segment.model import SamModel
    from .segment.predictor import SlicePredictor
    from .volume import AXIS_NAMES

    started = time.perf_counter()
    say = Progress("napari-medsam everything", quiet=args.quiet)
    axis = AXES.get(str(args.axis).lower())
    if axis is None:
        raise MedSamError(f"--axis {args.axis}: choose axial, coronal, sagittal or 0, 1, 2")
    try:
        settings = EverythingSettings(
            points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
            pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_thresh,
            stability_score_offset=args.stability_offset, box_nms_thresh=args.nms_thresh,
            crop_n_layers=args.crop_layers, min_region_mm2=args.min_region_mm2)
    except ValueError as exc:
        raise MedSamError(str(exc)) from None
    labels_format(args.out)
    check_writable_target(args.out)
    say.line(f"reading {args.image}")
    volume = load_volume(args.image, series_uid=args.series_uid, volume_index=args.volume_index,
                         modality=args.modality)
    if labels_format(args.out) == "dicom-seg":
        require_dicom_source(volume, args.out)
    n = volume.shape[axis]
    if not 0 <= args.slice_index < n:
        raise MedSamError(f"--slice {args.slice_index} is outside the scan: {AXIS_NAMES[axis]} slices are 0..{n - 1}")
    mapping = _mapping(args.window, volume)
    weights = resolve_weights(args.model, args.checkpoint, download=True, own_file_hint=CHECKPOINT_HINT)
    say.line(f"loading {args.model} from {weights}")
    model = SamModel.from_checkpoint(args.model, weights, device=args.device, threads=args.threads,
                                     backend=args.backend)
    predictor = SlicePredictor(model, volume, mapping=mapping, axis=axis)
    say.line(f"{settings.points_per_side}x{settings.points_per_side} points on {AXIS_NAMES[axis]} slice "
             f"{args.slice_index} on {model.device}")
    steps = [0.0]

    def progress(done: int, total: int) -> None:
        if time.perf_counter() - steps[0] > 5 or done == total:
            steps[0] = time.perf_counter()
            say.line(f"{done}/{total} points")

    result = segment_everything(predictor, args.slice_index, settings, progress=progress)
    labels = np.zeros(volume.shape, np.uint16 if len(result.candidates) > 255 else np.uint8)
    where = tuple(args.slice_index if a == axis else slice(None) for a in range(3))
    labels[where] = result.label_image()
    names = {i + 1: f"candidate {i + 1}" for i in range(len(result.candidates))}
    say.line(f"writing {len(result.candidates)} candidate(s) to {args.out}")
    out, sidecar, written_warnings = save_labels_named(labels, volume, args.out,
                                                       segments_for_labels(labels, names=names))
    for message in written_warnings:
        print(f"napari-medsam everything: warning: {message}", file=sys.stderr)
    summary = {"written": str(out), "model": args.model, "device": str(model.device), "window": mapping.name,
               **result.summary(), "axis": AXIS_NAMES[axis], "total_seconds": round(time.perf_counter() - started, 3),
               "warnings": list(written_warnings)}
    if sidecar is not None:
        summary["segments_file"] = str(sidecar)
    print(json.dumps(summary, indent=2))
    return 0
