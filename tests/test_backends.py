"""Encoder backends (models/backends.py): choice, refusal, fidelity, caching apart, CLI and panel."""

from __future__ import annotations

import sys
import time

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_medsam.cli import main
from napari_medsam.errors import DeviceError
from napari_medsam.models import backends
from napari_medsam.models import pipelines as P
from napari_medsam.models.backends import backend_status, make_encoder_runner, resolve_backend
from napari_medsam.models.checkpoint import load_network
from napari_medsam.segment.model import SamModel
from test_cli import scan  # noqa: F401  (fixture: a small CT-like NIfTI)
from test_cli_small import BOX, _prompts

pytestmark = pytest.mark.usefixtures("two_torch_threads")

EMBED_ATOL = 1e-4  # the golden tests' tolerance for embeddings


@pytest.fixture(scope="module")
def mobile_net(golden_dir):
    return load_network("mobile_sam", golden_dir / "mobile_sam_random.pt")


@pytest.fixture(scope="module")
def golden_mobile(golden_dir):
    data = np.load(golden_dir / "mobile_sam_golden.npz")
    return P.sam_preprocess(data["image"]).tensor, data


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.logical_and(a, b).sum()) / max(1.0, float(a.sum() + b.sum()))


def test_auto_is_float32_and_names_are_checked():
    assert resolve_backend("auto", "cpu") == "float32" and resolve_backend(None, "cpu") == "float32"
    assert resolve_backend("FP32", "cpu") == "float32"
    with pytest.raises(DeviceError, match="unknown encoder backend 'fast'"):
        resolve_backend("fast", "cpu")
    assert "SAM 1 family" in backend_status("int8", "cpu", "hiera_t512")
    assert backend_status("int8", "cpu", "lite_tiny_vit") is None
    with pytest.raises(DeviceError, match="'int8' is not available: int8 is offered for the SAM 1 family"):
        resolve_backend("int8", "cpu", "hiera_t512")


def test_bf16_is_refused_where_the_cpu_would_emulate_it(monkeypatch):
    monkeypatch.setattr(backends, "cpu_bf16_hardware", lambda: False)
    reason = backend_status("bf16", "cpu")
    assert "no bfloat16 matrix units" in reason and "slower" in reason
    with pytest.raises(DeviceError, match="'bf16' is not available: this CPU has no bfloat16"):
        resolve_backend("bf16", "cpu")


def test_cpu_flags_are_read_from_proc_cpuinfo(tmp_path, monkeypatch):
    fake = tmp_path / "cpuinfo"
    real_path = backends.Path

    def fake_path(text):
        return fake if text == "/proc/cpuinfo" else real_path(text)

    monkeypatch.setattr(backends, "Path", fake_path)
    for flags, expected in (("fpu sse avx2 fma", False), ("fpu avx512f amx_bf16 amx_tile", True),
                            ("avx512_bf16 avx2", True)):
        fake.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        backends.cpu_bf16_hardware.cache_clear()
        assert backends.cpu_bf16_hardware() is expected
    backends.cpu_bf16_hardware.cache_clear()


def test_float32_backend_is_the_network_itself(mobile_net, golden_mobile):
    tensor, data = golden_mobile
    model = SamModel(mobile_net, "sam", name="m", signature="sig", backend="auto")
    assert model.backend == "float32" and model.signature == "sig"
    with torch.inference_mode():
        got = make_encoder_runner(mobile_net, "float32", torch.device("cpu"))(tensor)
    np.testing.assert_allclose(got.numpy(), data["image_embedding"], atol=EMBED_ATOL, rtol=0)


def test_int8_is_close_but_not_exact_and_caches_apart(mobile_net, golden_mobile):
    tensor, data = golden_mobile
    model = SamModel(mobile_net, "sam", name="m", signature="sig", backend="int8", arch="tiny_vit")
    assert model.signature == "sig:int8"  # never mixed with float32 embeddings in a cache
    with torch.inference_mode():
        got = model._run_encoder(tensor).numpy()
        exact = mobile_net.encode_image(tensor).numpy()
    # the network itself is untouched (a quantised copy runs)
    assert all(type(m) is not torch.nn.Linear or m.weight.dtype == torch.float32 for m in mobile_net.modules())
    diff = np.abs(got - data["image_embedding"]).max()
    rel = np.linalg.norm(got - exact) / np.linalg.norm(exact)
    assert diff > EMBED_ATOL  # why auto never picks it: it does not pass the golden tests
    assert 1e-4 < rel < 0.1
    # the official box's mask from the int8 embedding against the float32 one
    geometry = model.geometry(*data["image"].shape[:2])
    box = data["box"].astype(np.float64)
    a = model.decode(exact, geometry, box_xyxy=box).masks[0]
    b = model.decode(got, geometry, box_xyxy=box).masks[0]
    assert a.sum() > 100 and _dice(a, b) > 0.9


