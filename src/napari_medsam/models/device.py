"""Choosing the compute device and the CPU thread count for the networks."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Callable, Iterator

import torch

from ..errors import DeviceError

__all__ = ["INTERACTIVE_THREADS", "DeviceError", "available_devices", "cpu_threads", "describe_runtime",
           "ThreadChooser", "adaptive_threads", "heavy_work_threads", "resolve_device", "set_cpu_threads",
           "torch_build", "tune_allocator"]

# torch threads of the napari Qt thread, which decodes the clicks while a worker thread encodes
# slices with cpu_threads(). On a 2-core machine busy with another program, one decode thread
# kept clicks fastest without slowing the encoder (benchmarks/bench_busy_click.py; figures in
# docs/performance.md, "Clicks on a busy CPU"): two thread teams on two cores wait on each other.
# Again with LiteMedSAM (benchmarks/bench_prefetch.py threads, 2 cores, load average 7.6-11, two
# runs): decode ms with D x E threads, while encoding / encoder stopped: 1x2 500-519 / 251-319,
# 2x2 150-280 / 2995-3504; with a competing numpy process 1x2 659-941 / 563-578, 2x2 476-630 /
# 3639-6060; the encoder 1.3-1.8x faster with E=2 than E=1. Kept: D=1 (never 3 s), E=cpu_threads().
INTERACTIVE_THREADS = 1
_threads: int | None = None  # the count set with set_cpu_threads (None: torch's default)
_TORCH_DEFAULT = torch.get_num_threads()  # torch's own choice (physical cores), before anyone changes it


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def torch_build() -> str:
    """Which PyTorch runs the networks, e.g. "torch 2.13.0+cpu (CPU-only build)"."""
    if torch.version.cuda:
        kind = f"CUDA {torch.version.cuda} build"
    elif getattr(torch.version, "hip", None):
        kind = f"ROCm {torch.version.hip} build"
    else:
        kind = "CPU-only build"
    return f"torch {torch.__version__} ({kind})"


def describe_runtime(device: str | torch.device) -> str:
    """The device a model runs on, in words, e.g. "cpu, 2 threads" or "cuda:0 (NVIDIA H100)"."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if device.type == "cpu":
        # The encoder's count (the napari panel's Qt thread decodes with INTERACTIVE_THREADS).
        n = cpu_threads()
        return f"cpu, {n} thread{'' if n == 1 else 's'}"
    return str(device)


