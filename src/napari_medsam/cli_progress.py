"""Progress of the command-line tools on stderr: tqdm bars on a terminal, plain rate-limited lines otherwise."""

from __future__ import annotations

import sys
import time

class Progress:
    """Progress of one command on stderr: tqdm bars on a terminal, plain lines otherwise.

    When stderr is not a terminal (a log file, a pipe, CI) a bar would either vanish (tqdm's
    choice) or fill the log with carriage returns, so each step becomes one plain line instead,
    rate-limited: a line when a phase starts, at every tenth of it, when it ends, and whenever
    ``interval_s`` have passed since the previous line. ``quiet`` silences all of it (errors are
    printed by ``main``, not here).
    """

    STEPS = 10

    def __init__(self, prefix: str, *, quiet: bool = False, stream=None, tty: bool | None = None,
                 interval_s: float = 5.0, clock=time.monotonic) -> None:
        self.prefix = prefix
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty and isatty())
        self.tty = tty
        self.interval_s = interval_s
        self.clock = clock

    def line(self, text: str) -> None:
        """One plain line (a stage of the command), unless quiet."""
        if not self.quiet:
            print(f"{self.prefix}: {text}", file=self.stream, flush=True)

    def slices(self) -> "SliceProgress":
        """A ``progress(done, total, message)`` callback for the segmentation engine."""
        return SliceProgress(self)

    def bytes(self, what: str):
        """A ``progress(done_bytes, total_bytes)`` callback for weight downloads."""
        if self.tty and not self.quiet:
            from .models.weights import tqdm_progress

            return tqdm_progress(what)
        return ByteLines(self, what)


class Steps:
    """Decides which progress updates deserve a plain line (see :class:`Progress`)."""

    def __init__(self, progress: Progress, *, counts_steps: bool) -> None:
        self.progress = progress
        # Counted steps (slices) never repeat a count within a phase, so a repeat means the next
        # object started; byte counts may repeat (a download waiting for another process).
        self.counts_steps = counts_steps
        self.last_done: float | None = None
        self.last_bucket = -1
        self.last_time = 0.0
        self.ended = False

    def due(self, done: float, total: float | None) -> bool:
        now = self.progress.clock()
        new_phase = (self.last_done is None or done < self.last_done
                     or (self.counts_steps and done == self.last_done))  # a count that starts again
        if new_phase:
            self.last_bucket, self.ended = -1, False
        self.last_done = done
        # The tenth of the work reached; a total that grows (propagation's estimate) never
        # brings back a tenth already shown.
        bucket = int(self.progress.STEPS * done / total) if total else -1
        end = bool(total) and done >= total
        show = (new_phase or bucket > self.last_bucket or (end and not self.ended)
                or now - self.last_time >= self.progress.interval_s)
        self.last_bucket = max(self.last_bucket, bucket)
        if show:
            self.last_time = now
            self.ended = self.ended or end
        return show


class SliceProgress:
    """The engine's progress(done, total, message) as a tqdm bar or rate-limited lines."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.steps = Steps(progress, counts_steps=True)
        self.bar = None
        if progress.tty and not progress.quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=0, unit="slice", file=progress.stream, leave=False)

    def __call__(self, done: int, total: int, message: str = "") -> None:
        if self.progress.quiet:
            return
        if self.bar is not None:
            if total and self.bar.total != total:
                self.bar.total = total
            self.bar.n = done
            self.bar.set_description(message[:40], refresh=False)
            self.bar.refresh()
        elif self.steps.due(done, total):
            self.progress.line(f"{done}/{total} slices" + (f" - {message}" if message else ""))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class ByteLines:
    """A download's progress(done_bytes, total_bytes) as rate-limited plain lines (or nothing)."""

    def __init__(self, progress: Progress, what: str) -> None:
        self.progress = progress
        self.what = what
        self.steps = Steps(progress, counts_steps=False)

    def __call__(self, done: int, total: int | None) -> None:
        if self.progress.quiet or not self.steps.due(done, total):
            return
        if total:
            self.progress.line(f"{self.what}: {done / 1e6:.1f} of {total / 1e6:.1f} MB ({100 * done // total}%)")
        else:
            self.progress.line(f"{self.what}: {done / 1e6:.1f} MB")

    def close(self) -> None:
        pass
