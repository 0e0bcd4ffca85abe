"""One-at-a-time background embedding of slices for the interactive controller.

The image encoder takes from a fraction of a second (GPU) to several seconds (CPU) per
slice, so it never runs on the Qt thread. Requests come in two kinds: *urgent* ones, which a
prediction waits for (the user prompted a slice that has no embedding yet), are all kept and
served first in order; a *landing* request (the user scrolled to a slice) only keeps the
newest, since embedding a slice the user scrolled past is wasted work.
"""

from __future__ import annotations

import logging
from typing import Callable

log = logging.getLogger(__name__)

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
        self._running: Slice | None = None
        self._worker = None
        self._closed = False

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
            return
        if urgent:
            if item not in self._urgent:
                self._urgent.append(item)
            if self._landing == item:
                self._landing = None
        elif item not in self._urgent:
            self._landing = item
        self._start_next()

    def close(self) -> None:
        """Start nothing more and ignore the result of a job still running (it cannot be interrupted)."""
        self._closed = True
        self._urgent.clear()
        self._landing = None

    def _start_next(self) -> None:
        if self._closed or self._running is not None:
            return
        if self._urgent:
            item = self._urgent.pop(0)
        elif self._landing is not None:
            item, self._landing = self._landing, None
        else:
            return
        from napari.qt.threading import create_worker

        self._running = item
        # Errors are reported through on_error (status line), not re-raised in the event loop.
        worker = create_worker(self._job, *item, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(lambda result, item=item: self._finished(item, result, None))
        worker.errored.connect(lambda exc, item=item: self._finished(item, None, exc))
        self._worker = worker
        self._on_start(*item)
        worker.start()

    def _finished(self, item: Slice, result: object, error: Exception | None) -> None:
        self._running = None
        self._worker = None
        if not self._closed:
            if error is not None:
                log.warning("embedding of slice %s along axis %s failed: %s", item[1], item[0], error)
                self._on_error(item[0], item[1], error)
            else:
                self._on_done(item[0], item[1], result)
        self._start_next()
