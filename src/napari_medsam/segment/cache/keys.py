"""What an image embedding depends on: cache keys, content signatures, array conversion.

An embedding of one 2D slice is a function of the voxels of the volume, the model and its
weights, the intensity mapping that turned voxels into an image, the display axis the slice is
taken along and the slice index. :class:`EmbeddingKey` holds one string or number for each,
plus the package version (a preprocessing fix must not reuse embeddings made before it).

This module imports neither torch nor zarr: torch tensors are recognised by duck typing.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ... import __version__

__all__ = [
    "CacheStats",
    "EmbeddingKey",
    "as_embedding_array",
    "file_signature",
    "volume_signature",
]

# Slabs of about this many bytes are hashed at a time, so a non-contiguous view (a transposed
# or flipped display-order array) is copied a piece at a time, never as a whole volume.
_SLAB_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class EmbeddingKey:
    """Everything one cached slice embedding depends on; hashable, usable as a dict key.

    ``axis`` is the display axis (0 slice, 1 row, 2 column) the 2D slice is cut across and
    ``index`` its position along that axis. Slices of the same volume, model, mapping and axis
    form a *group*; the disk cache keeps one zarr store per group.
    """

    volume_signature: str
    model_signature: str
    mapping_signature: str
    axis: int
    index: int
    version: str = field(default=__version__)

    def __post_init__(self) -> None:
        for name in ("volume_signature", "model_signature", "mapping_signature", "version"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"EmbeddingKey.{name} must be a non-empty string, got {value!r}")
        axis, index = int(self.axis), int(self.index)
        if axis != self.axis or axis not in (0, 1, 2):
            raise ValueError(f"EmbeddingKey.axis must be 0, 1 or 2, got {self.axis!r}")
        if index != self.index or index < 0:
            raise ValueError(f"EmbeddingKey.index must be a non-negative integer, got {self.index!r}")
        # numpy integers hash like ints but do not serialise to JSON; store plain ints.
        object.__setattr__(self, "axis", axis)
        object.__setattr__(self, "index", index)

    def group_fields(self) -> dict[str, Any]:
        """The key without its slice index: what all slices of one group share."""
        fields = asdict(self)
        del fields["index"]
        return fields

    def group_id(self) -> str:
        """A stable 32-hex-digit name for this key's group (same on every machine and run)."""
        text = json.dumps(self.group_fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]

    def with_index(self, index: int) -> "EmbeddingKey":
        """The key of another slice of the same group."""
        return EmbeddingKey(
            self.volume_signature,
            self.model_signature,
            self.mapping_signature,
            self.axis,
            index,
            self.version,
        )

    def matches(
        self,
        *,
        volume_signature: str | None = None,
        model_signature: str | None = None,
        mapping_signature: str | None = None,
        axis: int | None = None,
    ) -> bool:
        """True when every given field equals this key's (``None`` matches anything)."""
        return fields_match(
            self.group_fields(),
            volume_signature=volume_signature,
            model_signature=model_signature,
            mapping_signature=mapping_signature,
            axis=axis,
        )


def fields_match(fields: dict[str, Any], **wanted: Any) -> bool:
    """True when ``fields`` agrees with every non-None item of ``wanted``."""
    return all(value is None or fields.get(name) == value for name, value in wanted.items())


@dataclass(frozen=True)
class CacheStats:
    """Counters of one cache level, as a snapshot."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0
    max_bytes: int | None = None
    # Entries found damaged (disk) or refused because they exceed the whole budget (memory).
    corrupt: int = 0
    rejected: int = 0

    @property
    def hit_rate(self) -> float:
        """Hits over lookups (0.0 before the first lookup)."""
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


def volume_signature(array: np.ndarray, spacing: Any = None, extra: str = "") -> str:
    """A content hash of a volume: equal for equal voxels, different after any voxel edit.

    What is hashed (SHA-256): the shape, the dtype (as little-endian, so a big-endian copy of
    the same values gets the same signature), the spacing rounded to 1e-6 mm, ``extra``, then
    every voxel in C order of the array *as given* (display order), a slab at a time.

    Why every voxel rather than a strided sample: a sample cannot promise that an edited voxel
    changes the signature, and a stale embedding silently gives wrong masks. SHA-256 runs at
    about 2 GB/s on CPUs with SHA extensions, so a 512x512x300 int16 volume (157 MB) takes
    about 0.08 s, negligible against one embedding (2-20 s); compute it once per loaded volume.
    SHA-256 rather than blake2b because it measured faster here (hardware support) and
    collisions between different volumes are out of the question for either.
    """
    data = np.asarray(array)
    if data.ndim == 0 or data.dtype.kind not in "biuf":
        raise TypeError(f"volume_signature needs a numeric array, got dtype {data.dtype} with shape {data.shape}")
    little = data.dtype.newbyteorder("<")
    spacing_text = "" if spacing is None else ",".join(repr(round(float(s), 6)) for s in np.ravel(spacing))
    header = f"napari-medsam volume v1|{data.shape}|{little.str}|{spacing_text}|{extra}"
    hasher = hashlib.sha256(header.encode("utf-8"))
    if data.size:
        per_index = max(1, data[0].nbytes if data.ndim > 1 else data.itemsize)
        step = max(1, _SLAB_BYTES // per_index)
        for start in range(0, data.shape[0], step):
            # Copies only when the slab is not contiguous or not little-endian.
            hasher.update(np.ascontiguousarray(data[start : start + step], dtype=little))
    shape_text = "x".join(str(s) for s in data.shape)
    return f"{shape_text}:{little.name}:{hasher.hexdigest()[:40]}"


def file_signature(path: str | os.PathLike[str]) -> str:
    """A cheap identity of a file: name, size and modification time in nanoseconds.

    No content is read, so it costs one ``stat``; a weight file replaced by another one almost
    surely changes its size or mtime. Raises ``FileNotFoundError`` if the file is missing.
    """
    target = Path(path)
    info = target.stat()
    return f"{target.name}:{info.st_size}:{info.st_mtime_ns}"


def as_embedding_array(embedding: Any) -> np.ndarray:
    """An embedding (numpy array or torch tensor, any float dtype) as a float32 numpy array."""
    if hasattr(embedding, "detach") and hasattr(embedding, "numpy"):
        # A torch tensor: numpy has no bfloat16, so widen on the torch side first.
        embedding = embedding.detach().cpu().float().numpy()
    array = np.asarray(embedding)
    if array.dtype.kind not in "fiu":
        raise TypeError(f"an embedding must be a numeric array or tensor, got dtype {array.dtype}")
    if array.ndim == 0 or array.size == 0:
        raise ValueError(f"an embedding must be a non-empty array, got shape {array.shape}")
    return np.ascontiguousarray(array, dtype=np.float32)
