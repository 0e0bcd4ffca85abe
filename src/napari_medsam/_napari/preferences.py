"""Point napari's reader preferences at napari-medsam for the scan formats it reads with geometry.

Why this exists: napari's builtin reader lists ``*.nii``, ``*.nii.gz``, ``*.nrrd``, ``*.mha``,
``*.dcm``... among the patterns it accepts (its list comes from imageio), and it accepts every
folder. So for these files napari sees two readers and, with no preference saved, File > Open
(``QtViewer._qt_open`` -> ``ViewerModel._open_or_raise_error``) shows the "Choose reader" dialog,
where the builtin reader comes first; it then fails, or reads voxels without their geometry.
napari skips the dialog when ``get_settings().plugins.extension2reader`` has a pattern matching
the file (``napari.plugins.utils.get_preferred_reader``).

What it does: when napari activates the plugin (npe2 calls the manifest's ``on_activate`` the
first time any napari-medsam command runs: reader, panel, sample data or writer), every reader
pattern of our manifest that the user has made no choice for gets ``pattern -> napari-medsam``.
"No choice" means: no existing key equal to the pattern and no existing key that matches a file
of that pattern (a ``*.gz`` saved from the dialog covers ``*.nii.gz``), compared without case.
Existing entries are never changed. Each pattern is considered once per napari settings file:
the patterns handled are remembered in ``reader_preferences.json`` in napari-medsam's config
folder, so an entry the user removes in Preferences > Plugins stays removed. Folders get no
pattern: napari matches folders by name only, and a catch-all ``*/`` would take every folder
away from the other readers.

Nothing here imports torch or Qt; napari's settings are only touched when napari is running.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

__all__ = ["PLUGIN_NAME", "activate", "install_reader_preferences", "reader_patterns"]

log = logging.getLogger(__name__)

PLUGIN_NAME = "napari-medsam"
MARKER_FILENAME = "reader_preferences.json"
_MARKER_KEY = "handled"
# Marker key for napari settings that live only in memory (nothing persists between sessions).
_IN_MEMORY = ""


def activate(context: Any = None) -> None:
    """npe2 ``on_activate`` hook. Never raises: a failure here must not disable the plugin."""
    try:
        added = install_reader_preferences()
    except Exception:  # noqa: BLE001 - napari must keep working whatever happens here
        log.warning("napari-medsam: could not update napari's reader preferences", exc_info=True)
        return
    if added:
        log.info("napari-medsam: napari now opens %s with napari-medsam", ", ".join(added))


def reader_patterns() -> list[str]:
    """The filename patterns of this plugin's reader, as declared in the installed manifest."""
    from npe2 import PluginManager, PluginManifest

    try:
        manifest = PluginManager.instance().get_manifest(PLUGIN_NAME)
    except KeyError:  # not discovered by this process's plugin manager (yet)
        manifest = PluginManifest.from_distribution(PLUGIN_NAME)
    patterns: list[str] = []
    for reader in manifest.contributions.readers or ():
        patterns.extend(p for p in reader.filename_patterns if p not in patterns)
    return patterns


def install_reader_preferences(
    settings: Any = None, patterns: Iterable[str] | None = None, marker_path: str | Path | None = None
) -> list[str]:
    """Add ``pattern -> napari-medsam`` for the patterns the user has no preference for.

    ``settings`` defaults to napari's global settings (left alone when napari is not imported),
    ``patterns`` to the manifest's reader patterns, ``marker_path`` to the file in napari-medsam's
    config folder. Returns the patterns added, in order.
    """
    if settings is None:
        if "napari.settings" not in sys.modules:
            return []  # not inside napari: its preferences are none of our business
        from napari.settings import get_settings

        settings = get_settings()
    wanted = reader_patterns() if patterns is None else list(patterns)

    marker = _marker(marker_path)
    key = _settings_key(settings)
    handled = set(_handled(marker, key)) if key != _IN_MEMORY else set()

    current = dict(settings.plugins.extension2reader)
    added = [p for p in wanted if p not in handled and not _user_covers(p, current)]
    if added:
        # One assignment of a new dict: napari emits one change event and saves its file once
        # (the same way its own reader dialog and Preferences page store a choice).
        settings.plugins.extension2reader = {**current, **{p: PLUGIN_NAME for p in added}}
    if key != _IN_MEMORY and not set(wanted) <= handled:
        table = _table(marker)
        table[key] = sorted(handled | set(wanted))
        marker.set(_MARKER_KEY, table)
    return added


def _user_covers(pattern: str, preferences: dict[str, str]) -> bool:
    """Whether an existing preference already decides which reader opens files of ``pattern``."""
    example = pattern.replace("*", "scan").replace("?", "x").lower()
    for existing in preferences:
        if existing.lower() == pattern.lower() or fnmatchcase(example, existing.lower()):
            return True
    return False


def _settings_key(settings: Any) -> str:
    """Which napari settings file these preferences live in ('' when only in memory)."""
    path = getattr(settings, "config_path", None)
    if not isinstance(path, (str, Path)) or not str(path):
        return _IN_MEMORY
    return str(Path(path).expanduser().resolve())


def _marker(marker_path: str | Path | None):
    from .settings import Settings, config_dir

    return Settings(marker_path if marker_path is not None else config_dir() / MARKER_FILENAME)


def _table(marker) -> dict[str, list[str]]:
    table = marker.get(_MARKER_KEY, {})
    return table if isinstance(table, dict) else {}


def _handled(marker, key: str) -> list[str]:
    value = _table(marker).get(key, [])
    return [p for p in value if isinstance(p, str)] if isinstance(value, list) else []
