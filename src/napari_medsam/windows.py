"""CT window presets (level, width in HU), shared by the display and the model input mapping."""

from __future__ import annotations

# name -> (level, width). Soft tissue / abdomen is the default view of a CT.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft tissue": (40.0, 400.0),
    "liver": (30.0, 150.0),
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}


def window_limits(name: str) -> tuple[float, float]:
    """(low, high) HU of a named window preset."""
    try:
        level, width = CT_WINDOWS[name]
    except KeyError:
        raise KeyError(f"unknown window {name!r}; choose one of {', '.join(CT_WINDOWS)}") from None
    return level - width / 2.0, level + width / 2.0
