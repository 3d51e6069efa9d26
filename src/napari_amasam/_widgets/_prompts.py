"""Segment widget section: correct nuclei with SAM-style prompts.

A Points layer ``<image> prompts`` (positive / negative points) and a Shapes layer
``<image> prompt box`` (rectangles) sit on the image. Each new positive point, negative
point or box re-segments the current nucleus with all prompts on the layers through
``inference.prompting.PromptSession`` (the model's prompt encoder and decoder on the cached
image embedding, in a worker) and writes it into the nuclei layer as one undoable edit:
a new id, or, when the first positive point falls on an existing nucleus, that nucleus
re-segmented. "Next nucleus" clears the prompts so the next ones start a new object.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtWidgets import QCheckBox, QComboBox, QHBoxLayout, QPushButton

from ._layout import Section, tip
from ._nuclei_layer import make_room_for, write_nuclei_layer

if TYPE_CHECKING:
    from ._segment import SegmentWidget
    from ._workers import Job

POSITIVE, NEGATIVE = "positive", "negative"


class PromptSection(Section):
    """Prompt layers, point type, auto-run and the buttons (collapsed at first)."""

    def __init__(self, owner: SegmentWidget):
        super().__init__("Correct with prompts (model only)", expanded=False)
        self.owner = owner
        self._session: Any = None
        self._session_key: tuple | None = None
        self._current: tuple[str, int] | None = None  # (nuclei layer name, id being edited)
        self._pending = False
        self.last_commit: dict | None = None
        self.add_layers_button = tip(QPushButton("Add prompt layers"),
                                     "Add a Points layer (click: point prompt) and a Shapes "
                                     "layer (draw a rectangle: box prompt) on the image")
        self.add_layers_button.clicked.connect(lambda: self.add_prompt_layers())
        self.point_type = tip(QComboBox(), "Kind of the next point: positive (this is the "
                              "nucleus) or negative (not part of it)")
        self.point_type.addItems([POSITIVE, NEGATIVE])
        self.point_type.currentTextChanged.connect(self._point_type_changed)
        self.auto = tip(QCheckBox("segment on each prompt"),
                        "Re-segment the nucleus as soon as a point or box is added")
        self.auto.setChecked(True)
        self.segment_button = tip(QPushButton("Segment nucleus"),
                                  "Segment the nucleus from the current prompts")
        self.segment_button.clicked.connect(lambda: self.segment_prompt())
        self.next_button = tip(QPushButton("Next nucleus"),
                               "Keep this nucleus and clear the prompts for the next one")
        self.next_button.clicked.connect(self.next_nucleus)
        row = QHBoxLayout()
        row.addWidget(self.segment_button)
        row.addWidget(self.next_button)
        self.form.addRow(self.add_layers_button)
        self.form.addRow("Next point", self.point_type)
        self.form.addRow(self.auto)
        self.form.addRow(row)

    # ------------------------------------------------------------------------- layers
    def model_changed(self, classical: bool) -> None:
        for control in (self.add_layers_button, self.segment_button):
            control.setEnabled(not classical)

    def forget_session(self) -> None:
        self._session, self._session_key = None, None

    def _names(self) -> tuple[str, str]:
        image = self.owner.image_layer.currentText()
        return f"{image} prompts", f"{image} prompt box"

    def prompt_layers(self):
        """``(points layer, shapes layer)`` of the chosen image (None where missing)."""
        layers = self.owner.viewer.layers
        points, box = self._names()
        return (layers[points] if points in layers else None,
                layers[box] if box in layers else None)

    def add_prompt_layers(self):
        """Create (or return) the prompt layers on the chosen image."""
        owner = self.owner
        image_layer = owner.current_image_layer()
        if image_layer is None:
            owner.show_error(ValueError("choose an image layer first"))
            return None, None
        points, box = self.prompt_layers()
        space = dict(scale=tuple(image_layer.scale[-2:]),
                     translate=tuple(image_layer.translate[-2:]),
                     units=tuple(image_layer.units[-2:]))
        names = self._names()
        if points is None:
            points = owner.viewer.add_points(
                np.zeros((0, 2)), name=names[0], features={"prompt": np.array([], dtype=object)},
                feature_defaults={"prompt": self.point_type.currentText()},
                face_color="prompt", face_color_cycle=["lime", "red"], size=8, **space)
            points.events.data.connect(self._prompt_added)
        if box is None:
            box = owner.viewer.add_shapes(name=names[1], edge_color="yellow", face_color="transparent",
                                          edge_width=2, **space)
            box.events.data.connect(self._prompt_added)
        points.mode = "add"
        owner.viewer.layers.selection.active = points
        return points, box

    def _point_type_changed(self, kind: str) -> None:
        points, _ = self.prompt_layers()
        if points is not None:
            points.feature_defaults = {"prompt": kind}

    def _prompt_added(self, event) -> None:
        action = str(getattr(event, "action", "added")).lower()
        if self.auto.isChecked() and action.endswith("added"):
            self.segment_prompt()

    def current_prompt(self):
        """The prompts on the layers as an ``inference.prompting.Prompt`` (pixel coords)."""
        from ..inference.prompting import Prompt

        points_layer, box_layer = self.prompt_layers()
        image_layer = self.owner.current_image_layer()
        points = np.zeros((0, 2))
        positive = np.zeros(0, bool)
        if points_layer is not None and len(points_layer.data):
            points = _to_pixels(np.asarray(points_layer.data), points_layer, image_layer)
            positive = points_layer.features["prompt"].to_numpy() == POSITIVE
        box = None
        if box_layer is not None and len(box_layer.data):
            corners = _to_pixels(np.asarray(box_layer.data[-1]), box_layer, image_layer)
            box = np.array([*corners.min(axis=0), *corners.max(axis=0)])
        return Prompt(points, positive, box)

    def next_nucleus(self) -> None:
        """Keep the current nucleus; clear the prompt layers for the next one."""
        self._current = None
        points, box = self.prompt_layers()
        for layer in (points, box):
            if layer is not None:
                layer.events.data.disconnect(self._prompt_added)
                layer.data = np.zeros((0, 2)) if layer is points else []
                layer.events.data.connect(self._prompt_added)

    # --------------------------------------------------------------------------- run
    def segment_prompt(self) -> Job | None:
        """Segment the nucleus the prompts point at (in a worker); commit on return."""
        owner = self.owner
        if owner.job is not None and owner.job.running:
            self._pending = True  # re-run with the newest prompts when this one ends
            return None
        image_layer = owner.current_image_layer()
        if image_layer is None:
            owner.show_error(ValueError("choose an image layer first"))
            return None
        if owner.model_name() == "classical":
            owner.show_error(ValueError("prompts need a trained model; pick a model folder"))
            return None
        try:
            prompt = self.current_prompt()
        except Exception as exc:
            owner.show_error(exc)
            return None
        model_key = owner.model_key()
        key = (image_layer.name, id(image_layer.data), model_key, owner.input_mpp())
        session = self._session if self._session_key == key else None
        if session is not None:
            session.thresholds = owner.thresholds()  # not in use: no job is running
        generator = prompt_steps(session, owner.cached_predictor(model_key), model_key,
                                 np.asarray(image_layer.data), prompt, owner.thresholds(),
                                 owner.input_mpp())
        return owner.start(generator, "segmenting the prompted nucleus",
                           lambda result: self._commit(image_layer, key, result))

    def _commit(self, image_layer, key, result) -> None:
        from ..inference.prompting import commit_mask

        if result is None:
            return
        session, predictor, nucleus, prompt = result
        owner = self.owner
        owner._keep_predictor(predictor, key[2])
        self._session, self._session_key = session, key
        layer = owner.labels_layer()
        if layer is None:  # prompts on an image not segmented yet: start an empty layer
            empty = np.zeros(image_layer.data.shape[:2], np.uint8)
            layer, _ = write_nuclei_layer(owner.viewer, image_layer, empty,
                                          _empty_features(), owner.model_name())
            owner._outputs[image_layer.name] = layer
        labels = np.asarray(layer.data)
        if nucleus.area == 0:
            owner.status.setText("no nucleus found at this prompt; try a box or another point")
            return
        replace = 0
        if self._current is not None and self._current[0] == layer.name:
            replace = self._current[1]
        elif prompt.positive.any():
            r, c = np.round(prompt.points[prompt.positive][0]).astype(int)
            if 0 <= r < labels.shape[0] and 0 <= c < labels.shape[1]:
                replace = int(labels[r, c])
        indices, values, new_id = commit_mask(labels, nucleus, replace)
        make_room_for(layer, new_id)
        with layer.block_history():  # one undo step
            layer.data_setitem(indices, values.astype(np.asarray(layer.data).dtype))
        self._current = (layer.name, new_id)
        self.last_commit = {"id": new_id, "replaced": replace, "area": nucleus.area,
                            "encoder_runs": session.encoder_runs}
        owner.status.setText(f"nucleus {new_id}: {nucleus.area} px"
                             + (f" (replaces {replace})" if replace else "")
                             + "; Ctrl+Z in the layer undoes it")

    def on_job_finished(self) -> None:
        if self._pending:
            self._pending = False
            self.segment_prompt()


def _to_pixels(coords: np.ndarray, layer, image_layer) -> np.ndarray:
    """``(N, 2)`` data coordinates of ``layer`` -> pixel (row, column) of ``image_layer``
    (through both layers' scale and translate)."""
    world = coords[:, -2:] * np.asarray(layer.scale[-2:]) + np.asarray(layer.translate[-2:])
    return (world - np.asarray(image_layer.translate[-2:])) / np.asarray(image_layer.scale[-2:])


def _empty_features():
    import pandas as pd

    return pd.DataFrame({"index": np.zeros(0, int), "label": np.zeros(0, int)})


def prompt_steps(session, predictor, model_key, image, prompt, thresholds, input_mpp):
    """Worker generator: load the model and the session if needed, segment the prompt."""
    from ..inference.prompting import PromptSession
    from ._segment import load_predictor

    if predictor is None:
        yield {"stage": "setup", "message": f"loading model {model_key[0]}"}
        predictor = load_predictor(model_key)
    if session is None:
        if predictor.is_classical:
            from ..errors import AmaSamError

            raise AmaSamError("prompts need a trained model, not the classical baseline")
        session = PromptSession(predictor.model, image, thresholds,
                                scale=predictor._scale_for(input_mpp), device=predictor.device)
    yield {"stage": "prompt", "message": "encoding the image window (once per window)"
           if not session._cache else "decoding the prompt"}
    nucleus = session.segment(prompt)
    return session, predictor, nucleus, prompt
