"""Take the documentation screenshots of the real napari window (run under xvfb-run).

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshots.py docs/images
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(out: Path) -> None:
    """Save docs/images/demo.png: the CT phantom, its organ labels and the panel."""
    import napari
    from qtpy.QtWidgets import QApplication

    out.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer(title="napari-medsam")
    image, truth = viewer.open_sample("napari-medsam", "ct_phantom")
    truth.visible = True
    _, widget = viewer.window.add_plugin_dock_widget("napari-medsam", "MedSAM")
    viewer.layers.selection.active = image
    viewer.window._qt_window.resize(1400, 860)
    viewer.dims.set_point(0, image.data_to_world([30, 0, 0])[0])
    QApplication.processEvents()
    viewer.screenshot(str(out / "demo.png"), canvas_only=False)
    viewer.close()


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/images"))
