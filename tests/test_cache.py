"""Embedding cache: keys and signatures, memory LRU, disk stores, the two-level cache."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import platformdirs
import pytest
import torch
import zarr

from napari_medsam.segment.cache import group as cache_group, keys as cache_keys
from napari_medsam.segment.cache import (
    ENV_VAR,
    DiskCache,
    EmbeddingCache,
    EmbeddingKey,
    MemoryCache,
    cache_root,
    file_signature,
    volume_signature,
)

SMALL = (1, 8, 16, 16)
SAM = (1, 256, 64, 64)
MIB4 = 4 * 1024 * 1024


def key(index: int = 0, mapping: str = "window:40:400", volume: str = "vol-a", axis: int = 0) -> EmbeddingKey:
    return EmbeddingKey(volume, "medsam:weights.pth:123:456", mapping, axis, index)


def embedding(seed: int, shape: tuple[int, ...] = SMALL) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def chunk_file(group: Path, index: int) -> Path:
    """The file zarr keeps slice ``index`` of the embedding array in."""
    files = [p for p in (group / "embedding" / "c" / str(index)).rglob("*") if p.is_file()]
    assert len(files) == 1, files
    return files[0]


# -- keys and signatures ---------------------------------------------------------------------


def test_key_validation_and_grouping():
    k = key(5)
    assert EmbeddingKey(k.volume_signature, k.model_signature, k.mapping_signature, 0, np.int64(5)) == k
    assert isinstance(EmbeddingKey("v", "m", "w", np.int64(1), np.int32(2)).index, int)
    assert k.with_index(7).group_id() == k.group_id()
    assert key(5, mapping="window:50:350").group_id() != k.group_id()
    assert key(5, axis=1).group_id() != k.group_id()
    assert EmbeddingKey("v", "m", "w", 0, 0, version="9.9").group_id() != EmbeddingKey("v", "m", "w", 0, 0).group_id()
    assert k.matches(mapping_signature="window:40:400") and not k.matches(mapping_signature="x")
    for bad in (dict(axis=3), dict(axis=-1), dict(index=-1), dict(index=1.5)):
        args = dict(volume_signature="v", model_signature="m", mapping_signature="w", axis=0, index=0) | bad
        with pytest.raises(ValueError):
            EmbeddingKey(**args)
    with pytest.raises(ValueError):
        EmbeddingKey("", "m", "w", 0, 0)


def test_volume_signature_tracks_content_shape_dtype_spacing():
    rng = np.random.default_rng(1)
    volume = rng.integers(-1024, 3000, (12, 20, 24)).astype(np.int16)
    sig = volume_signature(volume, (2.5, 0.7, 0.7))
    assert sig == volume_signature(volume.copy(), (2.5, 0.7, 0.7))
    assert sig.startswith("12x20x24:int16:")
    for index in [(0, 0, 0), (11, 19, 23), (6, 3, 17)]:
        edited = volume.copy()
        edited[index] += 1
        assert volume_signature(edited, (2.5, 0.7, 0.7)) != sig
    assert volume_signature(volume, (2.5, 0.7, 0.8)) != sig
    assert volume_signature(volume, (2.5, 0.7, 0.7), extra="series-2") != sig
    assert volume_signature(volume.reshape(12, 24, 20), (2.5, 0.7, 0.7)) != sig
    assert volume_signature(volume.view(np.uint16), (2.5, 0.7, 0.7)) != sig
    # Same values in another memory layout or byte order: same signature.
    assert volume_signature(volume.astype(">i2"), (2.5, 0.7, 0.7)) == sig
    assert volume_signature(np.asfortranarray(volume), (2.5, 0.7, 0.7)) == sig
    transposed = volume.transpose(1, 0, 2)
    assert volume_signature(transposed) == volume_signature(np.ascontiguousarray(transposed))
    assert volume_signature(transposed) != volume_signature(volume)
    with pytest.raises(TypeError):
        volume_signature(np.array(["a", "b"]))


def test_volume_signature_across_slabs(monkeypatch):
    # Small slabs exercise the piecewise hashing of a flipped (non-contiguous) view.
    monkeypatch.setattr(cache_keys, "_SLAB_BYTES", 100)
    volume = np.arange(10 * 6 * 5, dtype=np.float32).reshape(10, 6, 5)[::-1]
    sig = volume_signature(volume)
    monkeypatch.setattr(cache_keys, "_SLAB_BYTES", 1 << 30)
    assert volume_signature(volume) == sig
    edited = volume.copy()
    edited[-1, -1, -1] = -1
    monkeypatch.setattr(cache_keys, "_SLAB_BYTES", 100)
    assert volume_signature(edited) != sig


def test_file_signature(tmp_path):
    path = tmp_path / "weights.pth"
    path.write_bytes(b"x" * 100)
    sig = file_signature(path)
    assert sig == file_signature(str(path)) and sig.startswith("weights.pth:100:")
    path.write_bytes(b"x" * 101)
    assert file_signature(path) != sig
    with pytest.raises(FileNotFoundError):
        file_signature(tmp_path / "missing.pth")


def _run_in_threads(worker, n: int = 2) -> None:
    """Run ``worker(0..n-1)`` in threads that switch as often as possible, to provoke races."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(previous)


