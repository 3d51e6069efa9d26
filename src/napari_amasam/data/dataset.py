"""Training crops from one domain, mixed-domain batches and the train/validation split.

Every random choice comes from a ``np.random.Generator`` derived from ``(seed, step)``, so a
resumed training run draws exactly the batches the interrupted run would have drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from napari_amasam.data.augment import AUXILIARY_STRENGTH, PRIMARY_STRENGTH, augment_sample
from napari_amasam.data.folders import Pair
from napari_amasam.data.io import read_image, read_labels
from napari_amasam.data.targets import instance_targets
from napari_amasam.errors import DataError

# A crop with no nuclei teaches only background; try this many positions before accepting one.
_CROP_ATTEMPTS = 5


def rescaled_shape(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    """``(H, W)`` after scaling by ``factor`` (at least 1 pixel each)."""
    return max(1, int(round(shape[0] * factor))), max(1, int(round(shape[1] * factor)))


def rescale_image(image: np.ndarray, factor: float) -> np.ndarray:
    """Bilinear resize of an ``H x W x 3`` image by ``factor`` (anti-aliased when shrinking).

    Returns
    -------
    ndarray
        ``round(H*factor) x round(W*factor) x 3`` uint8.
    """
    if factor == 1.0:
        return image
    from skimage.transform import resize

    height, width = rescaled_shape(image.shape[:2], factor)
    resized = resize(
        image,
        (height, width, image.shape[2]),
        order=1,
        preserve_range=True,
        anti_aliasing=factor < 1.0,
    )
    return np.clip(np.rint(resized), 0, 255).astype(np.uint8)


def rescale_labels(labels: np.ndarray, factor: float) -> np.ndarray:
    """Nearest-neighbour resize of an ``H x W`` label map (ids are never blended).

    Returns
    -------
    ndarray
        ``round(H*factor) x round(W*factor)``, same dtype.
    """
    if factor == 1.0:
        return labels
    height, width = rescaled_shape(labels.shape, factor)
    # Source pixel whose centre is nearest each output pixel centre.
    rows = np.minimum((np.arange(height) + 0.5) * labels.shape[0] / height, labels.shape[0] - 1)
    cols = np.minimum((np.arange(width) + 0.5) * labels.shape[1] / width, labels.shape[1] - 1)
    return labels[rows.astype(np.intp)[:, None], cols.astype(np.intp)[None, :]]


class DomainDataset:
    """Images and labels of one domain, loaded once and cropped at random.

    Parameters
    ----------
    pairs : sequence of Pair
        Image/label files (e.g. from :func:`~napari_amasam.data.folders.find_pairs`).
    domain : int
        Domain index: 0 = primary, 1..K-1 = auxiliary folders.
    mpp : float, optional
        Microns per pixel of these images.
    target_mpp : float, optional
        Microns per pixel the model works at. When both are given, images are resized by
        ``mpp / target_mpp`` (bilinear) and labels likewise (nearest neighbour) on load.
    augment_strength : float, optional
        Stain/colour jitter amplitude; default 0.05 for domain 0 and 0.1 otherwise.
    blur_probability : float
        Chance of a mild blur per augmented crop.
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        domain: int,
        mpp: float | None = None,
        target_mpp: float | None = None,
        *,
        augment_strength: float | None = None,
        blur_probability: float = 0.2,
    ):
        self.pairs = list(pairs)
        if not self.pairs:
            raise DataError("<dataset>", f"domain {domain} has no image/label pairs")
        if (mpp is not None and mpp <= 0) or (target_mpp is not None and target_mpp <= 0):
            raise DataError(self.pairs[0].image.parent, "microns per pixel must be positive")
        self.domain = int(domain)
        self.scale = float(mpp) / float(target_mpp) if mpp and target_mpp else 1.0
        if augment_strength is None:
            augment_strength = PRIMARY_STRENGTH if self.domain == 0 else AUXILIARY_STRENGTH
        self.augment_strength = float(augment_strength)
        self.blur_probability = float(blur_probability)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._targets: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``H x W x 3`` uint8 and labels ``H x W`` int32 of pair ``index`` (rescaled, cached)."""
        if index not in self._cache:
            pair = self.pairs[index]
            image = read_image(pair.image)
            labels = read_labels(pair.label)
            if image.shape[:2] != labels.shape:
                raise DataError(
                    pair.label,
                    f"label size {labels.shape[0]}x{labels.shape[1]} does not match image "
                    f"{pair.image.name} ({image.shape[0]}x{image.shape[1]})",
                )
            self._cache[index] = (
                rescale_image(image, self.scale),
                rescale_labels(labels, self.scale),
            )
        return self._cache[index]

    def targets(self, index: int) -> np.ndarray:
        """Targets of the whole image ``index``, ``H x W x 3`` uint8 = round(255 * target)
        (cached).

        Computed once per image rather than per crop: the per-object distance transforms are
        most of a batch's data cost, and a nucleus cut by a crop's edge keeps the distances
        of the whole nucleus (the crop edge is not its border). Stored as uint8 (steps of
        1/255, well below what the soft-Dice distance losses resolve) the cache costs 3 bytes
        a pixel, as much as the image itself.
        """
        if index not in self._targets:
            whole = instance_targets(self.load(index)[1])
            self._targets[index] = np.ascontiguousarray(
                np.rint(np.moveaxis(whole, 0, -1) * 255.0), np.uint8)
        return self._targets[index]

    def _random_window(
        self, rng: np.random.Generator, size: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A ``size``-sided window (or the whole image if smaller) of a random image:
        views of its image, labels and :meth:`targets`."""
        index = int(rng.integers(len(self)))
        image, labels = self.load(index)
        height, width = labels.shape
        top = int(rng.integers(0, height - size + 1)) if height > size else 0
        left = int(rng.integers(0, width - size + 1)) if width > size else 0
        window = (slice(top, top + size), slice(left, left + size))
        return image[window], labels[window], self.targets(index)[window]

    def sample_crop(
        self, rng: np.random.Generator, size: int, augment: bool = True
    ) -> dict[str, Any]:
        """Draw one training crop, preferring crops that contain nuclei.

        Parameters
        ----------
        rng : np.random.Generator
            Source of every random choice (image, position, augmentation).
        size : int
            Crop side S (the model input size). Smaller images are padded bottom/right with 0.
        augment : bool
            Apply flips/rotations, stain jitter, brightness/contrast and blur.

        Returns
        -------
        dict
            ``image`` 3 x S x S float32 (0-255), ``targets`` 3 x S x S float32 (the window
            of :func:`~napari_amasam.data.targets.instance_targets` of the whole image, moved
            with the labels; 0 on padding), ``labels`` S x S int32, ``valid`` S x S bool
            (False on padding, for losses to ignore), ``domain`` int.
        """
        for _ in range(_CROP_ATTEMPTS):
            image_window, label_window, target_window = self._random_window(rng, size)
            if label_window.any():
                break
        height, width = label_window.shape
        image = np.zeros((size, size, 3), np.uint8)
        labels = np.zeros((size, size), np.int32)
        valid = np.zeros((size, size), bool)
        targets = np.zeros((size, size, 3), np.uint8)
        image[:height, :width] = image_window
        labels[:height, :width] = label_window
        valid[:height, :width] = True
        targets[:height, :width] = target_window
        if augment:
            image, labels, valid, targets = augment_sample(
                image, labels, rng, self.augment_strength, valid, self.blur_probability,
                targets=targets,
            )
        return {
            "image": np.ascontiguousarray(np.moveaxis(image, -1, 0), dtype=np.float32),
            "targets": np.moveaxis(targets, -1, 0).astype(np.float32) / np.float32(255.0),
            "labels": labels.astype(np.int32, copy=False),
            "valid": valid,
            "domain": self.domain,
        }


