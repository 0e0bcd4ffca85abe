"""The dock widget's user settings, kept between napari sessions as a small JSON file.

File: ``platformdirs.user_config_dir("napari-medsam")/settings.json``, or ``settings.json`` in
the folder named by ``$NAPARI_MEDSAM_CONFIG_DIR``. Every change is written at once and
atomically (a temporary file in the same folder, then ``os.replace``), after re-reading the
file so that two napari windows do not undo each other's changes. A missing, unreadable or
corrupt file never stops napari: it is logged, the defaults are used, and the broken file is
left as it is until a setting actually changes. Values of the wrong type (a hand-edited file)
read as the default.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import platformdirs

__all__ = ["DEFAULTS", "ENV_VAR", "Settings", "config_dir", "settings_path"]

log = logging.getLogger(__name__)

ENV_VAR = "NAPARI_MEDSAM_CONFIG_DIR"
FILENAME = "settings.json"

# The keys the dock widget uses, with the value used when a key is not set.
DEFAULTS: dict[str, Any] = {
    "model": "",  # registry name; "" = the recommended model for this machine
    "device": "auto",  # "auto", "cpu", "cuda", "cuda:N" or "mps"
    "backend": "auto",  # encoder backend: "auto" (float32), "bf16" or "int8" (models/backends.py)
    "cache_dir": "",  # weights folder; "" = the default cache (or $NAPARI_MEDSAM_WEIGHTS_DIR)
    "window": "soft tissue",  # CT window preset name (display)
    "mapping": "",  # model input intensity mapping; "" = the panel's default
    "overwrite": False,
    "propagation_engine": "",  # "slice" or "memory" (SAM 2 models only); "" = memory for SAM 2 models
    "checkpoints": {},  # model name -> local weight file chosen by the user
    "refine_from_logits": False,  # a new click refines the slice's last mask (SAM's low-res logits as mask prompt)
    "keys": {},  # controller action -> key, overriding keys.SHORTCUTS (e.g. {"cycle_mask": "Shift-C"})
    "concept_model": "",  # concept (text prompt) model: registry name, "local" (concept_checkpoint) or "" (default)
    "concept_checkpoint": "",  # a local EfficientSAM3 checkpoint chosen by the user
    "concept_vocabulary": "",  # a local CLIP BPE vocabulary file ("": the cached/downloaded one)
    "concept_threshold": 0.5,  # detection score threshold of the Find by name box
    "prefetch": True,  # embed the neighbours of the slice shown while idle (controller.PREFETCH_RADIUS each side)
}
_TYPES: dict[str, type | tuple[type, ...]] = {key: type(value) for key, value in DEFAULTS.items()}
_MISSING = object()


def config_dir() -> Path:
    """The settings folder: ``$NAPARI_MEDSAM_CONFIG_DIR``, else the user config folder."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_config_dir("napari-medsam"))


def settings_path() -> Path:
    """Where the settings file is (or will be) stored."""
    return config_dir() / FILENAME


def _read(path: Path) -> dict[str, Any] | None:
    """The file's settings; {} when there is no file; None (logged) when it cannot be used."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("napari-medsam: cannot read the settings file %s (%s); using the defaults", path, exc)
        return None
    try:
        data = json.loads(text)
    except ValueError as exc:
        log.warning("napari-medsam: the settings file %s is corrupt (%s); using the defaults", path, exc)
        return None
    if not isinstance(data, dict):
        log.warning("napari-medsam: the settings file %s does not hold a JSON object; using the defaults", path)
        return None
    return data


class Settings:
    """Persistent key/value settings: loaded on construction, saved atomically on every change."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else settings_path()
        data = _read(self.path)
        self.broken = data is None  # the file exists but could not be used
        self._data: dict[str, Any] = data or {}

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """The stored value of ``key``; else ``default``; else the built-in default (or None)."""
        fallback = DEFAULTS.get(key) if default is _MISSING else default
        if key not in self._data:
            return _copy(fallback)
        value = self._data[key]
        expected = _TYPES.get(key)
        if expected is not None and (not isinstance(value, expected) or (expected is int and isinstance(value, bool))):
            log.warning("napari-medsam: ignoring setting %r = %r (expected %s)", key, value, expected.__name__)
            return _copy(fallback)
        return _copy(value)

    def set(self, key: str, value: Any) -> None:
        """Store ``value`` (JSON-serialisable) under ``key`` and save the file at once."""
        json.dumps(value)  # a TypeError here leaves the settings unchanged
        if key in self._data and self._data[key] == value and not self.broken:
            return
        fresh = _read(self.path) if not self.broken else None
        merged = dict(self._data if fresh is None else fresh)
        merged[key] = _copy(value)
        self._data = merged
        self.save()

    def as_dict(self) -> dict[str, Any]:
        """A copy of everything stored (without the built-in defaults)."""
        return _copy(self._data)

    def save(self) -> bool:
        """Write the settings atomically; a failure is logged, not raised. Return whether it worked."""
        from ..errors import MedSamError
        from ..io.atomic import atomic_output

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output(self.path) as tmp:
                tmp.write_text(json.dumps(self._data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        except (OSError, MedSamError) as exc:
            log.warning("napari-medsam: cannot save the settings to %s (%s)", self.path, exc)
            return False
        self.broken = False
        return True


def _copy(value: Any) -> Any:
    """A deep copy of a JSON value, so callers cannot change the stored settings by accident."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value