# -- memory level ----------------------------------------------------------------------------


def test_memory_hits_misses_and_private_copies():
    cache = MemoryCache(10 * MIB4)
    data = embedding(0)
    assert cache.get(key(0)) is None
    cache.put(key(0), data)
    data[:] = 0  # the caller's array is not the cached one
    got = cache.get(key(0))
    np.testing.assert_array_equal(got, embedding(0))
    got[:] = 1  # nor is the returned one
    np.testing.assert_array_equal(cache.get(key(0)), embedding(0))
    assert key(0) in cache and key(1) not in cache
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries, stats.bytes) == (2, 1, 1, data.nbytes)
    assert stats.hit_rate == pytest.approx(2 / 3)


def test_memory_lru_eviction_by_bytes():
    cache = MemoryCache(3 * MIB4)
    for i in range(3):
        cache.put(key(i), embedding(i, SAM))
    assert cache.nbytes == 3 * MIB4
    cache.get(key(0))  # 0 becomes the most recently used; 1 is now the oldest
    cache.put(key(3), embedding(3, SAM))
    assert [key(i) in cache for i in range(4)] == [True, False, True, True]
    assert cache.stats().evictions == 1 and cache.nbytes == 3 * MIB4
    cache.put(key(2), embedding(20, SAM))  # replacing an entry does not evict others
    assert len(cache) == 3 and cache.stats().evictions == 1
    np.testing.assert_array_equal(cache.get(key(2)), embedding(20, SAM))
    cache.set_max_bytes(MIB4)
    assert len(cache) == 1 and key(2) in cache
    assert cache.evict(key(2)) and not cache.evict(key(2)) and cache.nbytes == 0


def test_memory_rejects_entry_larger_than_budget():
    cache = MemoryCache(MIB4 - 1)
    cache.put(key(0), embedding(0))
    assert cache.put(key(1), embedding(1, SAM)) is False
    assert key(1) not in cache and key(0) in cache and cache.stats().rejected == 1
    assert MemoryCache(0).put(key(0), embedding(0)) is False
    with pytest.raises(ValueError):
        MemoryCache(-1)
    with pytest.raises(ValueError):
        MemoryCache(10, dtype="int8")


