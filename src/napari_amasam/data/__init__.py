"""Data: reading files, folder checks, training targets, augmentation and batches.

``dataset`` imports torch lazily (only ``MultiDomainSampler.batch`` needs it), so the names
below are cheap to import from the widgets.
"""

from napari_amasam.data.dataset import (
    DomainDataset,
    MultiDomainSampler,
    split_train_val,
)
from napari_amasam.data.folders import (
    FolderCheck,
    FolderCheckError,
    FolderReport,
    Pair,
    check_folder,
    check_folders,
    find_pairs,
    pair_folder,
)
from napari_amasam.data.io import (
    IMAGE_EXTENSIONS,
    BinaryLabelsWarning,
    as_rgb_uint8,
    labels_from_array,
    read_image,
    read_labels,
)
from napari_amasam.data.targets import instance_targets

__all__ = [
    "IMAGE_EXTENSIONS",
    "BinaryLabelsWarning",
    "DomainDataset",
    "FolderCheck",
    "FolderCheckError",
    "FolderReport",
    "MultiDomainSampler",
    "Pair",
    "as_rgb_uint8",
    "check_folder",
    "check_folders",
    "find_pairs",
    "instance_targets",
    "labels_from_array",
    "pair_folder",
    "read_image",
    "read_labels",
    "split_train_val",
]