def primary_rows(batch_size: int, primary_share: float, n_auxiliary: int) -> int:
    """Primary samples per batch: ``round(batch_size * primary_share)`` (halves round up),
    at least 1; all of the batch when there are no auxiliary domains."""
    if n_auxiliary == 0:
        return batch_size
    return int(min(batch_size, max(1, math.floor(batch_size * primary_share + 0.5))))


class MultiDomainSampler:
    """Mixed-domain batches, reproducible from ``(seed, step)``.

    Parameters
    ----------
    datasets : list of DomainDataset
        ``datasets[0]`` is the primary domain (domain 0); the rest are auxiliary.
    batch_size : int
        Samples per batch B.
    primary_share : float
        Fraction of each batch from the primary domain (see :func:`primary_rows`); the other
        rows pick an auxiliary domain uniformly at random, each row independently.
    seed : int
        Base seed.
    crop_size : int
        Crop side S (the model's ``image_size``).
    augment : bool
        Augment crops.
    """

    def __init__(
        self,
        datasets: Sequence[DomainDataset],
        batch_size: int,
        primary_share: float,
        seed: int,
        crop_size: int = 1024,
        augment: bool = True,
    ):
        self.datasets = list(datasets)
        if not self.datasets:
            raise ValueError("MultiDomainSampler needs at least the primary dataset")
        if self.datasets[0].domain != 0:
            raise ValueError(
                f"datasets[0] must be the primary domain 0, not {self.datasets[0].domain}"
            )
        if batch_size < 1:
            raise ValueError("batch size must be at least 1")
        self.batch_size = int(batch_size)
        self.primary_share = float(primary_share)
        self.seed = int(seed)
        self.crop_size = int(crop_size)
        self.augment = bool(augment)
        self.n_primary = primary_rows(self.batch_size, self.primary_share, len(self.datasets) - 1)

    def samples(self, step: int) -> list[dict[str, Any]]:
        """The batch of ``step`` as a list of :meth:`DomainDataset.sample_crop` dicts."""
        rng = np.random.default_rng([self.seed, int(step)])
        n_auxiliary = len(self.datasets) - 1
        sources = [0] * self.n_primary
        if n_auxiliary:
            sources += (1 + rng.integers(0, n_auxiliary, self.batch_size - self.n_primary)).tolist()
        return [
            self.datasets[source].sample_crop(rng, self.crop_size, self.augment)
            for source in sources
        ]

    def batch(self, step: int) -> dict[str, Any]:
        """The batch of ``step`` as torch tensors.

        Returns
        -------
        dict
            ``image`` B x 3 x S x S float32 (0-255), ``targets`` B x 3 x S x S float32,
            ``labels`` B x S x S int32, ``valid`` B x S x S bool, ``domain`` B int64.
        """
        import torch

        samples = self.samples(step)
        stacked = {
            key: torch.from_numpy(np.stack([s[key] for s in samples]))
            for key in ("image", "targets", "labels", "valid")
        }
        stacked["domain"] = torch.tensor([s["domain"] for s in samples], dtype=torch.long)
        return stacked


def split_train_val(
    pairs: Sequence[Pair], val_fraction: float, seed: int
) -> tuple[list[Pair], list[Pair]]:
    """Hold out a deterministic random share of the pairs for validation.

    Parameters
    ----------
    pairs : sequence of Pair
    val_fraction : float
        Share held out, in [0, 1). With 2+ pairs and a positive fraction at least one pair is
        held out and at least one kept for training; 0, or a single pair, holds out none.
    seed : int

    Returns
    -------
    train, val : list of Pair
        Each in the input order.
    """
    pairs = list(pairs)
    if len(pairs) < 2 or val_fraction <= 0:
        return pairs, []
    n_val = min(len(pairs) - 1, max(1, int(round(len(pairs) * val_fraction))))
    held_out = set(np.random.default_rng(seed).permutation(len(pairs))[:n_val].tolist())
    train = [p for i, p in enumerate(pairs) if i not in held_out]
    val = [p for i, p in enumerate(pairs) if i in held_out]
    return train, val
