"""Save a corrected image + labels as a new training pair (no Qt; used by the Segment widget)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np


def safe_stem(name: str) -> str:
    """A file-name stem from a layer name (letters, digits, ``-``, ``_``, ``.``)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return stem or "image"


def unique_folder(path: Path) -> Path:
    """``path`` if free, else ``path_2``, ``path_3``, ..."""
    if not path.exists():
        return path
    n = 2
    while (candidate := path.with_name(f"{path.name}_{n}")).exists():
        n += 1
    return candidate


def existing_pair_files(folder: str | Path, name: str) -> list[Path]:
    """Files in ``folder/images`` and its label folder that a pair called ``name`` would
    collide with.

    Pairs match by stem, so any image file with that stem (or a label suffix of it) counts,
    whatever its extension.
    """
    from ..data.folders import LABEL_FOLDER_NAMES, label_stems
    from ..data.io import IMAGE_EXTENSIONS

    stems = label_stems(name)
    root = Path(folder)
    return sorted(p for sub in ("images", *LABEL_FOLDER_NAMES) if (root / sub).is_dir()
                  for p in (root / sub).iterdir()
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.stem in stems)


def save_training_pair(folder: str | Path, name: str, image: np.ndarray,
                       labels: np.ndarray) -> tuple[Path, Path]:
    """Write ``folder/images/<name>.png`` and ``<label folder>/<name>.tif``; never overwrite.

    The label folder is the one the folder already uses (``labels/`` or ``masks/``, see
    ``data.folders.label_folder``), so existing pairs keep pairing.

    Parameters
    ----------
    folder : str or Path
        Training data folder (``images/`` and ``labels/`` are created if missing).
    name : str
        Pair stem (made file-name safe).
    image : ndarray
        Any image ``as_rgb_uint8`` accepts (saved as ``H x W x 3 uint8`` PNG).
    labels : (H, W) integer array
        Instance map of the same height and width.

    Raises
    ------
    FileExistsError
        If a file of that pair already exists (the message names it; nothing is written).
    ValueError
        If labels and image sizes differ.
    """
    import imageio.v3 as iio

    from ..data.folders import label_folder
    from ..data.io import as_rgb_uint8
    from ..export import write_labels_tiff

    name = safe_stem(name)
    clashes = existing_pair_files(folder, name)
    if clashes:
        raise FileExistsError(f"{clashes[0]}: already exists; nothing written "
                              "(choose another pair name)")
    rgb = as_rgb_uint8(np.asarray(image), name)
    labels = np.asarray(labels)
    if labels.shape != rgb.shape[:2]:
        raise ValueError(f"{name}: labels {labels.shape} do not match image {rgb.shape[:2]}")
    root = Path(folder)
    image_path, label_path = root / "images" / f"{name}.png", label_folder(root) / f"{name}.tif"
    image_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(image_path, rgb)
    write_labels_tiff(label_path, labels)
    return image_path, label_path
