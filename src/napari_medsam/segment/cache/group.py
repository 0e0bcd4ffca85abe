"""One group of cached slice embeddings on disk: a zarr v3 store, one chunk per slice.

Layout of a group folder (its name is :meth:`EmbeddingKey.group_id` + ``.zarr``)::

    zarr.json       group metadata; attributes: layout, key fields, embedding shape, dtype, created
    embedding/      (capacity, *embedding_shape), chunks (1, *embedding_shape)
    digest/         (capacity,) uint64, chunks (1,); 0 = slice not written

The arrays grow (doubling) when a slice index beyond their capacity arrives, so nobody needs
to know the number of slices up front; unwritten chunks take no space.

Why this is safe against interruption and damage:

* zarr 3's local store writes every chunk and metadata file to a temporary name and renames
  it into place, so a killed process leaves a whole old file or a whole new one.
* A slice's digest is written only after its data: a crash in between leaves it unmarked,
  so it is recomputed on resume, never returned.
* The digest hashes the group name, the slice index and the stored bytes, and every read
  checks it: a truncated, garbled, deleted or misplaced chunk is a miss, never wrong data.
* A new group is built in a temporary folder and renamed into place, so no process ever
  sees half a group.

Compression: Blosc (zstd level 3, byte shuffle). On the project's golden embeddings (official
encoders with seeded random weights; real weights may differ) it stored 1.5-3.5 MB per float32
(1, 256, 64, 64) slice where zarr's default zstd stored 2.7-3.9 MB, and read faster. Float32
embeddings compress poorly at best (noise-like low mantissa bits); float16 halves the size.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from .keys import EmbeddingKey

LAYOUT = 1
_MIN_CAPACITY = 64
_TOUCH_INTERVAL_S = 60.0


@dataclass
class SliceGroup:
    """An open, checked group folder: the slices of one (volume, model, mapping, axis)."""

    path: Path
    embedding: Any  # zarr.Array
    digest: Any  # zarr.Array
    shape: tuple[int, ...]
    dtype: np.dtype
    capacity: int
    last_touch: float = 0.0

    @classmethod
    def open(cls, path: Path, key: EmbeddingKey) -> "SliceGroup":
        """Open and check a group folder; raises if anything about it is off."""
        root = zarr.open_group(path, mode="r+")
        attributes = root.attrs.asdict()
        if attributes.get("layout") != LAYOUT or attributes.get("key") != key.group_fields():
            raise ValueError("its metadata belong to another key or cache layout")
        shape = tuple(int(s) for s in attributes["embedding_shape"])
        dtype = np.dtype(attributes["dtype"])
        embedding, digest = root["embedding"], root["digest"]
        if (
            dtype not in (np.float32, np.float16)
            or tuple(embedding.shape[1:]) != shape
            or tuple(embedding.chunks) != (1, *shape)
            or np.dtype(embedding.dtype) != dtype
            or tuple(digest.chunks) != (1,)
            or np.dtype(digest.dtype) != np.uint64
        ):
            raise ValueError("its arrays do not match its metadata")
        # A crash between the two resizes of a growth leaves the digest array the shorter one.
        capacity = min(embedding.shape[0], digest.shape[0])
        return cls(path, embedding, digest, shape, dtype, capacity)

    @staticmethod
    def create(path: Path, key: EmbeddingKey, shape: tuple[int, ...], dtype: np.dtype) -> None:
        """Build an empty group at ``path`` (in a temporary folder, renamed into place).

        If another process creates ``path`` first, its group is kept and this returns quietly.
        """
        temporary = path.with_name(f".tmp-{path.stem}-{uuid.uuid4().hex}.zarr")
        attributes = {
            "layout": LAYOUT,
            "key": key.group_fields(),
            "embedding_shape": list(shape),
            "dtype": np.dtype(dtype).name,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        capacity = max(_MIN_CAPACITY, key.index + 1)
        try:
            root = zarr.open_group(temporary, mode="w-", attributes=attributes)
            root.create_array(
                "embedding",
                shape=(capacity, *shape),
                chunks=(1, *shape),
                dtype=dtype,
                fill_value=0,
                compressors=[BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")],
            )
            root.create_array("digest", shape=(capacity,), chunks=(1,), dtype="uint64", fill_value=0)
            os.rename(temporary, path)
        except OSError:
            shutil.rmtree(temporary, ignore_errors=True)
            if not path.is_dir():
                raise

    def read(self, index: int) -> tuple[np.ndarray | None, bool]:
        """(stored slice or None, whether a damaged slice was found and unmarked)."""
        if index >= self.capacity:
            return None, False
        try:
            expected = int(self.digest[index])
            if expected == 0:
                return None, False
            stored = np.asarray(self.embedding[index])
            intact = stored.shape == self.shape and _slice_digest(self.path.name, index, stored) == expected
        except OSError as exc:
            if not isinstance(exc, (FileNotFoundError, NotADirectoryError)):
                return None, False  # could not read it (locked, I/O error): a miss, but not damage
            intact = False
        except Exception:  # zarr and Blosc raise several types for damaged chunks
            intact = False
        if intact:
            return stored, False
        self.unmark(index)
        return None, True

    def write(self, index: int, stored: np.ndarray) -> None:
        """Write one slice's data, then mark it done."""
        self._ensure_capacity(index)
        self.embedding[index] = stored
        # Marked only once its data are in place: a crash before this line leaves it unmarked.
        self.digest[index] = np.uint64(_slice_digest(self.path.name, index, stored))

    def unmark(self, index: int) -> None:
        """Forget one slice (its data stay until overwritten, never to be returned)."""
        try:
            self.digest[index] = np.uint64(0)
        except Exception:  # a read-only or vanished folder: the digest check still protects readers
            pass

    def filled(self) -> list[int]:
        """Sorted indices of the slices marked done."""
        try:
            digests = np.asarray(self.digest[: self.capacity])
        except Exception:  # one damaged digest chunk must not hide the others
            digests = np.array([self._digest_or_zero(i) for i in range(self.capacity)], dtype=np.uint64)
        return [int(i) for i in np.flatnonzero(digests)]

    def touch(self, force: bool = False) -> None:
        """Record a use: the group metadata's mtime is its last-use time for LRU eviction."""
        now = time.time()
        if force or now - self.last_touch > _TOUCH_INTERVAL_S:
            try:
                os.utime(self.path / "zarr.json")
            except OSError:
                pass
            self.last_touch = now

    def _digest_or_zero(self, index: int) -> int:
        try:
            return int(self.digest[index])
        except Exception:
            self.unmark(index)
            return 0

    def _ensure_capacity(self, index: int) -> None:
        if index < self.capacity:
            return
        capacity = max(index + 1, 2 * self.capacity)
        for array in (self.embedding, self.digest):  # embedding first, see open()
            if array.shape[0] < capacity:
                array.resize((capacity, *array.shape[1:]))
        self.capacity = capacity


def read_group_fields(path: Path) -> dict[str, Any] | None:
    """The key fields a group folder was made for, or None if its metadata are unreadable."""
    try:
        attributes = zarr.open_group(path, mode="r").attrs.asdict()
        fields = attributes["key"]
        return dict(fields) if isinstance(fields, dict) and attributes.get("layout") == LAYOUT else None
    except Exception:
        return None


def folder_bytes(path: Path) -> int:
    """Disk space taken by the files under ``path``."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                info = os.stat(os.path.join(folder, name))
            except OSError:
                continue
            # Allocated blocks where the platform reports them (what the disk really loses).
            blocks = getattr(info, "st_blocks", None)
            total += blocks * 512 if blocks is not None else info.st_size
    return total


def _slice_digest(group_name: str, index: int, stored: np.ndarray) -> int:
    """Nonzero 64-bit tag binding the stored bytes to their group and slice index."""
    hasher = hashlib.sha256(f"{group_name}|{index}|{stored.shape}|{stored.dtype.str}|".encode())
    hasher.update(np.ascontiguousarray(stored))
    return int.from_bytes(hasher.digest()[:8], "little") | 1  # 0 is reserved for "not written"
