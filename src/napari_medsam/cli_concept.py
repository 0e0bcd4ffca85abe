"""`napari-medsam segment --text PHRASE` and text prompts in PROMPTS.json: concept segmentation (issue 18).

A concept model (EfficientSAM3) finds every instance of the phrase on each slice of the range; the
best-scoring candidate of the range seeds the object, which is then followed slice by slice through
the candidates that overlap it (:meth:`napari_medsam.segment.concept.ConceptSegmenter.find_in_slices`).
Each object is written with propagation's write rule (objects never overwrite each other) and the label
volume is saved on the scan's grid like any `segment` output, with a JSON summary on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import MedSamError

__all__ = ["add_text_options", "download_concept", "parse_slices", "run_text", "wants_text"]

VOCABULARY_HINT = "--vocabulary FILE"


def add_text_options(segment: argparse.ArgumentParser) -> None:
    """The text-prompt options of `segment`; its --model default becomes "none given" (lite_medsam for
    points and boxes, the default concept model for text)."""
    group = segment.add_argument_group("text (concept) prompts, EfficientSAM3")
    group.add_argument("--text", metavar="PHRASE",
                       help="find PHRASE (e.g. \"liver\") with a concept model instead of reading --prompts; "
                       "--model defaults to efficientsam3_efficientvit then")
    group.add_argument("--slices", metavar="A:B",
                       help="search slices A to B, both included (display indices along the axial plane; "
                       "default all; A: or :B leave one end open)")
    group.add_argument("--threshold", type=float,
                       help="detection score threshold (default 0.5, the official one)")
    group.add_argument("--min-overlap", type=float, default=0.5,
                       help="Dice with the previous slice's mask a candidate needs to continue the object "
                       "(default 0.5)")
    group.add_argument("--vocabulary", metavar="FILE",
                       help="the CLIP vocabulary bpe_simple_vocab_16e6.txt.gz (default: the cache, downloaded "
                       "on first use)")
    segment.set_defaults(model=None)


def parse_slices(text: str | None, depth: int | None) -> tuple[int, int]:
    """``"A:B"`` (inclusive; either end may be left out) or ``"A"`` -> (first, last) within 0..depth-1.

    ``depth=None`` checks only the form and the order (before the scan is read).
    """
    if text is None:
        return 0, (depth or 1) - 1
    first, sep, last = text.partition(":")
    try:
        lo = int(first) if first.strip() else 0
        hi = (int(last) if last.strip() else (depth or lo + 1) - 1) if sep else lo
    except ValueError:
        raise MedSamError(f"--slices {text!r}: give A:B with slice indices, e.g. 20:40") from None
    if depth is None:
        if lo < 0 or hi < lo:
            raise MedSamError(f"--slices {text}: give A <= B, both 0 or more (A:B includes both)")
        return lo, hi
    if not 0 <= lo <= hi <= depth - 1:
        raise MedSamError(f"--slices {text}: the scan has {depth} axial slices (0..{depth - 1}); give A <= B "
                          "inside that range")
    return lo, hi


def _file_has_text(path: str | None) -> bool:
    """Whether PROMPTS.json has a text prompt (a cheap look; errors are left to the full reader)."""
    if not path:
        return False
    try:
        data = json.loads(Path(path).read_text())
        return any(isinstance(p, dict) and p.get("type") == "text"
                   for obj in data.get("objects") or [] if isinstance(obj, dict)
                   for p in obj.get("prompts") or [])
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def wants_text(args: argparse.Namespace) -> bool:
    """Whether `segment` runs the concept path; also sets the point/box default model otherwise."""
    if args.text is not None and args.prompts:
        raise MedSamError("give either --text PHRASE or --prompts PROMPTS.json, not both")
    if args.text is None and not args.prompts:
        raise MedSamError("say what to segment: --prompts PROMPTS.json (points, boxes, text) or --text PHRASE")
    text = args.text is not None or _file_has_text(args.prompts)
    if not text:
        args.model = args.model or "lite_medsam"
    return text


def run_text(args: argparse.Namespace) -> int:
    """`segment` with a text prompt (``--text`` or text prompts in ``--prompts``)."""
    from .cli import CHECKPOINT_HINT, _mapping, _print_read_warnings
    from .cli_progress import Progress
    from .io import labels_format, load_volume, require_dicom_source, save_labels_named
    from .io.atomic import check_writable_target
    from .io.segments import segments_for_labels, segments_sidecar_path
    from .models.registry import CLIP_VOCABULARY, DEFAULT_CONCEPT_MODEL, get_concept_model
    from .models.weights import resolve_file

    started = time.perf_counter()
    say = Progress("napari-medsam segment", quiet=args.quiet)
    if args.text is not None and not args.text.strip():
        raise MedSamError("--text: the phrase is empty; say what to find, e.g. --text liver")
    if args.threshold is not None and not 0 < args.threshold < 1:
        raise MedSamError(f"--threshold {args.threshold}: give a score between 0 and 1")
    if args.engine == "memory" or args.backend not in ("auto", "float32"):
        raise MedSamError("text prompts run the concept model in float32 with its own following through slices; "
                          "leave out --engine memory / --backend")
    if args.model is not None:
        spec = get_concept_model(args.model)  # a point/box model's name gets an error saying so
    else:  # a local checkpoint of the user's own is named after its file
        spec = None if args.checkpoint else get_concept_model(DEFAULT_CONCEPT_MODEL)
    if args.text is not None:
        parse_slices(args.slices or _zrange(args), None)  # the form: before anything is read
    labels_format(args.out)
    check_writable_target(args.out)
    if labels_format(args.out) != "dicom-seg":
        check_writable_target(segments_sidecar_path(args.out))
    say.line(f"reading {args.image}")
    volume = load_volume(args.image, series_uid=args.series_uid, volume_index=args.volume_index,
                         modality=args.modality)
    _print_read_warnings("segment", volume)
    if labels_format(args.out) == "dicom-seg":
        require_dicom_source(volume, args.out)
    objects = _objects(args, volume)
    mapping = _mapping(args.window, volume)
    weights = args.checkpoint
    if weights is None:
        bar = say.bytes(f"downloading {spec.name}")
        try:
            weights = resolve_file(spec, None, progress=bar, own_file_hint=CHECKPOINT_HINT)
        finally:
            bar.close()
    bar = say.bytes("downloading the CLIP vocabulary")
    try:
        vocabulary = resolve_file(CLIP_VOCABULARY, args.vocabulary, progress=bar, own_file_hint=VOCABULARY_HINT,
                                  checkpoint=False)
    finally:
        bar.close()
    from .segment.concept import ConceptModel

    say.line(f"loading {spec.name if spec else Path(weights).name} from {weights}")
    model = ConceptModel.from_checkpoint(spec.name if spec else None, weights, vocabulary, device=args.device,
                                         threads=args.threads)
    threshold = args.threshold if args.threshold is not None else (spec.threshold if spec else 0.5)
    say.line(f"finding {len(objects)} concept(s) on {model.device}, threshold {threshold:g}")
    labels, summaries = _segment_objects(args, volume, objects, model, mapping, threshold, say)
    names = {o.label: o.name for o in objects}
    say.line(f"writing {args.out}")
    out, sidecar, written_warnings = save_labels_named(labels, volume, args.out,
                                                       segments_for_labels(labels, names=names))
    for message in written_warnings:
        print(f"napari-medsam segment: warning: {message}", file=sys.stderr)
    warnings = [f"{s.name} (label {s.label}): the model found nothing above the threshold {threshold:g}"
                for s in summaries if not s.voxels] + written_warnings
    summary = {
        "written": str(out), "model": model.name, "device": str(model.device), "window": mapping.name,
        "threshold": threshold, "seconds": round(time.perf_counter() - started, 3), "engine": "concept",
        "objects": [s.as_dict() for s in summaries], "warnings": warnings,
    }
    if sidecar is not None:
        summary["segments_file"] = str(sidecar)
    print(json.dumps(summary, indent=2))
    return 0


def _objects(args: argparse.Namespace, volume) -> list:
    from .segment.prompt_file import ObjectPrompts, TextPrompt, load_prompt_file

    if args.text is not None:
        first, last = parse_slices(args.slices or _zrange(args), volume.shape[0])
        phrase = " ".join(args.text.split())
        return [ObjectPrompts(1, phrase, 0, {}, TextPrompt(phrase, (first, last), None))]
    objects = load_prompt_file(args.prompts, volume)
    others = [o.name for o in objects if o.text is None]
    if others:
        raise MedSamError(f"{args.prompts} mixes text prompts with point/box objects ({', '.join(others)}); "
                          "run `segment` once per kind of prompt")
    return objects


def _zrange(args: argparse.Namespace) -> str | None:
    return f"{args.zrange[0]}:{args.zrange[1]}" if getattr(args, "zrange", None) else None


def _segment_objects(args, volume, objects, model, mapping, threshold, say):
    import numpy as np

    from .segment.cache import DiskCache, EmbeddingCache, MemoryCache

    labels = np.zeros(volume.shape, dtype=np.uint16 if max(o.label for o in objects) > 255 else np.uint8)
    # --cache: image features on disk, reused by later runs (another phrase, another threshold)
    cache = EmbeddingCache(MemoryCache(), DiskCache(args.cache) if args.cache else None)
    try:
        return labels, _each_object(args, volume, objects, model, mapping, threshold, say, labels, cache)
    finally:
        cache.flush()


def _each_object(args, volume, objects, model, mapping, threshold, say, labels, cache):
    import numpy as np

    from .segment.concept import ConceptSegmenter
    from .segment.headless import ObjectSummary

    segmenters: dict[int, ConceptSegmenter] = {}
    voxel_ml = float(np.prod(volume.spacing_mm)) / 1000.0
    summaries = []
    for obj in objects:
        started = time.perf_counter()
        seg = segmenters.get(obj.axis)
        if seg is None:
            seg = segmenters[obj.axis] = ConceptSegmenter(model, volume, mapping=mapping, axis=obj.axis,
                                                          threshold=threshold, cache=cache)
        first, last = obj.text.slices or (0, volume.shape[obj.axis] - 1)
        exemplars = {i: [_box_xyxy(p.box, seg.slice_shape)] for i, p in obj.slices.items() if p.box is not None}
        bar = say.slices()
        try:
            track = seg.find_in_slices(range(first, last + 1), obj.text.phrase, boxes=exemplars,
                                       threshold=obj.text.threshold, min_overlap=args.min_overlap, progress=bar)
        finally:
            bar.close()
        result = track.write(labels, obj.label, overwrite=False, spacing_mm=volume.spacing_mm)
        owned = labels == obj.label
        summary = ObjectSummary(obj.label, obj.name, obj.axis, [] if track.seed is None else [track.seed],
                                engine="concept")
        summary.voxels = int(owned.sum())
        summary.volume_ml = summary.voxels * voxel_ml
        summary.slices = [int(i) for i in np.flatnonzero(owned.any(axis=tuple(a for a in range(3) if a != obj.axis)))]
        summary.stop_reasons = dict(result.stop_reasons)
        summary.report = result.table()
        summary.seconds = time.perf_counter() - started
        summaries.append(summary)
    return summaries


def _box_xyxy(box, shape: tuple[int, int]) -> list[float]:
    """A prompt file box (row0, col0, row1, col1: voxel centres) -> x0, y0, x1, y1 pixel edges in the slice."""
    r0, c0, r1, c1 = (float(v) for v in box)
    rows, cols = shape
    return [max(0.0, c0), max(0.0, r0), min(float(cols), c1 + 1.0), min(float(rows), r1 + 1.0)]


def download_concept(args: argparse.Namespace) -> bool:
    """`napari-medsam download NAME` for a concept model (with the CLIP vocabulary) or the vocabulary alone
    (``clip_bpe_vocab``); False when NAME is neither (the point/box table's download then runs)."""
    from .cli_progress import Progress
    from .models.registry import CLIP_VOCABULARY, CONCEPT_MODELS
    from .models.weights import resolve_file

    if args.model not in CONCEPT_MODELS and args.model != CLIP_VOCABULARY.name:
        return False
    wanted = [(CONCEPT_MODELS[args.model], True)] if args.model in CONCEPT_MODELS else []
    for spec, checkpoint in [*wanted, (CLIP_VOCABULARY, False)]:
        bar = Progress("napari-medsam download", quiet=args.quiet).bytes(spec.name)
        try:
            path = resolve_file(spec, None, progress=bar, cache_dir=args.weights_dir, checkpoint=checkpoint,
                                own_file_hint="`napari-medsam segment --text ... --checkpoint FILE --vocabulary FILE`")
        finally:
            bar.close()
        print(path)
    return True
