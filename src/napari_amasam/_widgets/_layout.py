"""Layout pieces that keep three docked widgets inside a 1600 x 1000 window.

napari docks plugin widgets one above the other on the right; a widget's minimum height
adds to the window's, and napari saves the grown window for the next launch. So every
widget puts its controls in a :class:`ScrollableDock` (a scroll area that asks for little
height) and groups the less used controls in collapsed :class:`Section` s.
"""

from __future__ import annotations

from qtpy.QtCore import QSize, Qt
from qtpy.QtWidgets import QFormLayout, QFrame, QScrollArea, QVBoxLayout, QWidget
from superqt import QCollapsible

#: Height a docked widget asks for at least (pixels): three fit a 1000-px screen with
#: napari's layer list above them.
DOCK_MIN_HEIGHT = 160


class ScrollableDock(QWidget):
    """A dock widget whose controls (``self.content``, a ``QVBoxLayout`` in
    ``self.body``) scroll when the dock is shorter than they are."""

    def __init__(self) -> None:
        super().__init__()
        self.body = QWidget()
        self.content = QVBoxLayout(self.body)
        self.content.setContentsMargins(4, 4, 4, 4)
        self.scroll = QScrollArea()
        self.scroll.setWidgetResizable(True)
        self.scroll.setFrameShape(QFrame.NoFrame)
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.scroll.setWidget(self.body)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self.scroll)
        self.setMinimumHeight(DOCK_MIN_HEIGHT)

    def minimumSizeHint(self) -> QSize:  # noqa: N802 (Qt naming)
        return QSize(self.body.minimumSizeHint().width(), DOCK_MIN_HEIGHT)

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt naming)
        # Ask for the controls' height, capped: the scroll area handles the rest.
        hint = self.body.sizeHint()
        return QSize(hint.width(), min(hint.height(), 600))


class Section(QCollapsible):
    """A titled, collapsible group of form rows (``self.form``)."""

    def __init__(self, title: str, expanded: bool = True) -> None:
        super().__init__(title)
        inner = QWidget()
        self.form = QFormLayout(inner)
        self.form.setContentsMargins(8, 0, 0, 0)
        self.addWidget(inner)
        self.setDuration(0)  # no animation: sizes are final at once (and in tests)
        self._toggle_btn.setToolTip(f"Show or hide '{title}'")
        if expanded:
            self.expand(animate=False)
        else:
            self.collapse(animate=False)


def tip(widget: QWidget, text: str) -> QWidget:
    """Set ``widget``'s tooltip (and that of a PathPicker's parts); returns the widget."""
    widget.setToolTip(text)
    for part in ("edit", "button"):
        child = getattr(widget, part, None)
        if isinstance(child, QWidget):
            child.setToolTip(text)
    return widget
