"""Drive a real napari window the way a user does: mouse events on the vispy canvas, Qt key events.

The events go in where Qt would deliver them (the vispy SceneCanvas's mouse events and the
canvas widget's key events), so napari's own dispatch runs: the active layer's mode callbacks,
its drag generators and the keymap chain.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def canvas_pos(viewer, layer, data_coord: Sequence[float]) -> np.ndarray:
    """Canvas pixel (x, y) of a data coordinate of ``layer`` on the slice shown."""
    canvas = viewer.window._qt_viewer.canvas
    view = canvas.view
    transform = view.transform * view.scene.transform
    world = layer.data_to_world(list(data_coord))
    vertical, horizontal = viewer.dims.displayed[-2:]
    return np.asarray(transform.map([world[horizontal], world[vertical]])[:2], float)


def _scene(viewer):
    return viewer.window._qt_viewer.canvas._scene_canvas


def press(viewer, pos, modifiers: Iterable[str] = (), button: int = 1):
    """A mouse press; ``button`` 1 is the left button, 2 the right one."""
    from vispy.app.canvas import MouseEvent

    _scene(viewer).events.mouse_press(pos=tuple(pos), modifiers=tuple(modifiers), button=button)
    return MouseEvent(type="mouse_press", pos=tuple(pos), modifiers=tuple(modifiers), button=button)


def move(viewer, pos, press_event, modifiers: Iterable[str] = (), last_event=None):
    """A mouse move with the button held; returns the event (the next move's ``last_event``)."""
    from vispy.app.canvas import MouseEvent

    _scene(viewer).events.mouse_move(pos=tuple(pos), modifiers=tuple(modifiers), button=1, buttons=[1],
                                     press_event=press_event, last_event=last_event or press_event)
    return MouseEvent(type="mouse_move", pos=tuple(pos), modifiers=tuple(modifiers), button=1, buttons=[1])


def release(viewer, pos, press_event, modifiers: Iterable[str] = (), button: int = 1):
    _scene(viewer).events.mouse_release(pos=tuple(pos), modifiers=tuple(modifiers), button=button,
                                        press_event=press_event)


def drag(viewer, layer, start: Sequence[float], end: Sequence[float], *, steps: int = 8, qtbot=None,
         modifiers: Iterable[str] = (), during=None) -> None:
    """Press at data coordinate ``start``, move in ``steps`` steps to ``end``, release there.

    ``during()`` is called after the last move, before the release (to look at the state mid-drag).
    """
    a, b = canvas_pos(viewer, layer, start), canvas_pos(viewer, layer, end)
    event = press(viewer, a, modifiers)
    last = None
    for t in np.linspace(0, 1, steps + 1)[1:]:
        last = move(viewer, a + (b - a) * t, event, modifiers, last)
        if qtbot is not None:
            qtbot.wait(1)
        else:
            from qtpy.QtWidgets import QApplication

            QApplication.processEvents()
    if during is not None:
        during()
    release(viewer, b, event, modifiers)


def click(viewer, layer, where: Sequence[float], modifiers: Iterable[str] = (), button: int = 1) -> None:
    """Press and release at data coordinate ``where`` (``button`` 2: a right-click)."""
    pos = canvas_pos(viewer, layer, where)
    event = press(viewer, pos, modifiers, button)
    release(viewer, pos, event, modifiers, button)


def key(viewer, qt_key, modifier=None, widget=None) -> None:
    """A Qt key click on the canvas (or on ``widget``), as the keyboard delivers it."""
    from qtpy.QtCore import Qt
    from qtpy.QtTest import QTest

    target = widget if widget is not None else viewer.window._qt_viewer.canvas.native
    QTest.keyClick(target, qt_key, modifier if modifier is not None else Qt.KeyboardModifier.NoModifier)
