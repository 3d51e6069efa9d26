"""A small live line plot drawn with QPainter (no plotting library needed)."""

from __future__ import annotations

import math

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget


class CurvePlot(QWidget):
    """Line plot of named curves that grow point by point.

    Parameters
    ----------
    title : str
        Drawn above the axes.
    x_label : str
        Name of the x axis (e.g. ``step``, ``epoch``).
    y_range : tuple of float, optional
        Fixed y limits (e.g. ``(0, 1)`` for metrics); None: fit the data.
    """

    COLOURS = ("#e8743b", "#19a979", "#5899da", "#ed4a7b", "#945ecf")

    def __init__(self, title: str, x_label: str, y_range: tuple[float, float] | None = None,
                 parent: QWidget | None = None):
        super().__init__(parent)
        self.title = title
        self.x_label = x_label
        self.y_range = y_range
        self.curves: dict[str, list[tuple[float, float]]] = {}
        self.setMinimumHeight(130)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Expanding)

    def clear(self) -> None:
        self.curves.clear()
        self.update()

    def add_point(self, name: str, x: float, y: float) -> None:
        """Append ``(x, y)`` to curve ``name`` (NaN/inf values are skipped)."""
        if y is None or not math.isfinite(float(y)):
            return
        self.curves.setdefault(name, []).append((float(x), float(y)))
        self.update()

    def _limits(self) -> tuple[float, float, float, float]:
        points = [p for curve in self.curves.values() for p in curve]
        xs = [p[0] for p in points] or [0.0, 1.0]
        ys = [p[1] for p in points] or [0.0, 1.0]
        x0, x1 = min(xs), max(xs)
        if x1 <= x0:
            x0, x1 = x0 - 0.5, x0 + 0.5
        if self.y_range is not None:
            y0, y1 = self.y_range
        else:
            y0, y1 = min(ys), max(ys)
            pad = 0.05 * (y1 - y0) if y1 > y0 else 0.5
            y0, y1 = y0 - pad, y1 + pad
        return x0, x1, y0, y1

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        painter = QPainter(self)
        painter.setRenderHint(QPainter.Antialiasing)
        palette = self.palette()
        foreground = palette.color(palette.WindowText)
        painter.fillRect(self.rect(), palette.color(palette.Base))
        font_h = painter.fontMetrics().height()
        left, right, top, bottom = 44, 8, font_h + 6, font_h + 8
        area = QRectF(left, top, max(10, self.width() - left - right),
                      max(10, self.height() - top - bottom))
        x0, x1, y0, y1 = self._limits()

        painter.setPen(QPen(foreground))
        painter.drawText(QRectF(0, 2, self.width(), font_h), Qt.AlignHCenter, self.title)
        painter.drawRect(area)
        # Axis limits as tick labels: enough to read a trend without a plotting library.
        painter.drawText(QRectF(0, area.top() - font_h / 2, left - 4, font_h),
                         Qt.AlignRight | Qt.AlignVCenter, f"{y1:.3g}")
        painter.drawText(QRectF(0, area.bottom() - font_h / 2, left - 4, font_h),
                         Qt.AlignRight | Qt.AlignVCenter, f"{y0:.3g}")
        painter.drawText(QRectF(area.left(), area.bottom() + 2, area.width(), font_h),
                         Qt.AlignLeft, f"{x0:g}")
        painter.drawText(QRectF(area.left(), area.bottom() + 2, area.width(), font_h),
                         Qt.AlignHCenter, self.x_label)
        painter.drawText(QRectF(area.left(), area.bottom() + 2, area.width(), font_h),
                         Qt.AlignRight, f"{x1:g}")

        def to_screen(x: float, y: float) -> QPointF:
            fx = (x - x0) / (x1 - x0)
            fy = (y - y0) / (y1 - y0)
            return QPointF(area.left() + fx * area.width(), area.bottom() - fy * area.height())

        legend_y = area.top() + 4
        for index, (name, points) in enumerate(self.curves.items()):
            colour = QColor(self.COLOURS[index % len(self.COLOURS)])
            painter.setPen(QPen(colour, 2))
            screen = [to_screen(x, y) for x, y in points]
            for a, b in zip(screen[:-1], screen[1:], strict=True):
                painter.drawLine(a, b)
            for p in screen if len(screen) < 30 else screen[-1:]:
                painter.drawEllipse(p, 2.5, 2.5)
            last = points[-1][1] if points else float("nan")
            painter.drawText(QRectF(area.left() + 6, legend_y, area.width() - 12, font_h),
                             Qt.AlignRight, f"{name} {last:.3f}")
            legend_y += font_h
        painter.end()


class TrainingPlot(QWidget):
    """Training loss per step (top) and validation Dice/AJI per epoch (bottom)."""

    def __init__(self, parent: QWidget | None = None):
        from qtpy.QtWidgets import QVBoxLayout

        super().__init__(parent)
        self.loss = CurvePlot("training loss", "step")
        self.metrics = CurvePlot("validation", "epoch", y_range=(0.0, 1.0))
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.loss)
        layout.addWidget(self.metrics)

    def clear(self) -> None:
        self.loss.clear()
        self.metrics.clear()

    def add_record(self, record: dict) -> None:
        """Plot a trainer record (``train``: loss; ``val``: dice and aji)."""
        if record.get("stage") == "train":
            self.loss.add_point("loss", record["step"], record["loss"])
        elif record.get("stage") == "val":
            metrics = record.get("metrics", {})
            for key in ("dice", "aji"):
                if key in metrics:
                    self.metrics.add_point(key, record["epoch"], metrics[key])
