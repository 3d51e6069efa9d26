"""Widget settings that outlive the napari session, kept by napari's plugin settings.

The manifest (``napari.yaml`` ``contributions.configurations``) declares them; napari
(>= 0.9) stores them in ``<napari config dir>/napari-amasam.yaml``, saves on every change and
shows them under Preferences. Widgets :func:`bind` their controls to a property; the model
picker keeps the recently used model folders (:func:`recent_models`, :func:`remember_model`).
Without napari's plugin settings (an older napari, or the plugin not registered) everything
here quietly does nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from qtpy.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QLineEdit, QSpinBox, QWidget

log = logging.getLogger(__name__)

# > 0 while a widget fills its controls with computed defaults (e.g. a backbone's): those
# changes are not the user's choices and are not saved
_defaults_being_applied = 0


@contextmanager
def applying_defaults() -> Iterator[None]:
    """Within this block, control changes are not saved as settings."""
    global _defaults_being_applied
    _defaults_being_applied += 1
    try:
        yield
    finally:
        _defaults_being_applied -= 1
PLUGIN = "napari-amasam"
#: How many model folders the picker remembers.
RECENT_MODELS = 8


def settings_group(name: str) -> Any | None:
    """The napari settings model of one configuration (``segment``, ``train``) or None."""
    try:
        from napari.settings import get_plugin_settings

        return getattr(get_plugin_settings(PLUGIN), name)
    except Exception as exc:  # no plugin settings in this napari / plugin not registered
        log.debug("no persistent settings: %s", exc)
        return None


def recent_models() -> list[str]:
    """Model folders used recently, newest first."""
    group = settings_group("segment")
    if group is None:
        return []
    return [line for line in str(group.recent_models).splitlines() if line.strip()]


def remember_model(folder: str) -> None:
    """Put ``folder`` first in the recent list (napari saves it at once)."""
    group = settings_group("segment")
    if group is None or not folder:
        return
    folders = [folder] + [f for f in recent_models() if f != folder]
    group.recent_models = "\n".join(folders[:RECENT_MODELS])


def _value(control: QWidget) -> Any:
    if isinstance(control, (QSpinBox, QDoubleSpinBox)):
        return control.value()
    if isinstance(control, QComboBox):
        return control.currentText()
    if isinstance(control, QCheckBox):
        return control.isChecked()
    return control.text()


def _apply(control: QWidget, value: Any) -> None:
    if isinstance(control, (QSpinBox, QDoubleSpinBox)):
        control.setValue(value)
    elif isinstance(control, QComboBox):
        index = control.findText(str(value))
        item = control.model().item(index) if index >= 0 and hasattr(control.model(), "item") else None
        if index >= 0 and (item is None or item.isEnabled()):
            control.setCurrentIndex(index)
    elif isinstance(control, QCheckBox):
        control.setChecked(bool(value))
    else:
        control.setText(str(value))


def _changed_signal(control: QWidget):
    if isinstance(control, (QSpinBox, QDoubleSpinBox)):
        return control.valueChanged
    if isinstance(control, QComboBox):
        return control.currentTextChanged
    if isinstance(control, QCheckBox):
        return control.toggled
    edit = control.edit if hasattr(control, "edit") else control  # PathPicker
    assert isinstance(edit, QLineEdit)
    return edit.textChanged


def bind(group_name: str, key: str, control: QWidget, unset: Any = None) -> None:
    """Load ``control``'s value from the setting (unless it equals ``unset``: keep the
    widget's own default) and save the setting whenever the control changes."""
    group = settings_group(group_name)
    if group is None:
        return
    stored = getattr(group, key)
    if stored != unset:
        _apply(control, stored)

    def save(*_: Any) -> None:
        if _defaults_being_applied:
            return
        try:
            setattr(group, key, _value(control))
        except Exception as exc:  # a value napari's model rejects: keep the old one
            log.debug("setting %s.%s not saved: %s", group_name, key, exc)

    _changed_signal(control).connect(save)
