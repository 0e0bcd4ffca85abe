"""Weight files: verified, resumable downloads from a real local HTTP server; safe loading.

The server (http.server on 127.0.0.1, port 0) supports Range requests and can, on demand,
drop the connection halfway once, ignore Range, corrupt the body, serve an HTML page or
send slowly. Specs in these tests point at it; nothing here touches the internet.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from napari_medsam.errors import MedSamError
from napari_medsam.models.checkpoint import (
    WeightsError,
    check_architecture,
    expected_state,
    load_network,
    load_state_dict,
)
from napari_medsam.models.registry import MODELS, ModelSpec
from napari_medsam.models.weights import (
    ENV_VAR,
    DownloadCancelled,
    download_weights,
    resolve_weights,
    tqdm_progress,
    weights_dir,
)

MiB = 1 << 20


class _State:
    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[tuple[str, str | None]] = []
        self.ignore_range = False
        self.drop_once_at: int | None = None
        self.corrupt = False
        self.html = False
        self.delay = 0.0  # seconds per 256 KiB sent


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        st: _State = self.server.state  # type: ignore[attr-defined]
        st.requests.append((self.path, self.headers.get("Range")))
        data = st.files.get(self.path.split("?")[0])
        if data is None:
            self.send_error(404)
            return
        if st.html:
            body = b"<!DOCTYPE html><html><body>Quota exceeded. Sign in.</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if st.corrupt:
            data = data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:]
        start = 0
        wanted = self.headers.get("Range")
        if wanted and not st.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", wanted).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if st.drop_once_at is not None and start < st.drop_once_at:
            cut, st.drop_once_at = st.drop_once_at - start, None
            self.wfile.write(body[:cut])
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)  # hang up in the middle of the body
            return
        for i in range(0, len(body), 256 * 1024):
            self.wfile.write(body[i:i + 256 * 1024])
            if st.delay:
                time.sleep(st.delay)


@pytest.fixture
def server():
    """A local HTTP server; ``server.state.files`` maps URL paths to bytes."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.state = _State({})  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"  # type: ignore[attr-defined]
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def payload(tmp_path_factory) -> bytes:
    """A real (small, 3 MiB) checkpoint's bytes: a zip written by torch.save."""
    path = tmp_path_factory.mktemp("payload") / "small.pth"
    generator = torch.Generator().manual_seed(0)
    torch.save({"w": torch.randn(3 * MiB // 4, generator=generator)}, path)
    return path.read_bytes()


def _spec(urls, data: bytes | None, *, sha: bool = True, size: bool = True, **changes) -> ModelSpec:
    fields = {
        "name": "test_model",
        "display_name": "Test Model",
        "urls": tuple(urls),
        "filename": "test_model.pth",
        "size_bytes": len(data) if (size and data is not None) else None,
        "sha256": hashlib.sha256(data).hexdigest() if (sha and data is not None) else None,
    }
    return dataclasses.replace(MODELS["mobile_sam"], **{**fields, **changes})


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- downloads --------------------------------------------------------------------------------


def test_fresh_download_checksum_sidecar_and_cache_reuse(server, payload, tmp_path):
    server.state.files["/w.pth"] = payload
    spec = _spec([server.url + "/w.pth"], payload)
    seen: list[tuple[int, int | None]] = []
    path = resolve_weights(spec, cache_dir=tmp_path, progress=lambda d, t: seen.append((d, t)))
    assert path == tmp_path / "test_model.pth"
    assert path.read_bytes() == payload
    sidecar = (tmp_path / "test_model.pth.sha256").read_text().split()
    assert sidecar == [spec.sha256, "test_model.pth"]
    assert _leftovers(tmp_path) == ["test_model.pth", "test_model.pth.sha256"]
    assert seen[-1] == (len(payload), len(payload)) and len(seen) >= 3
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert server.state.requests == [("/w.pth", None)]
    # second use: served from the cache without touching the network or re-hashing
    assert resolve_weights(spec, cache_dir=tmp_path) == path
    assert len(server.state.requests) == 1


def test_resume_after_dropped_connection(server, payload, tmp_path):
    server.state.files["/w.pth"] = payload
    server.state.drop_once_at = len(payload) // 2 + 12345
    spec = _spec([server.url + "/w.pth"], payload)
    path = resolve_weights(spec, cache_dir=tmp_path)
    assert path.read_bytes() == payload
    assert server.state.requests == [("/w.pth", None), ("/w.pth", f"bytes={len(payload) // 2 + 12345}-")]
    assert _leftovers(tmp_path) == ["test_model.pth", "test_model.pth.sha256"]


def test_cancel_keeps_part_and_next_call_resumes(server, payload, tmp_path):
    server.state.files["/w.pth"] = payload
    spec = _spec([server.url + "/w.pth"], payload)
    done: list[int] = [0]
    with pytest.raises(DownloadCancelled) as info:
        resolve_weights(spec, cache_dir=tmp_path, progress=lambda d, t: done.append(d), cancel=lambda: done[-1] >= MiB)
    assert isinstance(info.value, MedSamError) and "resumes" in str(info.value)
    part = tmp_path / "test_model.pth.part"
    kept = part.stat().st_size
    assert 0 < kept < len(payload) and part.read_bytes() == payload[:kept]
    assert _leftovers(tmp_path) == ["test_model.pth.part"]  # no lock left behind
    event = threading.Event()
    path = resolve_weights(spec, cache_dir=tmp_path, cancel=event)
    assert path.read_bytes() == payload
    assert server.state.requests[-1] == ("/w.pth", f"bytes={kept}-")


def test_keyboard_interrupt_becomes_cancel(server, payload, tmp_path):
    server.state.files["/w.pth"] = payload
    spec = _spec([server.url + "/w.pth"], payload)

    def interrupt(done: int, total: int | None) -> None:
        if done >= MiB:
            raise KeyboardInterrupt

    with pytest.raises(DownloadCancelled):
        resolve_weights(spec, cache_dir=tmp_path, progress=interrupt)
    assert (tmp_path / "test_model.pth.part").stat().st_size >= MiB
    assert not (tmp_path / "test_model.pth").exists()


def test_server_ignoring_range_restarts_cleanly(server, payload, tmp_path):
    server.state.files["/w.pth"] = payload
    server.state.ignore_range = True
    (tmp_path / "test_model.pth.part").write_bytes(b"PK\x03\x04" + b"\0" * 100_000)  # wrong bytes
    spec = _spec([server.url + "/w.pth"], payload, sha=False)  # bytes alone must prove the restart
    path = resolve_weights(spec, cache_dir=tmp_path)
    assert path.read_bytes() == payload
    assert server.state.requests == [("/w.pth", "bytes=100004-")]
    assert (tmp_path / "test_model.pth.sha256").read_text().split()[0] == hashlib.sha256(payload).hexdigest()


def test_checksum_mismatch_deletes_everything(server, payload, tmp_path):
    server.state.files["/w.pth"] = payload
    server.state.corrupt = True
    spec = _spec([server.url + "/w.pth"], payload)
    with pytest.raises(WeightsError, match="checksum mismatch") as info:
        resolve_weights(spec, cache_dir=tmp_path)
    assert spec.sha256 in str(info.value)
    assert _leftovers(tmp_path) == []


def test_size_mismatch_and_html_page_are_url_failures(server, payload, tmp_path):
    server.state.files["/w.pth"] = payload
    spec = _spec([server.url + "/w.pth"], payload, size_bytes=len(payload) + 1)
    with pytest.raises(WeightsError, match=f"{len(payload):,} bytes, expected"):
        resolve_weights(spec, cache_dir=tmp_path)
    server.state.html = True
    with pytest.raises(WeightsError, match="HTML page"):
        resolve_weights(_spec([server.url + "/w.pth"], payload), cache_dir=tmp_path)
    assert _leftovers(tmp_path) == []


def test_next_url_is_tried_after_a_failure(server, payload, tmp_path):
    server.state.files["/w.pth"] = payload
    dead = f"http://127.0.0.1:{_closed_port()}/w.pth"
    spec = _spec([dead, server.url + "/missing.pth", server.url + "/w.pth"], payload)
    assert resolve_weights(spec, cache_dir=tmp_path).read_bytes() == payload
    assert [p for p, _ in server.state.requests] == ["/missing.pth", "/w.pth"]


def test_unreachable_server_says_where_to_put_the_file(payload, tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/w.pth"
    spec = _spec([url], payload)
    with pytest.raises(WeightsError) as info:
        resolve_weights(spec, cache_dir=tmp_path / "cache")
    message = str(info.value)
    for needle in ("Test Model", url, str(tmp_path / "cache" / "test_model.pth"), ENV_VAR, "path="):
        assert needle in message
    with pytest.raises(WeightsError, match="switched off") as info:
        resolve_weights(spec, cache_dir=tmp_path / "cache", download=False)
    assert str(tmp_path / "cache" / "test_model.pth") in str(info.value)


def test_file_url(payload, tmp_path):
    source = tmp_path / "source" / "w.pth"
    source.parent.mkdir()
    source.write_bytes(payload)
    spec = _spec([source.as_uri()], payload)
    path = resolve_weights(spec, cache_dir=tmp_path / "cache")
    assert path.read_bytes() == payload and path != source
    assert (tmp_path / "cache" / "test_model.pth.sha256").exists()


def test_env_var_override(server, payload, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    default = weights_dir()
    assert default.name == "weights" and "napari-medsam" in str(default)
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env_cache"))
    assert weights_dir() == tmp_path / "env_cache"
    assert weights_dir(tmp_path / "arg") == tmp_path / "arg"  # the argument wins
    server.state.files["/w.pth"] = payload
    path = resolve_weights(_spec([server.url + "/w.pth"], payload))
    assert path == tmp_path / "env_cache" / "test_model.pth"


def test_local_file_is_used_in_place(server, payload, tmp_path):
    mine = tmp_path / "elsewhere" / "my_weights.pth"
    mine.parent.mkdir()
    mine.write_bytes(payload[:-10] + b"different!")  # not the official bytes: still the user's choice
    spec = _spec([server.url + "/w.pth"], payload)
    assert resolve_weights(spec, str(mine), cache_dir=tmp_path / "cache") == mine
    assert server.state.requests == [] and not (tmp_path / "cache").exists()
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_weights(spec, tmp_path / "nope.pth", cache_dir=tmp_path / "cache")
    page = tmp_path / "page.pth"
    page.write_text("\n<html><body>Google Drive - virus scan warning</body></html>")
    with pytest.raises(WeightsError, match="HTML page"):
        resolve_weights(spec, page)


def test_cached_file_placed_by_hand_is_checked(payload, tmp_path):
    spec = _spec(["http://127.0.0.1:9/never"], payload)
    (tmp_path / "test_model.pth").write_bytes(payload)
    assert resolve_weights(spec, cache_dir=tmp_path, download=False) == tmp_path / "test_model.pth"
    assert (tmp_path / "test_model.pth.sha256").read_text().startswith(spec.sha256)
    wrong = bytearray(payload)
    wrong[-100] ^= 1
    (tmp_path / "test_model.pth").write_bytes(bytes(wrong))
    os.utime(tmp_path / "test_model.pth.sha256", (1, 1))  # the sidecar is now older than the file
    with pytest.raises(WeightsError, match="not the official"):
        resolve_weights(spec, cache_dir=tmp_path)
    assert (tmp_path / "test_model.pth").exists()  # never deletes a file it did not download


def test_lock_blocks_then_stale_lock_is_taken_over(server, payload, tmp_path):
    server.state.files["/w.pth"] = payload
    spec = _spec([server.url + "/w.pth"], payload)
    lock = tmp_path / "test_model.pth.lock"
    lock.write_text("pid 1 elsewhere")
    with pytest.raises(WeightsError, match="another napari-medsam process"):
        download_weights(spec, tmp_path / "test_model.pth", lock_timeout=0.5)
    assert server.state.requests == []
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    assert download_weights(spec, tmp_path / "test_model.pth").read_bytes() == payload
    assert not lock.exists()


def test_two_concurrent_downloads_fetch_once(server, payload, tmp_path):
    server.state.files["/w.pth"] = payload
    server.state.delay = 0.05  # ~0.6 s in all, so the second caller finds the lock taken
    spec = _spec([server.url + "/w.pth"], payload)
    results: list[Path | Exception] = []

    def worker() -> None:
        try:
            results.append(resolve_weights(spec, cache_dir=tmp_path))
        except Exception as exc:  # pragma: no cover - reported by the assertion below
            results.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join(30)
    assert results == [tmp_path / "test_model.pth"] * 2
    assert len(server.state.requests) == 1
    assert (tmp_path / "test_model.pth").read_bytes() == payload


def test_tqdm_progress_adapter(capsys):
    bar = tqdm_progress("test download")
    for done in (0, 400, 1000):
        bar(done, 1000)
    bar(0, None)  # a restart with unknown size must not fail
    bar.close()
    err = capsys.readouterr().err
    assert "test download" in err and "100%" in err


# --- loading ----------------------------------------------------------------------------------


class _Evil:
    """Unpickling this would create a marker file: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("fmt", ["torch_zip", "raw_pickle"])
def test_malicious_pickle_is_refused_without_running_it(tmp_path, fmt):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    payload = {"image_encoder.x": torch.zeros(2), "trap": _Evil(marker)}
    if fmt == "torch_zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(WeightsError, match="refused") as info:
        load_state_dict(path)
    assert "tensors" in str(info.value)
    assert not marker.exists()


def test_wrappers_and_prefixes_are_unwrapped(tmp_path):
    sd = {"a.weight": torch.ones(2, 3), "b.bias": torch.zeros(4)}
    cases = {
        "plain": sd,
        "model": {"model": sd, "epoch": 3, "optimizer": {"lr": 1e-4}},
        "state_dict": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        "model_state_dict": {"model_state_dict": sd, "step": 10},
        "nested": {"model": {"state_dict": sd}},
    }
    for name, obj in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(obj, path)
        loaded = load_state_dict(path)
        assert list(loaded) == list(sd), name
        assert all(torch.equal(loaded[k], sd[k]) for k in sd), name
    torch.save({"config": {"depth": 12}, "note": "no tensors"}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="not tensors"):
        load_state_dict(tmp_path / "bad.pth")


def test_files_that_are_not_checkpoints(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"w": torch.randn(5000)}, good)
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.randn(5000)}, legacy, _use_new_zipfile_serialization=False)
    cases = {
        "page.pth": (b"<!DOCTYPE html><html>Sign in</html>", "HTML page: the download was probably a login"),
        "text.pth": (b"hello, I am text", "not a PyTorch checkpoint"),
        "empty.pth": (b"", "empty"),
        "trunc.pth": (good.read_bytes()[: good.stat().st_size // 2], "truncated or corrupt"),
        "trunc_legacy.pth": (legacy.read_bytes()[: legacy.stat().st_size // 2], "truncated or corrupt"),
    }
    for name, (data, needle) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(WeightsError, match=needle):
            load_state_dict(tmp_path / name)
    with pytest.raises(WeightsError, match="not found"):
        load_state_dict(tmp_path / "missing.pth")


# --- architecture checks and loading networks ---------------------------------------------------


def test_architecture_mismatch_names_the_real_model(golden_dir):
    vit_h_layout = expected_state("vit_h")  # shapes stand in for tensors
    with pytest.raises(WeightsError) as info:
        check_architecture(vit_h_layout, expected_state("vit_b"), "MedSAM ViT-B")
    message = str(info.value)
    assert "looks like a SAM ViT-H checkpoint, not MedSAM ViT-B" in message
    assert "280 unexpected (e.g. image_encoder.blocks.12." in message and "missing" not in message
    assert "wrong shape" in message and "image_encoder.pos_embed [1, 64, 64, 1280] instead of" in message
    with pytest.raises(WeightsError) as info:  # the other way round: blocks are missing
        check_architecture(expected_state("vit_b"), vit_h_layout, "SAM ViT-H")
    assert "280 missing" in str(info.value) and "looks like a SAM ViT-B / MedSAM ViT-B" in str(info.value)

    mobile = load_state_dict(golden_dir / "mobile_sam_random.pt")
    with pytest.raises(WeightsError, match="looks like a MobileSAM checkpoint, not LiteMedSAM"):
        check_architecture(mobile, expected_state("lite_tiny_vit"), "LiteMedSAM")
    check_architecture(mobile, expected_state("tiny_vit"), "MobileSAM")  # fits: no error

    depth2 = load_state_dict(golden_dir / "sam_vit_b_depth2_random.pth")
    with pytest.raises(WeightsError) as info:
        check_architecture(depth2, expected_state("vit_b"), "MedSAM ViT-B")
    message = str(info.value)
    assert "closest to SAM ViT-B / MedSAM ViT-B" in message and "not a standard checkpoint" in message
    assert "2 with the wrong shape" in message and "image_encoder.blocks.1.attn.rel_pos_h" in message

    junk = {"conv.weight": torch.zeros(3, 3)}
    with pytest.raises(WeightsError, match="does not look like a checkpoint of any model"):
        check_architecture(junk, expected_state("vit_b"), "SAM ViT-B")


def test_download_and_load_golden_mobile_sam(server, golden_dir, tmp_path):
    data = (golden_dir / "mobile_sam_random.pt").read_bytes()
    assert hashlib.sha256(data).hexdigest().startswith("faebdd74e9dfa371")  # golden README
    server.state.files["/weights/mobile_sam.pt"] = data
    server.state.drop_once_at = 25_000_000
    spec = dataclasses.replace(
        MODELS["mobile_sam"], urls=(server.url + "/weights/mobile_sam.pt",),
        size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
    )
    path = resolve_weights(spec, cache_dir=tmp_path)
    assert path.read_bytes() == data and server.state.requests[1][1] == "bytes=25000000-"
    net = load_network(spec, path, device="cpu")
    assert not net.training and net.image_size == 1024
    reference = torch.load(golden_dir / "mobile_sam_random.pt", map_location="cpu", weights_only=True)
    state = net.state_dict()
    assert list(state) == list(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    assert next(net.parameters()).device.type == "cpu"
    with pytest.raises(WeightsError, match="looks like a MobileSAM checkpoint"):
        load_network("lite_medsam", path)


def test_load_network_depth2_variant_by_spec(golden_dir):
    spec = dataclasses.replace(
        MODELS["sam_vit_b"], name="sam_vit_b_depth2", display_name="SAM ViT-B (depth 2)",
        arch_options=(("depth", 2), ("global_attn_indexes", (1,))),
    )
    path = golden_dir / "sam_vit_b_depth2_random.pth"
    net = load_network(spec, path)
    reference = load_state_dict(path)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in reference.items())
    with pytest.raises(WeightsError, match="do not fit SAM ViT-B"):
        load_network("sam_vit_b", path)


@pytest.mark.parametrize("wrong", ["other-bytes", "truncated"])
def test_a_wrong_file_from_one_url_moves_on_to_the_next(payload, tmp_path, wrong):
    """A mirror serving a bad copy (checksum or size mismatch) must not stop the download.

    (A short copy was already a URL failure when its length is announced; the checksum case is
    the one that used to stop at the first mirror.)"""
    bad = tmp_path / "mirror-a" / "w.pth"
    good = tmp_path / "mirror-b" / "w.pth"
    bad.parent.mkdir()
    good.parent.mkdir()
    bad.write_bytes(bytes(len(payload)) if wrong == "other-bytes" else payload[: len(payload) // 2])
    good.write_bytes(payload)
    spec = _spec([bad.as_uri(), good.as_uri()], payload)
    path = resolve_weights(spec, cache_dir=tmp_path / "cache")
    assert path.read_bytes() == payload
    assert _leftovers(tmp_path / "cache") == ["test_model.pth", "test_model.pth.sha256"]


def test_every_url_serving_a_wrong_file_is_named_in_the_error(payload, tmp_path):
    short = tmp_path / "a" / "w.pth"
    garbled = tmp_path / "b" / "w.pth"
    for path, data in ((short, payload[:1000]), (garbled, bytes(len(payload)))):
        path.parent.mkdir()
        path.write_bytes(data)
    spec = _spec([short.as_uri(), garbled.as_uri()], payload)
    with pytest.raises(WeightsError) as info:
        resolve_weights(spec, cache_dir=tmp_path / "cache")
    message = str(info.value)
    # A short file:// copy is caught by its length before it is read; the garbled one by its hash.
    assert f"{short.as_uri()} (" in message and f"1,000 bytes, expected {len(payload):,}" in message
    assert f"{garbled.as_uri()} (checksum mismatch" in message and spec.sha256 in message
    assert _leftovers(tmp_path / "cache") == []