def test_memory_float16_halves_bytes_and_keeps_precision():
    half, full = MemoryCache(3 * MIB4, dtype="float16"), MemoryCache(3 * MIB4)
    for i in range(6):
        half.put(key(i), embedding(i, SAM))
        full.put(key(i), embedding(i, SAM))
    assert len(half) == 6 and len(full) == 3
    assert half.nbytes == 6 * MIB4 // 2
    original = embedding(5, SAM)
    got = half.get(key(5))
    assert got.dtype == np.float32 and got.shape == SAM
    assert not np.array_equal(got, original)  # it really was rounded
    normal = np.abs(original) >= np.finfo(np.float16).tiny
    relative = np.abs(got - original)[normal] / np.abs(original)[normal]
    assert relative.max() < 1e-3
    assert np.linalg.norm(got - original) / np.linalg.norm(original) < 1e-3
    assert np.abs(got - original)[~normal].max(initial=0.0) < 1e-7


def test_memory_float16_keeps_out_of_range_values_exact():
    cache = MemoryCache(10 * MIB4, dtype="float16")
    data = embedding(0)
    data[0, 0, 0, 0] = 1e6
    cache.put(key(0), data)
    np.testing.assert_array_equal(cache.get(key(0)), data)


def test_memory_accepts_torch_tensors():
    cache = MemoryCache(10 * MIB4)
    tensor = torch.from_numpy(embedding(0)).requires_grad_(True) * 1.0
    cache.put(key(0), tensor)
    cache.put(key(1), tensor.detach().to(torch.bfloat16))
    np.testing.assert_array_equal(cache.get(key(0)), embedding(0))
    got = cache.get(key(1))
    assert got.dtype == np.float32 and np.abs(got - embedding(0)).max() < 0.05


def test_memory_remove_where_and_indices():
    cache = MemoryCache(10 * MIB4)
    for i in range(3):
        cache.put(key(i), embedding(i))
        cache.put(key(i, mapping="window:400:1800"), embedding(i))
    assert cache.indices(key(99)) == {0, 1, 2}
    assert cache.remove_where(mapping_signature="window:40:400") == 3
    assert len(cache) == 3 and all(key(i, mapping="window:400:1800") in cache for i in range(3))
    assert cache.remove_where(lambda k: k.index == 1) == 1
    assert cache.indices(key(0, mapping="window:400:1800")) == {0, 2}


def test_memory_thread_safety():
    # Tiny entries and many steps: the more often the threads meet inside the cache, the
    # likelier an unprotected section shows up (as a KeyError or a wrong byte count).
    shape = (1, 2, 2, 2)
    size = int(np.prod(shape)) * 4
    cache = MemoryCache(3 * size)  # room for 3 of 6 keys: constant eviction and replacement
    errors: list[str] = []
    lookups = [0, 0]

    def worker(offset: int) -> None:
        rng = np.random.default_rng(offset)
        values = [np.full(shape, float(i), dtype=np.float32) for i in range(6)]
        try:
            for step in range(40000):
                i = int(rng.integers(6))
                if (step + offset) % 2:
                    cache.put(key(i), values[i])
                else:
                    lookups[offset] += 1
                    got = cache.get(key(i))
                    if got is not None and not np.all(got == i):
                        errors.append(f"key {i} returned data of another key")
        except Exception as exc:  # an exception in a thread would otherwise only be a warning
            errors.append(repr(exc))

    _run_in_threads(worker)
    assert not errors
    stats = cache.stats()
    assert stats.bytes == stats.entries * size <= cache.max_bytes
    assert stats.hits + stats.misses == sum(lookups) and stats.evictions > 0


# -- disk level ------------------------------------------------------------------------------


def test_disk_round_trip_across_sessions(tmp_path):
    first = DiskCache(tmp_path)
    assert first.get(key(0)) is None and first.filled_indices(key(0)) == []
    for i in (0, 5, 150, 70):  # 150 grows the arrays past their first capacity
        assert first.put(key(i), embedding(i))
    first.put(key(0, mapping="window:400:1800"), embedding(99))
    second = DiskCache(tmp_path)  # a new session on the same folder
    assert second.filled_indices(key(1)) == [0, 5, 70, 150]
    for i in (0, 5, 150, 70):
        got = second.get(key(i))
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, embedding(i))
    np.testing.assert_array_equal(second.get(key(0, mapping="window:400:1800")), embedding(99))
    assert second.get(key(6)) is None and second.get(key(500)) is None
    assert key(5) in second and key(6) not in second
    stats = second.stats()
    assert (stats.hits, stats.misses, stats.entries, stats.corrupt) == (5, 2, 2, 0)
    assert stats.bytes == second.total_bytes() > 0
    attributes = zarr.open_group(second.groups()[0].path, mode="r").attrs.asdict()
    assert attributes["key"]["version"] and attributes["created"] and attributes["embedding_shape"] == list(SMALL)


