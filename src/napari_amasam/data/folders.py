"""Training-folder convention, image/label pairing and a check that reports every problem.

Folder convention
-----------------
A data folder ``DIR`` holds ``DIR/images/*`` and ``DIR/labels/*`` (or ``DIR/masks/*``).
Images and labels are paired by file stem; a label stem may carry one of the suffixes
``_label``, ``_labels``, ``_mask`` or ``_masks`` (``images/a.png`` pairs with
``labels/a.tif`` or ``labels/a_masks.tif``). If ``DIR`` has no ``images/`` but has a
``train/`` sub-folder that follows the convention (a dataset root with splits, like
MoNuSeg's), ``DIR/train`` is used. Files with other suffixes and hidden files are ignored.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_amasam.data.io import IMAGE_EXTENSIONS, read_image, read_labels
from napari_amasam.errors import DataError

#: Suffixes a label file's stem may add to its image's stem.
LABEL_SUFFIXES: tuple[str, ...] = ("_labels", "_label", "_masks", "_mask")
#: Label sub-folder names, in order of preference.
LABEL_FOLDER_NAMES: tuple[str, ...] = ("labels", "masks")


@dataclass(frozen=True)
class Pair:
    """One image and its instance-label file."""

    image: Path
    label: Path
    stem: str


def _count(n: int, singular: str, plural: str | None = None) -> str:
    return f"{n} {singular if n == 1 else (plural or singular + 's')}"


class FolderCheckError(DataError):
    """One or more data folders failed the check; ``str()`` lists every problem, one per line."""

    def __init__(self, path: str | Path, problems: list[str]):
        self.problems = list(problems)
        super().__init__(
            path, f"{_count(len(problems), 'problem')} in the data folders:\n" + "\n".join(problems)
        )


def resolve_data_dir(directory: str | Path) -> Path:
    """Return the folder that holds ``images/``: ``directory`` itself or its ``train/``."""
    directory = Path(directory)
    if not (directory / "images").is_dir() and (directory / "train" / "images").is_dir():
        return directory / "train"
    return directory


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def label_folder(root: str | Path) -> Path:
    """The label sub-folder of data folder ``root``: ``labels/`` or ``masks/`` if one exists
    (in that order), else ``labels/`` (where a new folder's labels go)."""
    root = Path(root)
    for name in LABEL_FOLDER_NAMES:
        if (root / name).is_dir():
            return root / name
    return root / LABEL_FOLDER_NAMES[0]


def strip_label_suffix(stem: str) -> str:
    """``stem`` without a trailing label suffix (``a_masks`` -> ``a``; case-insensitive)."""
    lowered = stem.lower()
    for suffix in LABEL_SUFFIXES:
        if lowered.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def label_stems(name: str) -> set[str]:
    """Every label-file stem that pairs with image stem ``name``."""
    return {name} | {name + suffix for suffix in LABEL_SUFFIXES}


def label_files(folder: str | Path) -> dict[str, Path]:
    """Label files of a folder keyed by the image stem they belong to (for ``evaluate``).

    ``folder`` is a data folder (its ``labels/`` or ``masks/`` is used; a dataset root with
    ``train/`` resolves as for training) or a folder of label files itself. Label suffixes
    are removed from the stems (``a_labels.tif`` -> ``a``).

    Raises
    ------
    DataError
        If two files map to the same stem (e.g. ``a.tif`` and ``a_labels.tif``).
    """
    root = resolve_data_dir(folder)
    directory = label_folder(root)
    if not directory.is_dir():
        directory = Path(folder)
    files: dict[str, Path] = {}
    for path in _image_files(directory):
        stem = strip_label_suffix(path.stem)
        if stem in files:
            raise DataError(path, f"and {files[stem].name} both hold labels of {stem!r}")
        files[stem] = path
    return files


def _label_key(label_stem: str, image_stems: set[str]) -> str:
    """Image stem a label file belongs to (its own stem, or minus a label suffix)."""
    if label_stem in image_stems:
        return label_stem
    lowered = label_stem.lower()
    for suffix in LABEL_SUFFIXES:
        if lowered.endswith(suffix) and label_stem[: -len(suffix)] in image_stems:
            return label_stem[: -len(suffix)]
    return label_stem


@dataclass
class _Scan:
    """Result of listing one folder (no pixel data read yet)."""

    root: Path
    pairs: list[Pair] = field(default_factory=list)
    problems: list[DataError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _scan(directory: str | Path) -> _Scan:
    """List and pair the files of one data folder, recording structural problems."""
    given = Path(directory)
    root = resolve_data_dir(given)
    scan = _Scan(root=root)
    if not given.exists():
        scan.problems.append(DataError(given, "folder does not exist"))
        return scan
    if not given.is_dir():
        scan.problems.append(DataError(given, "is not a folder"))
        return scan

    image_dir = root / "images"
    # label_folder() picks the first of these; both existing is worth a warning.
    label_dirs = [root / name for name in LABEL_FOLDER_NAMES if (root / name).is_dir()]
    if not image_dir.is_dir():
        scan.problems.append(
            DataError(root, "no images/ sub-folder (expected images/ and labels/)")
        )
    if not label_dirs:
        scan.problems.append(DataError(root, "no labels/ (or masks/) sub-folder"))
    if scan.problems:
        return scan
    label_dir = label_dirs[0]
    if len(label_dirs) > 1:
        scan.warnings.append(f"{root}: both labels/ and masks/ exist; using labels/")

    images = _image_files(image_dir)
    labels = _image_files(label_dir)
    if not images:
        scan.problems.append(
            DataError(image_dir, f"no image files ({', '.join(IMAGE_EXTENSIONS)})")
        )
    if not labels:
        scan.problems.append(
            DataError(label_dir, f"no label files ({', '.join(IMAGE_EXTENSIONS)})")
        )
    if not images or not labels:
        return scan

    images_by_stem: dict[str, list[Path]] = {}
    for image in images:
        images_by_stem.setdefault(image.stem, []).append(image)
    labels_by_stem: dict[str, list[Path]] = {}
    for label in labels:
        labels_by_stem.setdefault(_label_key(label.stem, set(images_by_stem)), []).append(label)

    for stem in sorted(images_by_stem):
        stem_images = images_by_stem[stem]
        stem_labels = labels_by_stem.get(stem, [])
        if len(stem_images) > 1:
            names = ", ".join(p.name for p in stem_images)
            scan.problems.append(
                DataError(image_dir, f"several images share the name {stem!r} ({names})")
            )
            continue
        if not stem_labels:
            scan.problems.append(
                DataError(stem_images[0], f"no label file for this image in {label_dir}")
            )
            continue
        if len(stem_labels) > 1:
            names = ", ".join(p.name for p in stem_labels)
            scan.problems.append(DataError(stem_images[0], f"several label files match ({names})"))
            continue
        scan.pairs.append(Pair(image=stem_images[0], label=stem_labels[0], stem=stem))
    for stem in sorted(set(labels_by_stem) - set(images_by_stem)):
        for label in labels_by_stem[stem]:
            scan.problems.append(DataError(label, f"no image file for this label in {image_dir}"))
    return scan


def find_pairs(directory: str | Path) -> list[Pair]:
    """Pair the images and labels of a data folder (see the module docstring).

    Parameters
    ----------
    directory : str or Path
        ``DIR`` with ``images/`` and ``labels/`` (or ``masks/``), or a dataset root with
        ``train/`` following that layout.

    Returns
    -------
    list of Pair
        Matched pairs sorted by stem. Unmatched files are left out; :func:`check_folders`
        reports them.

    Raises
    ------
    DataError
        If the folder or its sub-folders are missing or empty.
    """
    scan = _scan(directory)
    if not scan.pairs:
        if scan.problems:
            raise scan.problems[0]
        raise DataError(directory, "no image/label pairs")
    return scan.pairs


#: Name used in architecture.md.
pair_folder = find_pairs


@dataclass
class FolderCheck:
    """Check result of one data folder.

    Attributes
    ----------
    path : Path
        Folder as given; ``root`` is where ``images/`` was found (``path`` or ``path/train``).
    role : str
        ``primary`` or ``auxiliary 1``, ``auxiliary 2``, ...
    pairs : list of Pair
        Pairs whose files read correctly and match in size.
    n_nuclei : int
        Nuclei (distinct non-zero ids) over the valid pairs.
    image_sizes : Counter
        ``"HxW"`` -> number of valid images of that size.
    """

    path: Path
    root: Path
    role: str
    pairs: list[Pair] = field(default_factory=list)
    n_nuclei: int = 0
    image_sizes: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def n_pairs(self) -> int:
        """Number of valid pairs."""
        return len(self.pairs)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly description (stored in a model's config.json)."""
        return {
            "path": str(self.path),
            "n_pairs": self.n_pairs,
            "n_nuclei": self.n_nuclei,
            "image_sizes": dict(sorted(self.image_sizes.items())),
        }


@dataclass
class FolderReport:
    """All problems and warnings found in the primary and auxiliary folders."""

    folders: list[FolderCheck]

    @property
    def problems(self) -> list[str]:
        """Every problem, each naming its file or folder."""
        return [p for folder in self.folders for p in folder.problems]

    @property
    def warnings(self) -> list[str]:
        """Things that do not stop training but the user should know."""
        return [w for folder in self.folders for w in folder.warnings]

    @property
    def ok(self) -> bool:
        """True when no problems were found."""
        return not self.problems

    @property
    def n_pairs(self) -> dict[str, int]:
        """Valid pairs per folder (keyed by the folder path as given)."""
        return {str(folder.path): folder.n_pairs for folder in self.folders}

    def raise_if_failed(self) -> None:
        """Raise :class:`FolderCheckError` listing every problem, one per line."""
        if not self.ok:
            # Named after the folder that failed (an empty auxiliary folder is not the primary's
            # problem).
            failing = [f for f in self.folders if f.problems] or self.folders
            raise FolderCheckError(failing[0].path if failing else ".", self.problems)

    def summary(self) -> dict[str, Any]:
        """Per folder: path, n_pairs, n_nuclei, image sizes (JSON-friendly)."""
        primary = [f.summary() for f in self.folders if f.role == "primary"]
        return {
            "primary": primary[0] if primary else None,
            "aux": [f.summary() for f in self.folders if f.role != "primary"],
        }

    def text(self) -> str:
        """Short human-readable status, e.g. for a widget label."""
        lines = [
            f"{f.role}: {_count(f.n_pairs, 'valid pair')}, {_count(f.n_nuclei, 'nucleus', 'nuclei')}, "
            f"{_count(len(f.problems), 'problem')}"
            for f in self.folders
        ]
        return "\n".join(lines + self.problems + [f"warning: {w}" for w in self.warnings])


def _check_pair(pair: Pair, check: FolderCheck) -> int | None:
    """Read one pair, record problems/warnings; return its nucleus count if valid."""
    shape = None
    try:
        shape = read_image(pair.image).shape[:2]
    except DataError as exc:
        check.problems.append(str(exc))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            labels = read_labels(pair.label)
        check.warnings.extend(str(w.message) for w in caught)
    except DataError as exc:
        check.problems.append(str(exc))
        return None
    if shape is None:
        return None
    if labels.shape != shape:
        check.problems.append(
            f"{pair.label}: label size {labels.shape[0]}x{labels.shape[1]} does not match "
            f"image {pair.image.name} ({shape[0]}x{shape[1]})"
        )
        return None
    # Count distinct ids without sorting (bincount is linear in pixels).
    counts = np.bincount(labels.ravel())
    n_nuclei = int(np.count_nonzero(counts[1:]))
    if n_nuclei == 0:
        check.warnings.append(f"{pair.label}: no nuclei in this label (empty)")
    check.image_sizes[f"{shape[0]}x{shape[1]}"] += 1
    return n_nuclei


def check_folder(directory: str | Path, role: str = "primary") -> FolderCheck:
    """Check one data folder, reading every file once.

    Parameters
    ----------
    directory : str or Path
        Data folder (see the module docstring).
    role : str
        Label used in summaries (``primary``, ``auxiliary 1``, ...).

    Returns
    -------
    FolderCheck
        Valid pairs, nuclei count, image sizes and all problems found.
    """
    scan = _scan(directory)
    check = FolderCheck(
        path=Path(directory),
        root=scan.root,
        role=role,
        problems=[str(p) for p in scan.problems],
        warnings=list(scan.warnings),
    )
    for pair in scan.pairs:
        n_nuclei = _check_pair(pair, check)
        if n_nuclei is not None:
            check.pairs.append(pair)
            check.n_nuclei += n_nuclei
    if check.pairs and check.n_nuclei == 0:
        check.problems.append(f"{check.root}: no nuclei in any label file (all labels are empty)")
    return check


def check_folders(primary: str | Path, aux: list[str | Path] | tuple = ()) -> FolderReport:
    """Check the primary and auxiliary folders and collect every problem.

    Parameters
    ----------
    primary : str or Path
        The user's own data (domain 0).
    aux : list of str or Path
        Auxiliary folders (domains 1..K-1).

    Returns
    -------
    FolderReport
        Use ``report.ok`` / ``report.raise_if_failed()``; ``report.summary()`` for config.json.
    """
    folders = [check_folder(primary, "primary")]
    seen = {Path(primary).resolve()}
    for index, directory in enumerate(aux, start=1):
        check = check_folder(directory, f"auxiliary {index}")
        resolved = Path(directory).resolve()
        if resolved in seen:
            check.warnings.append(f"{directory}: folder is given more than once")
        seen.add(resolved)
        folders.append(check)
    return FolderReport(folders=folders)
