"""Evaluate widget: a prediction vs a ground-truth Labels layer -> metrics + error layer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFormLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
)

from ._common import report_error
from ._layout import ScrollableDock, tip

if TYPE_CHECKING:
    import napari

#: Rows of the metrics table: (metric key, label shown).
METRIC_ROWS = (
    ("dice", "Dice"),
    ("aji", "AJI"),
    ("aji_plus", "AJI+"),
    ("pq", "PQ"),
    ("dq", "DQ (detection quality)"),
    ("sq", "SQ (segmentation quality)"),
    ("dice2", "Dice2 (object Dice)"),
    ("f1", "Detection F1"),
)
#: Values of the error layer.
FALSE_POSITIVE, FALSE_NEGATIVE = 1, 2


def match_nuclei(gt: np.ndarray, pred: np.ndarray, iou: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Which nuclei are matched one-to-one (IoU above ``iou``, as PQ counts them).

    Parameters
    ----------
    gt, pred : (H, W) integer arrays
        Instance maps, 0 = background.
    iou : float
        Matching threshold (see ``metrics.match_instances``).

    Returns
    -------
    unmatched_pred, unmatched_gt : 1-D int arrays
        Ids of false-positive predictions and of false-negative (missed) ground-truth nuclei.
    """
    from ..metrics import match_instances

    gt = np.asarray(gt).astype(np.int64, copy=False)
    pred = np.asarray(pred).astype(np.int64, copy=False)
    matched_gt, matched_pred = match_instances(gt, pred, iou)
    unmatched_pred = np.setdiff1d(pred, np.append(matched_pred, 0))
    unmatched_gt = np.setdiff1d(gt, np.append(matched_gt, 0))
    return unmatched_pred, unmatched_gt


def error_map(gt: np.ndarray, pred: np.ndarray, iou: float = 0.5) -> tuple[np.ndarray, int, int]:
    """``(H, W) uint8``: 1 = false-positive prediction, 2 = missed ground truth; and both counts.

    Where a missed nucleus and a false positive overlap (typically one prediction merging
    several nuclei), the missed nucleus is drawn on top, so both stay visible.
    """
    fp_ids, fn_ids = match_nuclei(gt, pred, iou)
    errors = np.zeros(np.shape(gt), dtype=np.uint8)
    errors[np.isin(pred, fp_ids)] = FALSE_POSITIVE
    errors[np.isin(gt, fn_ids)] = FALSE_NEGATIVE
    return errors, len(fp_ids), len(fn_ids)


