"""A trained model is a folder (stardist style), written atomically.

::

    MODEL_DIR/
      config.json      architecture, training settings, base checkpoint name + sha256,
                       microns-per-pixel, normalisation, data summary, seed, package version
      thresholds.json  post-processing settings (PostprocessConfig)
      weights.pt       trainable weights the predictor uses (best validation Dice, else last;
                       the running average when ``TrainConfig.ema_decay`` > 0)
      best.pt          trainable weights at the best validation Dice (same rule)
      last.pt          full training state: raw weights, optimiser, scheduler, RNG, step, epoch,
                       the weight average (``ema``)
      base_sam.pt      only for the random-weight ``tiny`` backbone: its frozen SAM weights
      history.csv      one row per epoch: losses, learning rate, validation metrics

Every write goes to a temporary file in the same folder, is flushed to disk, then renamed
over the target, so a kill at any moment leaves the previous state loadable. A new model is
written into a staging folder ``.MODEL_DIR.partial-<pid>-<random>`` beside its target and
renamed into place at its first save, so an existing folder is never mixed with a new run
(``publish_folder``); what a killed run leaves behind is removed by the next run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import pickle
import secrets
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__

# atomic_write_* are re-exported: callers import them from here.
from .atomic import (  # noqa: F401
    atomic_write_bytes,
    atomic_write_text,
    check_can_create,
    remove_temp_files,
)
from .config import (
    RANDOM_BACKBONES,
    ConfigError,
    ModelConfig,
    PostprocessConfig,
    TrainConfig,
    valid_mpp,
)
from .errors import CheckpointError, OutputError

FORMAT_NAME = "napari-amasam-model"
FORMAT_VERSION = 1
# SAM's normalisation on the 0-255 scale (segment_anything Sam.pixel_mean / pixel_std).
SAM_NORMALISATION = {
    "pixel_mean": [123.675, 116.28, 103.53],
    "pixel_std": [58.395, 57.12, 57.375],
    "scale": "0-255 RGB",
}


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to memory, then an atomic write (no half-written checkpoint ever)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


# (resolved path, size, mtime_ns) -> sha256: a multi-GB base checkpoint is hashed once per
# process, and again only when the file changes.
_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file, cached by (path, size, modification time)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
        _SHA256_CACHE[key] = digest.hexdigest()
    return _SHA256_CACHE[key]


def torch_load(path: str | Path, what: str) -> Any:
    """``torch.load(weights_only=True)`` with one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols of foreign files; the error below says it all.
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # The weights-only unpickler met something other than tensors and plain containers.
        raise CheckpointError(f"{path}: {what} holds arbitrary Python objects (a pickle that "
                              "could run code when loaded); refused for safety") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    except Exception:  # zip/format errors differ by torch version
        raise CheckpointError(f"{path}: cannot read {what} (truncated or corrupt file)") from None


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
    #: Microns per pixel of the training data (``train.mpp``; a bioimage.io package records
    #: it without the rest of the training config): the scale an image of unknown pixel
    #: size is taken to be at. None: unknown.
    data_mpp: float | None = None

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
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{config_path}: not a napari-amasam model config")
    version = doc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{config_path}: format_version {version!r} is not a version number")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{config_path}: written by a newer napari-amasam (model format {version}, this "
            f"version reads up to {FORMAT_VERSION}; package {doc.get('package_version', '?')}); "
            "update napari-amasam")
    try:
        model = ModelConfig.from_dict(doc["model"])
        train = TrainConfig.from_dict(doc["train"]) if doc.get("train") else None
    except (ConfigError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{config_path}: invalid config ({exc})") from None
    mpp = doc.get("mpp")
    if not valid_mpp(mpp):
        raise CheckpointError(f"{config_path}: invalid config (mpp must be a positive finite "
                              f"number or null, not {mpp!r})")
    thresholds = PostprocessConfig()
    thresholds_path = path / "thresholds.json"
    if thresholds_path.is_file():
        try:
            thresholds = PostprocessConfig.from_dict(json.loads(thresholds_path.read_text()))
        except (OSError, ConfigError, json.JSONDecodeError, TypeError) as exc:
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
        data_mpp=train.mpp if train is not None else None,
    )


