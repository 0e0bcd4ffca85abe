"""Finding weight files: the user's own file, the download cache, or a fresh verified download.

Cache: ``platformdirs.user_cache_dir("napari-medsam")/weights``, or the folder named by the
environment variable ``NAPARI_MEDSAM_WEIGHTS_DIR``, or a ``cache_dir`` argument. A download
streams into ``<file>.part`` (resumed with an HTTP Range request after an interruption), is
checked against the registry's size and SHA-256 where those are known, and only then is moved
into place with ``os.replace``; the hash is always written beside it as ``<file>.sha256``. A
``<file>.lock`` created with O_EXCL keeps two processes from downloading the same file at once.

Only the standard library is used for HTTP (urllib), so ``file://`` URLs work as well.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import platformdirs

from ._download import (
    CancelFlag,
    DownloadCancelled,
    ProgressCallback,
    UrlFailed,
    DownloadLock,
    fetch,
    head_bytes,
    is_html,
    sha256_file,
)
from .checkpoint import WeightsError, describe_non_checkpoint
from .registry import ModelSpec, get_model

__all__ = [
    "ENV_VAR",
    "DownloadCancelled",
    "ProgressCallback",
    "cached_path",
    "download_weights",
    "is_cached",
    "resolve_file",
    "resolve_weights",
    "sha256_file",
    "tqdm_progress",
    "weights_dir",
]

ENV_VAR = "NAPARI_MEDSAM_WEIGHTS_DIR"


def weights_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The weight cache folder: ``override``, else ``$NAPARI_MEDSAM_WEIGHTS_DIR``, else the user cache."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("napari-medsam")) / "weights"


def cached_path(name: str | ModelSpec, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the cache keeps (or will keep) the weight file of model ``name``."""
    spec = get_model(name)
    if spec.local_path:  # a user's own (fine-tuned) model: its file where it is
        return Path(spec.local_path)
    return weights_dir(cache_dir) / spec.filename


def partial_path(dest: str | os.PathLike[str]) -> Path:
    """The file an unfinished download of ``dest`` is kept in (the next download resumes it)."""
    dest = Path(dest)
    return dest.with_name(dest.name + ".part")


def is_cached(name: str | ModelSpec, cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """Whether the weight file is already in the cache (cheap: no hashing)."""
    return cached_path(name, cache_dir).is_file()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _write_sidecar(path: Path, hexdigest: str) -> None:
    tmp = path.with_name(path.name + ".sha256.tmp")
    try:
        tmp.write_text(f"{hexdigest}  {path.name}\n", encoding="ascii")
        os.replace(tmp, _sidecar(path))
    except OSError:
        pass  # the sidecar only saves re-hashing later; a read-only folder is not an error


def _read_sidecar(path: Path) -> str | None:
    side = _sidecar(path)
    try:
        if side.stat().st_mtime < path.stat().st_mtime:
            return None  # the weight file changed after it was hashed
        text = side.read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError):
        return None
    if text and re.fullmatch(r"[0-9a-f]{64}", text[0]):
        return text[0]
    return None


# --- download and resolve ----------------------------------------------------------------------


# How a caller hands over a weight file of its own, as error messages name it. The default speaks
# to Python and panel users; the CLI passes its own flag (``--checkpoint FILE``).
API_OWN_FILE_HINT = (
    "weights=FILE in SamModel.from_checkpoint, path=FILE in resolve_weights, or \"Choose file...\" in the panel"
)


def _place_hint(spec: ModelSpec, target: Path, own_file_hint: str | None = None) -> str:
    return (
        f"Download {spec.filename} yourself (from {spec.urls[0]} or via {spec.homepage}) and put it at "
        f"{target}; or use a copy you already have where it is ({own_file_hint or API_OWN_FILE_HINT}); "
        f"or set {ENV_VAR} to a folder that contains {spec.filename}."
    )


