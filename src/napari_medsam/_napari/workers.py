"""One-at-a-time background embedding of slices for the interactive controller.

The image encoder takes from a fraction of a second (GPU) to several seconds (CPU) per
slice, so it never runs on the Qt thread. Requests come in two kinds: *urgent* ones, which a
prediction waits for (the user prompted a slice that has no embedding yet), are all kept and
served first in order; a *landing* request (the user scrolled to a slice) only keeps the
newest ("latest wins"), since embedding a slice the user scrolled past is wasted work. A
landing request starts only once the view has stayed on that slice for
:data:`LANDING_DELAY_MS`: a running encoder cannot be interrupted, so a slice merely scrolled
through must not start one ahead of the slice the user stops on.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

log = logging.getLogger(__name__)


# Idle worker threads end after this long. torch's OpenMP keeps one thread team per thread that
# ran torch code; while a pool thread that encoded a slice stays alive, every decode on the Qt
# thread is ~1.6x slower on 2 cores (benchmarks/bench_decoder_threads.py: 23 ms -> 39 ms).
# Qt's default keeps idle threads 30 s; a new thread per job costs well under a millisecond.
THREAD_EXPIRY_MS = 250

# A landing request starts after the view has stayed this long on the slice (wheel and slider
# steps while scrolling come faster than this).
LANDING_DELAY_MS = 150


def short_lived_threads() -> None:
    """Make idle threads of Qt's global pool (napari's workers) end soon after their job."""
    from qtpy.QtCore import QThreadPool

    pool = QThreadPool.globalInstance()
    if pool.expiryTimeout() < 0 or pool.expiryTimeout() > THREAD_EXPIRY_MS:
        pool.setExpiryTimeout(THREAD_EXPIRY_MS)


class _Failed:
    """An exception carried out of a worker as its result."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _worker_threads() -> None:
    """In a worker thread: torch's full thread count (the Qt thread decodes with fewer, see qt_thread_threads)."""
    import sys

    if "torch" in sys.modules:  # a job that imports torch itself starts with torch's default
        from ..models.device import cpu_threads

        sys.modules["torch"].set_num_threads(cpu_threads())


def qt_thread_threads() -> None:
    """On the Qt thread: decode clicks with INTERACTIVE_THREADS torch threads (device.py says why)."""
    import torch

    from ..models.device import INTERACTIVE_THREADS, cpu_threads

    torch.set_num_threads(min(INTERACTIVE_THREADS, cpu_threads()))