def resolve_base_checkpoint(folder: ModelFolder, checkpoint: str | Path | None) -> Path | None:
    """Find the SAM checkpoint a model folder was trained on.

    ``tiny`` models keep their random frozen weights in ``base_sam.pt`` inside the folder.
    For vit_* the explicit ``checkpoint`` wins, else the recorded path; its sha256 must match
    the recorded one, so a model is never silently combined with other SAM weights.
    """
    if folder.model.backbone in RANDOM_BACKBONES:
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
    rows = read_history(path)
    rows.append({k: row[k] for k in row})
    write_history(path, rows)


def write_history(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Replace ``history.csv`` by ``rows`` in one atomic write."""
    history_path = Path(path) / "history.csv"
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


def truncate_history(path: str | Path, max_step: int) -> None:
    """Drop rows written after step ``max_step`` (the step of the state a run resumes from).

    A killed run may have logged an epoch whose state it did not save; the resumed run
    re-does it. Rows are kept by step, not epoch, so the row of a final partial epoch (run
    ended by ``max_steps`` mid-epoch) stays. The file is replaced in one atomic write.
    """
    rows = read_history(path)
    kept = [r for r in rows if int(float(r.get("step") or 0)) <= max_step]
    if len(kept) != len(rows):
        write_history(path, kept)


# ----------------------------------------------------------------------- new model folders
def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "last.pt").is_file()


def check_output_folder(out: str | Path, overwrite: bool = False) -> Path:
    """Refuse an ``out`` that a new training run must not write into.

    Accepted: a path that does not exist (its parent is created later), an empty folder, or
    with ``overwrite`` an existing model folder (replaced only when the new one is saved).
    Raises ``OutputError`` naming the path otherwise; nothing is written here.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: is a file, not a folder; choose a folder for the model")
    if out.is_dir() and any(out.iterdir()):
        if _is_model_folder(out):
            if not overwrite:
                raise OutputError(f"{out}: is an existing model folder; resume its training "
                                  "(--resume) or replace it (--overwrite)")
        elif not overwrite:
            raise OutputError(f"{out}: folder is not empty; choose a new or empty folder "
                              "for the model (or --overwrite to replace it)")
        else:
            raise OutputError(f"{out}: folder is not empty and is not a model folder; "
                              "refusing to replace it")
    check_can_create(out)
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(out: str | Path) -> list[Path]:
    """Delete staging folders of ``out`` left by killed runs (not those of running ones)."""
    out = Path(out)
    removed = []
    if not out.parent.is_dir():
        return removed
    for entry in out.parent.glob(f".{out.name}.partial-*"):
        pid = entry.name.rsplit(".partial-", 1)[1].split("-")[0]
        if entry.is_dir() and not (pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    for entry in out.parent.glob(f".{out.name}.replaced-*"):
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def staging_folder(out: str | Path) -> Path:
    """Create the empty folder a new model for ``out`` is written into until its first save."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()  # mode 0777 & ~umask, like any folder the user makes
    return staging


def publish_folder(staging: str | Path, out: str | Path) -> Path:
    """Rename a staging folder to ``out``; an existing ``out`` (``overwrite``) is replaced.

    The old folder is first renamed aside and deleted only after the new one is in place, so
    a kill in between leaves the old model under ``.NAME.replaced-*`` rather than nothing.
    """
    staging, out = Path(staging), Path(out)
    aside = None
    if out.exists():
        aside = out.parent / f".{out.name}.replaced-{secrets.token_hex(4)}"
        os.rename(out, aside)
    os.rename(staging, out)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return out


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
