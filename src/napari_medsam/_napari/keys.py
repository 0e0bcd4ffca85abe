"""The plugin's keys and mouse actions: one table for the bindings, the panel's "Keys" help and the docs.

Light on purpose (no torch, no napari): the dock widget imports it at napari's start.

The user may give the actions of :data:`SHORTCUTS` other keys in the settings file (``"keys"``:
action -> key, e.g. ``{"cycle_mask": "Shift-C"}``); :func:`load_shortcuts` reads them, and a key
that cannot be read, is kept for napari or the prompt layers, or clashes with another action's
key falls back to the action's default with a warning.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from ..volume import AXIS_NAMES  # noqa: F401  (re-exported for the panels)

# key -> (controller method, description). Bound on the scan's own layers (image, labels,
# prompts), on the viewer and on every other layer that has no editing keys of its own (see
# SegmentationController._bind_keys); the dock widget adds them as Qt shortcuts.
SHORTCUTS = {
    "Control-Z": ("undo", "undo the active object's last change"),
    "Control-Shift-Z": ("redo", "redo the active object's last undone change"),
    "N": ("next_object", "select the next object"),
    "Shift-N": ("previous_object", "select the previous object"),
    "M": ("new_object", "new object with the next free label value"),
    "C": ("cycle_mask", "show the next candidate mask of an ambiguous prompt"),
}

# key -> (plane, description): one-step views (planes.show_plane), bound on the viewer while the
# panel is open (MedSamWidget) and as Qt shortcuts in the panel. Not napari defaults (napari uses
# Alt with the arrow keys and Ctrl-Alt-T/Slash only).
VIEW_KEYS = {
    "Alt-A": ("axial", "axial view (anterior at the top)"),
    "Alt-C": ("coronal", "coronal view, head up"),
    "Alt-S": ("sagittal", "sagittal view, head up"),
}

# Mouse actions of the prompt layers, for the key map shown in the panel and the user guide.
MOUSE_ACTIONS = (
    ("click (points layer)", "include point"),
    ("right-click or Shift/Alt-click (points layer)", "exclude point"),
    ("R, then drag (boxes layer)", "box; a new box on a slice replaces the object's old one there"),
    ("drag a point or box (select mode)", "move it: predicted once, on release"),
    ("Delete / Backspace", "remove the selected prompts"),
)


# Keys the user may not give a plugin action: the prompt layers' and napari's own uses.
RESERVED_KEYS = {
    "R": "the boxes layer's rectangle tool",
    "Delete": "removing the selected prompts",
    "Backspace": "removing the selected prompts",
    "Space": "napari's pan and zoom while held",
    "Escape": "napari's cancel",
    **{key: f"the {plane} view" for key, (plane, _) in VIEW_KEYS.items()},
}

_MODIFIERS = {"control": "Control", "ctrl": "Control", "shift": "Shift", "alt": "Alt", "option": "Alt",
              "meta": "Meta", "cmd": "Meta", "command": "Meta", "super": "Meta"}
_MODIFIER_ORDER = ("Control", "Shift", "Alt", "Meta")  # napari's order
_NAMED_KEYS = {name.lower(): name for name in (
    "Space", "Enter", "Escape", "Backspace", "Delete", "Insert", "Home", "End", "PageUp", "PageDown",
    "Up", "Down", "Left", "Right")}
_NAMED_KEYS.update({"return": "Enter", "esc": "Escape", "del": "Delete"})
_PUNCTUATION = set(",./;'[]\\`=")


def normalize_key(text: Any) -> str:
    """A key as napari names it ("Control-Shift-Z"): modifiers joined by "-" or "+", in napari's order.

    Accepts "ctrl+shift+z", "Shift-C", "c", "F5", "PageUp"; raises ValueError with the reason otherwise.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError("a key is a text such as \"Shift-C\" or \"Control-Alt-K\"")
    parts = [part.strip() for part in re.split(r"[-+]", text.strip())]
    if any(not part for part in parts):
        raise ValueError("empty part: join modifiers and the key with \"-\" (\"-\" and \"+\" cannot be keys)")
    *mods, base = parts
    modifiers = set()
    for mod in mods:
        name = _MODIFIERS.get(mod.lower())
        if name is None:
            raise ValueError(f"{mod!r} is not a modifier (Control, Shift, Alt, Meta)")
        modifiers.add(name)
    if base.lower() in _MODIFIERS:
        raise ValueError("a modifier alone is not a key (Shift and Alt with a click make exclude points)")
    if len(base) == 1 and (base.isascii() and (base.isalnum() or base in _PUNCTUATION)):
        key = base.upper()
    elif re.fullmatch(r"[fF]([1-9]|1[0-2])", base):
        key = base.upper()
    elif base.lower() in _NAMED_KEYS:
        key = _NAMED_KEYS[base.lower()]
    else:
        raise ValueError(f"{base!r} is not a key this plugin can bind (a letter, digit, F1-F12, "
                         f"{', '.join(sorted(set(_NAMED_KEYS.values())))} or one of {''.join(sorted(_PUNCTUATION))})")
    return "-".join([*(m for m in _MODIFIER_ORDER if m in modifiers), key])