def available_devices() -> list[str]:
    """Device names usable here, best first (e.g. ``["cuda:0", "cpu"]``)."""
    names = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    if _mps_available():
        names.append("mps")
    names.append("cpu")
    return names


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` -> CUDA, then Apple MPS, then CPU; an explicit name is checked to be usable."""
    if isinstance(name, torch.device):
        name = str(name)
    text = "auto" if name is None else str(name).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "gpu":
        text = "cuda"
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match:
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {name!r} was requested but CUDA is not available (no NVIDIA GPU, or this "
                "PyTorch build has no CUDA support); use 'auto' or 'cpu'"
            )
        index = int(match.group(1) or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise DeviceError(f"device {name!r} does not exist: this machine has {count} CUDA device(s)")
        return torch.device("cuda", index)
    if text == "mps":
        if not _mps_available():
            raise DeviceError(
                "device 'mps' (Apple GPU) was requested but is not available here; use 'auto' or 'cpu'"
            )
        return torch.device("mps")
    raise DeviceError(
        f"unknown device {name!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps' "
        f"(available here: {', '.join(available_devices())})"
    )


def cpu_threads() -> int:
    """The CPU thread count for heavy work (encoding, propagation): set_cpu_threads' or torch's default."""
    return _threads or _TORCH_DEFAULT


def set_cpu_threads(n: int | None) -> int:
    """Set torch's CPU thread count (``None``: one per CPU core) and return the count in effect.

    The count is also remembered (:func:`cpu_threads`) for the napari panel's worker threads.
    """
    global _threads
    if n is None:
        n = os.cpu_count() or 1
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DeviceError(f"the number of CPU threads must be a positive integer, got {n!r}")
    _threads = n
    torch.set_num_threads(n)
    return torch.get_num_threads()


# ---------------------------------------------------------------------- threads under contention
# When other programs keep cores busy, a team of torch threads larger than the free cores runs
# slower than a smaller one: every parallel operator ends at a barrier that waits for the thread
# the OS has parked. On the 2-core machine with other jobs running (load ~6), MobileSAM's
# encoder took 3.5 s on one thread against 6.8 s on two (median of 4 alternating pairs); idle,
# two threads are ~1.8x faster than one. The instantaneous run queue (/proc/loadavg) did not
# predict which count wins (at a queue of 3 two threads still won 0.89 s to 1.62 s: short-lived
# tasks), so it only prompts a trial, and the choice is made from the encoder's own times: see
# ThreadChooser.
ADAPTIVE_ENV = "NAPARI_MEDSAM_ADAPTIVE_THREADS"  # "0" turns the adaptation off (tests: bit-stable runs)


class ThreadChooser:
    """Picks the torch thread count of a repeated heavy call (one model's encoder) from its own times.

    All calls do the same work (one slice at the model's input size), so their times compare.
    It runs on the full count (``upper``) and switches to one thread when one thread proves
    faster: a call on one thread is tried when another program's task is runnable right now
    (``busy``: /proc/loadavg less this process's own runnable threads) or when a call took
    ``slow`` times the best; it stays on one thread if that call beat the last full-count call.
    On one thread, every ``probe``-th call tries the full count again and the faster count stays.
    Idle, every call runs on the full count.
    """

    def __init__(self, slow: float = 1.5, probe: int = 4, cooldown: int = 8,
                 busy: Callable[[], bool] | None = None) -> None:
        self.slow, self.probe, self.cooldown = slow, probe, cooldown
        self.busy = busy if busy is not None else _others_runnable
        self.best_full: float | None = None  # fastest call on the full count
        self.last_full: float | None = None  # the last call on the full count
        self.last_one: float | None = None  # the last call on one thread
        self.single = False  # running on one thread now
        self._since_probe = 0
        self._since_try = cooldown  # calls since one thread was last tried
        self._trying = False

    def pick(self, upper: int) -> int:
        """The thread count for the next call (at most ``upper``)."""
        if upper <= 1:
            return 1
        if self.single:
            self._since_probe += 1
            if self._since_probe >= self.probe:  # see whether the cores are free again
                self._since_probe = 0
                return upper
            return 1
        self._since_try += 1
        if self.last_full is not None and self._since_try >= self.cooldown and self.busy():
            self._since_try, self._trying = 0, True
            return 1
        return upper

    def record(self, threads: int, upper: int, seconds: float) -> None:
        """The call that ran on ``threads`` (of ``upper``) took ``seconds``."""
        if upper <= 1:
            return
        if threads == 1:
            self.last_one = seconds
            if self._trying:
                self._trying = False
                if self.last_full is not None and seconds < self.last_full:
                    self.single, self._since_probe = True, 0
            return
        self.last_full = seconds
        if self.best_full is None or seconds < self.best_full:
            self.best_full = seconds
        if self.single:
            if self.last_one is None or seconds <= self.last_one:
                self.single = False  # the full count is at least as fast again
        elif seconds > self.slow * self.best_full:
            self.single, self._since_probe = True, 0


def _runnable() -> int | None:
    """Tasks runnable on this machine right now, the caller included (Linux /proc/loadavg; else None)."""
    try:
        with open("/proc/loadavg", encoding="ascii") as handle:
            return int(handle.read().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return None


def _others_runnable() -> bool:
    """Whether another program's task is runnable on this machine right now (Linux; else False)."""
    return bool(_others_runnable_count())


def _own_runnable() -> int | None:
    """Threads of this process runnable right now (state R in /proc/self/task; Linux; else None).

    Includes the caller and torch's own team threads, which spin for a moment after each parallel
    step: they must not count as other programs holding cores.
    """
    count = 0
    try:
        entries = list(os.scandir("/proc/self/task"))
    except OSError:
        return None
    for entry in entries:
        try:
            with open(os.path.join(entry.path, "stat"), "rb") as handle:
                data = handle.read()
        except OSError:  # the thread ended meanwhile
            continue
        end = data.rfind(b")")
        if end >= 0 and data[end + 2:end + 3] == b"R":
            count += 1
    return count


def _others_runnable_count(running: int | None = None, own: int | None = None) -> int | None:
    """Runnable tasks that are not this process's threads (None where /proc cannot tell).

    ``running`` (all runnable tasks, /proc/loadavg) and ``own`` (this process's runnable threads,
    the caller included) are read when not given: the cheap machine-wide count first, the
    per-thread scan only when something besides the caller runs. This process's threads (torch's
    team spinning after its last step, a worker of ours) are no other program holding a core.
    """
    running = _runnable() if running is None else running
    if running is None or running <= 1:
        return None if running is None else 0
    own = _own_runnable() if own is None else own
    return max(0, running - max(1, own or 1))


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# A decoder call is a few hundred small parallel steps of 10-500 us each. With the cores taken by
# other programs, every step's barrier waits for a team thread the OS has parked: on the 2-core
# machine with two competing processes, a box on a slice not prepared took 2.5 s on two threads
# against 97 ms with this rule, a prepared one 883 ms against 78 ms (medians of 20 alternating
# calls, benchmarks/bench_short_threads.py; docs/performance.md). Idle, two threads are only
# ~1.6x faster than one. So short calls ask the run queue right before they start and take no
# more threads than there are cores without another program's runnable task: a wrong "busy"
# reading costs a few milliseconds, a missed one seconds.
def short_work_thread_count(upper: int, running: int | None = None, own: int | None = None) -> int:
    """Threads for one short call of many small steps: ``upper`` at most, fewer while others hold cores.

    ``running`` and ``own`` as for :func:`_others_runnable_count` (read from /proc when not given).
    """
    if upper <= 1:
        return 1
    others = _others_runnable_count(running, own)
    if not others:
        return upper
    return max(1, min(upper, _usable_cores() - others))


@contextlib.contextmanager
def short_work_threads() -> Iterator[int]:
    """``with short_work_threads() as n: ...``: one short call (a decode) on :func:`short_work_thread_count` threads.

    The caller's torch count is the upper bound and is restored afterwards; with the adaptation
    off (:func:`adaptive_threads`, e.g. the user fixed ``--threads``) nothing changes.
    """
    before = torch.get_num_threads()
    threads = short_work_thread_count(before) if adaptive_threads() else before
    if threads != before:
        torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def adaptive_threads() -> bool:
    """Whether heavy calls may use fewer threads than asked: not when the user fixed the count."""
    return _threads is None and os.environ.get(ADAPTIVE_ENV, "").strip() != "0"


@contextlib.contextmanager
def heavy_work_threads(chooser: ThreadChooser) -> Iterator[int]:
    """``with heavy_work_threads(chooser) as n: ...`` runs one heavy call on the count ``chooser`` picks.

    The caller's current torch count is the upper bound; the count is set on the calling thread
    (torch's OpenMP team is per thread) and restored afterwards, and the call's time is reported
    to the chooser. With the adaptation off (:func:`adaptive_threads`) the count is left alone.
    """
    before = torch.get_num_threads()
    adaptive = adaptive_threads()
    threads = chooser.pick(before) if adaptive else before
    if threads != before:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        yield threads
        if adaptive:  # a call that raised has no time worth comparing
            chooser.record(threads, before, time.perf_counter() - start)
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


# The encoders' temporaries are 4-50 MB each (ViT-B: the 64x64x768 token grids, the score blocks of
# the attention). glibc hands blocks that large out as fresh memory maps and gives them back on
# free, so every encoder step faults its temporaries in again, page by page (241,693 page faults
# per ViT-B pass on this project's 2-core test machine). Raising glibc's mmap and trim thresholds
# keeps freed blocks of up to ALLOCATOR_KEEP_BYTES in the process for reuse (at most
# ALLOCATOR_TRIM_BYTES of free memory are kept at the heap's top): 10,240 faults per pass, ViT-B
# 1.04x and TinyViT 1.10-1.13x faster, peak memory within +60 MiB
# (benchmarks/bench_encoder_levers.py --allocator; docs/performance.md, "Float32 encoders").
# NAPARI_MEDSAM_MALLOC_TUNING=0 leaves the allocator as it is.
ALLOCATOR_KEEP_BYTES = 64 << 20
ALLOCATOR_TRIM_BYTES = 128 << 20
_allocator_tuned: bool | None = None


def tune_allocator() -> bool:
    """Set glibc's mmap/trim thresholds for the encoders' large temporaries, once per process.

    True when applied (Linux with glibc, not switched off by NAPARI_MEDSAM_MALLOC_TUNING=0); False
    elsewhere (another C library, macOS, Windows): nothing changes there.
    """
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    _allocator_tuned = False
    if os.environ.get("NAPARI_MEDSAM_MALLOC_TUNING", "1").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    _allocator_tuned = bool(mallopt(m_mmap_threshold, ALLOCATOR_KEEP_BYTES)) and bool(
        mallopt(m_trim_threshold, ALLOCATOR_TRIM_BYTES))
    return _allocator_tuned
