"""The embedding cache of the slice predictor: memory first, then disk, else compute.

Typical use::

    cache = EmbeddingCache(MemoryCache(1 << 30), DiskCache())
    key = EmbeddingKey(volume_signature(vol.array, vol.spacing_mm), model_sig, "window:40:400", 0, z)
    embedding = cache.get_or_compute(key, lambda: encoder(image_of_slice(z)))

The pieces live in :mod:`.keys` (keys and signatures), :mod:`.memory` and
:mod:`.disk`; everything is re-exported here. Nothing here imports torch: tensors are
accepted and converted to numpy, and embeddings come back as float32 numpy arrays.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, Callable

import numpy as np

from .disk import DEFAULT_DISK_BYTES, ENV_VAR, DiskCache, GroupInfo, cache_root
from .keys import CacheStats, EmbeddingKey, as_embedding_array, file_signature, volume_signature
from .memory import DEFAULT_MEMORY_BYTES, MemoryCache

__all__ = [
    "DEFAULT_DISK_BYTES",
    "DEFAULT_MEMORY_BYTES",
    "ENV_VAR",
    "CacheStats",
    "DiskCache",
    "EmbeddingCache",
    "EmbeddingKey",
    "GroupInfo",
    "MemoryCache",
    "as_embedding_array",
    "cache_root",
    "file_signature",
    "volume_signature",
]

log = logging.getLogger(__name__)


class _Pending:
    """A computation in progress, which other threads asking for the same key wait on."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: np.ndarray | None = None


class EmbeddingCache:
    """Two cache levels in front of an embedding computation; thread-safe.

    The disk level is best effort: if it cannot be written (full disk, read-only folder) the
    embedding is still returned and kept in memory, and a warning is logged.
    """

    def __init__(self, memory: MemoryCache | None = None, disk: DiskCache | None = None) -> None:
        self.memory = memory if memory is not None else MemoryCache()
        self.disk = disk
        self._lock = threading.Lock()
        self._pending: dict[EmbeddingKey, _Pending] = {}
        # Calls of get_or_compute under way (in any thread); flush() waits for them to end.
        self._active = 0
        self._idle = threading.Condition(self._lock)

    def get(self, key: EmbeddingKey) -> np.ndarray | None:
        """The cached embedding (memory, else disk, promoted to memory) or None."""
        found = self.memory.get(key)
        if found is not None or self.disk is None:
            return found
        try:
            found = self.disk.get(key)
        except Exception as exc:  # the disk level must never break segmentation
            log.warning("embedding disk cache read failed: %s", exc)
            return None
        if found is not None:
            self.memory.put(key, found)
        return found

    def put(self, key: EmbeddingKey, embedding: Any) -> np.ndarray:
        """Store an embedding at both levels; returns it as a float32 numpy array."""
        array = as_embedding_array(embedding)
        self.memory.put(key, array)
        if self.disk is not None:
            try:
                self.disk.put(key, array)
            except Exception as exc:
                if _interpreter_exiting(exc):
                    # A background embedding finished while Python was exiting: zarr's thread pool
                    # takes no more work. Chunks are written whole or not at all, so nothing on
                    # disk is damaged; only this slice is not cached.
                    log.debug("embedding disk cache write skipped: the interpreter is exiting")
                else:
                    log.warning("embedding disk cache write failed (the embedding stays in memory): %s", exc)
        return array

    def get_or_compute(self, key: EmbeddingKey, compute: Callable[[], Any]) -> np.ndarray:
        """The cached embedding, else ``compute()``'s result, stored at both levels.

        ``compute`` runs without any lock held. If another thread is already computing the same
        key, this waits for its result instead of computing it twice.
        """
        with self._lock:
            self._active += 1
        try:
            return self._get_or_compute(key, compute)
        finally:
            with self._lock:
                self._active -= 1
                if self._active == 0:
                    self._idle.notify_all()

    def hold(self) -> Callable[[], None]:
        """Count work that will call :meth:`get_or_compute` later (queued prefetch) as under way.

        :meth:`flush` waits for held work as for running calls. Returns the release function,
        which must be called exactly once (calling it again does nothing).
        """
        with self._lock:
            self._active += 1
        released = threading.Event()

        def release() -> None:
            if released.is_set():
                return
            released.set()
            with self._lock:
                self._active -= 1
                if self._active == 0:
                    self._idle.notify_all()

        return release

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until no :meth:`get_or_compute` call is under way, so that its disk write is done.

        A background thread (propagation's prefetch) may still be embedding a slice when the
        caller has finished; a process that exits then loses that slice's disk write. Call this
        before exiting. Work announced with :meth:`hold` counts from the moment it was queued,
        so a prefetch thread that has not yet reached :meth:`get_or_compute` is waited for too. Returns False if ``timeout`` seconds passed first.
        """
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout)

    def _get_or_compute(self, key: EmbeddingKey, compute: Callable[[], Any]) -> np.ndarray:
        found = self.get(key)
        if found is not None:
            return found
        with self._lock:
            pending = self._pending.get(key)
            owner = pending is None
            if owner:
                pending = self._pending[key] = _Pending()
        assert pending is not None
        if not owner:
            pending.done.wait()
            if pending.result is not None:
                return pending.result.copy()
            # The other thread's computation failed: try ourselves (and raise our error if any).
            found = self.get(key)
            return found if found is not None else self.put(key, compute())
        try:
            # Another thread may have stored it between our miss and our registration; that
            # thread stored it in memory, so looking there is enough (and counts no second miss).
            found = self.memory.get(key) if key in self.memory else None
            result = found if found is not None else self.put(key, compute())
            pending.result = result
            return result.copy()
        finally:
            with self._lock:
                self._pending.pop(key, None)
            pending.done.set()

    def __contains__(self, key: EmbeddingKey) -> bool:
        return key in self.memory or (self.disk is not None and key in self.disk)

    def cached_indices(self, key: EmbeddingKey) -> set[int]:
        """Slice indices of ``key``'s group available at either level (``key.index`` is ignored)."""
        indices = self.memory.indices(key)
        if self.disk is not None:
            indices.update(self.disk.filled_indices(key))
        return indices

    def invalidate(
        self,
        *,
        volume_signature: str | None = None,
        model_signature: str | None = None,
        mapping_signature: str | None = None,
        axis: int | None = None,
    ) -> tuple[int, int]:
        """Drop entries matching every given field at both levels; returns (memory entries, disk groups).

        Entries under other mappings, volumes or models stay usable: switching the CT window
        and back finds the first window's embeddings again.
        """
        fields = dict(
            volume_signature=volume_signature,
            model_signature=model_signature,
            mapping_signature=mapping_signature,
            axis=axis,
        )
        if all(value is None for value in fields.values()):
            raise ValueError("invalidate() needs at least one field to match; use clear() to drop everything")
        in_memory = self.memory.remove_where(**fields)
        on_disk = self.disk.clear(**fields) if self.disk is not None else 0
        return in_memory, on_disk

    def clear(self, disk: bool = False) -> None:
        """Empty the memory level, and the disk folder too if ``disk``."""
        self.memory.clear()
        if disk and self.disk is not None:
            self.disk.clear()


def _interpreter_exiting(exc: BaseException) -> bool:
    """Whether ``exc`` comes from Python's exit: thread pools refuse new work once it has begun."""
    if sys.is_finalizing() or not threading.main_thread().is_alive():
        return True
    return isinstance(exc, RuntimeError) and "interpreter shutdown" in str(exc)
