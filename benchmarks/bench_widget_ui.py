"""How long the Segment widget blocks napari's UI thread per segmentation.

Segments the breast sample tiled to 512 px and 2048 px with the classical baseline in a
real napari window (threads on) and prints, side by side:

- the worst gap between 100 ms QTimer ticks on the UI thread during the whole job
  (what a user feels as a freeze);
- the per-nucleus table (``measure_nuclei``), which now runs in the worker: the UI-thread
  time it used to cost;
- ``write_nuclei_layer`` (what stays on the UI thread: handing arrays to napari).

Run under a display: ``PYTHONPATH=src xvfb-run -a .venv/bin/python
benchmarks/bench_widget_ui.py``.
"""

from __future__ import annotations

import os
import time

import numpy as np


def main() -> None:
    os.environ["NAPARI_AMASAM_NOTHREADS"] = "0"
    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_amasam._sample_data import load_sample
    from napari_amasam._widgets import SegmentWidget
    from napari_amasam._widgets._nuclei_layer import measure_nuclei, write_nuclei_layer

    image, _ = load_sample("monuseg_breast")
    viewer = napari.Viewer(show=False)
    widget = SegmentWidget(viewer)
    app = QApplication.instance()
    print(f"{'image':>8}{'nuclei':>8}{'worst UI gap s':>16}{'table s (worker)':>18}"
          f"{'layer write s (UI)':>20}")
    for side in (512, 2048):
        data = np.tile(image, (side // 512, side // 512, 1))
        layer = viewer.add_image(data, name=f"he{side}", rgb=True)
        widget.image_layer.setCurrentText(layer.name)
        ticks = []
        timer = QTimer()
        timer.setInterval(100)
        timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
        timer.start()
        job = widget.run()
        while job.running:
            app.processEvents()
            time.sleep(0.005)
        for _ in range(20):  # the result callback and napari's refresh
            app.processEvents()
            time.sleep(0.01)
        timer.stop()
        gaps = np.diff(ticks) if len(ticks) > 1 else np.array([0.0])
        labels = np.asarray(viewer.layers[f"he{side} nuclei"].data)
        start = time.perf_counter()
        features = measure_nuclei(labels, data)
        table = time.perf_counter() - start
        start = time.perf_counter()
        write_nuclei_layer(viewer, layer, labels.copy(), features, "classical")
        write = time.perf_counter() - start
        print(f"{side:>8}{labels.max():>8}{gaps.max():>16.3f}{table:>18.3f}{write:>20.3f}")
    viewer.close()


if __name__ == "__main__":
    main()