def test_disk_float16(tmp_path):
    cache = DiskCache(tmp_path, dtype="float16")
    cache.put(key(0), embedding(0))
    got = DiskCache(tmp_path).get(key(0))  # the group's own dtype is used, whatever the reader's
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, embedding(0), rtol=1e-3, atol=1e-7)
    data = embedding(1)
    data[0, 0, 0, 0] = 1e6
    assert cache.put(key(1), data) is False and cache.get(key(1)) is None


def test_disk_resume_after_crash_between_data_and_mark(tmp_path, monkeypatch):
    cache = DiskCache(tmp_path)
    cache.put(key(0), embedding(0))

    def killed(*args):
        raise KeyboardInterrupt("killed after the data, before the mark")

    monkeypatch.setattr(cache_group, "_slice_digest", killed)
    with pytest.raises(KeyboardInterrupt):
        cache.put(key(1), embedding(1))
    monkeypatch.undo()
    group = cache.groups()[0].path
    assert chunk_file(group, 1).stat().st_size > 0  # the data reached the disk ...
    resumed = DiskCache(tmp_path)
    assert resumed.filled_indices(key(0)) == [0]  # ... but the slice is not counted as done
    assert resumed.get(key(1)) is None
    resumed.put(key(1), embedding(1))
    np.testing.assert_array_equal(DiskCache(tmp_path).get(key(1)), embedding(1))


def test_disk_unmarked_data_written_directly_is_ignored(tmp_path):
    cache = DiskCache(tmp_path)
    cache.put(key(0), embedding(0))
    zarr.open_group(cache.groups()[0].path, mode="r+")["embedding"][3] = embedding(3)
    assert DiskCache(tmp_path).get(key(3)) is None
    assert DiskCache(tmp_path).filled_indices(key(0)) == [0]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete", "other-slice", "other-slice-and-mark"])
