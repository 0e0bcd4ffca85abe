"""Cohorts: the headless `segment` run over many studies on a dask.distributed cluster.

What `napari-medsam batch MANIFEST` and :func:`run_batch` do. A manifest lists studies (scan,
prompts or a label file whose objects give the prompts, output); each study becomes one task
on a dask.distributed cluster (a ``LocalCluster`` by default, or any running scheduler), so the
scheduling, worker life cycle and dashboard are dask's, not the project's own.

Why it is built this way:

* Each worker process loads the model once and keeps it (:func:`worker_model`, a per-process
  cache), and a :class:`TorchThreads` worker plugin sets torch's thread count in every worker, so
  that workers x threads do not oversubscribe the cores.
* A study runs exactly the engine of ``napari-medsam segment``
  (:func:`napari_medsam.segment.headless.segment_volume`, the same intensity mapping, the same
  writer, :func:`napari_medsam.io.save_labels_named`, which writes atomically).
* Resumable: a study whose output is complete (the label file and, for NIfTI/NRRD/MHA, its
  segments sidecar, which is written after it) is skipped unless ``force``; a study that fails
  is one report row with its one-line error and does not stop the others; Ctrl+C cancels the
  pending tasks, writes the report of what finished, and re-raises.
"""

from __future__ import annotations

import csv
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MedSamError

try:  # a dependency; the module still imports (for its manifest and report helpers) without it
    from distributed import WorkerPlugin as _WorkerPlugin
except ImportError:  # pragma: no cover
    _WorkerPlugin = object

__all__ = [
    "BatchCancelled", "BatchOptions", "BatchResult", "ManifestError", "REPORT_COLUMNS", "Study", "TorchThreads",
    "default_workers", "labels_to_prompts", "load_manifest", "model_loads", "run_batch", "segment_study",
    "study_complete",
]

# One row per study and object (a study without objects, failed or skipped, has one row).
REPORT_COLUMNS = ("study", "status", "label", "name", "voxels", "volume_ml", "slice_first", "slice_last",
                  "slices", "stop_reasons", "seconds", "worker", "image", "output", "error")


class ManifestError(MedSamError):
    """The manifest is missing, unreadable, or a row lacks what a study needs."""


@dataclass(frozen=True)
class Study:
    """One row of the manifest: a scan, where its prompts come from, and where its labels go.

    Exactly one of ``prompts`` (a PROMPTS.json, the `segment` format) and ``labels`` (a label
    file on the scan's grid whose objects give one box each) is set.
    """

    id: str
    image: str
    output: str
    prompts: str | None = None
    labels: str | None = None


@dataclass(frozen=True)
class BatchOptions:
    """The options of `segment`, for every study of a run.

    ``every``: with label-file prompts, a box on every k-th slice of each object (the sparse-
    marker mode) instead of one box on its largest slice. ``threads``: torch threads per worker
    (None: the cores divided among the workers of the local cluster, or among a remote worker's
    threads).
    """

    model: str = "lite_medsam"
    checkpoint: str | None = None
    device: str = "cpu"
    window: str | None = None
    propagate: bool = False
    engine: str = "auto"
    z_range: tuple[int | None, int | None] = (None, None)
    every: int | None = None
    threads: int | None = None
    modality: str | None = None
    force: bool = False
    backend: str = "auto"


@dataclass
class BatchResult:
    """What a run did: one dict per study (see :func:`segment_study`), the report rows and files."""

    studies: list[dict]
    rows: list[dict]
    seconds: float
    report_csv: Path | None = None
    report_json: Path | None = None
    dashboard: str | None = None
    workers: int = 0
    cancelled: bool = False

    def counts(self) -> Counter:
        return Counter(s["status"] for s in self.studies)

    def summary(self) -> str:
        """One line: how many studies did what, in how long."""
        counts = self.counts()
        done = counts.get("done", 0)
        rate = 60.0 * done / self.seconds if self.seconds > 0 else 0.0
        parts = ", ".join(f"{counts[k]} {k}" for k in ("done", "skipped", "failed", "cancelled") if counts.get(k))
        speed = f" ({rate:.1f} studies/min, {self.workers} worker(s))" if done else ""
        return f"{len(self.studies)} studies: {parts or 'nothing to do'} in {self.seconds:.1f} s{speed}"


