"""Take the README screenshots of the three widgets with real results.

Run under a virtual display::

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python resources/screenshots/take_screenshots.py

Writes ``train.png`` (after a short real training run of the tiny model on crops of the
bundled MoNuSeg sample, with its live plot), ``segment.png`` (the sample segmented by the
classical baseline, features table filled) and ``evaluate.png`` (that result against the
sample's ground truth, with false positives/negatives marked) next to this script.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

# Jobs run synchronously so each screenshot shows a finished result.
os.environ.setdefault("NAPARI_AMASAM_NOTHREADS", "1")

import imageio.v3 as iio  # noqa: E402
import napari  # noqa: E402
import tifffile  # noqa: E402
from qtpy.QtWidgets import QApplication  # noqa: E402

from napari_amasam._sample_data import load_sample  # noqa: E402

HERE = Path(__file__).resolve().parent
PLUGIN = "napari-amasam"


def settle(app: QApplication, rounds: int = 20) -> None:
    for _ in range(rounds):
        app.processEvents()


def write_primary(root: Path) -> Path:
    """Four 256x256 training pairs cropped from the bundled breast sample."""
    image, labels = load_sample("monuseg_breast")
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i, (y, x) in enumerate([(0, 0), (0, 256), (256, 0), (256, 256)]):
        iio.imwrite(root / "images" / f"crop{i}.png", image[y:y + 256, x:x + 256])
        tifffile.imwrite(root / "labels" / f"crop{i}.tif", labels[y:y + 256, x:x + 256])
    return root


def only(docks: dict, name: str) -> None:
    for key, dock in docks.items():
        dock.setVisible(key == name)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="amasam_screens_"))
    viewer = napari.Viewer(show=True, title="napari-amasam")
    app = QApplication.instance()
    window = viewer.window._qt_window
    window.resize(1600, 1000)
    viewer.open_sample(PLUGIN, "monuseg_breast")
    docks, widgets = {}, {}
    for name in ("Train", "Segment nuclei", "Evaluate"):
        docks[name], widgets[name] = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    settle(app)

    # ---- Train: a short real run of the tiny backbone, its plot and status.
    train = widgets["Train"]
    train.primary.setText(str(write_primary(work / "primary")))
    train.refresh_primary()
    train.backbone.setCurrentText("tiny")
    train.model_options = dict(tiny_embed_dim=32, tiny_depth=2, tiny_heads=2, tiny_global_attn=(1,))
    train.image_size.setValue(128)
    train.epochs.setValue(4)
    train.steps_per_epoch.setValue(4)
    train.batch_size.setValue(2)
    train.lr.setValue(1e-3)
    train.device.setCurrentText("cpu")
    train.output.setText(str(work / "tiny_model"))
    train.start()
    if train.last_error is not None:
        print(f"training failed: {train.last_error}", file=sys.stderr)
        return 1
    only(docks, "Train")
    settle(app)
    viewer.screenshot(str(HERE / "train.png"), canvas_only=False)

    # ---- Segment: the classical baseline on the sample (the tiny model is not trained enough
    # to show meaningful nuclei; it is offered in the model list after the run above).
    segment = widgets["Segment nuclei"]
    segment.image_layer.setCurrentText("monuseg_breast")
    segment.model.setCurrentText("classical")
    segment.run()
    if segment.last_error is not None:
        print(f"segmentation failed: {segment.last_error}", file=sys.stderr)
        return 1
    viewer.layers["monuseg_breast ground truth"].visible = False
    nuclei = viewer.layers["monuseg_breast nuclei"]
    viewer.layers.selection.active = nuclei
    only(docks, "Segment nuclei")
    settle(app)
    viewer.screenshot(str(HERE / "segment.png"), canvas_only=False)

    # ---- Evaluate: that prediction against the ground truth; FP/FN layer on top.
    evaluate = widgets["Evaluate"]
    evaluate._refresh_layers()
    evaluate.prediction.setCurrentText("monuseg_breast nuclei")
    evaluate.ground_truth.setCurrentText("monuseg_breast ground truth")
    metrics = evaluate.evaluate()
    if metrics is None:
        print(f"evaluation failed: {evaluate.last_error}", file=sys.stderr)
        return 1
    nuclei.visible = False
    only(docks, "Evaluate")
    settle(app)
    viewer.screenshot(str(HERE / "evaluate.png"), canvas_only=False)
    print("dice {dice:.3f} aji {aji:.3f} pq {pq:.3f}".format(**metrics))
    for name in ("train", "segment", "evaluate"):
        print(HERE / f"{name}.png")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
