"""The `napari-medsam` command line: the plugin's I/O and engine without a screen."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import __version__
from .cli_options import add_model_options
from .cli_progress import Progress as _Progress
from .errors import MedSamError


# Exit status after stdout was closed early (`napari-medsam models --json | head`): 128 + SIGPIPE,
# what a shell reports for any Unix tool that stops writing because its reader went away.
EXIT_BROKEN_PIPE = 141
# The flag that hands the CLI a weight file of the user's own, as error messages name it.
CHECKPOINT_HINT = "--checkpoint FILE"


def _add_source_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--series-uid", help="DICOM: the SeriesInstanceUID to read when a folder holds several series")
    parser.add_argument("--volume-index", type=int, help="4D NIfTI/NRRD: which volume to read (0-based)")


def _add_modality_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modality", type=str.upper, choices=["CT", "MR", "OT"],
                        help="override the modality (default: DICOM Modality, else guessed from the values)")


def _print_read_warnings(command: str, volume) -> None:
    """One stderr line per reader warning (gap-filled or skipped slices, series not read, ...)."""
    for warning in volume.metadata.get("warnings") or []:
        print(f"napari-medsam {command}: warning: {_one_line(warning)}", file=sys.stderr)


def _add_quiet_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress on stderr (errors are still printed)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="napari-medsam",
        description="Segment Anything for CT and MRI: inspect scans, convert label volumes, launch the demo.",
    )
    parser.add_argument("--version", action="version", version=f"napari-medsam {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    info = sub.add_parser(
        "info",
        help="print a scan's shape, spacing and orientation as JSON",
        description="Print JSON facts about a scan as napari-medsam reads it: shape in display order "
        "(slice, row, column), spacing_mm, origin_mm and direction (LPS), modality, source format, the "
        "file-order to display-order axis mapping, and for DICOM the series UID and number of instances.",
    )
    info.add_argument("path", help="NIfTI file, DICOM folder or file, DICOM-SEG, NRRD or MHA/MHD")
    _add_source_options(info)
    _add_modality_option(info)

    export = sub.add_parser(
        "export",
        help="convert a label volume to NIfTI, DICOM-SEG, NRRD or MHA on the source's grid",
        description="Convert LABELS (a label volume on the source scan's grid, e.g. NIfTI) to OUT. "
        "OUT ending in .nii/.nii.gz writes NIfTI with the source's exact affine and voxel order; .dcm "
        "writes a DICOM-SEG referencing SOURCE (which must be a DICOM series); .nrrd/.mha write ITK files.",
    )
    export.add_argument("labels", help="label volume (NIfTI, NRRD, MHA or DICOM-SEG) on SOURCE's grid; its segment "
                        "names come from the SEG or from a LABELS.segments.json sidecar when there is one")
    export.add_argument("--source", required=True, help="the scan the labels were drawn on")
    export.add_argument("--out", required=True, help="output file: .nii, .nii.gz, .dcm, .nrrd or .mha")
    export.add_argument("--segments", help="JSON file with segment names, colours and codes (see docs/cli.md)")
    export.add_argument("--names", help="segment names as 1=liver,2=spleen (simpler than --segments)")
    export.add_argument(
        "--seg-type", choices=["binary", "labelmap"], default="binary",
        help="DICOM-SEG encoding: binary (Segmentation Storage, read by every SEG viewer; default) "
        "or labelmap (Label Map Segmentation Storage, DICOM 2024)",
    )
    _add_source_options(export)

    segment = sub.add_parser(
        "segment",
        help="segment a scan from a prompt file (optionally propagating through the volume)",
        description="Segment IMAGE with a SAM-family model from the prompts in PROMPTS.json and write the "
        "label volume LABELS on exactly the input's grid (.nii/.nii.gz; .dcm DICOM-SEG for a DICOM series). "
        "Progress goes to stderr (a bar on a terminal, a plain line per step otherwise; --quiet for none), "
        "a JSON summary to stdout. See docs/cli.md for the prompt file format.",
    )
    segment.add_argument("image", help="NIfTI file, DICOM series folder or file, NRRD or MHA")
    segment.add_argument("--prompts", help="PROMPTS.json (see docs/cli.md); or --text PHRASE")
    segment.add_argument("--out", required=True, help="output labels: .nii, .nii.gz, .dcm, .nrrd or .mha")
    add_model_options(segment, window_help="CT window preset (soft tissue, liver, lung, mediastinum, bone, brain), "
                      "LEVEL/WIDTH in HU, or 'percentile' (default: soft tissue for CT, percentile for MR)")
    segment.add_argument("--propagate", action="store_true", help="propagate every object through the volume")
    segment.add_argument("--engine", choices=["auto", "slice", "memory"], default="auto",
                         help="how --propagate finds each next slice: slice (prompted from the previous slice's "
                         "mask, any model) or memory (SAM 2 / MedSAM2 tracking with the model's memory; SAM 2 "
                         "models only); auto (default): memory for SAM 2 models, else slice")
    segment.add_argument("--zrange", nargs=2, type=int, metavar=("Z0", "Z1"),
                         help="limit propagation to slices Z0..Z1 (display slice indices along the object's plane)")
    segment.add_argument("--cache", help="folder for the on-disk embedding cache (reused across runs)")
    _add_quiet_option(segment)
    _add_source_options(segment)
    _add_modality_option(segment)
    from .cli_concept import add_text_options  # issue 18: text (concept) prompts

    add_text_options(segment)

    from .cli_everything import add_parser as _add_everything_parser  # issue 13: segment everything

    _add_everything_parser(sub)

    from .cli_finetune import add_parser as _add_finetune_parser  # issue 13: fine-tune the decoder

    _add_finetune_parser(sub)

    from .cli_batch import add_parser as _add_batch_parser  # issue 14: cohorts on dask.distributed

    _add_batch_parser(sub)

    models = sub.add_parser(
        "models",
        help="list the models, their weight files and whether they are in the cache",
        description="List the SAM-family models napari-medsam knows, with input size, pipeline, license, "
        "weight file and whether it is already in the weight cache ($NAPARI_MEDSAM_WEIGHTS_DIR or the user cache).",
    )
    models.add_argument("--json", action="store_true", help="print JSON instead of a table")

    download = sub.add_parser(
        "download",
        help="download a model's official weights into the cache (progress on stderr)",
        description="Download (or resume) a model's official weight file into the weight cache, verify its "
        "checksum and print where it is. Without network access, place the file there yourself.",
    )
    download.add_argument("model", help="model name, see `napari-medsam models`")
    download.add_argument("--weights-dir", help="cache folder (default: $NAPARI_MEDSAM_WEIGHTS_DIR or the user cache)")
    _add_quiet_option(download)

    demo = sub.add_parser(
        "demo",
        help="open napari with the CT phantom and the napari-medsam panel",
        description="Launch napari with a sample scan (the CT phantom unless PATH is given) and the "
        "napari-medsam dock widget.",
    )
    demo.add_argument("path", nargs="?", help="a scan to open instead of the CT phantom")
    demo.add_argument("--sample", choices=["ct", "mr"], default="ct", help="which phantom to open (default ct)")
    demo.add_argument("--screenshot", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    try:
        try:
            return _run(argv)
        finally:
            # A closed pipe shows up here (also after argparse's --help/--version, which exit),
            # not later in Python's own flush at exit, where it could only print a traceback.
            sys.stdout.flush()
    except BrokenPipeError:
        # The reader of stdout went away (`... | head`): stop quietly, as Unix tools do. Later
        # writes, Python's flush at exit included, go to /dev/null instead of raising again.
        _stdout_to_devnull()
        return EXIT_BROKEN_PIPE


def _stdout_to_devnull() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):  # no real file descriptor behind sys.stdout
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives until the interpreter exits


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            return _info(args)
        if args.command == "export":
            return _export(args)
        if args.command == "segment":
            return _segment(args)
        if args.command == "everything":
            from .cli_everything import run as _everything

            return _everything(args)
        if args.command == "finetune":
            from .cli_finetune import run as _finetune

            return _finetune(args)
        if args.command == "batch":
            from .cli_batch import run as _batch

            return _batch(args)
        if args.command == "models":
            return _models(args)
        if args.command == "download":
            return _download(args)
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(path=args.path, sample=args.sample, screenshot=args.screenshot)
    except MedSamError as exc:
        print(f"napari-medsam {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"napari-medsam {args.command}: cancelled", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _info(args: argparse.Namespace) -> int:
    from .io import describe_volume, load_volume

    volume = load_volume(args.path, series_uid=args.series_uid, volume_index=args.volume_index,
                         modality=args.modality)
    _print_read_warnings("info", volume)
    print(json.dumps(describe_volume(volume), indent=2, default=str))
    return 0


def _export(args: argparse.Namespace) -> int:
    from .io import labels_format, load_volume, read_labels_and_segments, require_dicom_source, save_labels_named
    from .io.segments import Segment, segments_for_labels, segments_from_json

    labels_format(args.out)  # refuse a bad output name before reading anything
    source = load_volume(args.source, series_uid=args.series_uid, volume_index=args.volume_index)
    _print_read_warnings("export", source)
    if labels_format(args.out) == "dicom-seg":
        require_dicom_source(source, args.out)
    labels, described = read_labels_and_segments(args.labels, like=source)
    names = _parse_names(args.names) if args.names else {}
    overrides: list[Segment] = []
    if args.segments:
        try:
            overrides = segments_from_json(Path(args.segments).read_text())
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise MedSamError(f"Could not read segments from {args.segments}: {exc}") from exc
    # Who names a label, strongest first: --segments, --names, then the label file itself (the
    # SEG's segment descriptions or the NIfTI/NRRD/MHA sidecar); "Segment N" only as a last resort.
    chosen = {s.label: s for s in described if s.label not in names}
    chosen.update({s.label: s for s in overrides})
    segments = segments_for_labels(labels, names=names, overrides=list(chosen.values()))
    out, sidecar, written_warnings = save_labels_named(labels, source, args.out, segments,
                                                       segmentation_type=args.seg_type)
    for message in written_warnings:
        print(f"napari-medsam export: warning: {message}", file=sys.stderr)
    summary = {
        "written": str(out),
        "format": labels_format(out),
        "shape": list(source.shape),
        "segments": [{"label": s.label, "name": s.name, "voxels": int((labels == s.label).sum())} for s in segments],
        # What the reader filled or skipped (also on stderr above) and what writing had to invent.
        "warnings": [_one_line(w) for w in source.metadata.get("warnings") or []] + written_warnings,
    }
    if sidecar is not None:
        summary["segments_file"] = str(sidecar)
    print(json.dumps(summary, indent=2))
    return 0


def _segment(args: argparse.Namespace) -> int:
    from .io import labels_format, load_volume, require_dicom_source, save_labels_named
    from .io.atomic import check_writable_target
    from .io.segments import segments_for_labels, segments_sidecar_path
    from .models.weights import resolve_weights
    from .segment.cache import DiskCache, EmbeddingCache, MemoryCache
    from .segment.headless import check_z_range, choose_engine, segment_volume
    from .segment.model import SamModel
    from .segment.prompt_file import load_prompt_file

    from .cli_concept import run_text, wants_text  # issue 18: text prompts take the concept path

    if wants_text(args):
        return run_text(args)
    started = time.perf_counter()
    say = _Progress("napari-medsam segment", quiet=args.quiet)
    z_range = tuple(args.zrange) if args.zrange else (None, None)
    check_z_range(z_range, ())  # order and sign: before reading anything
    labels_format(args.out)
    check_writable_target(args.out)  # fail before minutes of computing, not after
    if labels_format(args.out) != "dicom-seg":
        check_writable_target(segments_sidecar_path(args.out))
    say.line(f"reading {args.image}")
    volume = load_volume(args.image, series_uid=args.series_uid, volume_index=args.volume_index,
                         modality=args.modality)
    if labels_format(args.out) == "dicom-seg":
        require_dicom_source(volume, args.out)
    objects = load_prompt_file(args.prompts, volume)
    check_z_range(z_range, volume.shape, objects)  # inside the scan: before any model is loaded
    mapping = _mapping(args.window, volume)
    if args.propagate:
        from .models.registry import get_model

        try:
            spec = get_model(args.model)
        except MedSamError:
            spec = None  # an unknown name: resolve_weights says so, as without --propagate
        if spec is not None:
            choose_engine(args.engine, spec)  # --engine memory with a SAM 1 model: before any download
    download = say.bytes(f"downloading {args.model}")
    try:
        weights = resolve_weights(args.model, args.checkpoint, download=True, progress=download,
                                  own_file_hint=CHECKPOINT_HINT)
    finally:
        download.close()
    say.line(f"loading {args.model} from {weights}")
    model = SamModel.from_checkpoint(args.model, weights, device=args.device, threads=args.threads,
                                     backend=args.backend)
    engine = choose_engine(args.engine, model)
    cache = EmbeddingCache(MemoryCache(), DiskCache(args.cache) if args.cache else None)
    say.line(f"segmenting {len(objects)} object(s) on {model.device}"
             f"{f' with propagation ({engine} engine)' if args.propagate else ''}")
    bar = say.slices()
    try:
        labels, summaries = segment_volume(
            volume, objects, model, mapping=mapping, propagate_objects=args.propagate,
            z_range=z_range, cache=cache, progress=bar, engine=engine,
        )
    finally:
        bar.close()  # segment_volume has flushed the cache: the last embeddings are on disk
    names = {o.label: o.name for o in objects}
    for s in summaries:
        scores = s.object_scores()
        if scores is not None:
            absent = len(scores["absent_slices"])
            say.line(f"{s.name}: object score {scores['min']:.2f} to {scores['max']:.2f} (mean {scores['mean']:.2f})"
                     f"{f', absent on {absent} slice(s)' if absent else ''}")
    say.line(f"writing {args.out}")
    out, sidecar, written_warnings = save_labels_named(labels, volume, args.out,
                                                       segments_for_labels(labels, names=names))
    for message in written_warnings:
        print(f"napari-medsam segment: warning: {message}", file=sys.stderr)
    warnings = [f"{s.name} (label {s.label}): the model found nothing" for s in summaries if not s.voxels]
    warnings += written_warnings
    summary = {
        "written": str(out), "model": args.model, "device": str(model.device), "window": mapping.name,
        "propagate": args.propagate, "seconds": round(time.perf_counter() - started, 3),
        **({"engine": engine} if args.propagate else {}),
        "objects": [s.as_dict() for s in summaries], "warnings": warnings,
    }
    if sidecar is not None:
        summary["segments_file"] = str(sidecar)
    print(json.dumps(summary, indent=2))
    return 0


def _mapping(window: str | None, volume):
    from .segment.headless import window_mapping  # shared with `napari-medsam batch`

    return window_mapping(window, volume)


def _models(args: argparse.Namespace) -> int:
    from .models.registry import list_concept_models, list_models
    from .models.weights import cached_path, is_cached, weights_dir

    rows = [
        {"name": spec.name, "display_name": spec.display_name, "architecture": spec.architecture,
         "input_size": spec.input_size, "pipeline": spec.pipeline, "license": spec.license,
         "size_mb": round(spec.size_bytes / 1e6, 1) if spec.size_bytes else None,
         "cached": is_cached(spec), "path": str(cached_path(spec)), "url": spec.urls[0], "prompts": "points/boxes"}
        for spec in list_models()
    ]
    # Concept (text-prompt) models: a table of their own in the registry (issue 18).
    for spec in list_concept_models():
        path = weights_dir() / spec.filename
        rows.append({"name": spec.name, "display_name": spec.display_name, "architecture": spec.vision,
                     "input_size": 1008, "pipeline": spec.family, "license": spec.license,
                     "size_mb": round(spec.size_bytes / 1e6, 1) if spec.size_bytes else None,
                     "cached": path.is_file(), "path": str(path), "url": spec.urls[0], "prompts": "text"})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        state = "cached" if row["cached"] else "not downloaded"
        size = f"{row['size_mb']} MB" if row["size_mb"] else "size unpublished"
        kind = "  text prompts" if row["prompts"] == "text" else ""
        print(f"{row['name']:<12} {row['display_name']:<28} {row['input_size']:>5}px  {size:<17} {state}{kind}")
    from .models.device import describe_runtime, resolve_device, torch_build

    print(f"\nmodels run on {describe_runtime(resolve_device('auto'))} with {torch_build()}")
    return 0


def _download(args: argparse.Namespace) -> int:
    from .models.weights import resolve_weights

    from .cli_concept import download_concept  # issue 18: concept models and their vocabulary

    if download_concept(args):
        return 0

    progress = _Progress("napari-medsam download", quiet=args.quiet).bytes(args.model)
    try:
        path = resolve_weights(args.model, download=True, progress=progress, cache_dir=args.weights_dir,
                               own_file_hint=f"`napari-medsam segment {CHECKPOINT_HINT}`")
    finally:
        progress.close()
    print(path)
    return 0


def _parse_names(text: str) -> dict[int, str]:
    names: dict[int, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        value, sep, name = item.partition("=")
        if not sep or not value.strip().isdigit() or not name.strip():
            raise MedSamError(f"--names expects items like 1=liver,2=spleen; got {item!r}")
        names[int(value)] = name.strip()
    return names


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
