"""Pieces the three widgets share: the trained-model registry, pickers, messages, progress."""

from __future__ import annotations

import logging
from pathlib import Path

from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QWidget,
)

log = logging.getLogger(__name__)


class TrainedModels(QObject):
    """Model folders trained in this session; the Segment widget offers each new one.

    ``added`` is emitted with the folder path (str) when a training run finishes with a
    loadable model. One instance per process (:data:`trained_models`) so that a Train widget
    and a Segment widget docked separately still meet.
    """

    added = Signal(str)

    def __init__(self) -> None:
        super().__init__()
        self.folders: list[str] = []

    def add(self, folder: str | Path) -> None:
        folder = str(folder)
        if folder not in self.folders:
            self.folders.append(folder)
        self.added.emit(folder)


_registry: TrainedModels | None = None


def trained_models() -> TrainedModels:
    """The process-wide :class:`TrainedModels` (created on first use, after QApplication)."""
    global _registry
    if _registry is None:
        _registry = TrainedModels()
    return _registry


class PathPicker(QWidget):
    """A line edit with a Browse button (folder, file to open, or file to save)."""

    def __init__(self, mode: str = "folder", caption: str = "Choose", filter: str = "",
                 placeholder: str = "", parent: QWidget | None = None):
        super().__init__(parent)
        self.mode, self.caption, self.filter = mode, caption, filter
        self.edit = QLineEdit()
        self.edit.setPlaceholderText(placeholder)
        self.button = QPushButton("Browse…")
        self.button.clicked.connect(self.browse)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.edit)
        layout.addWidget(self.button)

    def browse(self) -> None:
        start = self.edit.text() or str(Path.home())
        if self.mode == "folder":
            path = QFileDialog.getExistingDirectory(self, self.caption, start)
        elif self.mode == "save":
            path, _ = QFileDialog.getSaveFileName(self, self.caption, start, self.filter)
        else:
            path, _ = QFileDialog.getOpenFileName(self, self.caption, start, self.filter)
        if path:
            self.edit.setText(path)
            self.edit.editingFinished.emit()

    def text(self) -> str:
        return self.edit.text().strip()

    def setText(self, text: str) -> None:  # noqa: N802 (Qt naming)
        self.edit.setText(str(text))


def device_combo() -> QComboBox:
    """auto/cuda/mps/cpu; devices this machine lacks are listed but disabled."""
    from ..device import DEVICE_CHOICES, available_devices

    combo = QComboBox()
    available = set(available_devices()) | {"auto"}
    for name in DEVICE_CHOICES:
        combo.addItem(name)
        if name not in available:
            item = combo.model().item(combo.count() - 1)
            item.setEnabled(False)
            item.setToolTip(f"{name} is not available on this machine")
    return combo


def notify(message: str, error: bool = False) -> None:
    """Show a napari notification (and log it), never raising from a UI callback."""
    try:
        from napari.utils.notifications import show_error, show_info

        (show_error if error else show_info)(message)
    except Exception:  # pragma: no cover - notifications need a running napari
        log.warning(message)


def report_error(widget: QWidget, exc: BaseException) -> None:
    """A widget's error path: keep ``exc`` as ``widget.last_error``, show it in
    ``widget.status`` and as a napari notification."""
    widget.last_error = exc
    widget.status.setText(f"error: {exc}")
    notify(str(exc), error=True)


class Progress:
    """A napari progress bar that accepts totals late and closes once."""

    def __init__(self, description: str):
        from napari.utils import progress

        self._bar = progress(total=0, desc=description)
        self._done = 0

    def update_to(self, done: int, total: int, description: str | None = None) -> None:
        if total and self._bar.total != total:
            self._bar.total = total
        if done > self._done:
            self._bar.update(done - self._done)
            self._done = done
        if description:
            self._bar.set_description(description)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def end_job(widget: QWidget, run_button: QPushButton) -> None:
    """What every widget does when its job ends (done, failed or cancelled): close the
    progress bar in ``widget._progress``, enable ``run_button``, disable
    ``widget.cancel_button``."""
    progress = getattr(widget, "_progress", None)
    if progress is not None:
        progress.close()
    widget._progress = None
    run_button.setEnabled(True)
    widget.cancel_button.setEnabled(False)