def test_disk_damaged_chunk_is_a_miss_then_rebuilt(tmp_path, damage, caplog):
    cache = DiskCache(tmp_path)
    for i in range(3):
        cache.put(key(i), embedding(i))
    group = cache.groups()[0].path
    target = chunk_file(group, 2)
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "garbage":
        target.write_bytes(os.urandom(target.stat().st_size))
    elif damage == "delete":
        target.unlink()
    elif damage == "other-slice":  # valid data, but of slice 1
        target.write_bytes(chunk_file(group, 1).read_bytes())
    else:  # slice 1's data and its mark, both copied onto slice 2
        target.write_bytes(chunk_file(group, 1).read_bytes())
        (group / "digest" / "c" / "2").write_bytes((group / "digest" / "c" / "1").read_bytes())
    fresh = DiskCache(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert fresh.get(key(2)) is None
    assert fresh.stats().corrupt == 1
    assert fresh.filled_indices(key(0)) == [0, 1]  # the bad slice was unmarked
    np.testing.assert_array_equal(fresh.get(key(1)), embedding(1))
    fresh.put(key(2), embedding(2))
    np.testing.assert_array_equal(DiskCache(tmp_path).get(key(2)), embedding(2))


@pytest.mark.parametrize(
    "damage", ["garbage-json", "empty-json", "other-key", "array-metadata", "digest-chunk"]
)
def test_disk_damaged_metadata_is_a_miss_then_rebuilt(tmp_path, damage):
    cache = DiskCache(tmp_path)
    cache.put(key(0), embedding(0))
    cache.put(key(1), embedding(1))
    group = cache.groups()[0].path
    if damage == "garbage-json":
        (group / "zarr.json").write_text("{not json")
    elif damage == "empty-json":
        (group / "zarr.json").write_bytes(b"")
    elif damage == "other-key":
        meta = json.loads((group / "zarr.json").read_text())
        meta["attributes"]["key"]["mapping_signature"] = "window:0:1"
        (group / "zarr.json").write_text(json.dumps(meta))
    elif damage == "array-metadata":
        (group / "embedding" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "array"}')
    else:
        digest_files = [p for p in (group / "digest" / "c").rglob("*") if p.is_file()]
        for path in digest_files:
            path.write_bytes(b"\x00garbage")
    fresh = DiskCache(tmp_path)
    assert fresh.get(key(0)) is None
    fresh.filled_indices(key(0))  # must not raise either
    fresh.put(key(0), embedding(10))
    again = DiskCache(tmp_path)
    np.testing.assert_array_equal(again.get(key(0)), embedding(10))
    if damage != "digest-chunk":  # a rebuilt group starts empty
        assert again.filled_indices(key(0)) == [0]


def test_disk_shape_change_rebuilds_group(tmp_path):
    cache = DiskCache(tmp_path)
    cache.put(key(0), embedding(0))
    cache.put(key(1), embedding(1, (1, 4, 8, 8)))
    assert cache.filled_indices(key(0)) == [1]
    np.testing.assert_array_equal(DiskCache(tmp_path).get(key(1)), embedding(1, (1, 4, 8, 8)))


def test_disk_clear_by_mapping_keeps_others(tmp_path):
    cache = DiskCache(tmp_path)
    for mapping in ("window:40:400", "window:400:1800"):
        for volume in ("vol-a", "vol-b"):
            cache.put(key(0, mapping=mapping, volume=volume), embedding(0))
    (tmp_path / "junk.zarr").mkdir()  # an unreadable group goes whatever the filter
    assert cache.clear(mapping_signature="window:40:400") == 3
    assert cache.get(key(0, mapping="window:40:400")) is None
    assert cache.get(key(0, mapping="window:400:1800")) is not None
    assert cache.clear(volume_signature="vol-b") == 1
    assert [g.fields["volume_signature"] for g in cache.groups()] == ["vol-a"]
    assert cache.clear() == 1 and cache.groups() == [] and cache.total_bytes() == 0


def test_disk_size_limit_evicts_least_recently_used_groups(tmp_path):
    cache = DiskCache(tmp_path, max_bytes=None)
    for n, volume in enumerate(("old", "middle", "new")):
        for i in range(4):
            cache.put(key(i, volume=volume), embedding(i, (1, 64, 32, 32)))
        group = [g for g in cache.groups() if g.fields["volume_signature"] == volume][0]
        os.utime(group.path / "zarr.json", (1000 + n, 1000 + n))
    per_group = max(g.bytes for g in cache.groups())
    # Three groups and one slice over a three-group budget: only the least recently used goes.
    limited = DiskCache(tmp_path, max_bytes=3 * per_group)
    limited.put(key(4, volume="old"), embedding(4, (1, 64, 32, 32)))  # the written group is kept
    volumes = sorted(g.fields["volume_signature"] for g in limited.groups())
    assert volumes == ["new", "old"]
    assert limited.total_bytes() <= 0.9 * 3 * per_group and limited.stats().evictions == 1


def test_cache_root_override(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert cache_root() == Path(platformdirs.user_cache_dir("napari-medsam")) / "embeddings"
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "from-env"))
    assert cache_root() == tmp_path / "from-env"
    assert DiskCache().root == tmp_path / "from-env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    DiskCache().put(key(0), embedding(0))
    assert (tmp_path / "from-env").is_dir() and not (tmp_path / "arg").exists()


