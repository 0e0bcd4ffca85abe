"""Transfer machinery behind :mod:`napari_medsam.models.weights`: the lock file and one URL's fetch.

Private: the public entry points are ``resolve_weights`` and ``download_weights``.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Union

from .. import __version__
from ..errors import DownloadCancelled, WeightsError
from .registry import ModelSpec

ProgressCallback = Callable[[int, Union[int, None]], None]
CancelFlag = Union[Callable[[], bool], threading.Event, None]

_CHUNK = 1 << 20
_LOCK_STALE_S = 120.0  # a lock not refreshed for this long belongs to a dead process
_HEARTBEAT_S = 5.0
_MAX_STALLS = 3  # attempts in a row that make no progress before a URL is given up



class UrlFailed(Exception):
    """One URL could not deliver the file; another URL of the spec may still work."""


def _cancelled(cancel: CancelFlag) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def sha256_file(path: str | os.PathLike[str], cancel: CancelFlag = None) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            if _cancelled(cancel):
                raise DownloadCancelled(f"hashing {path} was cancelled")
            digest.update(chunk)
    return digest.hexdigest()


def head_bytes(path: Path) -> bytes:
    """The first 64 bytes of a file (enough to tell a checkpoint from an error page)."""
    with open(path, "rb") as fh:
        return fh.read(64)


def is_html(head: bytes) -> bool:
    """Whether a file's first bytes look like an HTML page."""
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<")


# --- the lock --------------------------------------------------------------------------------


class DownloadLock:
    """``<file>.lock`` made with O_EXCL; refreshed while held, taken over once stale."""

    def __init__(self, path: Path, cancel: CancelFlag, timeout: float | None, on_wait: Callable[[], None]):
        self.path = path
        self.cancel = cancel
        self.timeout = timeout
        self.on_wait = on_wait
        self._beat = 0.0

    def __enter__(self) -> DownloadLock:
        start = time.monotonic()
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as fh:
                    fh.write(f"pid {os.getpid()} on {socket.gethostname()} at {time.time():.0f}\n")
                self._beat = time.monotonic()
                return self
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                continue
            if age > _LOCK_STALE_S:
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            if _cancelled(self.cancel):
                raise DownloadCancelled("cancelled while waiting for another download of the same file")
            if self.timeout is not None and time.monotonic() - start > self.timeout:
                raise WeightsError(
                    f"another napari-medsam process is downloading this file (lock {self.path}); "
                    f"wait for it to finish, or delete the lock file if no download is running"
                )
            self.on_wait()
            time.sleep(0.2)

    def heartbeat(self) -> None:
        """Refresh the lock's time stamp so waiting processes know the download is alive."""
        if time.monotonic() - self._beat >= _HEARTBEAT_S:
            try:
                os.utime(self.path)
            except OSError:
                pass
            self._beat = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


# --- one URL ---------------------------------------------------------------------------------


def _content_range_start(value: str | None) -> tuple[int | None, int | None]:
    match = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value or "")
    if not match:
        return None, None
    total = None if match.group(2) == "*" else int(match.group(2))
    return int(match.group(1)), total


def _hash_prefix(part: Path, cancel: CancelFlag) -> Any:
    digest = hashlib.sha256()
    with open(part, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            if _cancelled(cancel):
                raise DownloadCancelled("cancelled")
            digest.update(chunk)
    return digest


def fetch(
    url: str,
    part: Path,
    spec: ModelSpec,
    progress: ProgressCallback | None,
    cancel: CancelFlag,
    lock: DownloadLock,
    timeout: float,
) -> tuple[str, int]:
    """Stream ``url`` into ``part`` (resuming what is there); return (sha256 hex, size)."""
    stalls = 0
    use_range = True
    while True:
        have = part.stat().st_size if part.exists() else 0
        if have and (is_html(head_bytes(part)) or (spec.size_bytes and have > spec.size_bytes)):
            part.unlink()  # an error page or an oversized leftover is no base to resume from
            have = 0
        if have and spec.size_bytes and have == spec.size_bytes:
            return _hash_prefix(part, cancel).hexdigest(), have
        request = urllib.request.Request(
            url, headers={"User-Agent": f"napari-medsam/{__version__}", "Accept-Encoding": "identity"}
        )
        if have and use_range:
            request.add_header("Range", f"bytes={have}-")
        try:
            response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:  # our .part does not fit the file any more: start over
                part.unlink()
                continue
            raise UrlFailed(f"HTTP {exc.code} {exc.reason}") from exc
        except urllib.error.URLError as exc:
            raise UrlFailed(str(exc.reason)) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise UrlFailed(str(exc) or type(exc).__name__) from exc
        with response:
            status = response.status or 200  # file:// responses carry no status
            if "text/html" in (response.headers.get("Content-Type") or "").lower():
                raise UrlFailed("the server sent an HTML page (a login, quota or virus-scan page?) instead of the file")
            if status == 206:
                start, total = _content_range_start(response.headers.get("Content-Range"))
                if start != have:
                    use_range = False  # a range we did not ask for: fetch the whole file instead
                    continue
                digest, mode = _hash_prefix(part, cancel), "ab"
            else:  # 200: no Range was sent, or the server ignored it -> start from zero
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                have, digest, mode = 0, hashlib.sha256(), "wb"
            if total is not None and spec.size_bytes and total != spec.size_bytes:
                raise UrlFailed(f"the server's file has {total:,} bytes, expected {spec.size_bytes:,}")
            total = total or spec.size_bytes
            done, dropped = have, None
            with open(part, mode) as fh:
                try:
                    while True:
                        if _cancelled(cancel):
                            raise DownloadCancelled(
                                f"download of {spec.filename} cancelled; {done:,} bytes are kept in "
                                f"{part} and the next download resumes from there"
                            )
                        try:
                            chunk = response.read(_CHUNK)
                        except (OSError, http.client.HTTPException) as exc:
                            dropped = str(exc) or type(exc).__name__
                            break
                        if not chunk:
                            break
                        fh.write(chunk)  # an OSError here (disk full) is not the server's fault
                        digest.update(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(done, total)
                        lock.heartbeat()
                except KeyboardInterrupt:
                    raise DownloadCancelled(
                        f"download of {spec.filename} interrupted; {done:,} bytes are kept in {part} "
                        "and the next download resumes from there"
                    ) from None
        if total is not None and done < total and dropped is None:
            dropped = f"the connection closed after {done:,} of {total:,} bytes"
        if dropped is None:
            return digest.hexdigest(), done
        stalls = 0 if done > have else stalls + 1
        if stalls >= _MAX_STALLS:
            raise UrlFailed(f"the download kept breaking off ({dropped})")
        # otherwise loop: resume from what arrived, with a Range request
