"""Train widget: data folders and settings in, a model folder out, with a live plot."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
)

from ..config import BACKBONES, RANDOM_BACKBONES, lr_gamma_for_epochs, train_defaults
from ._common import (
    PathPicker,
    Progress,
    device_combo,
    end_job,
    notify,
    report_error,
    trained_models,
)
from ._layout import ScrollableDock, Section, tip
from ._plot import TrainingPlot
from ._settings import applying_defaults, bind
from ._workers import Job


def default_backbone() -> str:
    """``tiny_conv`` on a machine without a CUDA GPU (the random CPU backbone that learns
    best, as `make demo` trains it; vit_b at 1024 px takes hours per epoch on a CPU, and no
    SAM checkpoint is bundled), else ``vit_b``."""
    import torch

    return "vit_b" if torch.cuda.is_available() else "tiny_conv"


if TYPE_CHECKING:
    import napari


def describe_folder(path: str, role: str = "primary") -> tuple[str, list[str], bool]:
    """Check one data folder: ``(one-line summary, problems + warnings, ok)``."""
    from ..data.folders import check_folder

    check = check_folder(path, role)
    summary = (f"{check.n_pairs} valid pair{'s' if check.n_pairs != 1 else ''}, "
               f"{check.n_nuclei} nuclei")
    if check.problems:
        summary += f", {len(check.problems)} problem{'s' if len(check.problems) != 1 else ''}"
    details = list(check.problems) + [f"warning: {w}" for w in check.warnings]
    return summary, details, not check.problems


class TrainWidget(ScrollableDock):
    """Fine-tune AMA-SAM on a primary folder plus auxiliary folders.

    ``record_received`` is emitted (on the UI thread) with every trainer record; ``finished``
    with the model folder (str) when a run ends with a loadable model.

    ``model_options`` (dict) are extra :class:`~napari_amasam.config.ModelConfig` fields
    for scripts and tests (e.g. a smaller ``tiny`` encoder); the form sets the rest.
    """

    record_received = Signal(dict)
    finished = Signal(str)

    def __init__(self, napari_viewer: napari.viewer.Viewer | None = None):
        super().__init__()
        self.viewer = napari_viewer
        self.job: Job | None = None
        self.last_error: BaseException | None = None
        self.last_done: dict | None = None
        self.model_options: dict[str, Any] = {}
        self._progress: Progress | None = None
        self._build()

    # ----------------------------------------------------------------------------- layout
    def _build(self) -> None:
        data = Section("Data")
        form = data.form
        self.primary = tip(PathPicker("folder", "Primary data folder (images/ + labels/)"),
                           "The target-domain training data: images/ and labels/ (or masks/) "
                           "paired by file name")
        self.primary.edit.editingFinished.connect(self.refresh_primary)
        self.primary_status = QLabel("no folder")
        self.primary_status.setWordWrap(True)
        form.addRow("Primary folder", self.primary)
        form.addRow("", self.primary_status)

        self.aux_list = tip(QListWidget(), "Auxiliary (other stain/scanner) datasets; hover "
                            "an entry for its problems")
        self.aux_list.setMaximumHeight(70)
        self.aux_picker = tip(PathPicker("folder", "Auxiliary data folder"),
                              "An auxiliary folder to add to the list")
        add = tip(QPushButton("Add"), "Add the folder above to the auxiliary list")
        remove = tip(QPushButton("Remove"), "Remove the selected auxiliary folders")
        add.clicked.connect(lambda: self.add_aux_folder(self.aux_picker.text()))
        remove.clicked.connect(self.remove_selected_aux)
        buttons = QHBoxLayout()
        buttons.addWidget(self.aux_picker)
        buttons.addWidget(add)
        buttons.addWidget(remove)
        form.addRow("Auxiliary folders", self.aux_list)
        form.addRow("", buttons)
        self.content.addWidget(data)

        model = Section("Model")
        form = model.form
        self.backbone = tip(QComboBox(), "Encoder: 'tiny_conv' or 'tiny' (random weights, "
                            "train on a CPU in minutes; tiny_conv, as `make demo`, learns "
                            "better) or a SAM ViT (needs its checkpoint and a GPU). Changing "
                            "it resets the training settings to its defaults")
        self.backbone.addItems(list(BACKBONES))
        self.backbone.currentTextChanged.connect(self._backbone_changed)
        self.checkpoint = tip(PathPicker("open", "SAM checkpoint", "PyTorch checkpoint (*.pth *.pt)"),
                              "Official SAM checkpoint of the chosen ViT (sam_vit_b_01ec64.pth, ...)")
        self.train_encoder = tip(QCheckBox("train the encoder too"),
                                 "Needed for the random tiny encoders; for SAM ViTs only the "
                                 "adapters and decoder train")
        self.mpp = tip(QDoubleSpinBox(), "Microns per pixel of the primary images (40x is "
                       "about 0.25, 20x about 0.5); stored in the model so inference "
                       "rescales other magnifications")
        # Pixel size of the primary data: stored in the model so that inference rescales
        # images taken at another magnification (0 = unknown, no rescaling).
        self.mpp.setDecimals(3)
        self.mpp.setRange(0.0, 10.0)
        self.mpp.setSingleStep(0.05)
        self.mpp.setSpecialValueText("unknown")
        self.output = tip(PathPicker("folder", "Output model folder"),
                          "New folder for the trained model (config.json, weights.pt, ...)")
        form.addRow("Base model", self.backbone)
        form.addRow("SAM checkpoint", self.checkpoint)
        form.addRow("", self.train_encoder)
        form.addRow("Microns per pixel", self.mpp)
        form.addRow("Output folder", self.output)
        self.content.addWidget(model)

        training = Section("Training settings", expanded=False)
        form = training.form
        self.alignment = tip(QComboBox(), "Domain alignment with the auxiliary data: CGRL "
                             "(class-aware), GRL, or none")
        self.alignment.addItems(["cgrl", "grl", "none"])
        self.epochs = tip(QSpinBox(), "Passes over the training data")
        self.epochs.setRange(1, 10000)
        self.steps_per_epoch = tip(QSpinBox(), "Steps per epoch (auto: one pass over the "
                                   "primary data)")
        self.steps_per_epoch.setRange(0, 1000000)
        self.steps_per_epoch.setSpecialValueText("auto")
        self.lr = tip(QDoubleSpinBox(), "Learning rate (AdamW)")
        self.lr.setDecimals(6)
        self.lr.setRange(1e-6, 1.0)
        self.lr.setSingleStep(1e-5)
        self.batch_size = tip(QSpinBox(), "Images per training step")
        self.batch_size.setRange(1, 256)
        self.image_size = tip(QSpinBox(), "Network input side in pixels (SAM ViTs: 1024)")
        self.image_size.setRange(64, 4096)
        self.image_size.setSingleStep(64)
        self.device = tip(device_combo(), "Where training runs (auto: CUDA, then MPS, then CPU)")
        self.precision = tip(QComboBox(), "auto: mixed precision where the device computes it "
                             "natively (bf16 on CPUs with AVX-512 BF16 or AMX, bf16/fp16 on "
                             "CUDA); fp32: float32 training steps everywhere")
        self.precision.addItems(["auto", "fp32"])
        form.addRow("Alignment", self.alignment)
        form.addRow("Epochs", self.epochs)
        form.addRow("Steps per epoch", self.steps_per_epoch)
        form.addRow("Learning rate", self.lr)
        form.addRow("Batch size", self.batch_size)
        form.addRow("Input size", self.image_size)
        form.addRow("Device", self.device)
        form.addRow("Precision", self.precision)
        self.content.addWidget(training)

        run = QHBoxLayout()
        self.start_button = tip(QPushButton("Start"), "Check the folders and start training")
        self.cancel_button = tip(QPushButton("Cancel"), "Stop soon and save a loadable model")
        self.cancel_button.setEnabled(False)
        self.start_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        run.addWidget(self.start_button)
        run.addWidget(self.cancel_button)
        self.content.addLayout(run)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.content.addWidget(self.status)
        self.plot = TrainingPlot()
        self.content.addWidget(self.plot, stretch=1)

        self.backbone.setCurrentText(default_backbone())
        self._backbone_changed(self.backbone.currentText())
        bind("train", "backbone", self.backbone, unset="")
        bind("train", "checkpoint", self.checkpoint)
        bind("train", "alignment", self.alignment, unset="")
        bind("train", "epochs", self.epochs, unset=0)
        bind("train", "batch_size", self.batch_size, unset=0)
        bind("train", "learning_rate", self.lr, unset=0.0)
        bind("train", "device", self.device)
        bind("train", "precision", self.precision)

    def _backbone_changed(self, backbone: str) -> None:
        """Show ``backbone``'s defaults (config.train_defaults, as the CLI uses them)."""
        self.checkpoint.setEnabled(backbone not in RANDOM_BACKBONES)
        defaults = train_defaults(backbone)
        # the backbone's defaults, not the user's choices: shown, not saved as settings
        with applying_defaults():
            self.image_size.setValue(defaults["image_size"])
            self.alignment.setCurrentText(defaults["alignment"])
            self.lr.setValue(defaults["lr"])
            self.epochs.setValue(defaults["epochs"])
            self.steps_per_epoch.setValue(defaults["steps_per_epoch"])
            self.batch_size.setValue(defaults["batch_size"])
            # As ModelConfig resolves trainable_backbone=None: random encoders train.
            self.train_encoder.setChecked(backbone in RANDOM_BACKBONES)

    # ------------------------------------------------------------------------ data folders
    def refresh_primary(self) -> bool:
        """Check the primary folder and show its summary; returns whether it is usable."""
        path = self.primary.text()
        if not path:
            self.primary_status.setText("no folder")
            return False
        summary, details, ok = describe_folder(path, "primary")
        self.primary_status.setText("\n".join([summary] + details[:5]))
        self.primary_status.setToolTip("\n".join(details))
        return ok

    def add_aux_folder(self, path: str) -> QListWidgetItem | None:
        """Add an auxiliary folder with its pair count and problems; returns the list item."""
        path = str(path).strip()
        if not path:
            return None
        if path in self.aux_folders():
            notify(f"{path}: already in the auxiliary list")
            return None
        role = f"auxiliary {self.aux_list.count() + 1}"
        summary, details, ok = describe_folder(path, role)
        item = QListWidgetItem(f"{'' if ok else '⚠ '}{path} — {summary}")
        item.setData(Qt.UserRole, path)
        item.setToolTip("\n".join(details) or "no problems found")
        self.aux_list.addItem(item)
        return item

    def remove_selected_aux(self) -> None:
        for item in self.aux_list.selectedItems():
            self.aux_list.takeItem(self.aux_list.row(item))

    def aux_folders(self) -> list[str]:
        return [self.aux_list.item(i).data(Qt.UserRole) for i in range(self.aux_list.count())]

    # ----------------------------------------------------------------------------- configs
    def configs(self):
        """``(TrainConfig, ModelConfig)`` from the form (raises ConfigError on bad values)."""
        from ..config import ConfigError, ModelConfig, TrainConfig

        if not self.primary.text():
            raise ConfigError("choose a primary data folder")
        if not self.output.text():
            raise ConfigError("choose an output folder for the model")
        backbone = self.backbone.currentText()
        # Settings the form does not show keep the backbone's defaults, as in the CLI.
        defaults = train_defaults(backbone)
        options = {"trainable_backbone": self.train_encoder.isChecked(),
                   "lambda_max": defaults["lambda_max"], **self.model_options}
        model_cfg = ModelConfig(
            backbone=backbone, image_size=self.image_size.value(),
            alignment=self.alignment.currentText(), **options,
        )
        checkpoint = None if backbone in RANDOM_BACKBONES else self.checkpoint.text() or None
        train_cfg = TrainConfig(
            primary=self.primary.text(), aux=self.aux_folders(), out=self.output.text(),
            checkpoint=checkpoint, epochs=self.epochs.value(),
            steps_per_epoch=self.steps_per_epoch.value(), batch_size=self.batch_size.value(),
            lr=self.lr.value(), lr_gamma=lr_gamma_for_epochs(backbone, self.epochs.value()),
            primary_share=defaults["primary_share"], val_fraction=defaults["val_fraction"],
            model_mpp=defaults["model_mpp"],
            device=self.device.currentText(), mpp=self.mpp.value() or None,
            amp=self.precision.currentText() != "fp32",
        )
        return train_cfg, model_cfg

    # ------------------------------------------------------------------------------- run
    def start(self) -> Job | None:
        """Start training with the form's settings (in a thread worker)."""
        from ..config import ConfigError
        from ..errors import AmaSamError

        if self.job is not None and self.job.running:
            notify("training is already running")
            return None
        try:
            train_cfg, model_cfg = self.configs()
        except (ConfigError, AmaSamError) as exc:
            self._show_error(exc)
            return None
        if model_cfg.backbone not in RANDOM_BACKBONES and not train_cfg.checkpoint:
            notify(f"no SAM checkpoint for {model_cfg.backbone}: the encoder gets random weights")
        if train_cfg.mpp is None and train_cfg.model_mpp is not None:
            notify(f"microns per pixel unknown: training at the images' own scale, not at the "
                   f"{train_cfg.model_mpp} µm/px working scale of {model_cfg.backbone}")
        return self.run_training(train_cfg, model_cfg)

    def run_training(self, train_cfg, model_cfg=None, resume: bool = False) -> Job:
        """Run ``trainer.train`` through the worker path (also used by Segment's Fine-tune)."""
        from ..config import ModelConfig
        from ..training.trainer import train

        cancel = threading.Event()
        generator = train(train_cfg, model_cfg or ModelConfig(), resume=resume, cancel=cancel)
        self.last_error, self.last_done = None, None
        self.plot.clear()
        self._progress = Progress("training")
        self.status.setText(f"training → {train_cfg.out}")
        self.start_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.job = Job(generator, cancel_event=cancel, on_yielded=self._on_record,
                       on_errored=self._show_error, on_finished=self._on_finished)
        return self.job.start()

    def cancel(self) -> None:
        """Stop after the current step (or batch of validation tiles); the trainer saves a
        loadable, resumable model first."""
        if self.job is not None and self.job.running:
            self.job.cancel()
            self.cancel_button.setEnabled(False)
            self.status.setText("cancelling: finishing the current step (or batch of "
                                "validation tiles), then saving…")

    def _on_record(self, record: dict) -> None:
        stage = record.get("stage")
        if stage == "train":
            if self._progress is not None:
                self._progress.update_to(record["step"], record["total_steps"],
                                         f"epoch {record['epoch']}/{record['epochs']}")
            text = (f"step {record['step']}/{record['total_steps']}  epoch {record['epoch']}/"
                    f"{record['epochs']}  loss {record['loss']:.4f}")
            if record["step"] >= record["total_steps"]:
                # The eta covers training steps only; what follows takes minutes on a CPU.
                text += "  - last step done: validating, then tuning thresholds…"
            else:
                text += f"  eta {record['eta_s']:.0f} s"
            self.status.setText(text)
        elif stage == "val":
            m = record.get("metrics", {})
            self.status.setText(f"validation epoch {record['epoch']}: " + "  ".join(
                f"{k} {m[k]:.3f}" for k in ("dice", "aji", "pq") if k in m))
        elif stage in ("setup", "progress"):
            self.status.setText(record.get("message", ""))
        elif stage == "done":
            self.last_done = record
            state = "cancelled" if record.get("cancelled") else "finished"
            self.status.setText(f"training {state} at step {record['step']}: "
                                f"{record['model_dir']}")
        self.plot.add_record(record)
        self.record_received.emit(record)

    def _on_finished(self) -> None:
        end_job(self, self.start_button)
        if self.last_done is not None and (Path(self.last_done["model_dir"]) / "weights.pt").is_file():
            folder = self.last_done["model_dir"]
            trained_models().add(folder)
            self.finished.emit(folder)

    def _show_error(self, exc: BaseException) -> None:
        report_error(self, exc)
