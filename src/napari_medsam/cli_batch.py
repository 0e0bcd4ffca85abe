"""`napari-medsam batch MANIFEST`: segment a cohort on a dask.distributed cluster.

The command line of :mod:`napari_medsam.segment.batch`: the options of `segment` for every
study, a local cluster by default (``--workers``, ``--threads``) or a running scheduler
(``--scheduler tcp://HOST:PORT``), a progress bar over studies, the dashboard's address, and
REPORT.csv + REPORT.json. Exit status: 0 when every study is done or skipped, 1 when any failed
(the others are still done), 130 after Ctrl+C.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli_options import add_model_options
from .cli_progress import Progress


def add_parser(sub) -> None:
    """Register the `batch` subcommand on the CLI's subparsers."""
    batch = sub.add_parser(
        "batch",
        help="segment a cohort listed in a manifest on a dask.distributed cluster (resumable)",
        description="Run `segment` on every study of MANIFEST (CSV or JSON: image, output, and prompts "
        "or labels; see docs/cli.md) on a dask.distributed cluster: a local one by default, or a running "
        "scheduler. Studies whose output is complete are skipped; a failing study is reported and does "
        "not stop the others. Writes REPORT.csv and REPORT.json (one row per study and object).",
    )
    batch.add_argument("manifest", help="CSV or JSON manifest, one study per row")
    add_model_options(batch, checkpoint_help="weight file (every worker must be able to read it at this path)",
                      device="cpu", device_help="cpu, cuda, cuda:N or mps on each worker (default cpu)",
                      threads_help="torch threads per worker (default: cores / workers)")
    batch.add_argument("--propagate", action="store_true", help="propagate every object through the volume")
    batch.add_argument("--engine", choices=["auto", "slice", "memory"], default="auto",
                       help="propagation engine (as for segment)")
    batch.add_argument("--zrange", nargs=2, type=int, metavar=("Z0", "Z1"),
                       help="propagate only within these slices of each object's plane")
    batch.add_argument("--every", type=int, metavar="K",
                       help="label-file prompts: a box on every K-th slice of each object (sparse markers) "
                       "instead of one box on its largest slice")
    batch.add_argument("--modality", type=str.upper, choices=["CT", "MR", "OT"], help="override every scan's modality")
    batch.add_argument("--force", action="store_true", help="segment studies whose output already exists again")
    batch.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                       help="run on this running dask scheduler instead of a local cluster")
    batch.add_argument("--workers", type=int, help="local cluster: worker processes (default: cores / 2)")
    batch.add_argument("--report", metavar="CSV",
                       help="report path (default REPORT.csv beside the manifest; REPORT.json beside it)")
    batch.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr (errors are still printed)")


def run(args: argparse.Namespace) -> int:
    """Run `napari-medsam batch`; MedSamError and KeyboardInterrupt are handled by the CLI's main."""
    from .errors import MedSamError
    from .segment.batch import BatchCancelled, BatchOptions, run_batch
    from .segment.headless import check_z_range

    say = Progress("napari-medsam batch", quiet=args.quiet)
    z_range = tuple(args.zrange) if args.zrange else (None, None)
    check_z_range(z_range, ())
    checkpoint = str(Path(args.checkpoint).expanduser().resolve()) if args.checkpoint else None
    options = BatchOptions(model=args.model, checkpoint=checkpoint,
                           device=args.device, window=args.window, propagate=args.propagate, engine=args.engine,
                           z_range=z_range, every=args.every, threads=args.threads, modality=args.modality,
                           force=args.force, backend=args.backend)
    report = Path(args.report) if args.report else Path(args.manifest).expanduser().parent / "REPORT.csv"
    bar = _StudyBar(say)
    client = None
    try:
        if args.scheduler:
            from distributed import Client

            say.line(f"connecting to {args.scheduler}")
            try:
                client = Client(args.scheduler, timeout="20s")
            except (OSError, TimeoutError) as exc:
                raise MedSamError(f"--scheduler {args.scheduler}: cannot connect ({exc})") from None
        result = run_batch(args.manifest, client, options=options, workers=args.workers, report=report,
                           progress=bar, on_start=lambda dashboard, n: say.line(
                               f"{n} worker(s) ready; dashboard: {dashboard or 'not available'}"))
    except BatchCancelled as stop:
        bar.close()
        print(f"napari-medsam batch: {stop.result.summary()}", file=sys.stderr)
        raise KeyboardInterrupt from None
    finally:
        bar.close()
        if client is not None:
            client.close()
    for study in result.studies:
        if study["status"] == "failed":
            print(f"napari-medsam batch: {study['id']}: failed: {study['error']}", file=sys.stderr)
    print(f"{result.summary()}; report: {result.report_csv}")
    return 1 if result.counts().get("failed") else 0


class _StudyBar:
    """progress(done, total, study) as a tqdm bar over studies on a terminal, plain lines otherwise."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.bar = None

    def __call__(self, done: int, total: int, study: dict) -> None:
        if self.progress.quiet:
            return
        if self.progress.tty:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="study", file=self.progress.stream)
            self.bar.n = done
            self.bar.set_postfix_str(f"{study['id']}: {study['status']}"[:40], refresh=False)
            self.bar.refresh()
        else:
            self.progress.line(f"{done}/{total} studies - {study['id']}: {study['status']}"
                               f"{' (' + study['error'][:120] + ')' if study.get('error') else ''}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