def test_disk_thread_safety(tmp_path):
    cache = DiskCache(tmp_path)
    errors: list[str] = []

    def worker(offset: int) -> None:
        for i in range(offset, 40, 2):
            cache.put(key(i), np.full(SMALL, float(i), dtype=np.float32))
            for j in range(0, i + 1, 3):
                got = cache.get(key(j))
                if got is not None and not np.all(got == j):
                    errors.append(f"slice {j} returned another slice's data")

    _run_in_threads(worker)
    assert not errors
    assert DiskCache(tmp_path).filled_indices(key(0)) == list(range(40))


# -- two levels ------------------------------------------------------------------------------


def test_get_or_compute_memory_then_disk_then_compute(tmp_path):
    calls: list[int] = []

    def compute(i: int):
        return lambda: calls.append(i) or embedding(i)

    cache = EmbeddingCache(MemoryCache(10 * MIB4), DiskCache(tmp_path))
    np.testing.assert_array_equal(cache.get_or_compute(key(0), compute(0)), embedding(0))
    np.testing.assert_array_equal(cache.get_or_compute(key(0), compute(0)), embedding(0))
    assert calls == [0] and cache.memory.stats().hits == 1
    # A new session: memory is empty, the disk level answers and fills memory.
    later = EmbeddingCache(MemoryCache(10 * MIB4), DiskCache(tmp_path))
    np.testing.assert_array_equal(later.get_or_compute(key(0), compute(0)), embedding(0))
    assert calls == [0] and key(0) in later.memory
    later.get_or_compute(key(3), compute(3))
    assert calls == [0, 3] and later.cached_indices(key(0)) == {0, 3}
    assert key(3) in later and key(4) not in later


def test_get_or_compute_without_disk_and_with_failing_disk(tmp_path, caplog):
    memory_only = EmbeddingCache(MemoryCache(10 * MIB4))
    np.testing.assert_array_equal(memory_only.get_or_compute(key(0), lambda: embedding(0)), embedding(0))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    broken = EmbeddingCache(MemoryCache(10 * MIB4), DiskCache(blocker / "cache"))
    with caplog.at_level(logging.WARNING):
        got = broken.get_or_compute(key(0), lambda: embedding(0))
    np.testing.assert_array_equal(got, embedding(0))
    assert "disk cache write failed" in caplog.text and key(0) in broken.memory


EXIT_WHILE_WRITING = """
import logging, sys, threading, time
import numpy as np
from napari_medsam.segment.cache import DiskCache, EmbeddingCache, EmbeddingKey, MemoryCache
logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
cache = EmbeddingCache(MemoryCache(1 << 24), DiskCache(sys.argv[1]))
key = lambda i: EmbeddingKey("vol", "model", "window:40:400", 0, i)
cache.put(key(0), np.zeros((1, 4, 8, 8), np.float32))  # the group exists; later writes are chunk writes

def late_embedding():  # a background encoder that finishes while Python exits (as QThreadPool jobs do)
    time.sleep(0.5)
    cache.put(key(1), np.ones((1, 4, 8, 8), np.float32))
    print("put returned", flush=True)

threading.Thread(target=late_embedding, daemon=True).start()
import atexit
atexit.register(time.sleep, 1.5)  # keep the process alive past the write, after the pools shut down
"""


