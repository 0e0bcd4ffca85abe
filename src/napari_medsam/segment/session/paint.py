"""Hand edits as napari reports them, turned into voxel lists the session can record.

napari's Labels layer emits ``events.paint`` with a list of history atoms when a brush,
eraser, fill or polygon stroke is committed. An atom is either ``(indices, old_values,
new_value)`` (``data_setitem``: a numpy multi-index, the previous values, the new value or
values) or a 4-tuple ``(slice_key, mask, old_values, new_value)`` (the bounding box of a
mask-based edit, the changed pixels in it or None when all changed, the old values under the
mask or a snapshot of the whole box, the painted label). Both are read here by shape, so
this module needs no napari import.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ...errors import SessionError


def voxel_indices(indices: Any, shape: tuple[int, int, int]) -> np.ndarray:
    """(N, 3) int64 voxel indices from an (N, 3) array or a tuple of three index arrays (checked against ``shape``)."""
    if isinstance(indices, tuple):
        if len(indices) != 3:
            raise SessionError(f"A hand edit needs three index arrays (slice, row, column), got {len(indices)}.")
        parts = [np.asarray(i).reshape(-1) for i in indices]
        if len({p.size for p in parts}) != 1:
            raise SessionError("The three index arrays of a hand edit have different lengths.")
        array = np.stack(parts, axis=1) if parts[0].size else np.zeros((0, 3), np.int64)
    else:
        array = np.asarray(indices)
        if array.size == 0:
            array = array.reshape(0, 3)
        if array.ndim != 2 or array.shape[1] != 3:
            raise SessionError(f"Hand-edited voxels must be an (N, 3) array or a tuple of 3 arrays, got shape "
                               f"{array.shape}.")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.mod(array, 1) == 0):
            raise SessionError("Hand-edited voxel indices must be whole numbers.")
    array = array.astype(np.int64)
    if len(array) and (array.min() < 0 or np.any(array.max(axis=0) >= np.asarray(shape))):
        raise SessionError(f"Hand-edited voxels lie outside the label volume {tuple(shape)}.")
    return array


def per_voxel(values: Any, n: int, what: str) -> np.ndarray:
    """``values`` as one value per voxel (a scalar is repeated)."""
    array = np.asarray(values).reshape(-1)
    if array.size == 1:
        return np.repeat(array, n)
    if array.size != n:
        raise SessionError(f"{array.size} {what} for {n} hand-edited voxels; give one per voxel or a single value.")
    return array


def _masked_atom(atom: Sequence, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    slice_key, mask, old_values, new_value = atom
    if len(slice_key) != 3:
        raise SessionError(f"A paint atom of a {len(slice_key)}D layer cannot edit a 3D session.")
    starts = np.array([range(*s.indices(n)).start for s, n in zip(slice_key, shape)], np.int64)
    old = np.asarray(old_values)
    if mask is None:  # every voxel of the box changed; old_values is the box's snapshot
        local = np.argwhere(np.ones(old.shape, bool))
        old = old.reshape(-1)
    else:
        local = np.argwhere(np.asarray(mask, bool))
    voxels = voxel_indices(local + starts, shape)
    return voxels, per_voxel(old, len(voxels), "old values"), per_voxel(new_value, len(voxels), "new values")


def atoms_to_voxels(atoms: Sequence, shape: tuple[int, int, int]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(voxels (N, 3), old values (N,), new values (N,)) for each napari paint atom, in order."""
    out = []
    for atom in atoms:
        if len(atom) == 4 and all(isinstance(s, slice) for s in atom[0]):
            out.append(_masked_atom(atom, shape))
        elif len(atom) == 3:
            indices, old_values, new_value = atom
            voxels = voxel_indices(tuple(indices) if not isinstance(indices, np.ndarray) else indices, shape)
            out.append((voxels, per_voxel(old_values, len(voxels), "old values"),
                        per_voxel(new_value, len(voxels), "new values")))
        else:
            raise SessionError(f"Unrecognised paint atom of length {len(atom)}: expected (indices, old, new) or "
                               "(slice_key, mask, old_values, new_value).")
    return out


def group_by_plane(voxels: np.ndarray, old: np.ndarray,
                   new: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """{axial index: (rows, cols, old values, new values)} with each voxel once.

    A voxel edited several times in one stroke keeps its FIRST old value (its state before the
    edit) and its LAST new value (its state after it).
    """
    out = {}
    if not len(voxels):
        return out
    for z in np.unique(voxels[:, 0]):
        sel = np.flatnonzero(voxels[:, 0] == z)
        rows, cols = voxels[sel, 1], voxels[sel, 2]
        linear = rows * (int(cols.max()) + 1) + cols
        _, first = np.unique(linear, return_index=True)
        _, from_end = np.unique(linear[::-1], return_index=True)  # same sorted order as ``first``
        last = len(linear) - 1 - from_end
        out[int(z)] = (rows[first], cols[first], old[sel][first], new[sel][last])
    return out
