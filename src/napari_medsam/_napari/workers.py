"""One-at-a-time background embedding of slices for the interactive controller.

The image encoder takes from a fraction of a second (GPU) to several seconds (CPU) per
slice, so it never runs on the Qt thread. Requests come in two kinds: *urgent* ones, which a
prediction waits for (the user prompted a slice that has no embedding yet), are all kept and
served first in order; a *landing* request (the user scrolled to a slice) only keeps the
newest ("latest wins"), since embedding a slice the user scrolled past is wasted work. A
landing request starts only once the view has stayed on that slice for
:data:`LANDING_DELAY_MS`: a running encoder cannot be interrupted, so a slice merely scrolled
through must not start one ahead of the slice the user stops on.

*Prefetch* requests (the neighbours of the slice the user is on, nearest first) come last: one
starts only when no urgent or landing request waits and the queue has been idle for
:data:`PREFETCH_DELAY_MS` (also since the user's last prompt), and only when the owner's
``may_prefetch`` check allows it then (that slice still uncached, no other background job using
the CPU). A new list replaces the queued one, so moving to another slice re-centres it. Still
one encoder job at a time: a prefetch that has started runs to its end, and whatever the user
asks meanwhile comes next.
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

# A queued prefetch starts once the queue has had nothing else to do for this long after the
# prefetch list was (re)made or the user's last prompt (postpone_prefetch): the first clicks on a
# slice that has just become ready, and a user still scrolling, find the CPU free of the encoder
# (a decode beside a running encoder took 1.6-2x longer on 2 cores: bench_prefetch.py threads).
PREFETCH_DELAY_MS = 1000


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


def _restart_single_shot(timer: Any, callback: Callable[[], None], ms: float) -> Any:
    """(Re)start a single-shot QTimer calling ``callback`` after ``ms``; made on first use. Returns it."""
    if timer is None:
        from qtpy.QtCore import QTimer

        timer = QTimer()
        timer.setSingleShot(True)
        timer.timeout.connect(callback)
    timer.start(int(ms))
    return timer


class EmbeddingQueue:
    """Runs ``job(axis, index)`` in a napari thread worker, one at a time, and reports back on the Qt thread.

    ``may_prefetch(axis, index)``, when set, is asked on the Qt thread before a prefetch starts:
    True starts it, False drops that slice (cached meanwhile), None means "not now" (tried again
    after :data:`PREFETCH_DELAY_MS`).
    """

    def __init__(
        self,
        job: Callable[[int, int], object],
        *,
        on_start: Callable[[int, int], None],
        on_done: Callable[[int, int, object], None],
        on_error: Callable[[int, int, Exception], None],
        may_prefetch: Callable[[int, int], bool | None] | None = None,
    ) -> None:
        self._job = job
        self._on_start = on_start
        self._on_done = on_done
        self._on_error = on_error
        self.may_prefetch = may_prefetch
        self._urgent: list[Slice] = []
        self._landing: Slice | None = None
        self._landing_ready = False  # the view stayed on the landing slice for landing_delay_ms
        self.landing_delay_ms = LANDING_DELAY_MS
        self._timer: Any = None
        self._prefetch: list[Slice] = []
        self._prefetch_ready = False  # the queue stayed idle for prefetch_delay_ms since the list was made
        self.prefetch_delay_ms = PREFETCH_DELAY_MS
        self._prefetch_timer: Any = None
        self._running: Slice | None = None
        self._running_prefetch = False
        self._worker = None
        self._closed = False
        qt_thread_threads()  # made on the Qt thread by the controller, which decodes there

    @property
    def running(self) -> Slice | None:
        """The slice being embedded now, or None when idle."""
        return self._running

    @property
    def prefetching(self) -> bool:
        """True while the running job is a prefetch nobody has asked for since."""
        return self._running is not None and self._running_prefetch

    @property
    def pending(self) -> list[Slice]:
        """Slices waiting for their turn, next first (prefetch requests not included: see :attr:`prefetch_pending`)."""
        waiting = list(self._urgent)
        if self._landing is not None and self._landing not in waiting:
            waiting.append(self._landing)
        return waiting

    @property
    def prefetch_pending(self) -> list[Slice]:
        """Prefetch requests not started yet, next first."""
        return list(self._prefetch)

    def request(self, axis: int, index: int, *, urgent: bool = False) -> None:
        """Ask for slice ``index`` along ``axis``; a landing request replaces an older queued one."""
        if self._closed:
            return
        item = (int(axis), int(index))
        if item in self._prefetch:  # asked for now: no longer a prefetch
            self._prefetch.remove(item)
        if item == self._running:
            self._running_prefetch = False  # somebody waits for it now
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

    def prefetch(self, items: list[Slice]) -> None:
        """Embed these slices, in this order, when there is nothing else to do; replaces the queued prefetch list."""
        if self._closed:
            return
        self.withdraw_prefetch()
        self._prefetch = [(int(a), int(i)) for a, i in items if (int(a), int(i)) != self._running]
        if not self._prefetch:
            return
        if self.prefetch_delay_ms <= 0:
            self._prefetch_ready = True
            self._start_next()
        else:
            self._restart_prefetch_timer()

    def postpone_prefetch(self) -> None:
        """Start the queued prefetch only after another :data:`PREFETCH_DELAY_MS` (the user is busy on the slice)."""
        if self._prefetch and not self._closed and self.prefetch_delay_ms > 0:
            self._restart_prefetch_timer()

    def withdraw_prefetch(self) -> None:
        """Forget the queued prefetch requests (one already running ends as it is)."""
        self._prefetch, self._prefetch_ready = [], False
        if self._prefetch_timer is not None:
            self._prefetch_timer.stop()

    def _restart_timer(self) -> None:
        self._timer = _restart_single_shot(self._timer, self._on_landed, self.landing_delay_ms)

    def _restart_prefetch_timer(self) -> None:
        self._prefetch_ready = False
        self._prefetch_timer = _restart_single_shot(self._prefetch_timer, self._on_prefetch_due,
                                                    max(1, self.prefetch_delay_ms))

    def _on_landed(self) -> None:
        if self._landing is not None:
            self._landing_ready = True
            self._start_next()

    def _on_prefetch_due(self) -> None:
        if self._prefetch:
            self._prefetch_ready = True
            self._start_next()

    def close(self) -> None:
        """Start nothing more and ignore the result of a job still running (it cannot be interrupted)."""
        self._closed = True
        self._urgent.clear()
        self.withdraw_landing()
        self.withdraw_prefetch()

    def _next_prefetch(self) -> Slice | None:
        """The prefetch request to start now, or None (none ready, or the owner says not now)."""
        while self._prefetch and self._prefetch_ready:
            item = self._prefetch[0]
            verdict = True if self.may_prefetch is None else self.may_prefetch(*item)
            if verdict is None:  # not now: look again a moment later
                self._restart_prefetch_timer()
                return None
            self._prefetch.pop(0)
            if verdict:
                return item
        return None

    def _start_next(self) -> None:
        if self._closed or self._running is not None:
            return
        prefetch = False
        if self._urgent:
            item = self._urgent.pop(0)
        elif self._landing is not None:
            if not self._landing_ready:
                return  # a landing request waits for its delay: no prefetch ahead of it
            item, self._landing, self._landing_ready = self._landing, None, False
        else:
            found = self._next_prefetch()
            if found is None:
                return
            item, prefetch = found, True
        self._running, self._running_prefetch = item, prefetch
        self._on_start(*item)
        self._worker = start_worker(self._job, *item, on_done=lambda result, item=item: self._finished(item, result, None),
                                    on_error=lambda exc, item=item: self._finished(item, None, exc))

    def _finished(self, item: Slice, result: object, error: Exception | None) -> None:
        self._running, self._running_prefetch = None, False
        self._worker = None
        if not self._closed:
            if error is not None:  # start_worker has logged it
                self._on_error(item[0], item[1], error)
            else:
                self._on_done(item[0], item[1], result)
        self._start_next()
