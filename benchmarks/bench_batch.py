"""Cohort throughput: `run_batch` on a LocalCluster (1 and 2 workers) against a plain loop.

A synthetic cohort of CT phantoms (varied seeds, written as NIfTI with a rough liver + spleen
label file each, whose objects give one box per object on its largest slice) is segmented four
ways in one run, with the same total number of torch threads (the machine's cores):

* ``loop``: one process, the model loaded once, :func:`segment_study` study after study (the
  engine of `napari-medsam segment`, without a cluster), with all cores' torch threads, then
  with one thread;
* ``1 worker`` and ``2 workers``: :func:`run_batch` on a fresh LocalCluster (its start, the
  workers' imports and model loads included), cores / workers torch threads each;
* the first loop again, to see how far the machine's load drifted during the run.

Prints studies/minute, the per-study overhead of each cluster against the loop with the same
torch threads per process, and the load average next to every figure (absolute times move with
other work on the machine; compare the ratios of one run).

    python3 benchmarks/bench_batch.py [--studies 12] [--model lite_medsam --checkpoint FILE]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def make_cohort(root: Path, n: int, shape: tuple[int, int, int]) -> Path:
    from napari_medsam.io.nifti import write_nifti_labels, write_nifti_volume
    from napari_medsam.phantoms import make_ct_phantom

    rows = ["id,image,labels,output"]
    for seed in range(n):
        volume, truth, _ = make_ct_phantom(shape=shape, spacing_mm=(4.0, 5.0, 5.0), seed=seed)
        write_nifti_volume(volume, root / f"s{seed:02d}.nii.gz")
        write_nifti_labels(np.where(np.isin(truth, (1, 2)), truth, 0).astype(np.uint8), volume,
                           root / f"s{seed:02d}_rough.nii.gz")
        rows.append(f"s{seed:02d},s{seed:02d}.nii.gz,s{seed:02d}_rough.nii.gz,OUT/s{seed:02d}.nii.gz")
    template = "\n".join(rows) + "\n"
    (root / "manifest.template").write_text(template)
    return root


def manifest_for(root: Path, name: str) -> Path:
    path = root / f"{name}.csv"
    path.write_text((root / "manifest.template").read_text().replace("OUT/", f"out_{name}/"))
    return path


def plain_loop(root: Path, name: str, options, threads: int) -> float:
    from napari_medsam.models.device import set_cpu_threads
    from napari_medsam.segment.batch import load_manifest, segment_study, worker_model

    set_cpu_threads(threads)
    started = time.perf_counter()
    worker_model(options)  # loaded once, as a worker does
    for study in load_manifest(manifest_for(root, name)):
        result = segment_study(study, options)
        assert result["status"] == "done", result["error"]
    return time.perf_counter() - started


def on_cluster(root: Path, name: str, options, workers: int) -> tuple[float, float]:
    from dataclasses import replace

    from napari_medsam.segment.batch import run_batch

    up: list[float] = []
    started = time.perf_counter()
    result = run_batch(manifest_for(root, name), None, options=replace(options, threads=None), workers=workers,
                       on_start=lambda dashboard, n: up.append(time.perf_counter()))
    total = time.perf_counter() - started
    assert result.counts().get("done") == len(result.studies), result.summary()
    return total, total - (up[0] - started)


def main() -> None:
    from napari_medsam.segment.batch import BatchOptions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=12)
    parser.add_argument("--shape", type=int, nargs=3, default=(12, 48, 48))
    parser.add_argument("--model", default="lite_medsam")
    parser.add_argument("--checkpoint", default="/work/shared/golden/lite_medsam_random.pth")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    options = BatchOptions(model=args.model, checkpoint=args.checkpoint, device="cpu")
    n = args.studies
    print(f"{n} studies of {tuple(args.shape)} voxels, 2 objects each (box on the largest slice), {args.model}, "
          f"{cores} cores; torch threads per process: loop {cores} or 1, 1 worker x {cores}, "
          f"2 workers x {max(1, cores // 2)}")

    def line(label: str, seconds: float, base: float | None = None, base_name: str = "", extra: str = "") -> None:
        load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
        over = f"  {(seconds - base) / n:+6.2f} s/study vs {base_name}" if base is not None else ""
        print(f"{label:<22} {seconds:7.1f} s  {60 * n / seconds:6.2f} studies/min{over}{extra}  (load {load})",
              flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_batch_") as tmp:
        root = make_cohort(Path(tmp), n, tuple(args.shape))
        loops = {cores: plain_loop(root, "loop", options, cores)}
        line(f"plain loop, {cores} threads", loops[cores])
        loops[1] = plain_loop(root, "loop1", options, 1)
        line("plain loop, 1 thread", loops[1], loops[cores], f"loop {cores} threads")
        for workers in (1, 2):
            same = max(1, cores // workers)
            total, after_start = on_cluster(root, f"w{workers}", options, workers)
            line(f"LocalCluster {workers} x {same} thr", total, loops[same], f"loop {same} thread(s)",
                 f"; x{loops[same] / total:.2f} the loop's speed; {60 * n / after_start:.2f} studies/min "
                 "once the cluster is up")
        line(f"plain loop, {cores} thr again", plain_loop(root, "loop2", options, cores), loops[cores],
             "the first loop")


if __name__ == "__main__":
    main()
