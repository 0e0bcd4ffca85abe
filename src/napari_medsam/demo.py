"""`napari-medsam demo`: napari with a sample scan and the napari-medsam panel."""

from __future__ import annotations


def run_demo(path: str | None = None, sample: str = "ct", screenshot: str | None = None) -> int:
    """Open napari with a scan and the dock widget; block until the window closes."""
    import napari

    viewer = napari.Viewer(title="napari-medsam demo")
    if path:
        viewer.open(path, plugin="napari-medsam")
    else:
        viewer.open_sample("napari-medsam", "ct_phantom" if sample == "ct" else "mr_phantom")
    dock, _ = viewer.window.add_plugin_dock_widget("napari-medsam", "MedSAM")
    image = next((layer for layer in viewer.layers if layer._type_string == "image"), None)
    if image is not None:
        viewer.layers.selection.active = image
        # Start in the middle of the scan, where the organs are.
        viewer.dims.set_point(0, image.data_to_world([image.data.shape[0] // 2, 0, 0])[0])
    from qtpy.QtCore import Qt

    viewer.window._qt_window.resize(1500, 960)
    viewer.window._qt_window.resizeDocks([dock], [460], Qt.Horizontal)  # the panel's rows fit without scrolling sideways
    if screenshot:
        from qtpy.QtWidgets import QApplication

        QApplication.processEvents()
        viewer.screenshot(screenshot, canvas_only=False)
        viewer.close()
        return 0
    napari.run()
    return 0