@pytest.mark.skipif(not backends.cpu_bf16_hardware(), reason="this CPU has no bfloat16 matrix units")
def test_bf16_embedding_is_close_to_float32(mobile_net, golden_mobile):
    tensor, data = golden_mobile
    model = SamModel(mobile_net, "sam", name="m", signature="sig", backend="bf16")
    assert model.signature == "sig:bf16"
    with torch.inference_mode():
        got = model._run_encoder(tensor)
        exact = mobile_net.encode_image(tensor)
    assert got.dtype == torch.float32 and got.shape == exact.shape
    rel = float((got - exact).norm() / exact.norm())
    assert 1e-5 < rel < 0.05


def test_cli_segment_with_int8_backend_runs_and_refuses_what_cannot_run(scan, golden_dir, tmp_path,  # noqa: F811
                                                                        monkeypatch, capsys):
    prompts = _prompts(tmp_path, BOX)
    outs = {}
    for backend in ("float32", "int8"):
        outs[backend] = tmp_path / f"labels-{backend}.nii.gz"
        code = main(["segment", str(scan), "--prompts", str(prompts), "--out", str(outs[backend]),
                     "--model", "lite_medsam", "--checkpoint", str(golden_dir / "lite_medsam_random.pth"),
                     "--device", "cpu", "--backend", backend, "--quiet"])
        assert code == 0, capsys.readouterr().err
    a, b = (np.asarray(nib.load(str(outs[k])).dataobj) > 0 for k in ("float32", "int8"))
    assert a.sum() > 0 and _dice(a, b) > 0.8

    monkeypatch.setattr(backends, "cpu_bf16_hardware", lambda: False)
    bad = tmp_path / "labels-bf16.nii.gz"
    code = main(["segment", str(scan), "--prompts", str(prompts), "--out", str(bad), "--model", "lite_medsam",
                 "--checkpoint", str(golden_dir / "lite_medsam_random.pth"), "--device", "cpu",
                 "--backend", "bf16", "--quiet"])
    err = capsys.readouterr().err
    assert code != 0 and "bf16" in err and "no bfloat16 matrix units" in err and not bad.exists()


def test_panel_loads_with_the_chosen_backend_and_remembers_it(qtbot, tmp_path, monkeypatch, golden_dir):
    from napari_medsam._napari.model_panel import ModelPanel
    from napari_medsam._napari.settings import Settings

    monkeypatch.setenv("NAPARI_MEDSAM_WEIGHTS_DIR", str(tmp_path / "cache"))
    panel = ModelPanel(Settings())
    qtbot.addWidget(panel)
    panel.model_combo.setCurrentIndex(panel.model_combo.findData("lite_medsam"))
    assert panel.set_local_file("lite_medsam", str(golden_dir / "lite_medsam_random.pth"))
    panel.device_combo.setCurrentIndex(panel.device_combo.findData("cpu"))
    assert panel.backend == "auto" and panel.backend_combo.currentText() == "float32 (exact)"
    panel.backend_combo.setCurrentIndex(panel.backend_combo.findData("int8"))
    with qtbot.waitSignal(panel.model_changed, timeout=60000) as blocker:
        panel.load()
    model = blocker.args[0]
    assert model.backend == "int8" and model.signature.endswith(":int8")
    assert "int8 encoder" in panel.status.text()
    assert Settings().get("backend") == "int8"  # the next panel starts with it
    again = ModelPanel(Settings())
    qtbot.addWidget(again)
    assert again.backend == "int8"
    again.shutdown()
    panel.shutdown()


# --- threads under contention (models/device.py ThreadChooser) -----------------------------------


