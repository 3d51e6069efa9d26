"""A trained model is a folder (stardist style), written atomically.

::

    MODEL_DIR/
      config.json      architecture, training settings, base checkpoint name + sha256,
                       microns-per-pixel, normalisation, data summary, seed, package version
      thresholds.json  post-processing settings (PostprocessConfig)
      weights.pt       trainable weights the predictor uses (best validation Dice, else last)
      best.pt          trainable weights at the best validation Dice
      last.pt          full training state: weights, optimiser, scheduler, RNG, step, epoch
      base_sam.pt      only for the random-weight ``tiny`` backbone: its frozen SAM weights
      history.csv      one row per epoch: losses, learning rate, validation metrics

Every write goes to a temporary file in the same folder, is flushed to disk, then renamed
over the target, so a kill at any moment leaves the previous state loadable.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import ConfigError, ModelConfig, PostprocessConfig, TrainConfig
from .errors import CheckpointError

FORMAT_NAME = "napari-amasam-model"
FORMAT_VERSION = 1
# SAM's normalisation on the 0-255 scale (segment_anything Sam.pixel_mean / pixel_std).
SAM_NORMALISATION = {
    "pixel_mean": [123.675, 116.28, 103.53],
    "pixel_std": [58.395, 57.12, 57.375],
    "scale": "0-255 RGB",
}


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary sibling file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to memory, then an atomic write (no half-written checkpoint ever)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def torch_load(path: str | Path, what: str) -> Any:
    """``torch.load(weights_only=True)`` with one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors differ by torch version
        raise CheckpointError(f"{path}: cannot read {what} (truncated or corrupt: {exc})") from None


@dataclass
class ModelFolder:
    """What ``config.json`` of a model folder says, plus its thresholds."""

    path: Path
    model: ModelConfig
    thresholds: PostprocessConfig
    train: TrainConfig | None = None
    base_checkpoint: dict[str, Any] = field(default_factory=dict)
    mpp: float | None = None
    data: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def has_weights(self) -> bool:
        return (self.path / "weights.pt").is_file()


