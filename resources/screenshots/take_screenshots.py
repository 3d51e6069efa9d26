"""Take the README screenshots of the three widgets with real results.

Run under a virtual display::

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python resources/screenshots/take_screenshots.py \
        [--epochs 5] [--steps-per-epoch 30]

Writes ``train.png`` (after a real few-minute training run of the tiny_conv model on the
bundled demo data: MoNuSeg crops as primary, TNBC as auxiliary domain, with its live plot),
``segment.png`` (the held-out sample segmented by that model, features table filled) and
``evaluate.png`` (that result against the sample's ground truth, with false
positives/negatives marked) next to this script.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

# Jobs run synchronously so each screenshot shows a finished result.
os.environ.setdefault("NAPARI_AMASAM_NOTHREADS", "1")

import napari  # noqa: E402
from qtpy.QtWidgets import QApplication  # noqa: E402

HERE = Path(__file__).resolve().parent
DEMO = HERE.parent / "demo" / "data"
PLUGIN = "napari-amasam"


def settle(app: QApplication, rounds: int = 20) -> None:
    for _ in range(rounds):
        app.processEvents()


def only(docks: dict, name: str) -> None:
    for key, dock in docks.items():
        dock.setVisible(key == name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--steps-per-epoch", type=int, default=30)
    args = parser.parse_args()
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

    # ---- Train: a real run of the tiny_conv backbone (the widget's default without a GPU,
    # with its defaults from config.train_defaults) on the bundled demo data (MoNuSeg crops
    # as primary, TNBC as auxiliary domain), its live plot and status; shortened (default
    # 5 x 30 steps) so that the script takes minutes. The sample image shown is a held-out
    # MoNuSeg tile, never seen in training.
    train = widgets["Train"]
    train.primary.setText(str(DEMO / "monuseg_train"))
    train.refresh_primary()
    train.add_aux_folder(str(DEMO / "tnbc_aux"))
    train.backbone.setCurrentText("tiny_conv")
    train.epochs.setValue(args.epochs)
    train.steps_per_epoch.setValue(args.steps_per_epoch)
    train.mpp.setValue(0.25)  # MoNuSeg and TNBC are 40x
    train.device.setCurrentText("cpu")
    train.output.setText(str(work / "tiny_conv_model"))
    train.start()
    if train.last_error is not None:
        print(f"training failed: {train.last_error}", file=sys.stderr)
        return 1
    only(docks, "Train")
    settle(app)
    viewer.screenshot(str(HERE / "train.png"), canvas_only=False)

    # ---- Segment: the model just trained (the Segment widget selects it when training ends).
    segment = widgets["Segment nuclei"]
    segment.image_layer.setCurrentText("monuseg_breast")
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