class EvaluateWidget(ScrollableDock):
    """Compare a predicted Labels layer with a ground-truth one."""

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.metrics: dict[str, float] = {}
        self.last_error: BaseException | None = None
        form = QFormLayout()
        self.prediction = tip(QComboBox(), "The Labels layer to score (default: the newest "
                              "'<image> nuclei' layer)")
        self.ground_truth = tip(QComboBox(), "The reference Labels layer (default: a layer "
                                "named '... ground truth')")
        form.addRow("Prediction", self.prediction)
        form.addRow("Ground truth", self.ground_truth)
        self.content.addLayout(form)
        self.evaluate_button = tip(QPushButton("Evaluate"), "Score the prediction and add a "
                                   "layer marking false positives and missed nuclei")
        self.evaluate_button.clicked.connect(self.evaluate)
        self.content.addWidget(self.evaluate_button)
        self.table = tip(QTableWidget(0, 2), "Dice, AJI, PQ and detection counts (IoU 0.5)")
        self.table.setHorizontalHeaderLabels(["metric", "value"])
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setVerticalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.verticalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.content.addWidget(self.table)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.content.addWidget(self.status)
        self.content.addStretch(1)
        self._fit_table()
        self._refresh_layers()
        self.viewer.layers.events.inserted.connect(self._layer_inserted)
        self.viewer.layers.events.removed.connect(self._refresh_layers)

    def _fit_table(self) -> None:
        """Make the table exactly as tall as its rows (the dock scrolls, not the table)."""
        table = self.table
        table.resizeRowsToContents()
        rows = sum(table.rowHeight(i) for i in range(table.rowCount()))
        header = table.horizontalHeader().sizeHint().height()
        table.setFixedHeight(rows + header + 2 * table.frameWidth() + 2)

    def _labels_names(self) -> list[str]:
        from napari.layers import Labels

        return [layer.name for layer in self.viewer.layers
                if isinstance(layer, Labels) and not layer.name.endswith(" errors")]

    def _layer_inserted(self, event: Any = None) -> None:
        self._refresh_layers()
        layer = getattr(event, "value", None)
        # A new segmentation becomes the prediction to score.
        if layer is not None and _is_prediction(layer.name) and \
                self.prediction.findText(layer.name) >= 0:
            self.prediction.setCurrentText(layer.name)

    def _refresh_layers(self, *_: Any) -> None:
        names = self._labels_names()
        truths = [n for n in names if "ground truth" in n]
        predictions = [n for n in names if _is_prediction(n)]
        for combo in (self.ground_truth, self.prediction):
            current = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(names)
            if current in names:
                combo.setCurrentText(current)
            elif combo is self.ground_truth and truths:
                combo.setCurrentText(truths[0])
            elif combo is self.prediction:
                # the newest segmentation, else any layer but the ground truth's
                others = [n for n in names if n != self.ground_truth.currentText()]
                choice = (predictions or others or [""])[-1]
                combo.setCurrentIndex(combo.findText(choice))
            combo.blockSignals(False)

    def evaluate(self) -> dict[str, float] | None:
        """Fill the table and add/update the ``<prediction> errors`` layer; returns the metrics."""
        from ..metrics import evaluate_pair

        pred_name, gt_name = self.prediction.currentText(), self.ground_truth.currentText()
        if not pred_name or not gt_name:
            return self._fail(ValueError("choose a prediction and a ground-truth Labels layer"))
        if pred_name == gt_name:
            return self._fail(ValueError(
                f"{pred_name}: prediction and ground truth are the same layer; pick two"))
        pred_layer, gt_layer = self.viewer.layers[pred_name], self.viewer.layers[gt_name]
        pred, gt = np.asarray(pred_layer.data), np.asarray(gt_layer.data)
        if pred.shape != gt.shape:
            return self._fail(ValueError(
                f"{pred_name}: shape {pred.shape} differs from {gt_name} {gt.shape}"))
        try:
            metrics = {k: float(v) for k, v in evaluate_pair(gt, pred).items()}
        except Exception as exc:
            return self._fail(exc)
        errors, n_fp, n_fn = error_map(gt, pred)
        self.metrics = metrics
        rows = [(label, metrics[key]) for key, label in METRIC_ROWS if key in metrics]
        rows += [("false positives", n_fp), ("false negatives", n_fn)]
        self.table.setRowCount(len(rows))
        for i, (label, value) in enumerate(rows):
            self.table.setItem(i, 0, QTableWidgetItem(label))
            text = f"{value:.4f}" if isinstance(value, float) else str(value)
            self.table.setItem(i, 1, QTableWidgetItem(text))
        self.table.resizeColumnsToContents()
        self._fit_table()
        self._write_error_layer(pred_layer, errors)
        self.status.setText(f"{n_fp} false positives (magenta), {n_fn} missed nuclei (cyan)")
        return metrics

    def _write_error_layer(self, pred_layer, errors: np.ndarray):
        name = f"{pred_layer.name} errors"
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            layer.data = errors
            return layer
        from napari.utils.colormaps import DirectLabelColormap

        colormap = DirectLabelColormap(color_dict={
            None: "transparent", 0: "transparent",
            FALSE_POSITIVE: "magenta", FALSE_NEGATIVE: "cyan"})
        return self.viewer.add_labels(
            errors, name=name, colormap=colormap, opacity=0.8,
            scale=tuple(pred_layer.scale), translate=tuple(pred_layer.translate),
            units=pred_layer.units,
            metadata={"values": {FALSE_POSITIVE: "false positive", FALSE_NEGATIVE: "false negative"}})

    def _fail(self, exc: BaseException) -> None:
        report_error(self, exc)


def _is_prediction(name: str) -> bool:
    """``<image> nuclei`` and its numbered copies (``<image> nuclei (2)``)."""
    import re

    return re.search(r" nuclei( \(\d+\))?$", name) is not None