def test_thread_chooser_keeps_the_full_count_idle_and_drops_to_one_when_calls_slow_down():
    from napari_medsam.models.device import ThreadChooser

    chooser = ThreadChooser(slow=1.5, probe=4, busy=lambda: False)
    for seconds in (1.2, 1.0, 1.05, 1.4):  # idle: the full count every time
        assert chooser.pick(2) == 2
        chooser.record(2, 2, seconds)
    assert chooser.pick(2) == 2
    chooser.record(2, 2, 2.0)  # 2x the best: another program holds a core
    picks = []
    for _ in range(7):
        n = chooser.pick(2)
        picks.append(n)
        chooser.record(n, 2, 1.1 if n == 1 else 2.2)  # one thread wins while the other program runs
    assert picks == [1, 1, 1, 2, 1, 1, 1]  # every 4th call probes the full count again
    # the other program ended: the next probe is faster than one thread, and the full count stays
    assert chooser.pick(2) == 2
    chooser.record(2, 2, 1.0)
    assert [chooser.pick(2) for _ in range(5)] == [2] * 5
    single = ThreadChooser(busy=lambda: True)
    single.record(1, 1, 9.0)
    assert single.pick(1) == 1


def test_thread_chooser_tries_one_thread_when_other_tasks_run_from_the_start():
    from napari_medsam.models.device import ThreadChooser

    busy = [True]
    chooser = ThreadChooser(probe=4, cooldown=8, busy=lambda: busy[0])
    assert chooser.pick(2) == 2  # nothing to compare with yet
    chooser.record(2, 2, 2.0)  # contended from the start: never 1.5x its own best
    assert chooser.pick(2) == 1  # another task is runnable: try one thread once
    chooser.record(1, 2, 1.2)  # and it wins
    assert chooser.single and [chooser.pick(2) for _ in range(4)] == [1, 1, 1, 2]

    losing = ThreadChooser(cooldown=3, busy=lambda: busy[0])
    losing.pick(2)
    losing.record(2, 2, 1.0)
    assert losing.pick(2) == 1
    losing.record(1, 2, 1.8)  # short-lived competition: two threads were better, they stay
    assert not losing.single and [losing.pick(2) for _ in range(2)] == [2, 2]
    assert losing.pick(2) == 1  # tried again after the cooldown, while still busy
    losing.record(1, 2, 1.9)
    busy[0] = False
    assert [losing.pick(2) for _ in range(5)] == [2] * 5  # idle: never tried


def test_an_encode_reports_to_the_chooser_and_restores_the_count(mobile_net, monkeypatch):
    from napari_medsam.models import device

    monkeypatch.setenv(device.ADAPTIVE_ENV, "1")
    monkeypatch.setattr(device, "_threads", None)
    model = SamModel(mobile_net, "sam", name="m", signature="sig")
    seen = []
    inner = model._run_encoder
    model._run_encoder = lambda t: (seen.append(torch.get_num_threads()), inner(t))[1]
    model._threads.single = True  # as after a slow call
    torch.set_num_threads(2)
    model.encode(np.zeros((64, 64, 3), np.uint8))
    assert seen == [1] and torch.get_num_threads() == 2 and model._threads.last_one is not None
    monkeypatch.setattr(device, "_threads", 2)  # the user fixed the count (--threads): kept
    model.encode(np.zeros((64, 64, 3), np.uint8))
    assert seen == [1, 2]


def test_allocator_tuning_is_applied_once_and_can_be_switched_off():
    """glibc's thresholds are raised once per process (Linux); NAPARI_MEDSAM_MALLOC_TUNING=0 leaves them.

    And what it is for: 40 MB + 12 MB temporaries made and freed again and again (as an encoder
    does) are reused instead of being faulted in again page by page (~10,000 faults per step).
    """
    import subprocess
    import sys

    code = (
        "import resource, torch\n"
        "from napari_medsam.models import device\n"
        "first = device.tune_allocator()\n"
        "def step():\n"
        "    a = torch.ones(10 << 20); b = torch.ones(3 << 20); a[:5].sum() + b[:5].sum(); del a, b\n"
        "for _ in range(3): step()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(5): step()\n"
        "faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5\n"
        "print(first, device.tune_allocator() is first, faults)\n"
    )
    results = {}
    for value in ("1", "0"):
        env = dict(__import__("os").environ, NAPARI_MEDSAM_MALLOC_TUNING=value, THP_MEM_ALLOC_ENABLE="0")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        applied, once, faults = out.stdout.split()
        results[value] = (applied, once, int(faults))
    assert results["0"][:2] == ("False", "True") and results["1"][1] == "True"
    if sys.platform.startswith("linux"):
        assert results["1"][0] == "True"
        assert results["1"][2] < results["0"][2] / 4, results


