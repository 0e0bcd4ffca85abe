"""The plugin's keys and mouse actions: one table for the bindings, the panel's "Keys" help and the docs.

Light on purpose (no torch, no napari): the dock widget imports it at napari's start.
"""

from __future__ import annotations

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


def key_map_html() -> str:
    """The mouse actions and keys as a small HTML table, built from the bindings themselves."""
    rows = [*MOUSE_ACTIONS, *((qt_key_sequence(key), text) for key, (_, text) in SHORTCUTS.items()),
            *((qt_key_sequence(key), text) for key, (_, text) in VIEW_KEYS.items())]
    body = "".join(f"<tr><td><b>{k}</b>&nbsp;&nbsp;</td><td>{v}</td></tr>" for k, v in rows)
    return (f"<table>{body}</table><p>The keys work whichever layer is selected (other label, point "
            "and shape layers keep napari's own keys) and in this panel, except while a text field is edited.</p>")


def qt_key_sequence(key: str) -> str:
    """napari's key name ("Control-Shift-Z") as Qt's ("Ctrl+Shift+Z")."""
    return key.replace("Control", "Ctrl").replace("-", "+")
