"""On-disk embedding cache: a folder of zarr groups that survives restarts and resumes runs.

Each group holds every slice of one (volume, model, intensity mapping, display axis); its
layout and crash safety are described in :mod:`.group`. This module adds the folder
(:func:`cache_root`), thread safety, damage recovery (a damaged slice or group is a miss and
is rebuilt on the next write), clearing by key fields, and a size limit with
least-recently-used eviction of whole groups. Only provable damage is deleted: a group that
cannot be opened because of an operating-system error (a locked file, a permission, an I/O
error) is left on disk untouched and merely not used by this :class:`DiskCache`.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs

from .group import SliceGroup, folder_bytes, read_group_fields
from .keys import CacheStats, EmbeddingKey, as_embedding_array, fields_match

__all__ = ["DEFAULT_DISK_BYTES", "ENV_VAR", "DiskCache", "GroupInfo", "cache_root"]

log = logging.getLogger(__name__)

ENV_VAR = "NAPARI_MEDSAM_CACHE_DIR"
DEFAULT_DISK_BYTES = 20 * 1024**3  # about 5,000 float32 SAM slices: some 15 volume-axis groups
_STALE_TEMP_S = 3600.0
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def cache_root(override: str | os.PathLike[str] | None = None) -> Path:
    """The embedding cache folder: ``override``, else ``$NAPARI_MEDSAM_CACHE_DIR``, else the user cache."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("napari-medsam")) / "embeddings"


@dataclass(frozen=True)
class GroupInfo:
    """One group folder on disk: its key fields (None if unreadable), size and last use."""

    path: Path
    fields: dict[str, Any] | None
    bytes: int
    last_used: float


