"""Shared fixtures: paths to the golden data and to generated sample scans."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# napari's settings (window geometry, reader preferences the plugin adds on first use) go to a
# file of this test run, never to the user's: napari reads NAPARI_CONFIG when its settings load,
# which is after this module (subprocesses of the tests inherit it too).
# In a parallel run (pytest-xdist) the workers inherit the controller's environment: each one
# gets a settings file of its own in the controller's folder, so that two napari sessions never
# write one file at the same time.
_RUN_SETTINGS = "NAPARI_MEDSAM_TESTS_SETTINGS_DIR"  # the folder this file made for the run
if "NAPARI_CONFIG" not in os.environ:
    import tempfile

    os.environ[_RUN_SETTINGS] = tempfile.mkdtemp(prefix="napari-medsam-tests-")
    os.environ["NAPARI_CONFIG"] = str(Path(os.environ[_RUN_SETTINGS]) / "settings.yaml")
if (os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get(_RUN_SETTINGS)
        and os.environ["NAPARI_CONFIG"] == str(Path(os.environ[_RUN_SETTINGS]) / "settings.yaml")):
    _own = Path(os.environ[_RUN_SETTINGS]) / os.environ["PYTEST_XDIST_WORKER"]
    _own.mkdir(exist_ok=True)
    os.environ["NAPARI_CONFIG"] = str(_own / "settings.yaml")

# Encoders run on a fixed thread count in tests (models/device.py heavy_threads adapts it to other
# programs' load, which would make float rounding, and so near-zero mask pixels, vary between two
# runs of one test); tests/test_backends.py checks the adaptation itself.
os.environ.setdefault("NAPARI_MEDSAM_ADAPTIVE_THREADS", "0")


# ---------------------------------------------------------------- parallel runs (pytest-xdist)
# pyproject's addopts run the suite with "-n auto": pytest_xdist_auto_num_workers below says how
# many worker processes. Each worker is a napari + torch process of 1-3 GiB, and torch's OpenMP
# threads spin while they wait, so more workers than cores (or than memory for them) is slower.
WORKER_MEMORY = 4 << 30  # bytes of available memory asked per worker
MAX_WORKERS = 4


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def auto_workers(cores: int, available: int | None) -> int:
    """Workers for ``-n auto``: one per core, at most MAX_WORKERS and one per WORKER_MEMORY available."""
    n = min(cores, MAX_WORKERS)
    if available is not None:
        n = min(n, available // WORKER_MEMORY)
    return max(1, n)


@pytest.hookimpl(optionalhook=True)  # an xdist hook: unknown when xdist is off (-p no:xdist)
def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: see auto_workers; PYTEST_XDIST_AUTO_NUM_WORKERS=N still sets the count."""
    text = os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS", "").strip()
    if text.isdigit() and int(text) > 0:
        return int(text)
    try:
        import psutil

        available = int(psutil.virtual_memory().available)
    except Exception:  # no psutil, or no reading: cores and MAX_WORKERS decide
        available = None
    return auto_workers(_usable_cores(), available)