# ---------------------------------------------------------------------------------- manifest
def load_manifest(manifest: str | Path | Sequence[Study | dict]) -> list[Study]:
    """Studies from a CSV or JSON manifest, or from a list of :class:`Study` / dicts.

    CSV: a header with ``image``, ``output`` and ``prompts`` or ``labels`` (``id`` optional:
    the image's name without suffix). JSON: a list of such objects, or ``{"studies": [...]}``.
    Relative paths are relative to the manifest's folder.
    """
    if isinstance(manifest, (str, os.PathLike)):
        path = Path(manifest).expanduser()
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ManifestError(f"manifest {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ManifestError(f"cannot read manifest {path}: {exc}") from exc
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ManifestError(f"{path.name} is not valid JSON: {exc.msg} at line {exc.lineno}") from exc
            rows = data.get("studies") if isinstance(data, dict) else data
            if not isinstance(rows, list):
                raise ManifestError(f"{path.name}: expected a list of studies, or {{\"studies\": [...]}}")
        else:
            rows = list(csv.DictReader(line for line in text.splitlines() if line.strip()))
        base, source = Path(os.path.abspath(path)).parent, path.name
    else:
        rows, base, source = list(manifest), None, "manifest"
    studies = [_study(row, n, base, source) for n, row in enumerate(rows)]
    if not studies:
        raise ManifestError(f"{source}: no studies")
    ids = Counter(s.id for s in studies)
    twice = sorted(k for k, v in ids.items() if v > 1)
    if twice:
        raise ManifestError(f"{source}: study id(s) used twice: {', '.join(twice[:5])}")
    outputs = Counter(str(Path(s.output).resolve()) for s in studies)
    shared = sorted(k for k, v in outputs.items() if v > 1)
    if shared:
        raise ManifestError(f"{source}: two studies write the same output {shared[0]}")
    return studies


def _study(row: Study | dict, n: int, base: Path | None, source: str) -> Study:
    if isinstance(row, Study):
        return row
    where = f"{source}: study {n + 1}"
    if not isinstance(row, dict):
        raise ManifestError(f"{where}: expected an object with image, output and prompts or labels")
    clean = {str(k).strip().lower(): (str(v).strip() if v is not None else "") for k, v in row.items() if k}
    image, output = clean.get("image"), clean.get("output")
    prompts, labels = clean.get("prompts") or None, clean.get("labels") or None
    if not image or not output:
        raise ManifestError(f"{where}: 'image' and 'output' are required")
    if bool(prompts) == bool(labels):
        raise ManifestError(f"{where}: give either 'prompts' (PROMPTS.json) or 'labels' (a label file), not "
                            f"{'both' if prompts else 'neither'}")

    def full(value: str | None) -> str | None:
        if value is None:
            return None
        p = Path(value).expanduser()
        return str(p if p.is_absolute() or base is None else base / p)

    name = Path(image.rstrip("/\\")).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return Study(id=clean.get("id") or name or f"study{n + 1}", image=full(image), output=full(output),
                 prompts=full(prompts), labels=full(labels))


def study_complete(study: Study) -> bool:
    """Whether ``study``'s output was written completely by an earlier run.

    Labels are written atomically, then (NIfTI/NRRD/MHA) their names' sidecar: both present =
    complete. A DICOM-SEG holds its names, so the file alone is enough.
    """
    from ..io import labels_format
    from ..io.segments import segments_sidecar_path

    out = Path(study.output)
    if not out.is_file():
        return False
    try:
        return labels_format(out) == "dicom-seg" or segments_sidecar_path(out).is_file()
    except MedSamError:
        return False


# ---------------------------------------------------------------------------------- prompts
def labels_to_prompts(labels: np.ndarray, names: dict[int, str] | None = None, every: int | None = None):
    """One :class:`ObjectPrompts` per label value: a box on its largest axial slice, or with
    ``every=k`` a box on every k-th slice of its extent (sparse markers; the largest slice is
    always one of them)."""
    from .finetune_prompts import bounding_box
    from .predictor import Prompts
    from .prompt_file import ObjectPrompts

    if every is not None and every < 1:
        raise MedSamError(f"--every {every}: give a slice step of 1 or more")
    names = names or {}
    objects = []
    for value in (int(v) for v in np.unique(labels) if v):
        mask = labels == value
        area = mask.sum(axis=(1, 2))
        present = np.flatnonzero(area)
        largest = int(np.argmax(area))
        chosen = {largest}
        if every:
            chosen |= {int(z) for z in range(int(present[0]), int(present[-1]) + 1, every) if area[z]}
        obj = ObjectPrompts(value, names.get(value) or f"object {value}", axis=0)
        for z in sorted(chosen):
            obj.slices[z] = Prompts(box=bounding_box(mask[z]))
        objects.append(obj)
    if not objects:
        raise MedSamError("the label file has no objects (every voxel is 0)")
    return objects


# ---------------------------------------------------------------------------------- worker side
_models: dict[tuple, Any] = {}
_loads: Counter = Counter()
_lock = threading.Lock()


def worker_model(options: BatchOptions):
    """This process's model for ``options``: loaded on first use, then kept (one load per worker)."""
    from .model import SamModel

    key = (options.model, options.checkpoint, options.device, options.backend)
    with _lock:
        model = _models.get(key)
        if model is None:
            model = SamModel.from_checkpoint(options.model, options.checkpoint, device=options.device,
                                             download=True, backend=options.backend)
            _models[key] = model
            _loads[key] += 1
    return model


def model_loads() -> int:
    """How many times this process has loaded a model for a batch (``client.run(model_loads)``)."""
    return sum(_loads.values())


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return f"local:{os.getpid()}"


class TorchThreads(_WorkerPlugin):
    """A dask worker plugin setting torch's CPU threads in each worker as it starts.

    ``threads=None``: the machine's cores divided by the task threads of all workers on that
    host (``per_host``, counted by the client), so workers x threads <= cores on every machine.
    """

    name = "napari-medsam-torch-threads"

    def __init__(self, threads: int | None = None, per_host: dict[str, int] | None = None,
                 ignore_sigint: bool = False) -> None:
        self.threads = threads
        self.per_host = per_host or {}
        # The workers of our own LocalCluster share the terminal: Ctrl+C reaches them too, and
        # each would print a traceback. They ignore it; the client cancels and closes them.
        self.ignore_sigint = ignore_sigint

    def setup(self, worker) -> None:
        from ..models.device import set_cpu_threads

        if self.ignore_sigint:
            import signal

            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
            except ValueError:  # not the worker process's main thread: leave it
                pass

        sharing = self.per_host.get(_host(worker.address), worker.state.nthreads)
        n = self.threads or max(1, _cores() // max(1, sharing))
        os.environ["OMP_NUM_THREADS"] = str(n)
        set_cpu_threads(n)


def _host(address: str) -> str:
    """``tcp://10.0.0.5:40123`` -> ``10.0.0.5``."""
    return address.split("://")[-1].rsplit(":", 1)[0]


def _torch_threads_plugin(threads: int | None, nthreads: dict[str, int], own: bool = False) -> TorchThreads:
    """The worker plugin for a cluster whose workers have ``nthreads`` ({address: task threads})."""
    per_host: Counter = Counter()
    for address, n in nthreads.items():
        per_host[_host(address)] += n
    return TorchThreads(threads, dict(per_host), ignore_sigint=own)


def segment_study(study: Study, options: BatchOptions) -> dict:
    """Segment one study with this process's model and write its labels; never raises for the study's own faults.

    Returns ``{"id", "status" ("done"/"failed"), "error", "objects" (ObjectSummary dicts),
    "seconds", "worker", "model_loads", "written", "warnings"}``.
    """
    started = time.perf_counter()
    result: dict = {"id": study.id, "image": study.image, "output": study.output, "status": "done", "error": "",
                    "objects": [], "warnings": [], "worker": _worker_name()}
    try:
        result.update(_segment(study, options))
    except Exception as exc:  # noqa: BLE001 - one study's fault (unreadable scan, bad prompts, memory) stays its own
        result["status"], result["error"] = "failed", f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
    result["seconds"] = round(time.perf_counter() - started, 3)
    result["model_loads"] = model_loads()
    return result


def _segment(study: Study, options: BatchOptions) -> dict:
    from ..io import labels_format, load_volume, read_labels_and_segments, require_dicom_source, save_labels_named
    from ..io.atomic import check_writable_target
    from ..io.segments import save_segments_sidecar, segments_for_labels, segments_sidecar_path
    from .cache import EmbeddingCache, MemoryCache
    from .headless import check_z_range, segment_volume, window_mapping
    from .prompt_file import load_prompt_file

    labels_format(study.output)
    Path(study.output).parent.mkdir(parents=True, exist_ok=True)
    check_writable_target(study.output)
    if labels_format(study.output) != "dicom-seg":
        check_writable_target(segments_sidecar_path(study.output))
    volume = load_volume(study.image, modality=options.modality)
    if labels_format(study.output) == "dicom-seg":
        require_dicom_source(volume, study.output)
    if study.prompts:
        objects = load_prompt_file(study.prompts, volume)
    else:
        marks, segments = read_labels_and_segments(study.labels, like=volume)
        objects = labels_to_prompts(marks, {s.label: s.name for s in segments}, options.every)
    check_z_range(options.z_range, volume.shape, objects)
    mapping = window_mapping(options.window, volume)
    model = worker_model(options)
    labels, summaries = segment_volume(volume, objects, model, mapping=mapping,
                                       propagate_objects=options.propagate, z_range=options.z_range,
                                       cache=EmbeddingCache(MemoryCache()), engine=options.engine)
    names = {o.label: o.name for o in objects}
    out, sidecar, written = save_labels_named(labels, volume, study.output, segments_for_labels(labels, names=names))
    if sidecar is None and labels_format(out) != "dicom-seg":
        # Nothing was found: an empty names file still marks the study as done, so a resumed run
        # does not redo it (the report row says what the model found).
        save_segments_sidecar([], out)
    return {"written": str(out), "objects": [s.as_dict() for s in summaries],
            "warnings": [f"{s.name} (label {s.label}): the model found nothing" for s in summaries if not s.voxels]
            + written}


def _skipped(study: Study) -> dict:
    """The report of a study done by an earlier run, measured from its output file."""
    result: dict = {"id": study.id, "image": study.image, "output": study.output, "status": "skipped",
                    "error": "", "objects": [], "warnings": [], "worker": "", "seconds": 0.0}
    try:
        from ..io import load_volume, read_labels_and_segments

        volume = load_volume(study.output)
        labels, segments = read_labels_and_segments(study.output, like=volume)
        names = {s.label: s.name for s in segments}
        voxel_ml = float(np.prod(volume.spacing_mm)) / 1000.0
        for value in (int(v) for v in np.unique(labels) if v):
            owned = labels == value
            slices = np.flatnonzero(owned.any(axis=(1, 2)))
            voxels = int(owned.sum())
            result["objects"].append({"label": value, "name": names.get(value, f"object {value}"), "voxels": voxels,
                                      "volume_ml": round(voxels * voxel_ml, 3), "slices_reached": len(slices),
                                      "slice_range": [int(slices[0]), int(slices[-1])], "stop_reasons": {}})
    except (MedSamError, OSError, ValueError) as exc:
        result["warnings"].append(f"could not measure the earlier output: {' '.join(str(exc).split())}")
    return result


# ---------------------------------------------------------------------------------- client side
def _cores() -> int:
    """The cores this process may run on (its CPU affinity where the system tells)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def default_workers(n_studies: int, device: str = "cpu", cores: int | None = None) -> tuple[int, int]:
    """(workers, torch threads per worker) for a local cluster: workers x threads <= cores.

    On the CPU, two torch threads per worker and as many workers as the cores then allow (each
    worker holds a copy of the model), never more than studies; on a GPU, one worker.
    docs/performance.md measures one worker against two on two cores.
    """
    cores = cores or _cores()
    if not str(device).startswith("cpu"):
        return 1, max(1, cores)
    workers = max(1, min(cores // 2, n_studies))
    return workers, max(1, cores // workers)


def run_batch(
    manifest: str | Path | Sequence[Study | dict],
    client=None,
    *,
    options: BatchOptions | None = None,
    workers: int | None = None,
    report: str | Path | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
    on_start: Callable[[str | None, int], None] | None = None,
    **option_values: Any,
) -> BatchResult:
    """Segment every study of ``manifest`` on a dask.distributed cluster; return what happened.

    ``client``: a ``distributed.Client`` to run on (left open); None starts a ``LocalCluster``
    on loopback with ``workers`` processes (default :func:`default_workers`) and closes it at the
    end. Options are a :class:`BatchOptions` or its fields as keywords. ``report``: the CSV path
    (a JSON file of the same name is written beside it); None writes no files.
    ``progress(done, total, study_result)`` after each study; ``on_start(dashboard, workers)``
    once the cluster is up.
    """
    options = replace(options or BatchOptions(), **option_values)
    studies = load_manifest(manifest)
    if options.every is not None and options.every < 1:
        raise MedSamError(f"--every {options.every}: give a slice step of 1 or more")
    if client is None:  # local workers share this machine's hardware: refuse an unusable backend now
        from ..models.backends import resolve_backend
        from ..models.device import resolve_device
        from ..models.registry import get_model

        resolve_backend(options.backend, resolve_device(options.device), get_model(options.model).architecture)
    started = time.perf_counter()
    results: dict[str, dict] = {}
    todo = []
    for study in studies:
        if not options.force and study_complete(study):
            results[study.id] = _skipped(study)
        else:
            todo.append(study)
    done_count = len(results)
    if progress:
        for r in list(results.values()):
            progress(done_count, len(studies), r)
    cancelled = False
    dashboard, n_workers = None, 0
    try:
        if todo:
            with _client(client, workers, options, len(todo)) as (active, n_threads):
                if not active.nthreads():  # a scheduler whose workers have not joined yet
                    try:
                        active.wait_for_workers(1, timeout=120)
                    except TimeoutError:
                        raise MedSamError("the scheduler has no workers (waited 120 s): start `dask worker "
                                          "SCHEDULER_ADDRESS` on the machines that should compute") from None
                dashboard = getattr(active, "dashboard_link", None) if _has_dashboard(active) else None
                n_workers = len(active.nthreads())
                if on_start:
                    on_start(dashboard, n_workers)
                plugin = _torch_threads_plugin(n_threads, active.nthreads(), own=client is None)
                active.register_plugin(plugin, name=TorchThreads.name)
                done_count = _submit_all(active, todo, options, results, studies, done_count, progress)
    except KeyboardInterrupt:
        cancelled = True
        for study in todo:
            results.setdefault(study.id, {"id": study.id, "image": study.image, "output": study.output,
                                          "status": "cancelled", "error": "cancelled (Ctrl+C)", "objects": [],
                                          "warnings": [], "worker": "", "seconds": 0.0})
    ordered = [results[s.id] for s in studies if s.id in results]
    result = BatchResult(ordered, report_rows(ordered), time.perf_counter() - started, dashboard=dashboard,
                         workers=n_workers, cancelled=cancelled)
    if report is not None:
        result.report_csv, result.report_json = write_report(result, report)
    if cancelled:
        raise BatchCancelled(result)
    return result


class BatchCancelled(KeyboardInterrupt):
    """Ctrl+C during :func:`run_batch`: pending studies were cancelled; ``result`` holds what finished."""

    def __init__(self, result: BatchResult) -> None:
        super().__init__("cancelled")
        self.result = result


def _has_dashboard(client) -> bool:
    try:
        return "dashboard" in client.scheduler_info().get("services", {})
    except Exception:  # noqa: BLE001 - an address to print, nothing more
        return False


class _client:
    """Context manager: the caller's client as is, or a LocalCluster + Client closed on exit."""

    def __init__(self, client, workers: int | None, options: BatchOptions, n_studies: int) -> None:
        self.client, self.workers, self.options, self.n_studies = client, workers, options, n_studies
        self.own: list = []

    def __enter__(self):
        if self.client is not None:
            return self.client, self.options.threads
        from distributed import Client, LocalCluster

        n, threads = default_workers(self.n_studies, self.options.device)
        if self.workers:
            n = self.workers
            threads = max(1, _cores() // n)
        threads = self.options.threads or threads
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=":0", silence_logs=40)
        self.own.append(cluster)
        client = Client(cluster)
        self.own.append(client)
        return client, threads

    def __exit__(self, *exc) -> None:
        for thing in reversed(self.own):
            try:
                thing.close()
            except Exception:  # noqa: BLE001 - closing on the way out; the first error matters
                pass


def _submit_all(client, todo, options, results, studies, done_count, progress) -> int:
    from distributed import as_completed

    futures = {}
    for study in todo:
        # pure=False: a re-run (after --force, or a changed file) must compute again, not reuse a key.
        futures[client.submit(segment_study, study, options, pure=False, key=f"study-{study.id}-{time.time_ns()}")] \
            = study
    try:
        for future in as_completed(futures):
            study = futures[future]
            try:
                outcome = future.result()
            except Exception as exc:  # noqa: BLE001 - a worker that died on this study (memory, crash)
                outcome = {"id": study.id, "image": study.image, "output": study.output, "status": "failed",
                           "error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300], "objects": [],
                           "warnings": [], "worker": "", "seconds": 0.0}
            results[study.id] = outcome
            done_count += 1
            if progress:
                progress(done_count, len(studies), outcome)
    except KeyboardInterrupt:
        client.cancel(list(futures))
        raise
    return done_count


# ---------------------------------------------------------------------------------- report
def report_rows(studies: Iterable[dict]) -> list[dict]:
    """One row per study and object (REPORT_COLUMNS); a study with no objects has one row."""
    rows = []
    for s in studies:
        base = {"study": s["id"], "status": s["status"], "seconds": s.get("seconds", 0.0),
                "worker": s.get("worker", ""),
                "image": s.get("image", ""), "output": s.get("output", ""), "error": s.get("error", "")}
        objects = s.get("objects") or [None]
        for obj in objects:
            row = dict.fromkeys(REPORT_COLUMNS, "")
            row.update(base)
            if obj is not None:
                span = obj.get("slice_range") or ["", ""]
                row.update(label=obj["label"], name=obj["name"], voxels=obj["voxels"], volume_ml=obj["volume_ml"],
                           slice_first=span[0], slice_last=span[1], slices=obj.get("slices_reached", ""),
                           stop_reasons="; ".join(f"{k}: {v}" for k, v in (obj.get("stop_reasons") or {}).items()))
            rows.append(row)
    return rows


def write_report(result: BatchResult, path: str | Path) -> tuple[Path, Path]:
    """REPORT.csv (``path``) and REPORT.json beside it, each written atomically."""
    from ..io.atomic import atomic_output

    csv_path = Path(path)
    json_path = csv_path.with_suffix(".json")
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(csv_path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=REPORT_COLUMNS)
            writer.writeheader()
            writer.writerows(result.rows)
    document = {"summary": result.summary(), "counts": dict(result.counts()), "seconds": round(result.seconds, 3),
                "workers": result.workers, "cancelled": result.cancelled, "studies": result.studies}
    with atomic_output(json_path) as tmp:
        Path(tmp).write_text(json.dumps(document, indent=2, default=str))
    return csv_path, json_path