def download_weights(
    spec: ModelSpec,
    dest: str | os.PathLike[str],
    *,
    progress: ProgressCallback | None = None,
    cancel: CancelFlag = None,
    timeout: float = 30.0,
    lock_timeout: float | None = None,
    own_file_hint: str | None = None,
) -> Path:
    """Download ``spec``'s weights to ``dest`` (trying each URL in turn) and verify them.

    ``own_file_hint`` says, in the caller's terms, how to use a local copy instead (it appears in
    the error raised when every URL fails); the default names the Python API and the panel.
    """
    dest = Path(dest)
    part = partial_path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsError(
            f"cannot create the weights folder {dest.parent} ({exc.strerror or exc}); set {ENV_VAR} "
            "to a writable folder"
        ) from exc

    def report_waiting() -> None:
        if progress is not None and part.exists():
            progress(part.stat().st_size, spec.size_bytes)

    tried: list[str] = []
    with DownloadLock(dest.with_name(dest.name + ".lock"), cancel, lock_timeout, report_waiting) as lock:
        if dest.is_file():
            return dest  # another process finished it while we waited
        for url in spec.urls:
            try:
                hexdigest, size = fetch(url, part, spec, progress, cancel, lock, timeout)
            except UrlFailed as exc:
                tried.append(f"{url} ({exc})")
                continue
            except OSError as exc:  # writing the .part failed: disk full, permissions, ...
                raise WeightsError(
                    f"cannot write {part} ({exc.strerror or exc}); free some disk space or set "
                    f"{ENV_VAR} to another folder"
                ) from exc
            if is_html(head_bytes(part)):
                part.unlink()
                tried.append(f"{url} (it sent an HTML page, not the file)")
                continue
            # A wrong file from one server (a truncated transfer, a changed upload) is deleted and
            # the next URL is tried; only when every URL failed is it an error, naming each failure.
            if spec.size_bytes is not None and size != spec.size_bytes:
                part.unlink()
                tried.append(f"{url} (it sent {size:,} bytes, expected {spec.size_bytes:,}; deleted)")
                continue
            if spec.sha256 is not None and hexdigest != spec.sha256:
                part.unlink()
                tried.append(f"{url} (checksum mismatch: SHA-256 {hexdigest}, expected {spec.sha256}; deleted)")
                continue
            os.replace(part, dest)
            _write_sidecar(dest, hexdigest)
            return dest
    raise WeightsError(
        f"could not download the {spec.display_name} weights ({spec.name}); tried: "
        + "; ".join(tried) + ". " + _place_hint(spec, dest, own_file_hint)
    )


def _check_cached(spec: ModelSpec, target: Path, cancel: CancelFlag, own_file_hint: str | None = None) -> Path:
    size = target.stat().st_size
    problem = describe_non_checkpoint(head_bytes(target))
    if problem:
        raise WeightsError(f"the cached weight file {target} is unusable: {problem}. Delete it and try again.")
    if spec.size_bytes is not None and size != spec.size_bytes:
        raise WeightsError(
            f"the cached weight file {target} has {size:,} bytes, but {spec.display_name} has "
            f"{spec.size_bytes:,}; it is incomplete or a different file. Delete it and try again."
        )
    recorded = _read_sidecar(target)
    if recorded is None:
        recorded = sha256_file(target, cancel)  # once; the sidecar spares this next time
        _write_sidecar(target, recorded)
    if spec.sha256 is not None and recorded != spec.sha256:
        raise WeightsError(
            f"the cached weight file {target} is not the official {spec.display_name} file (SHA-256 "
            f"{recorded}, expected {spec.sha256}). Delete it to download the right one, or name it "
            f"as your own weight file ({own_file_hint or API_OWN_FILE_HINT}) to use it anyway."
        )
    return target