def test_a_write_while_python_exits_is_skipped_quietly(tmp_path):
    """A background write that zarr refuses because the interpreter is exiting is not reported as a failure."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", EXIT_WHILE_WRITING, str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "put returned" in out  # the write really ran during the exit
    assert "disk cache write failed" not in out and "Traceback" not in out, out
    assert key(0).index == 0 and DiskCache(tmp_path / "cache").contains(EmbeddingKey("vol", "model", "window:40:400", 0, 0))


def test_invalidate_by_mapping_keeps_other_mappings(tmp_path):
    cache = EmbeddingCache(MemoryCache(10 * MIB4), DiskCache(tmp_path))
    for mapping in ("window:40:400", "window:400:1800"):
        for i in range(2):
            cache.put(key(i, mapping=mapping), embedding(i))
    assert cache.invalidate(mapping_signature="window:40:400") == (2, 1)
    assert cache.get(key(0)) is None and cache.get(key(1)) is None
    for i in range(2):
        np.testing.assert_array_equal(cache.get(key(i, mapping="window:400:1800")), embedding(i))
    cache.memory.clear()
    np.testing.assert_array_equal(cache.get(key(1, mapping="window:400:1800")), embedding(1))
    with pytest.raises(ValueError):
        cache.invalidate()
    cache.clear(disk=True)
    assert len(cache.memory) == 0 and cache.disk.groups() == []


def test_compute_runs_without_lock_and_only_once_per_key():
    cache = EmbeddingCache(MemoryCache(10 * MIB4))
    cache.put(key(9), embedding(9))
    started, release = threading.Event(), threading.Event()
    calls: list[int] = []
    results: dict[str, np.ndarray] = {}

    def slow_compute():
        calls.append(0)
        started.set()
        assert release.wait(10)
        return embedding(0)

    def run(name: str) -> None:
        results[name] = cache.get_or_compute(key(0), slow_compute)

    first = threading.Thread(target=run, args=("first",))
    first.start()
    assert started.wait(10)
    # While the worker computes, another thread reads the cache without blocking ...
    np.testing.assert_array_equal(cache.get(key(9)), embedding(9))
    # ... and a second request for the same slice waits for that computation.
    second = threading.Thread(target=run, args=("second",))
    second.start()
    time.sleep(0.2)
    release.set()
    first.join(10)
    second.join(10)
    assert calls == [0]
    np.testing.assert_array_equal(results["first"], embedding(0))
    np.testing.assert_array_equal(results["second"], embedding(0))
    results["first"][:] = 0  # each caller owns its array
    np.testing.assert_array_equal(results["second"], embedding(0))


def test_failed_compute_raises_and_is_not_cached():
    cache = EmbeddingCache(MemoryCache(10 * MIB4))

    def broken():
        raise RuntimeError("encoder failed")

    with pytest.raises(RuntimeError, match="encoder failed"):
        cache.get_or_compute(key(0), broken)
    assert key(0) not in cache
    np.testing.assert_array_equal(cache.get_or_compute(key(0), lambda: embedding(0)), embedding(0))


# -- transient errors are not damage (issue 9) ----------------------------------------------


@pytest.mark.parametrize("error", [
    PermissionError(13, "Permission denied"),
    OSError(28, "No space left on device"),
    OSError(16, "Device or resource busy"),
])
def test_disk_group_that_cannot_be_opened_is_kept_and_skipped(tmp_path, monkeypatch, caplog, error):
    from napari_medsam.segment.cache import disk as cache_disk

    DiskCache(tmp_path).put(key(0), embedding(0))
    DiskCache(tmp_path).put(key(1), embedding(1))
    group = DiskCache(tmp_path).groups()[0].path

    def refuse(path, k):
        raise error

    monkeypatch.setattr(cache_disk.SliceGroup, "open", staticmethod(refuse))
    blocked = DiskCache(tmp_path)
    with caplog.at_level(logging.WARNING, logger=cache_disk.__name__):
        assert blocked.get(key(0)) is None
        assert blocked.filled_indices(key(0)) == [] and key(1) not in blocked
        assert blocked.put(key(2), embedding(2)) is False  # no rebuild over the user's group
        assert blocked.get(key(1)) is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "left as it is" in warnings[0].getMessage()
    assert group.is_dir() and blocked.stats().corrupt == 0
    monkeypatch.undo()  # the lock is gone: everything is still there
    later = DiskCache(tmp_path)
    assert later.filled_indices(key(0)) == [0, 1]
    np.testing.assert_array_equal(later.get(key(0)), embedding(0))
    np.testing.assert_array_equal(later.get(key(1)), embedding(1))


def test_disk_group_whose_metadata_file_cannot_be_read_is_kept(tmp_path, monkeypatch):
    """zarr may report an unreadable file as bad metadata: the file itself is then checked."""
    from napari_medsam.segment.cache import disk as cache_disk

    DiskCache(tmp_path).put(key(0), embedding(0))
    group = DiskCache(tmp_path).groups()[0].path

    def looks_garbled(path, k):
        raise ValueError("metadata could not be parsed")

    read_bytes = Path.read_bytes

    def locked(self):
        if self.name == "zarr.json":
            raise PermissionError(13, "locked by another program", str(self))
        return read_bytes(self)

    monkeypatch.setattr(cache_disk.SliceGroup, "open", staticmethod(looks_garbled))
    monkeypatch.setattr(Path, "read_bytes", locked)
    blocked = DiskCache(tmp_path)
    assert blocked.get(key(0)) is None and blocked.put(key(0), embedding(5)) is False
    assert group.is_dir() and blocked.stats().corrupt == 0
    monkeypatch.undo()
    np.testing.assert_array_equal(DiskCache(tmp_path).get(key(0)), embedding(0))


def test_disk_group_with_readable_but_broken_metadata_is_deleted(tmp_path):
    DiskCache(tmp_path).put(key(0), embedding(0))
    group = DiskCache(tmp_path).groups()[0].path
    (group / "zarr.json").write_text("{not json")
    fresh = DiskCache(tmp_path)
    assert fresh.get(key(0)) is None
    assert not group.exists() and fresh.stats().corrupt == 1


def test_disk_slice_that_cannot_be_read_stays_marked(tmp_path, monkeypatch):
    DiskCache(tmp_path).put(key(0), embedding(0))
    cache = DiskCache(tmp_path)
    assert cache.filled_indices(key(0)) == [0]  # the group is open
    original = zarr.Array.__getitem__

    def flaky(self, selection):
        if self.dtype == np.float32:
            raise OSError(5, "Input/output error")
        return original(self, selection)

    monkeypatch.setattr(zarr.Array, "__getitem__", flaky)
    assert cache.get(key(0)) is None
    monkeypatch.undo()
    assert cache.filled_indices(key(0)) == [0] and cache.stats().corrupt == 0
    np.testing.assert_array_equal(cache.get(key(0)), embedding(0))


def test_disk_clear_keeps_group_that_cannot_be_read_and_deletes_damaged_one(tmp_path, monkeypatch, caplog):
    """clear() follows the rule of opening: only provable damage is deleted (issue 9)."""
    from napari_medsam.segment.cache import disk as cache_disk

    DiskCache(tmp_path).put(key(0, volume="locked"), embedding(0))
    DiskCache(tmp_path).put(key(0, volume="broken"), embedding(1))
    DiskCache(tmp_path).put(key(0, volume="fine"), embedding(2))
    paths = {info.fields["volume_signature"]: info.path for info in DiskCache(tmp_path).groups()}
    (paths["broken"] / "zarr.json").write_text("{not json")
    read_bytes = Path.read_bytes
    original_open = zarr.open_group

    def locked_read(self):
        if paths["locked"] in self.parents:
            raise PermissionError(13, "locked by another program", str(self))
        return read_bytes(self)

    def locked_open(store=None, *args, **kwargs):
        if Path(str(store)) == paths["locked"]:
            raise PermissionError(13, "locked by another program", str(store))
        return original_open(store, *args, **kwargs)

    monkeypatch.setattr(Path, "read_bytes", locked_read)
    monkeypatch.setattr(cache_group.zarr, "open_group", locked_open)
    with caplog.at_level(logging.WARNING, logger=cache_disk.__name__):
        removed = DiskCache(tmp_path).clear()
    assert removed == 2  # the damaged group and the sound one
    assert paths["locked"].is_dir() and not paths["broken"].exists() and not paths["fine"].exists()
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("left as it is" in m and str(paths["locked"]) in m for m in messages)
    monkeypatch.undo()  # the lock is gone: the kept group is intact
    np.testing.assert_array_equal(DiskCache(tmp_path).get(key(0, volume="locked")), embedding(0))
