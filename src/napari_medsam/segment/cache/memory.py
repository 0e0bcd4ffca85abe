"""In-memory LRU cache of slice embeddings, bounded by bytes and safe to share between threads.

The UI computes embeddings in a worker thread while the main thread reads them, so every
method takes a lock; the lock is only ever held for dictionary bookkeeping, never while an
array is converted or copied, and never while an embedding is computed.

``dtype="float16"`` halves the memory per slice (a (1, 256, 64, 64) embedding takes 2 MiB
instead of 4 MiB). The cost is rounding: float16 keeps an 11-bit significand, so each value in
float16's normal range (|x| >= 6.1e-5) comes back with a relative error of at most 2**-11
(4.9e-4), and smaller values with an absolute error of at most 2**-25 (3e-8). SAM-family
embeddings are roughly N(0, 1), well inside that range; the mask decoder's output does not
change visibly. An embedding with values beyond float16's range (|x| > 65504) is kept in
float32 rather than turned into infinities.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable

import numpy as np

from .keys import CacheStats, EmbeddingKey, as_embedding_array

__all__ = ["DEFAULT_MEMORY_BYTES", "MemoryCache"]

DEFAULT_MEMORY_BYTES = 1024**3  # 256 float32 slices of (1, 256, 64, 64); 512 in float16

_FLOAT16_MAX = float(np.finfo(np.float16).max)
_STORAGE_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}


class MemoryCache:
    """Least-recently-used embeddings held in memory, up to ``max_bytes`` bytes in all."""

    def __init__(self, max_bytes: int = DEFAULT_MEMORY_BYTES, dtype: str = "float32") -> None:
        if str(dtype) not in _STORAGE_DTYPES:
            raise ValueError(f"MemoryCache dtype must be 'float32' or 'float16', got {dtype!r}")
        if int(max_bytes) < 0:
            raise ValueError(f"MemoryCache max_bytes must be >= 0, got {max_bytes}")
        self.dtype = str(dtype)
        self._storage = _STORAGE_DTYPES[self.dtype]
        self._max_bytes = int(max_bytes)
        self._entries: OrderedDict[EmbeddingKey, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._hits = self._misses = self._evictions = self._rejected = 0

    @property
    def max_bytes(self) -> int:
        """The byte budget."""
        return self._max_bytes

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def set_max_bytes(self, max_bytes: int) -> None:
        """Change the byte budget, evicting least-recently-used entries if it shrank."""
        if int(max_bytes) < 0:
            raise ValueError(f"MemoryCache max_bytes must be >= 0, got {max_bytes}")
        with self._lock:
            self._max_bytes = int(max_bytes)
            self._evict_to_fit(0)

    def get(self, key: EmbeddingKey) -> np.ndarray | None:
        """The embedding as a new float32 array the caller owns, or None (a miss)."""
        with self._lock:
            stored = self._entries.get(key)
            if stored is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
        # Stored arrays are read-only and never changed in place, so copying needs no lock.
        return stored.astype(np.float32, copy=True)

    def peek(self, key: EmbeddingKey) -> bool:
        """Whether ``key`` is held, without counting a lookup or refreshing its LRU place."""
        with self._lock:
            return key in self._entries

    __contains__ = peek

    def put(self, key: EmbeddingKey, embedding: Any) -> bool:
        """Store a copy of ``embedding`` (numpy or torch); False if it alone exceeds the budget."""
        stored = self._to_storage(embedding)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            if stored.nbytes > self._max_bytes:
                self._rejected += 1
                return False
            self._evict_to_fit(stored.nbytes)
            self._entries[key] = stored
            self._bytes += stored.nbytes
            return True

    def evict(self, key: EmbeddingKey) -> bool:
        """Drop one entry; True if it was there."""
        with self._lock:
            stored = self._entries.pop(key, None)
            if stored is None:
                return False
            self._bytes -= stored.nbytes
            self._evictions += 1
            return True

    def remove_where(
        self,
        predicate: Callable[[EmbeddingKey], bool] | None = None,
        *,
        volume_signature: str | None = None,
        model_signature: str | None = None,
        mapping_signature: str | None = None,
        axis: int | None = None,
    ) -> int:
        """Drop every entry whose key matches all given fields (and ``predicate``); returns the count."""

        def selected(key: EmbeddingKey) -> bool:
            return key.matches(
                volume_signature=volume_signature,
                model_signature=model_signature,
                mapping_signature=mapping_signature,
                axis=axis,
            ) and (predicate is None or predicate(key))

        with self._lock:
            doomed = [key for key in self._entries if selected(key)]
            for key in doomed:
                self._bytes -= self._entries.pop(key).nbytes
            self._evictions += len(doomed)
            return len(doomed)

    def indices(self, key: EmbeddingKey) -> set[int]:
        """Slice indices held for ``key``'s group (its own index does not matter)."""
        group = key.group_fields()
        with self._lock:
            return {k.index for k in self._entries if k.group_fields() == group}

    def clear(self) -> None:
        """Drop everything (the counters stay)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        """A snapshot of the counters and the bytes held."""
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                entries=len(self._entries),
                bytes=self._bytes,
                max_bytes=self._max_bytes,
                rejected=self._rejected,
            )

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _to_storage(self, embedding: Any) -> np.ndarray:
        array = as_embedding_array(embedding)
        storage = self._storage
        if storage == np.float16 and float(np.nanmax(np.abs(array), initial=0.0)) > _FLOAT16_MAX:
            storage = np.dtype(np.float32)
        # Always a private copy: the caller may reuse or modify its array (or tensor) later.
        stored = np.array(array, dtype=storage, copy=True, order="C")
        stored.setflags(write=False)
        return stored

    def _evict_to_fit(self, incoming: int) -> None:
        # Called with the lock held.
        while self._entries and self._bytes + incoming > self._max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= dropped.nbytes
            self._evictions += 1