def resolve_shortcuts(overrides: Any) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """SHORTCUTS with the user's keys (action -> key) applied; and a warning per key not used.

    An unknown action, a key that :func:`normalize_key` refuses, a key of :data:`RESERVED_KEYS`
    or a key that two actions would share (changed ones go back to their defaults) is not used:
    that action keeps its default key. The result is ordered as SHORTCUTS.
    """
    defaults = {method: key for key, (method, _) in SHORTCUTS.items()}
    texts = {method: text for _, (method, text) in SHORTCUTS.items()}
    warnings: list[str] = []
    if not isinstance(overrides, Mapping):
        warnings.append(f"keys: expected a mapping of action to key, got {overrides!r}; using the default keys")
        overrides = {}
    chosen = dict(defaults)
    for action, key in overrides.items():
        if action not in defaults:
            warnings.append(f"keys: unknown action {action!r} (the actions are {', '.join(defaults)}); ignored")
            continue
        fallback = f"; {action} keeps {qt_key_sequence(defaults[action])}"
        try:
            normal = normalize_key(key)
        except ValueError as error:
            warnings.append(f"keys: {action} = {key!r} cannot be used: {error}{fallback}")
            continue
        if normal in RESERVED_KEYS:
            warnings.append(f"keys: {action} = {key!r} is kept for {RESERVED_KEYS[normal]}{fallback}")
            continue
        chosen[action] = normal
    while True:  # ends: every round puts at least one changed action back, and the defaults never clash
        owners: dict[str, list[str]] = {}
        for action, key in chosen.items():
            owners.setdefault(key, []).append(action)
        clashing = [(a, acts) for acts in owners.values() if len(acts) > 1 for a in acts if chosen[a] != defaults[a]]
        if not clashing:
            break
        for action, actions in clashing:
            others = ", ".join(a for a in actions if a != action)
            warnings.append(f"keys: {action} = {qt_key_sequence(chosen[action])!r} is also the key of {others}; "
                            f"{action} keeps {qt_key_sequence(defaults[action])}")
            chosen[action] = defaults[action]
    return {chosen[method]: (method, texts[method]) for method in defaults}, warnings


def load_shortcuts(settings: Any = None) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """The keys in use: SHORTCUTS with the ``"keys"`` of ``settings`` (else the settings file); and the warnings."""
    if settings is None:
        from .settings import Settings

        settings = Settings()
    return resolve_shortcuts(settings.get("keys", {}))


def key_map_html(shortcuts: Mapping[str, tuple[str, str]] | None = None, warnings: list[str] | None = None) -> str:
    """The mouse actions and keys as a small HTML table, built from the bindings themselves.

    ``shortcuts``: the keys in use; by default those of the settings file (with its warnings).
    """
    if shortcuts is None:
        shortcuts, found = load_shortcuts()
        warnings = found if warnings is None else warnings
    rows = [*MOUSE_ACTIONS, *((qt_key_sequence(key), text) for key, (_, text) in shortcuts.items()),
            *((qt_key_sequence(key), text) for key, (_, text) in VIEW_KEYS.items())]
    body = "".join(f"<tr><td><b>{k}</b>&nbsp;&nbsp;</td><td>{v}</td></tr>" for k, v in rows)
    notes = "".join(f"<p><b>Settings:</b> {_escape(w)}</p>" for w in warnings or ())
    return (f"<table>{body}</table><p>The keys work whichever layer is selected (other label, point "
            "and shape layers keep napari's own keys) and in this panel, except while a text field is edited. "
            "Change them with \"keys\" in the plugin's settings file (see the user guide).</p>" + notes)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def qt_key_sequence(key: str) -> str:
    """napari's key name ("Control-Shift-Z") as Qt's ("Ctrl+Shift+Z")."""
    return key.replace("Control", "Ctrl").replace("-", "+")
