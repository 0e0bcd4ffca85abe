"""The wheel carries the manifest and napari finds the plugin when installed from it."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import build  # noqa: F401  (test extra: `python -m build` below needs it)
import hatchling  # noqa: F401  (test extra: the build backend, used without isolation)
import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# Top-level names napari-medsam may own inside a site directory: its package, its dist-info and
# the files an editable install leaves (hatchling's `_editable_impl_*.pth`, setuptools'
# `__editable__.*.pth` and `__editable___*_finder.py`). Used alongside the distribution's RECORD.
_OWN_NAME = re.compile(r"^(?:__editable__[._]+|_editable_impl_)?napari[_-]medsam(?:[-_.]|$)", re.IGNORECASE)


def test_package_manifest_is_a_link_to_the_top_level_file():
    inner = REPO / "src" / "napari_medsam" / "napari.yaml"
    assert inner.is_symlink()
    assert inner.resolve() == (REPO / "napari.yaml").resolve()


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def _is_checkout_source(path: Path) -> bool:
    """The checkout itself, its src/ (the editable install) or its tests/; not a venv inside it (.venv/)."""
    return path == REPO.resolve() or _inside(path, REPO / "src") or _inside(path, REPO / "tests")


def _own_entries() -> dict[Path, set[str]]:
    """For each folder holding files of an installed napari-medsam: the names of those files there."""
    owned: dict[Path, set[str]] = {}
    for dist in importlib.metadata.distributions(name="napari-medsam"):
        base = Path(dist.locate_file("")).resolve()
        for file in dist.files or ():
            parts = Path(file).parts
            if parts and parts[0] != "..":  # console scripts live outside the site folder
                owned.setdefault(base, set()).add(parts[0])
    return owned


def _dependency_path(scratch_path: list[str], shadow_root: Path) -> list[str]:
    """What the scratch interpreter must append to its sys.path to see this environment's packages.

    Taken from this interpreter's sys.path *after* site processing, so it holds exactly what the
    running tests import from, wherever it lives: the venv's own site-packages, the base
    interpreter's (for a venv with system site packages), the user site, folders added by .pth
    files or PYTHONPATH. Left out: the standard library (the scratch interpreter has its own, of
    the same base), the current directory and this checkout's own code (the editable install's
    `src/`, pytest's `tests/`); the project's `.venv/`, which lives inside the checkout, stays. A folder that holds napari-medsam's own files (the
    editable install's dist-info and .pth) is replaced by a "shadow" folder of symbolic links to
    everything else in it, so the only napari-medsam the scratch interpreter can find is the wheel.
    """
    owned = _own_entries()
    own_stdlib = {os.path.realpath(p) for p in scratch_path if p}
    out: list[str] = []
    seen: set[Path] = set()
    for entry in sys.path:
        if not entry or not os.path.exists(entry):
            continue
        path = Path(entry).resolve()
        if str(path) in own_stdlib or _is_checkout_source(path) or path in seen:
            continue
        seen.add(path)
        hidden = set(owned.get(path, ()))
        if path.is_dir():
            hidden |= {child.name for child in path.iterdir() if _OWN_NAME.match(child.name)}
        if not hidden:
            out.append(str(path))
            continue
        shadow = shadow_root / str(len(out))
        shadow.mkdir(parents=True)
        for child in path.iterdir():
            if child.name not in hidden:
                (shadow / child.name).symlink_to(child)
        out.append(str(shadow))
    return out


def _scratch_environment(root: Path) -> Path:
    """A venv that sees this environment's dependencies but neither this checkout nor its install.

    Not `venv --system-site-packages`: from inside a venv that gives the *base* interpreter's
    packages, not the running venv's. Instead a plain venv (no pip of its own, so no ensurepip is
    needed) gets one .pth file that appends the folders of `_dependency_path` to its sys.path,
    after its own site-packages, where the wheel goes. .pth files inside those folders are not run
    again: the paths they add are already in the list; only their import hooks are skipped.
    """
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    probe = subprocess.run(
        [str(python), "-c", "import json, sys, sysconfig; print(json.dumps([sys.path, sysconfig.get_path('purelib')]))"],
        check=True, capture_output=True, text=True, timeout=60, cwd=root, env=_scratch_env(),
    )
    own_path, purelib = json.loads(probe.stdout)
    folders = _dependency_path(own_path, root / "deps")
    # Idempotent: with a lib64 -> lib link the same site-packages can be processed twice.
    line = f"import sys; sys.path.extend(p for p in {folders!r} if p not in sys.path)\n"
    (Path(purelib) / "_running_test_environment.pth").write_text(line)
    return python


def _scratch_env() -> dict[str, str]:
    """This process's environment without PYTHONPATH (its useful entries are in the .pth already)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.mark.slow
def test_wheel_install_is_discovered_by_napari(tmp_path):
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(wheel_dir), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )
    wheel = next(wheel_dir.glob("napari_medsam-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert "napari_medsam/napari.yaml" in names
        assert archive.read("napari_medsam/napari.yaml") == (REPO / "napari.yaml").read_bytes()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "napari_medsam:napari.yaml" in archive.read(entry_points).decode()

    python = _scratch_environment(tmp_path)
    venv = python.parent.parent
    env = _scratch_env()
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert install.returncode == 0, install.stdout + install.stderr
    validate = subprocess.run([str(python), "-m", "npe2", "validate", "napari-medsam"],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert validate.returncode == 0, validate.stdout + validate.stderr
    assert "valid" in validate.stdout

    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.full((20, 20, 6), -1000, np.int16), np.diag([0.9, 0.9, 3.0, 1.0])), str(scan))
    code = textwrap.dedent(
        f"""
        import importlib.metadata, os, sys
        import napari, napari_medsam
        venv, repo = os.path.realpath({str(venv)!r}), os.path.realpath({str(REPO)!r})
        inside = lambda path, folder: os.path.realpath(path).startswith(folder + os.sep)
        # Exactly one napari-medsam, the wheel's, and nothing of the checkout on the path.
        assert inside(napari_medsam.__file__, venv), napari_medsam.__file__
        found = [str(d.locate_file("")) for d in importlib.metadata.distributions(name="napari-medsam")]
        assert len(found) == 1 and inside(found[0], venv), found
        assert not [p for p in sys.path if p and (inside(p, repo) or os.path.realpath(p) == repo)], sys.path
        viewer = napari.Viewer(show=False)
        layer = viewer.open({str(scan)!r}, plugin="napari-medsam")[0]
        print("OPENED", layer.data.shape, tuple(round(float(s), 3) for s in layer.scale))
        viewer.close()
        """
    )
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=180,
                            cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OPENED (6, 20, 20) (3.0, 0.9, 0.9)" in result.stdout