def start_worker(function: Callable[..., Any], *args: Any, on_done: Callable[[Any], None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None,
                 on_yield: Callable[[Any], None] | None = None, on_finished: Callable[[], None] | None = None,
                 progress_bar: dict | None = None, **kwargs: Any) -> Any:
    """Run ``function(*args, **kwargs)`` (a plain function or a generator) in a napari thread worker.

    Exceptions come back as a value and reach ``on_error`` on the Qt thread: napari 0.9's own
    task-status handler of the ``errored`` signal raises when a viewer is open, so that signal
    cannot be relied on. Returns the started worker (``worker.quit()`` stops a generator).
    """
    import inspect

    from napari.qt.threading import create_worker

    if inspect.isgeneratorfunction(function):
        def job():
            try:
                _worker_threads()
                result = yield from function(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 (handed to on_error on the Qt thread)
                return _Failed(error)
            return result
    else:
        def job():
            try:
                _worker_threads()
                return function(*args, **kwargs)
            except Exception as error:  # noqa: BLE001
                return _Failed(error)

    options = {"_start_thread": False}
    if progress_bar is not None:  # napari's own progress bar for a generator: {"total": n, "desc": text}
        options["_progress"] = progress_bar
    worker = create_worker(job, **options)

    def returned(result: Any) -> None:
        try:
            if isinstance(result, _Failed):
                log.warning("background task %s failed: %r", getattr(function, "__name__", function), result.error)
                if on_error is not None:
                    on_error(result.error)
            elif on_done is not None:
                on_done(result)
        except RuntimeError as error:  # the widget that asked was closed meanwhile
            log.debug("result of %s not delivered: %s", getattr(function, "__name__", function), error)

    worker.returned.connect(returned)
    if on_yield is not None:
        worker.yielded.connect(on_yield)
    if on_finished is not None:  # connected before the start: a quick job may finish at once
        worker.finished.connect(on_finished)
    short_lived_threads()
    worker.start()
    return worker

Slice = tuple[int, int]  # (axis, index)


class EmbeddingQueue:
    """Runs ``job(axis, index)`` in a napari thread worker, one at a time, and reports back on the Qt thread."""

    def __init__(
        self,
        job: Callable[[int, int], object],
        *,
        on_start: Callable[[int, int], None],
        on_done: Callable[[int, int, object], None],
        on_error: Callable[[int, int, Exception], None],
    ) -> None:
        self._job = job
        self._on_start = on_start
        self._on_done = on_done
        self._on_error = on_error
        self._urgent: list[Slice] = []
        self._landing: Slice | None = None
        self._landing_ready = False  # the view stayed on the landing slice for landing_delay_ms
        self.landing_delay_ms = LANDING_DELAY_MS
        self._timer: Any = None
        self._running: Slice | None = None
        self._worker = None
        self._closed = False
        qt_thread_threads()  # made on the Qt thread by the controller, which decodes there

    @property
    def running(self) -> Slice | None:
        """The slice being embedded now, or None when idle."""
        return self._running

    @property
    def pending(self) -> list[Slice]:
        """Slices waiting for their turn, next first."""
        waiting = list(self._urgent)
        if self._landing is not None and self._landing not in waiting:
            waiting.append(self._landing)
        return waiting

    def request(self, axis: int, index: int, *, urgent: bool = False) -> None:
        """Ask for slice ``index`` along ``axis``; a landing request replaces an older queued one."""
        if self._closed:
            return
        item = (int(axis), int(index))
        if item == self._running:
            if not urgent:  # back on the slice being embedded: the slices scrolled past since then wait
                self.withdraw_landing()
            return
        if urgent:
            if item not in self._urgent:
                self._urgent.append(item)
            if self._landing == item:
                self.withdraw_landing()
        elif item in self._urgent:
            self.withdraw_landing()
        elif item != self._landing:
            self._landing, self._landing_ready = item, False
            if self.landing_delay_ms <= 0:
                self._landing_ready = True
            else:
                self._restart_timer()
        self._start_next()

    def withdraw_landing(self) -> None:
        """Forget the queued landing request (the user left that slice for one that needs no embedding)."""
        self._landing, self._landing_ready = None, False
        if self._timer is not None:
            self._timer.stop()

    def _restart_timer(self) -> None:
        from qtpy.QtCore import QTimer

        if self._timer is None:
            self._timer = QTimer()
            self._timer.setSingleShot(True)
            self._timer.timeout.connect(self._on_landed)
        self._timer.start(int(self.landing_delay_ms))

    def _on_landed(self) -> None:
        if self._landing is not None:
            self._landing_ready = True
            self._start_next()

    def close(self) -> None:
        """Start nothing more and ignore the result of a job still running (it cannot be interrupted)."""
        self._closed = True
        self._urgent.clear()
        self.withdraw_landing()

    def _start_next(self) -> None:
        if self._closed or self._running is not None:
            return
        if self._urgent:
            item = self._urgent.pop(0)
        elif self._landing is not None and self._landing_ready:
            item, self._landing, self._landing_ready = self._landing, None, False
        else:
            return
        self._running = item
        self._on_start(*item)
        self._worker = start_worker(self._job, *item, on_done=lambda result, item=item: self._finished(item, result, None),
                                    on_error=lambda exc, item=item: self._finished(item, None, exc))

    def _finished(self, item: Slice, result: object, error: Exception | None) -> None:
        self._running = None
        self._worker = None
        if not self._closed:
            if error is not None:  # start_worker has logged it
                self._on_error(item[0], item[1], error)
            else:
                self._on_done(item[0], item[1], result)
        self._start_next()