def test_importing_the_package_requests_huge_pages_before_torch_allocates():
    """THP_MEM_ALLOC_ENABLE=1 is set by ``import napari_medsam`` (Linux) unless the user set it or opted out;
    and with it, a 64 MB tensor made again and again faults in ~500x less often (2 MB pages)."""
    import os
    import subprocess
    import sys

    code = (
        "import os, resource\n"
        "import napari_medsam\n"
        "import torch\n"
        "for _ in range(2): torch.ones(16 << 20)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(4): torch.ones(16 << 20)\n"
        "print(os.environ.get('THP_MEM_ALLOC_ENABLE'), (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 4)\n"
    )
    seen = {}
    for name, extra in (("default", {}), ("off", {"NAPARI_MEDSAM_MALLOC_TUNING": "0"}),
                        ("user", {"THP_MEM_ALLOC_ENABLE": "0"})):
        env = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "NAPARI_MEDSAM_MALLOC_TUNING")}
        env.update(extra)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        value, faults = out.stdout.split()
        seen[name] = (value, int(faults))
    if not sys.platform.startswith("linux"):
        assert seen["default"][0] == "None"
        return
    assert seen["default"][0] == "1" and seen["off"][0] == "None" and seen["user"][0] == "0"
    assert seen["off"][1] > 8000  # 64 MB in 4 KB pages, faulted in on every make
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as handle:
            thp = handle.read()
    except OSError:  # no THP support in this kernel
        thp = "[never]"
    if "[never]" not in thp:  # the kernel may refuse huge pages altogether: then nothing changes
        assert seen["default"][1] < seen["off"][1] / 8, seen


def test_short_calls_take_only_the_cores_other_programs_leave(monkeypatch):
    from napari_medsam.models import device

    monkeypatch.setattr(device, "_usable_cores", lambda: 2)
    count = device.short_work_thread_count
    assert count(2, running=1, own=1) == 2  # idle: only the caller runs
    assert count(2, running=3, own=3) == 2  # this process's own threads (torch's team) are no competition
    assert count(2, running=2, own=1) == 1  # one other program: one core left
    assert count(2, running=4, own=2) == 1  # two: none left, still one thread
    assert count(1, running=1, own=1) == 1
    monkeypatch.setattr(device, "_usable_cores", lambda: 16)
    assert count(8, running=3, own=1) == 8 and count(16, running=3, own=1) == 14
    monkeypatch.setattr(device, "_runnable", lambda: None)  # no /proc: leave the count
    assert count(2) == 2 and device._others_runnable() is False
    # The encoders' chooser asks the same question: this process's own spinning threads are not "busy".
    monkeypatch.setattr(device, "_runnable", lambda: 3)
    monkeypatch.setattr(device, "_own_runnable", lambda: 3)
    assert device._others_runnable() is False
    monkeypatch.setattr(device, "_own_runnable", lambda: 1)
    assert device._others_runnable() is True
    if sys.platform.startswith("linux"):
        assert device._own_runnable() >= 1  # the caller itself is running


def test_short_calls_on_a_busy_machine_drop_to_one_thread():
    """Live: as many spinning processes as cores, then the count asked for a decode is one thread."""
    import subprocess

    from napari_medsam.models import device

    if not sys.platform.startswith("linux"):
        pytest.skip("/proc/loadavg is Linux's")
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(min(8, device._usable_cores()))]
    try:
        time.sleep(0.5)
        counts = [device.short_work_thread_count(2) for _ in range(5) if time.sleep(0.05) is None]
    finally:
        for proc in spinners:
            proc.kill()
            proc.wait()
    assert counts.count(1) >= 3, counts


def test_a_decode_runs_on_the_short_call_count_and_restores_it(mobile_net, monkeypatch):
    from napari_medsam.models import device

    model = SamModel(mobile_net, "sam", name="m", signature="sig")
    embedding = model.encode(np.zeros((64, 64, 3), np.uint8))
    seen = []
    inner = model.network.decode
    monkeypatch.setattr(model.network, "decode", lambda *a, **k: (seen.append(torch.get_num_threads()), inner(*a, **k))[1])
    monkeypatch.setattr(device, "short_work_thread_count", lambda upper, **k: 1)
    geometry = model.geometry(64, 64)
    torch.set_num_threads(2)
    for adaptive, expect in (("1", 1), ("0", 2)):
        monkeypatch.setenv(device.ADAPTIVE_ENV, adaptive)
        monkeypatch.setattr(device, "_threads", None)
        model.decode(embedding, geometry, box_xyxy=np.array([10, 10, 40, 40]))
        assert seen[-1] == expect and torch.get_num_threads() == 2
