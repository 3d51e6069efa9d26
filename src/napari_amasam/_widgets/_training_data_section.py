"""Segment widget section: corrected labels -> a training pair; fine-tune on that folder
(continue training, or for a ``ca-sam`` model add the folder as a new task); ``sam-da``:
adapt the model to the current image without labels.

The default folder is a new one beside the model (``<model>_added_data``), never a folder
the user did not pick: the model's own training folders may be curated datasets.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtWidgets import QComboBox, QHBoxLayout, QLabel, QLineEdit, QPushButton, QSpinBox

from ._common import PathPicker, trained_models
from ._layout import Section, tip
from ._training_data import safe_stem, save_training_pair, unique_folder

if TYPE_CHECKING:
    from ._segment import SegmentWidget
    from ._workers import Job

ADDED_DATA_SUFFIX = "_added_data"
FINETUNE_CONTINUE = "continue training"
FINETUNE_NEW_TASK = "add as a new task (no forgetting)"


def default_training_folder(model_dir: str | None) -> str:
    """``<model>_added_data`` beside the model folder ('' for the classical baseline)."""
    if not model_dir:
        return ""
    model = Path(model_dir)
    return str(model.with_name(f"{model.name}{ADDED_DATA_SUFFIX}"))


class TrainingDataSection(Section):
    """Folder, pair name, Add to training data; epochs and Fine-tune (collapsed at first)."""

    def __init__(self, owner: SegmentWidget):
        super().__init__("Training data", expanded=False)
        self.owner = owner
        self._model_dir: str | None = None
        self.folder = tip(PathPicker("folder", "Training data folder (images/ + labels/)",
                                     placeholder="choose a folder"),
                          "Where 'Add to training data' writes images/<name>.png + "
                          "labels/<name>.tif; default: a new folder beside the model")
        self.pair_name = tip(QLineEdit(), "File name of the new pair (default: the image "
                             "layer's name)")
        self.pair_name.setPlaceholderText("image layer name")
        self.add_button = tip(QPushButton("Add to training data"),
                              "Save the image and its corrected nuclei layer as a new "
                              "training pair (never overwrites)")
        self.add_button.clicked.connect(lambda: self.add())
        self.epochs = tip(QSpinBox(), "Epochs of fine-tuning")
        self.epochs.setRange(1, 1000)
        self.epochs.setValue(5)
        self.finetune_button = tip(QPushButton("Fine-tune"),
                                   "Continue training the current model on this folder; "
                                   "the result is a new model folder beside it")
        self.finetune_button.clicked.connect(lambda: self.fine_tune())
        # CA-SAM models can learn the data as a new task instead (training.continual)
        self.finetune_mode = tip(QComboBox(),
                                 "continue training: the model's weights keep learning; "
                                 "add as a new task (ca-sam models): a new alignment layer "
                                 "learns the data, earlier tasks stay exactly as they are")
        self.finetune_mode.addItems([FINETUNE_CONTINUE, FINETUNE_NEW_TASK])
        # SAM-DA test-time adaptation to the current (unlabelled) image
        self.adapt_button = tip(QPushButton("Adapt to this image"),
                                "SAM-DA models: tune only the decoder adapter on the current "
                                "image, without labels (entropy + flip/rotation consistency)")
        self.adapt_button.clicked.connect(lambda: self.adapt_to_image())
        row = QHBoxLayout()
        row.addWidget(QLabel("epochs"))
        row.addWidget(self.epochs)
        row.addWidget(self.finetune_button)
        row.addWidget(self.adapt_button)
        self.form.addRow("Folder", self.folder)
        self.form.addRow("Pair name", self.pair_name)
        self.form.addRow(self.add_button)
        self.form.addRow("Fine-tune", self.finetune_mode)
        self.form.addRow(row)

    def model_changed(self, model_dir: str | None) -> None:
        """Offer the new model's default folder (only where the user typed none)."""
        previous = default_training_folder(self._model_dir)
        self._model_dir = model_dir
        if not self.folder.text() or self.folder.text() == previous:
            self.folder.setText(default_training_folder(model_dir))
        self.finetune_button.setEnabled(model_dir is not None)
        self.adapt_button.setEnabled(model_dir is not None)

    def training_folder(self) -> str:
        """The folder pairs go to and fine-tuning reads: the form's (default beside the model)."""
        return self.folder.text() or default_training_folder(self._model_dir)

    def add(self, folder: str | None = None, name: str | None = None) -> tuple[Path, Path] | None:
        """Save the image and its (corrected) nuclei layer as ``images/<name>.png`` +
        ``labels/<name>.tif``; refuses (returns None, says why) when a file of that pair
        already exists."""
        owner = self.owner
        image_layer, labels_layer = owner.current_image_layer(), owner.labels_layer()
        if image_layer is None or labels_layer is None:
            owner.show_error(ValueError("segment an image first (no '<image> nuclei' layer)"))
            return None
        folder = folder or self.training_folder()
        if not folder:
            owner.show_error(ValueError("choose a training data folder"))
            return None
        name = safe_stem(name or self.pair_name.text() or image_layer.name)
        try:
            image_path, label_path = save_training_pair(
                folder, name, np.asarray(image_layer.data), np.asarray(labels_layer.data))
        except (FileExistsError, ValueError) as exc:
            owner.show_error(exc)
            return None
        owner.status.setText(f"added {image_path.name} + {label_path.name} to {folder}")
        return image_path, label_path

    def fine_tune(self, epochs: int | None = None, out: str | None = None,
                  new_task: bool | None = None) -> Job | None:
        """Continue training the current model with the training folder's data.

        Settings come from the model folder's config.json; the result goes to a new folder
        next to it (``<model>_finetuned``, or ``<model>_task`` when the data is added as a new
        CA-SAM task: ``new_task``, default the form's choice) and is offered in the model
        list when done.
        """
        from ..config import ModelConfig, TrainConfig
        from ..model_folder import read_model_folder
        from ..training.trainer import train

        owner = self.owner
        if owner.busy():
            return None
        model_dir = owner.model_name()
        if self._model_dir is None or model_dir != self._model_dir:
            owner.show_error(ValueError(
                "the classical baseline cannot be fine-tuned; pick a model folder"))
            return None
        try:
            folder = read_model_folder(model_dir)
        except Exception as exc:
            owner.show_error(exc)
            return None
        primary = self.training_folder()
        if not Path(primary).is_dir():
            owner.show_error(ValueError(
                f"{primary}: no training data yet; use 'Add to training data' first"))
            return None
        if new_task is None:
            new_task = self.finetune_mode.currentText() == FINETUNE_NEW_TASK
        if new_task and folder.model.kind != "ca-sam":
            owner.show_error(ValueError(f"adding a new task needs a ca-sam model; this one is "
                                        f"{folder.model.kind} (choose 'continue training')"))
            return None
        suffix = "task" if new_task else "finetuned"
        target = Path(out) if out else unique_folder(Path(model_dir).with_name(
            f"{Path(model_dir).name}_{suffix}"))
        recorded = folder.train or TrainConfig()
        cfg = dataclasses.replace(
            recorded, primary=primary, out=str(target),
            init_from=None if new_task else str(model_dir),
            continue_from=str(model_dir) if new_task else None,
            epochs=int(epochs or self.epochs.value()), max_steps=0,
            device=owner.device.currentText())
        cancel = threading.Event()
        generator = train(cfg, ModelConfig(), cancel=cancel)
        return owner.start(generator, f"fine-tuning → {target}", self._done,
                           cancel_event=cancel)

    def adapt_to_image(self, steps: int = 50, out: str | None = None) -> Job | None:
        """Test-time adaptation (``training.adapt``) of the model to the current image layer;
        the result goes to ``<model>_adapted`` and is offered in the model list when done."""
        from ..training.adapt import AdaptConfig, adapt

        owner = self.owner
        if owner.busy():
            return None
        model_dir, layer = owner.model_name(), owner.current_image_layer()
        if self._model_dir is None or model_dir != self._model_dir or layer is None:
            owner.show_error(ValueError("choose a model folder and an image layer to adapt to"))
            return None
        target = Path(out) if out else unique_folder(Path(model_dir).with_name(
            f"{Path(model_dir).name}_adapted"))
        cancel = threading.Event()
        generator = adapt(model_dir, [np.asarray(layer.data)], target,
                          AdaptConfig(steps=steps, device=owner.device.currentText()),
                          cancel=cancel)
        return owner.start(generator, f"adapting → {target}", self._done, cancel_event=cancel)

    def _done(self, out) -> None:
        if out is not None and (Path(out) / "weights.pt").is_file():
            trained_models().add(str(out))