def resolve_weights(
    name: str | ModelSpec,
    path: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    progress: ProgressCallback | None = None,
    cancel: CancelFlag = None,
    cache_dir: str | os.PathLike[str] | None = None,
    timeout: float = 30.0,
    own_file_hint: str | None = None,
) -> Path:
    """The weight file to load for model ``name``: ``path`` if given, else the cache, downloading if needed.

    ``own_file_hint`` is how error messages tell the user to pass a file of their own, in the
    caller's terms (the CLI: ``"--checkpoint FILE"``); by default they name ``path=``/``weights=``
    of the Python API and the panel's "Choose file..." button.
    """
    spec = get_model(name)
    if path is None and spec.local_path:  # a registered fine-tuned model: never downloaded, never cached
        own = Path(spec.local_path)
        if not own.is_file():
            raise WeightsError(f"the checkpoint {own} of {spec.display_name} is missing; save it again or "
                               "remove its registration (napari_medsam.models.local.models_dir())")
        return own
    return resolve_file(spec, path, download=download, progress=progress, cancel=cancel, cache_dir=cache_dir,
                        timeout=timeout, own_file_hint=own_file_hint)


def resolve_file(
    spec,
    path: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    progress: ProgressCallback | None = None,
    cancel: CancelFlag = None,
    cache_dir: str | os.PathLike[str] | None = None,
    timeout: float = 30.0,
    own_file_hint: str | None = None,
    checkpoint: bool = True,
) -> Path:
    """The file of a registry entry (a point/box model's ``ModelSpec`` via :func:`resolve_weights`, or a
    ``registry.FileSpec``: a concept model, the CLIP vocabulary): ``path`` if given, else the cache,
    downloading if needed.

    ``checkpoint=False`` for files that are not PyTorch checkpoints (the vocabulary): only their size and
    SHA-256 are checked.
    """
    if path is not None:
        local = Path(path).expanduser()
        if not local.is_file():
            raise WeightsError(f"the file {local} for {spec.display_name} does not exist or is not a file")
        problem = describe_non_checkpoint(head_bytes(local)) if checkpoint else None
        if problem:
            raise WeightsError(f"{local} cannot be used as {spec.display_name} weights: {problem}.")
        return local  # the user's own file is used where it is; its layout is checked on loading
    target = weights_dir(cache_dir) / spec.filename
    if target.is_file():
        if checkpoint:
            return _check_cached(spec, target, cancel, own_file_hint)
        recorded = _read_sidecar(target) or sha256_file(target, cancel)
        _write_sidecar(target, recorded)
        if spec.sha256 is not None and recorded != spec.sha256:
            raise WeightsError(f"the cached file {target} is not the official {spec.display_name} (SHA-256 {recorded}, "
                               f"expected {spec.sha256}). Delete it to download the right one.")
        return target
    if not download:
        raise WeightsError(f"the {spec.display_name} ({spec.filename}) is not on this computer and downloading is "
                           "switched off. " + _place_hint(spec, target, own_file_hint))
    return download_weights(spec, target, progress=progress, cancel=cancel, timeout=timeout,
                            own_file_hint=own_file_hint)


class _TqdmProgress:
    """A progress callback that draws a tqdm bar on stderr (for the CLI)."""

    def __init__(self, desc: str, factory=None) -> None:
        self.desc = desc
        self._factory = factory  # a tqdm-like class (napari's progress in the UI); None = tqdm on stderr
        self._bar = None
        self._shown = 0

    def __call__(self, done: int, total: int | None) -> None:
        if self._bar is None:
            options = dict(total=total, desc=self.desc, unit="B", unit_scale=True, unit_divisor=1024)
            if self._factory is None:
                from tqdm import tqdm

                self._bar = tqdm(**options, file=sys.stderr, leave=True)
            else:
                self._bar = self._factory(**options)
        elif total is not None and self._bar.total != total:
            self._bar.total = total
        if done < self._shown:  # a restart from zero (the server ignored a resume request)
            self._bar.reset(total=total)
            self._shown = 0
        self._bar.update(done - self._shown)
        self._shown = done
        if total is not None and done >= total:
            self.close()

    def close(self) -> None:
        """Finish the bar (safe to call more than once)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._shown = 0


def tqdm_progress(desc: str) -> _TqdmProgress:
    """A ``progress(done_bytes, total_bytes)`` callback drawing a tqdm bar on stderr."""
    return _TqdmProgress(desc)