class DiskCache:
    """Embeddings in zarr stores under ``root`` (see :func:`cache_root`).

    Thread-safe: one lock, held during the disk I/O of one slice (a few milliseconds). Nothing
    is created on disk before the first :meth:`put`. ``dtype`` applies to new groups; existing
    groups keep the dtype they were made with. When the folder grows past ``max_bytes``
    (``None``: no limit), least-recently-used groups are deleted.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        dtype: str = "float32",
        max_bytes: int | None = DEFAULT_DISK_BYTES,
    ) -> None:
        if str(dtype) not in ("float32", "float16"):
            raise ValueError(f"DiskCache dtype must be 'float32' or 'float16', got {dtype!r}")
        self.root = cache_root(root)
        self.dtype = np.dtype(str(dtype))
        self.max_bytes = None if max_bytes is None else int(max_bytes)
        self._groups: dict[str, SliceGroup] = {}
        self._lock = threading.RLock()
        # Bytes on disk as of the last scan plus the raw size of every slice written since: an
        # upper bound (chunks are compressed) that decides when a rescan is due.
        self._approx_bytes: int | None = None
        self._hits = self._misses = self._evictions = self._corrupt = 0
        # Groups that could not be opened for a reason other than damage (a locked or unreadable
        # file, an I/O error): left alone on disk and not used by this object; group id -> reason.
        self._unavailable: dict[str, str] = {}

    def get(self, key: EmbeddingKey) -> np.ndarray | None:
        """The slice's embedding as a new float32 array, or None if absent or damaged."""
        with self._lock:
            group = self._open(key)
            stored, damaged = group.read(key.index) if group is not None else (None, False)
            if damaged:
                self._corrupt += 1
                log.warning("embedding cache slice %d of %s was damaged; it will be recomputed", key.index, group.path)
            if stored is None:
                self._misses += 1
                return None
            self._hits += 1
            group.touch()
        return stored.astype(np.float32)

    def contains(self, key: EmbeddingKey) -> bool:
        """Whether the slice is marked written (its data are verified only by :meth:`get`)."""
        return key.index in self.filled_indices(key)

    __contains__ = contains

    def filled_indices(self, key: EmbeddingKey) -> list[int]:
        """Sorted indices of the slices written for ``key``'s group (``key.index`` is ignored)."""
        with self._lock:
            group = self._open(key)
            return group.filled() if group is not None else []

    def put(self, key: EmbeddingKey, embedding: Any) -> bool:
        """Write one slice (numpy or torch); False if it cannot be stored in the group's dtype."""
        array = as_embedding_array(embedding)
        with self._lock:
            group = self._open(key)
            if group is None and key.group_id() in self._unavailable:
                return False  # the group's folder could not be opened (see _open): leave it alone
            if group is not None and group.shape != array.shape:
                log.warning(
                    "embedding shape changed from %s to %s; rebuilding %s", group.shape, array.shape, group.path
                )
                self._remove_dir(group.path)
                group = None
            if group is None:
                self.root.mkdir(parents=True, exist_ok=True)
                SliceGroup.create(self._path_of(key), key, array.shape, self.dtype)
                group = self._open(key)
                if group is None or group.shape != array.shape:
                    raise OSError(f"could not create the embedding cache group {self._path_of(key)}")
            if group.dtype == np.float16 and float(np.nanmax(np.abs(array), initial=0.0)) > _FLOAT16_MAX:
                log.warning("embedding values exceed the float16 range; slice %d not cached on disk", key.index)
                return False
            stored = np.ascontiguousarray(array, dtype=group.dtype)
            group.write(key.index, stored)
            group.touch()
            if self._approx_bytes is not None:
                self._approx_bytes += stored.nbytes
            over = self.max_bytes is not None and (self._approx_bytes is None or self._approx_bytes > self.max_bytes)
            if over:
                self.enforce_limit(keep=group.path)
        return True

    def clear(
        self,
        *,
        volume_signature: str | None = None,
        model_signature: str | None = None,
        mapping_signature: str | None = None,
        axis: int | None = None,
    ) -> int:
        """Delete the groups matching every given field (all groups if none given); returns the count.

        Groups whose metadata are provably damaged (the files can be read but are not a group)
        are deleted too, whatever the fields: they can never be used. A group that cannot be
        read because of an operating-system error (a locked file, a permission, an I/O error)
        is kept, as opening it would keep it, with a log warning; it is not counted.
        """
        wanted = dict(
            volume_signature=volume_signature,
            model_signature=model_signature,
            mapping_signature=mapping_signature,
            axis=axis,
        )
        removed = 0
        with self._lock:
            for info in self.groups():
                if info.fields is None:
                    reason = _unreadable_because(info.path)
                    if reason is not None:
                        log.warning("embedding cache group %s cannot be read (%s); it is left as it is, "
                                    "not cleared", info.path, reason)
                        continue
                elif not fields_match(info.fields, **wanted):
                    continue
                self._remove_dir(info.path)
                removed += 1
            self._sweep_leftovers()
        return removed

    def enforce_limit(self, keep: Path | None = None) -> int:
        """Delete least-recently-used groups (never ``keep``) until under 90 % of ``max_bytes``."""
        with self._lock:
            infos = self.groups()
            total = sum(info.bytes for info in infos)
            removed = 0
            if self.max_bytes is not None and total > self.max_bytes:
                target = int(self.max_bytes * 0.9)  # headroom, so the next put does not rescan at once
                for info in sorted(infos, key=lambda i: i.last_used):
                    if total <= target:
                        break
                    if info.path != keep:
                        self._remove_dir(info.path)
                        total -= info.bytes
                        removed += 1
                self._evictions += removed
            self._approx_bytes = total
            return removed

    def groups(self) -> list[GroupInfo]:
        """Every group folder under the root, with its key fields, size on disk and last use."""
        if not self.root.is_dir():
            return []
        infos = []
        for path in sorted(self.root.glob("*.zarr")):
            if path.name.startswith(".") or not path.is_dir():
                continue
            try:
                last_used = (path / "zarr.json").stat().st_mtime
            except OSError:
                last_used = 0.0
            infos.append(GroupInfo(path, read_group_fields(path), folder_bytes(path), last_used))
        return infos

    def total_bytes(self) -> int:
        """Bytes the cache folder takes on disk now (a scan of the folder)."""
        return folder_bytes(self.root) if self.root.is_dir() else 0

    def stats(self) -> CacheStats:
        """Counters since this object was made, plus the folder's groups and size now (a scan)."""
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                entries=len(self.groups()),
                bytes=self.total_bytes(),
                max_bytes=self.max_bytes,
                corrupt=self._corrupt,
            )

    # -- internals, called with the lock held ----------------------------------------------

    def _path_of(self, key: EmbeddingKey) -> Path:
        return self.root / f"{key.group_id()}.zarr"

    def _open(self, key: EmbeddingKey) -> SliceGroup | None:
        """The key's group if it exists and is sound; a damaged one is deleted."""
        gid = key.group_id()
        cached = self._groups.get(gid)
        if cached is not None:
            if (cached.path / "zarr.json").is_file():
                return cached
            del self._groups[gid]  # deleted by another process or another DiskCache
        if gid in self._unavailable:
            return None
        path = self._path_of(key)
        if not path.exists():
            return None
        try:
            group = SliceGroup.open(path, key)
        except Exception as exc:
            reason = _access_problem(path, exc)
            if reason is not None:
                # Not damage: a locked file, a permission, an I/O error. Deleting would destroy
                # embeddings that may be fine, so this object works without the group instead.
                self._unavailable[gid] = reason
                log.warning("embedding cache group %s cannot be opened (%s); it is left as it is and "
                            "not used until the next start", path, reason)
                return None
            # The files could be read and are not a group of this key and layout (unreadable
            # JSON, missing arrays, foreign metadata): it can never be used, so it is rebuilt.
            self._corrupt += 1
            log.warning("embedding cache group %s is unusable (%s); it will be rebuilt", path, exc)
            self._remove_dir(path)
            return None
        self._groups[gid] = group
        group.touch(force=True)
        return group

    def _remove_dir(self, path: Path) -> None:
        self._groups = {gid: g for gid, g in self._groups.items() if g.path != path}
        trash = self.root / f".trash-{uuid.uuid4().hex}"
        try:
            os.rename(path, trash)  # atomic: other readers see the whole group or none of it
        except OSError:
            trash = path
        shutil.rmtree(trash, ignore_errors=True)
        self._approx_bytes = None

    def _sweep_leftovers(self) -> None:
        # Folders of processes killed while creating or deleting a group.
        now = time.time()
        for path in [*self.root.glob(".tmp-*"), *self.root.glob(".trash-*")]:
            try:
                if now - path.stat().st_mtime > _STALE_TEMP_S:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass


def _unreadable_because(path: Path) -> str | None:
    """For a group whose key fields could not be read: why, if that is not provably damage, else None."""
    import zarr

    try:
        zarr.open_group(path, mode="r").attrs.asdict()
    except Exception as exc:  # noqa: BLE001 - sorted into damage or not below
        return _access_problem(path, exc)
    return _access_problem(path, None)  # readable metadata that are not a group of ours: damage


def _access_problem(path: Path, exc: BaseException | None) -> str | None:
    """Why a group could not be opened if that is not provably damage, else None.

    Damage is only assumed when the group's folder can be listed and every metadata file in it
    can be read, so that the failure lies in their content. An operating-system error on the
    way (other than a file that is simply absent) means the content was never seen.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and not isinstance(seen, (FileNotFoundError, NotADirectoryError)):
            return f"{type(seen).__name__}: {seen}"
        seen = seen.__cause__ or seen.__context__
    try:
        os.listdir(path)
        for metadata in (path / "zarr.json", path / "embedding" / "zarr.json", path / "digest" / "zarr.json"):
            if metadata.is_file():
                metadata.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as probe:
        return f"{type(probe).__name__}: {probe}"
    return None