def worker_torch_threads(cores: int, workers: int) -> int:
    """torch's intra-op threads in each of ``workers`` parallel test processes sharing ``cores``."""
    return max(1, cores // max(1, workers))


# In a worker, torch (imported later, by the tests) gets its share of the cores, so that two
# workers on two cores do not oversubscribe them: OMP_NUM_THREADS sets the count of every thread
# (napari's worker threads too) and of the subprocesses the tests start. A count set by the user
# stays; tests that set their own count (the golden tests: two_torch_threads) still do.
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    _count = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")
    _share = worker_torch_threads(_usable_cores(), int(_count) if _count.isdigit() else 1)
    os.environ["OMP_NUM_THREADS"] = str(_share)
    # Where a test asks for more threads than its share (the golden tests' two), the team's
    # waiting threads sleep instead of spinning on a core the other worker needs.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "torch" in sys.modules:  # imported by a plugin before this file: set it there too
        sys.modules["torch"].set_num_threads(_share)


GOLDEN_ENV = "NAPARI_MEDSAM_GOLDEN"
_golden_missing: list[str] = []  # the message, once, when a test asked for absent golden data


def golden_path() -> Path:
    """Where the golden data are looked for: $NAPARI_MEDSAM_GOLDEN, else ../shared/golden."""
    return Path(os.environ.get(GOLDEN_ENV) or REPO.parent / "shared" / "golden")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """The golden reference data (see tests/README.md); missing: a loud skip, or a failure under CI=true."""
    path = golden_path()
    if not (path / "README.md").is_file():
        message = (f"golden data not found at {path} (looked for {path / 'README.md'}): the tests comparing "
                   f"with the official SAM/MedSAM code do not run; put the shared/ folder beside the clone "
                   f"or set {GOLDEN_ENV}, see tests/README.md")
        if _in_ci():
            pytest.fail(f"{message} [CI=true: missing golden data is an error]", pytrace=False)
        if not _golden_missing:
            _golden_missing.append(message)
            warnings.warn(pytest.PytestWarning(message), stacklevel=1)
        pytest.skip(f"golden data not found at {path} (see tests/README.md)")
    return path


@pytest.fixture(autouse=True)
def _no_user_models(tmp_path_factory, monkeypatch):
    """Every test sees an empty folder of the user's fine-tuned models (never the real one)."""
    monkeypatch.setenv("NAPARI_MEDSAM_MODELS_DIR", str(tmp_path_factory.mktemp("user-models")))


def pytest_terminal_summary(terminalreporter) -> None:
    """A last, red line when golden tests were skipped for want of their data."""
    for message in _golden_missing:
        terminalreporter.write_sep("=", "GOLDEN DATA MISSING", red=True, bold=True)
        terminalreporter.write_line(message, red=True)


@pytest.fixture(scope="session")
def es3_dir(golden_dir: Path) -> Path:
    """The EfficientSAM3 part of the golden data (reduced checkpoint, arrays, CLIP vocabulary)."""
    folder = golden_dir / "efficientsam3"
    if not (folder / "es3_golden_image.npz").is_file():
        message = f"no EfficientSAM3 golden data in {folder}"
        if _in_ci():
            pytest.fail(f"{message} [CI=true: missing golden data is an error]", pytrace=False)
        pytest.skip(message)
    return folder


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The committed sample_data/ folder."""
    return REPO / "sample_data"


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path_factory, monkeypatch) -> Path:
    """Every test reads and writes the dock widget's settings in its own empty folder."""
    folder = tmp_path_factory.mktemp("medsam-config")
    monkeypatch.setenv("NAPARI_MEDSAM_CONFIG_DIR", str(folder))
    return folder


@pytest.fixture
def calls(monkeypatch):
    """Every SlicePredictor.predict call: (axis, index, Prompts, multimask)."""
    from napari_medsam.segment.predictor import SlicePredictor

    recorded = []
    original = SlicePredictor.predict

    def spy(self, index, prompts, multimask=False, **kwargs):
        recorded.append((self.axis, int(index), prompts, multimask))
        return original(self, index, prompts, multimask, **kwargs)

    monkeypatch.setattr(SlicePredictor, "predict", spy)
    return recorded


def start_workflow(viewer, model, sample_dir, *, dock: bool = False):
    """The dock widget on the sample CT with ``model`` loaded (memory cache only); returns (widget, controller)."""
    from napari_medsam._napari.widget import MedSamWidget
    from napari_medsam.segment.cache import EmbeddingCache, MemoryCache

    viewer.open(str(sample_dir / "ct_phantom.nii.gz"), plugin="napari-medsam")
    widget = MedSamWidget(viewer)
    widget.cache = EmbeddingCache(MemoryCache())  # keep the tests off the user's disk cache
    if dock:
        viewer.window.add_dock_widget(widget, name="MedSAM")
    widget.model_panel.set_model(model, "mobile_sam")
    assert widget.controller is not None, widget.status.text()
    return widget, widget.controller


def stop_workflow(qtbot, widget, controller) -> None:
    qtbot.waitUntil(lambda: controller.queue.running is None and widget.segment_panel.worker is None, timeout=30000)
    widget.stop_segmentation()


@pytest.fixture(scope="module")
def two_torch_threads():
    """torch on 2 threads for a module (the golden data were made so: the count changes float
    reduction order); the next module gets the count it had before."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