def write_config(
    path: str | Path,
    model: ModelConfig,
    train: TrainConfig | None,
    base_checkpoint: dict[str, Any],
    mpp: float | None,
    data: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``config.json`` (atomically)."""
    doc = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model.to_dict(),
        "train": train.to_dict() if train is not None else None,
        "base_checkpoint": base_checkpoint,
        "mpp": mpp,
        "normalisation": SAM_NORMALISATION,
        "data": data or {},
        "seed": train.seed if train is not None else None,
    }
    if extra:
        doc.update(extra)
    atomic_write_text(Path(path) / "config.json", json.dumps(doc, indent=2, default=str))


def write_thresholds(path: str | Path, thresholds: PostprocessConfig) -> None:
    atomic_write_text(Path(path) / "thresholds.json", json.dumps(thresholds.to_dict(), indent=2))


def read_model_folder(path: str | Path) -> ModelFolder:
    """Read ``config.json`` and ``thresholds.json``; one-line errors for a bad folder.

    A bioimage.io package exported by this plugin (``.zip`` or folder) reads the same way.
    """
    from .bioimageio_package import is_model_package, read_package

    path = Path(path)
    if is_model_package(path):
        return read_package(path)
    config_path = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: model folder not found")
    if not config_path.is_file():
        raise CheckpointError(f"{path}: not a napari-amasam model folder (no config.json)")
    try:
        doc = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: cannot be read as JSON ({exc})") from None
    if doc.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{config_path}: not a napari-amasam model config")
    try:
        model = ModelConfig.from_dict(doc["model"])
        train = TrainConfig.from_dict(doc["train"]) if doc.get("train") else None
    except (ConfigError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{config_path}: invalid config ({exc})") from None
    thresholds = PostprocessConfig()
    thresholds_path = path / "thresholds.json"
    if thresholds_path.is_file():
        try:
            thresholds = PostprocessConfig.from_dict(json.loads(thresholds_path.read_text()))
        except (ConfigError, json.JSONDecodeError, TypeError) as exc:
            raise CheckpointError(f"{thresholds_path}: invalid thresholds ({exc})") from None
    return ModelFolder(
        path=path,
        model=model,
        thresholds=thresholds,
        train=train,
        base_checkpoint=doc.get("base_checkpoint") or {},
        mpp=doc.get("mpp"),
        data=doc.get("data") or {},
        meta={k: doc.get(k) for k in ("package_version", "created", "seed", "normalisation")},
    )


def resolve_base_checkpoint(folder: ModelFolder, checkpoint: str | Path | None) -> Path | None:
    """Find the SAM checkpoint a model folder was trained on.

    ``tiny`` models keep their random frozen weights in ``base_sam.pt`` inside the folder.
    For vit_* the explicit ``checkpoint`` wins, else the recorded path; its sha256 must match
    the recorded one, so a model is never silently combined with other SAM weights.
    """
    if folder.model.backbone == "tiny":
        return folder.path / "base_sam.pt"
    recorded = folder.base_checkpoint
    candidate = Path(checkpoint) if checkpoint else None
    if candidate is None and recorded.get("path"):
        candidate = Path(recorded["path"])
    if candidate is None or not candidate.is_file():
        name = recorded.get("name", f"the official SAM {folder.model.backbone} checkpoint")
        where = f" (looked for {candidate})" if candidate is not None else ""
        raise CheckpointError(
            f"{folder.path}: needs the base SAM checkpoint {name}{where}; pass it with --checkpoint"
        )
    expected = recorded.get("sha256")
    if expected:
        actual = sha256_file(candidate)
        if actual != expected:
            raise CheckpointError(
                f"{candidate}: sha256 {actual[:12]}... does not match the {expected[:12]}... "
                f"this model was trained on ({recorded.get('name', '?')})"
            )
    return candidate


def append_history(path: str | Path, row: dict[str, Any]) -> None:
    """Rewrite ``history.csv`` with one more row (atomically; columns grow as needed)."""
    history_path = Path(path) / "history.csv"
    rows = read_history(path)
    rows.append({k: row[k] for k in row})
    columns: list[str] = []
    for r in rows:
        for key in r:
            if key not in columns:
                columns.append(key)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(history_path, buffer.getvalue())


def read_history(path: str | Path) -> list[dict[str, Any]]:
    history_path = Path(path) / "history.csv"
    if not history_path.is_file():
        return []
    with open(history_path, newline="") as fh:
        return list(csv.DictReader(fh))


def truncate_history(path: str | Path, max_epoch: int) -> None:
    """Drop rows after ``max_epoch`` (a resumed run re-does the epochs after its last state)."""
    rows = [r for r in read_history(path) if int(float(r.get("epoch", 0))) <= max_epoch]
    history_path = Path(path) / "history.csv"
    if history_path.exists():
        history_path.unlink()
    for r in rows:
        append_history(path, r)


def load_model(
    path: str | Path,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    weights: str = "weights.pt",
):
    """Rebuild a trained model from its folder (or bioimage.io package), ready for inference.

    Returns
    -------
    (AmaSam, ModelFolder)
        The model in eval mode on ``device`` and the folder's description.
    """
    from .bioimageio_package import is_model_package, load_model_package
    from .device import resolve_device
    from .model import build_amasam

    if is_model_package(path):  # a bioimage.io package exported by this plugin
        return load_model_package(path, checkpoint=checkpoint, device=device)
    folder = read_model_folder(path)
    weights_path = folder.path / weights
    if not weights_path.is_file():
        raise CheckpointError(f"{folder.path}: no {weights} (the model was never saved)")
    base = resolve_base_checkpoint(folder, checkpoint)
    model = build_amasam(folder.model, checkpoint=base)
    model.load_trainable_state_dict(torch_load(weights_path, "model weights"), str(weights_path))
    if not isinstance(device, torch.device):
        device = resolve_device(device)
    return model.to(device).eval(), folder
