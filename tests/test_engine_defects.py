"""Engine defects of issue 9: `segment` flushes its disk cache, checks --zrange first; model speeds."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from napari_medsam.cli import main
from napari_medsam.io import load_volume
from napari_medsam.models import weights
from napari_medsam.models.registry import MODELS
from napari_medsam.segment.cache import DiskCache, EmbeddingKey
from napari_medsam.segment.model import SamModel


@pytest.fixture(scope="module")
def liver_box(sample_dir):
    """A box around the liver on its middle slice (file voxel order) as a prompt file's content."""
    truth = np.asarray(nib.load(str(sample_dir / "ct_phantom_labels.nii.gz")).dataobj)
    ks = np.flatnonzero((truth == 1).any(axis=(0, 1)))
    k = int(ks[len(ks) // 2])
    ii, jj = np.nonzero(truth[:, :, k] == 1)
    return {"coordinates": "voxel", "objects": [{"label": 1, "name": "liver", "prompts": [
        {"type": "box", "corners": [[int(ii.min()), int(jj.min()), k], [int(ii.max()), int(jj.max()), k]]}]}]}


def _segment_args(tmp_path, golden_dir, sample_dir, prompts, *extra) -> list[str]:
    prompt_file = tmp_path / "prompts.json"
    prompt_file.write_text(json.dumps(prompts))
    return ["segment", str(sample_dir / "ct_phantom.nii.gz"), "--prompts", str(prompt_file),
            "--out", str(tmp_path / "labels.nii.gz"), "--model", "lite_medsam",
            "--checkpoint", str(golden_dir / "lite_medsam_random.pth"), "--device", "cpu", "--quiet", *extra]


# Runs the CLI in a fresh interpreter (so the process really exits after it, as a user's does)
# and reports on stderr how many slices the encoder embedded.
_COUNTING_RUN = """
import sys
from napari_medsam.cli import main
from napari_medsam.segment.model import SamModel
calls = []
encode = SamModel.encode
def counting_encode(self, image):
    calls.append(1)
    return encode(self, image)
SamModel.encode = counting_encode
code = main(sys.argv[1:])
print(f"ENCODER CALLS {len(calls)}", file=sys.stderr)
sys.exit(code)
"""


def _run_counting(args: list[str]) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-c", _COUNTING_RUN, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    line = [s for s in done.stderr.splitlines() if s.startswith("ENCODER CALLS ")]
    assert len(line) == 1, done.stderr
    return int(line[0].split()[-1]), done.stderr


def test_segment_cache_keeps_every_embedding_for_the_next_run(tmp_path, golden_dir, sample_dir, liver_box):
    """Two runs in fresh processes: the second finds every slice the first embedded on disk.

    Propagation is limited to the box's slice and three on each side (--zrange): the encoder and
    its prefetch thread still embed several slices and the process ends right after, which is
    what the check needs, in a fraction of the whole scan's time.
    """
    volume = load_volume(sample_dir / "ct_phantom.nii.gz")
    corner = np.array([liver_box["objects"][0]["prompts"][0]["corners"][0]])
    k = int(volume.axes.file_index_to_display(corner, volume.shape)[0][0])  # the box's display slice
    args = _segment_args(tmp_path, golden_dir, sample_dir, liver_box, "--propagate", "--cache", str(tmp_path / "c"),
                         "--zrange", str(k - 3), str(k + 3))
    first, first_err = _run_counting(args)
    assert first > 0
    second, second_err = _run_counting(args)
    for err in (first_err, second_err):
        assert "write failed" not in err and "Traceback" not in err, err
    assert second == 0, f"the second run embedded {second} slice(s) again: the first run's did not reach the disk"


def test_segment_returns_only_after_the_prefetched_embedding_is_on_disk(tmp_path, golden_dir, sample_dir,
                                                                         liver_box, monkeypatch):
    """In one process: whatever the encoder embedded is on disk when `main` returns.

    The run is limited to ``--zrange 0 55``, the first and the last slice of the scan: a range at
    the edges is accepted (the run's exit code) and, being the whole scan, changes nothing else.
    """
    started = []
    encode = SamModel.encode

    def slow_encode(self, image):
        started.append(threading.current_thread().name)
        if threading.current_thread().name.startswith("medsam-prefetch"):
            time.sleep(1.0)  # a background embedding that is still running when the run ends
        return encode(self, image)

    monkeypatch.setattr(SamModel, "encode", slow_encode)
    disk_root = tmp_path / "c"
    assert load_volume(sample_dir / "ct_phantom.nii.gz").shape[0] == 56  # the axial plane has 56 slices
    assert main(_segment_args(tmp_path, golden_dir, sample_dir, liver_box, "--propagate",
                              "--cache", str(disk_root), "--zrange", "0", "55")) == 0
    written_at_return = sum(len(DiskCache(disk_root).filled_indices(EmbeddingKey(**info.fields, index=0)))
                            for info in DiskCache(disk_root).groups())
    assert any(name.startswith("medsam-prefetch") for name in started)
    assert written_at_return == len(started)


@pytest.mark.parametrize(("zrange", "expected"), [
    (("30", "10"), "first slice is after the last"),
    (("100", "200"), "0..55"),
    (("10", "56"), "0..55"),
    (("-1", "10"), "start at 0"),
])
def test_segment_refuses_a_bad_zrange_before_loading_a_model(tmp_path, golden_dir, sample_dir, liver_box,
                                                             monkeypatch, capsys, zrange, expected):
    assert load_volume(sample_dir / "ct_phantom.nii.gz").shape[0] == 56  # the axial plane has 56 slices
    touched = []
    # The CLI imports these where it runs, so patching the modules' attributes reaches it.
    monkeypatch.setattr(weights, "resolve_weights", lambda *a, **k: touched.append("weights") or a[1])
    monkeypatch.setattr(SamModel, "from_checkpoint", classmethod(lambda cls, *a, **k: touched.append("model")))
    code = main(_segment_args(tmp_path, golden_dir, sample_dir, liver_box, "--propagate", "--zrange", *zrange))
    err = capsys.readouterr().err.strip().splitlines()
    assert code in (1, 2)
    assert len(err) == 1 and "--zrange" in err[0] and expected in err[0], err
    assert touched == []
    assert not (tmp_path / "labels.nii.gz").exists()


def test_model_notes_quote_the_plugins_own_measured_speeds():
    """Tooltips (the registry's notes) give this plugin's encoder times from docs/performance.md."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "performance.md").read_text(encoding="utf-8")
    measured = {}  # first word(s) of a table row -> encoder ms of the 2-core CPU table
    for row in re.finditer(r"^\| ([^|]+?) \| (\d+) \|", text, re.MULTILINE):
        measured.setdefault(row.group(1), int(row.group(2)))
    rows = {"sam_vit_b": "SAM ViT-B / MedSAM (1024)", "medsam": "SAM ViT-B / MedSAM (1024)",
            "sam_vit_l": "SAM ViT-L (1024), 1 run", "sam_vit_h": "SAM ViT-H (1024), 1 run",
            "mobile_sam": "MobileSAM (TinyViT, 1024)", "lite_medsam": "LiteMedSAM (TinyViT, 256)",
            "medsam2": "MedSAM2 (Hiera-T, 512)", "sam2.1_hiera_tiny": "SAM 2.1 Tiny (Hiera, 1024)",
            "sam2.1_hiera_small": "SAM 2.1 Small (Hiera, 1024)", "sam2.1_hiera_base_plus": "SAM 2.1 Base+ (Hiera, 1024)",
            "sam2.1_hiera_large": "SAM 2.1 Large (Hiera, 1024)"}
    assert set(rows) == set(MODELS)
    for name, spec in MODELS.items():
        seconds = [float(m.group(1) or m.group(2)) for m in re.finditer(
            r"(\d+(?:\.\d+)?) s per slice|in about (\d+(?:\.\d+)?) s", spec.notes)]
        assert seconds, f"{name}: no speed in its notes"
        assert "2-core CPU" in spec.notes, name
        for value in seconds:
            expected = measured[rows[name]] / 1000
            assert abs(value - expected) <= max(0.05, 0.1 * expected), (name, value, expected)
    ratio = re.search(r"about (\d+)x faster than MedSAM", MODELS["lite_medsam"].notes)
    if ratio:
        real = measured[rows["medsam"]] / measured[rows["lite_medsam"]]
        assert abs(int(ratio.group(1)) - real) < 1, (ratio.group(0), real)


def test_flush_waits_for_a_prefetch_that_has_not_reached_the_cache_yet(tmp_path):
    """A queued prefetch counts from the moment it is queued, not only inside get_or_compute.

    The stand-in's embed() pauses before calling the cache (where a real predictor computes the
    key and prepares the image); the old flush() returned during that pause, so a process
    exiting then lost the slice's disk write.
    """
    from napari_medsam.segment.cache import EmbeddingCache, MemoryCache
    from napari_medsam.segment.propagation.run import Prefetcher

    disk = DiskCache(tmp_path / "cache")
    cache = EmbeddingCache(MemoryCache(), disk)
    started = threading.Event()

    def key(index: int) -> EmbeddingKey:
        return EmbeddingKey("vol", "model:w:1:2", "window:40:400", 0, index)

    class SlowStartPredictor:
        def __init__(self) -> None:
            self.cache = cache

        def embed(self, index: int) -> np.ndarray:
            started.set()
            time.sleep(0.4)
            return self.cache.get_or_compute(key(index), lambda: np.ones((1, 4, 2, 2), np.float32))

    prefetcher = Prefetcher(SlowStartPredictor(), enabled=True)
    prefetcher.ahead(7)
    assert started.wait(5)
    prefetcher.close()  # the run ends while the worker is still before get_or_compute
    assert cache.flush(timeout=10)
    assert disk.get(key(7)) is not None  # on disk once flush() returned

    # A queued slice that is cancelled before it starts releases its hold: flush does not hang.
    blocker = threading.Event()

    class BlockedPredictor(SlowStartPredictor):
        def embed(self, index: int) -> np.ndarray:
            blocker.wait(5)
            return super().embed(index)

    prefetcher = Prefetcher(BlockedPredictor(), enabled=True)
    prefetcher.ahead(1)
    prefetcher.ahead(2)  # queued behind slice 1
    prefetcher.close()  # slice 2 is cancelled
    blocker.set()
    assert cache.flush(timeout=10)
    assert disk.get(key(1)) is not None
