"""Domain datasets, augmentation, mixed-domain batches and the train/val split."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
import torch

from napari_amasam.data.augment import augment_sample, flip_rotate, hed_jitter
from napari_amasam.data.dataset import (
    DomainDataset,
    MultiDomainSampler,
    primary_rows,
    rescale_labels,
    split_train_val,
)
from napari_amasam.data.folders import Pair, find_pairs
from napari_amasam.data.io import read_image, read_labels
from napari_amasam.data.targets import instance_targets
from napari_amasam.errors import DataError

from .helpers import CONSEP, MONUSEG, TNBC


@pytest.fixture(scope="module")
def tnbc_pairs() -> list[Pair]:
    return find_pairs(TNBC)[:3]


@pytest.fixture(scope="module")
def consep_pairs() -> list[Pair]:
    return find_pairs(CONSEP)


def _check_sample(sample, size, domain):
    assert sample["image"].shape == (3, size, size) and sample["image"].dtype == np.float32
    assert sample["targets"].shape == (3, size, size) and sample["targets"].dtype == np.float32
    assert sample["labels"].shape == (size, size) and sample["labels"].dtype == np.int32
    assert sample["valid"].shape == (size, size) and sample["valid"].dtype == bool
    assert sample["domain"] == domain
    assert 0 <= sample["image"].min() and sample["image"].max() <= 255
    # Targets always describe the returned (augmented) labels: the foreground exactly, the
    # distances inside the nuclei only.
    np.testing.assert_array_equal(sample["targets"][0], sample["labels"] > 0)
    assert np.all(sample["targets"][1:, sample["labels"] == 0] == 0)


def test_sample_crop_from_large_images(tnbc_pairs):
    dataset = DomainDataset(tnbc_pairs, domain=0)
    rng = np.random.default_rng(0)
    for augment in (False, True):
        sample = dataset.sample_crop(rng, 128, augment=augment)
        _check_sample(sample, 128, 0)
        assert sample["valid"].all()
        assert sample["labels"].any()


def test_unaugmented_crop_is_a_window_of_the_image(tnbc_pairs):
    dataset = DomainDataset(tnbc_pairs[:1], domain=2)
    sample = dataset.sample_crop(np.random.default_rng(5), 100, augment=False)
    image = read_image(tnbc_pairs[0].image)
    labels = read_labels(tnbc_pairs[0].label)
    crop = np.moveaxis(sample["image"], 0, -1).astype(np.uint8)
    hits = np.argwhere(np.all(image[:-99, :-99] == crop[0, 0], axis=-1))
    assert any(
        np.array_equal(image[r : r + 100, c : c + 100], crop)
        and np.array_equal(labels[r : r + 100, c : c + 100], sample["labels"])
        for r, c in hits
    )


def test_crop_targets_are_the_whole_images_targets_moved_with_the_crop(tnbc_pairs):
    """Targets are computed once per image: a crop holds the window of the whole image's
    targets (a nucleus cut by the crop edge keeps its whole-nucleus distances), and the
    augmented crop the same window flipped/rotated with the image and labels."""
    dataset = DomainDataset(tnbc_pairs[:1], domain=0)
    labels = read_labels(tnbc_pairs[0].label)
    whole = instance_targets(labels)
    plain = dataset.sample_crop(np.random.default_rng(11), 200, augment=False)
    hits = [(r, c) for r in range(labels.shape[0] - 199) for c in range(labels.shape[1] - 199)
            if np.array_equal(labels[r : r + 200, c : c + 200], plain["labels"])]
    assert len(hits) == 1
    r, c = hits[0]
    # uint8 storage: distances in [0, 1] to within half a step of 1/255
    np.testing.assert_allclose(plain["targets"], whole[:, r : r + 200, c : c + 200],
                               atol=0.5 / 255 + 1e-6)
    cut = instance_targets(plain["labels"])  # what per-crop targets would have been
    assert np.abs(cut - plain["targets"]).max() > 0.1  # the edge nuclei differ
    # Same draws up to the window, then the augmentation moves everything together.
    moved = dataset.sample_crop(np.random.default_rng(11), 200, augment=True)
    matches = [
        k for k in range(8)
        if np.array_equal(_dihedral(plain["labels"], k), moved["labels"])
        and np.array_equal(_dihedral(np.moveaxis(plain["targets"], 0, -1), k),
                           np.moveaxis(moved["targets"], 0, -1))
    ]
    assert matches


def _dihedral(array, k):
    """The k-th of the 8 flips/rotations of the first two axes."""
    if k >= 4:
        array = array[:, ::-1]
    return np.rot90(array, k % 4, axes=(0, 1))


def test_small_image_is_padded_with_a_valid_mask(consep_pairs):
    dataset = DomainDataset(consep_pairs[:2], domain=1)
    rng = np.random.default_rng(1)
    for augment in (False, True):
        sample = dataset.sample_crop(rng, 320, augment=augment)
        _check_sample(sample, 320, 1)
        valid = sample["valid"]
        assert valid.sum() == 256 * 256
        assert np.all(sample["image"][:, ~valid] == 0)
        assert np.all(sample["labels"][~valid] == 0)
        assert np.all(sample["targets"][:, ~valid] == 0)
    # Without augmentation the image sits top-left, as the predictor pads.
    sample = dataset.sample_crop(rng, 320, augment=False)
    assert sample["valid"][:256, :256].all()


def test_crops_favour_nuclei(tmp_path, consep_pairs):
    empty = [p for p in consep_pairs if p.stem == "test_7_005"]
    assert read_labels(empty[0].label).max() == 0
    # One image without nuclei and one with: a naive sampler would give ~50% empty crops.
    dataset = DomainDataset(empty + consep_pairs[:1], domain=0)
    rng = np.random.default_rng(2)
    with_nuclei = [dataset.sample_crop(rng, 64, augment=False)["labels"].any() for _ in range(60)]
    assert sum(with_nuclei) >= 54


def test_mpp_rescale(tnbc_pairs):
    original = read_labels(tnbc_pairs[0].label)
    up = DomainDataset(tnbc_pairs[:1], domain=0, mpp=0.5, target_mpp=0.25)
    image, labels = up.load(0)
    assert image.shape == (1024, 1024, 3) and labels.shape == (1024, 1024)
    assert labels.dtype == np.int32
    # Nearest neighbour: the same ids, no new (blended) values, areas scale by 4.
    assert set(np.unique(labels)) == set(np.unique(original))
    assert (labels > 0).sum() == pytest.approx(4 * (original > 0).sum(), rel=0.01)
    down = DomainDataset(tnbc_pairs[:1], domain=0, mpp=0.25, target_mpp=0.5)
    image, labels = down.load(0)
    assert image.shape == (256, 256, 3) and labels.shape == (256, 256)
    assert set(np.unique(labels)) <= set(np.unique(original))
    same = DomainDataset(tnbc_pairs[:1], domain=0, mpp=0.25)  # no target: native scale
    assert same.load(0)[1].shape == (512, 512)


def test_rescale_labels_exact_for_integer_factors():
    labels = np.arange(12, dtype=np.int32).reshape(3, 4)
    np.testing.assert_array_equal(
        rescale_labels(labels, 2.0), np.kron(labels, np.ones((2, 2), int))
    )


def test_augmentation_moves_image_and_labels_together():
    rng = np.random.default_rng(4)
    labels = np.zeros((48, 48), np.int32)
    labels[3:20, 5:12] = 1
    labels[30:44, 25:46] = 2
    # Image encodes the labels, so any geometric mismatch would show.
    image = np.stack([labels * 100 + 20] * 3, axis=-1).astype(np.uint8)
    for _ in range(8):
        out_image, out_labels, valid = augment_sample(
            image, labels, rng, strength=0.0, blur_probability=0.0
        )
        assert out_labels.dtype == labels.dtype and valid.all()
        np.testing.assert_array_equal(out_image[..., 0], out_labels * 100 + 20)
        assert Counter(out_labels.ravel().tolist()) == Counter(labels.ravel().tolist())


def test_flip_rotate_covers_the_dihedral_group():
    array = np.arange(9).reshape(3, 3)
    rng = np.random.default_rng(0)
    seen = {flip_rotate(rng, array)[0].tobytes() for _ in range(200)}
    assert len(seen) == 8


def test_hed_jitter_changes_colour_mildly_and_auxiliary_more(tnbc_pairs):
    image = read_image(tnbc_pairs[0].image)[:128, :128]
    primary_change, auxiliary_change = [], []
    for seed in range(6):
        primary_change.append(
            np.abs(hed_jitter(image, np.random.default_rng(seed), 0.05) - image).mean()
        )
        auxiliary_change.append(
            np.abs(hed_jitter(image, np.random.default_rng(seed), 0.1) - image).mean()
        )
    assert 0.2 < np.mean(primary_change) < 15
    assert np.mean(auxiliary_change) > np.mean(primary_change)
    np.testing.assert_allclose(hed_jitter(image, np.random.default_rng(0), 0.0), image)


def test_default_strength_by_domain(tnbc_pairs):
    assert DomainDataset(tnbc_pairs, 0).augment_strength == 0.05
    assert DomainDataset(tnbc_pairs, 1).augment_strength == 0.1


@pytest.fixture(scope="module")
def sampler_datasets(tnbc_pairs, consep_pairs):
    return [
        DomainDataset(tnbc_pairs, 0),
        DomainDataset(consep_pairs[:3], 1),
        DomainDataset(find_pairs(MONUSEG)[:2], 2),
    ]


def test_batch_composition(sampler_datasets):
    sampler = MultiDomainSampler(
        sampler_datasets, batch_size=4, primary_share=0.5, seed=0, crop_size=64
    )
    batch = sampler.batch(0)
    assert batch["image"].shape == (4, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["targets"].shape == (4, 3, 64, 64) and batch["targets"].dtype == torch.float32
    assert batch["valid"].shape == (4, 64, 64) and batch["valid"].dtype == torch.bool
    assert batch["labels"].shape == (4, 64, 64)
    assert batch["domain"].dtype == torch.long
    assert (batch["domain"] == 0).sum() == 2 and (batch["domain"] > 0).sum() == 2
    # Auxiliary rows come from both auxiliary domains over a few steps.
    small = MultiDomainSampler(
        sampler_datasets, batch_size=4, primary_share=0.25, seed=1, crop_size=32, augment=False
    )
    domains = Counter(d for step in range(10) for d in small.batch(step)["domain"].tolist())
    assert domains[0] == 10 and domains[1] > 0 and domains[2] > 0
    assert domains[1] + domains[2] == 30


def test_primary_rows():
    assert primary_rows(4, 0.5, n_auxiliary=2) == 2
    assert primary_rows(5, 0.5, n_auxiliary=1) == 3
    assert primary_rows(4, 0.1, n_auxiliary=1) == 1  # at least one primary sample
    assert primary_rows(4, 1.0, n_auxiliary=1) == 4
    assert primary_rows(4, 0.25, n_auxiliary=0) == 4  # only primary: all from primary


def test_only_primary(sampler_datasets):
    sampler = MultiDomainSampler(
        sampler_datasets[:1], batch_size=3, primary_share=0.5, seed=0, crop_size=32
    )
    assert sampler.batch(0)["domain"].tolist() == [0, 0, 0]


def test_batches_are_reproducible_from_seed_and_step(sampler_datasets):
    def make(seed):
        return MultiDomainSampler(
            sampler_datasets, batch_size=3, primary_share=0.5, seed=seed, crop_size=48
        )

    first = make(7)
    step_3 = first.batch(3)
    first.batch(4)
    again = first.batch(3)  # no hidden state between calls
    resumed = make(7).batch(3)  # a new sampler, as after resuming a run
    for key in step_3:
        assert torch.equal(step_3[key], again[key]), key
        assert torch.equal(step_3[key], resumed[key]), key
    assert not torch.equal(step_3["image"], first.batch(4)["image"])
    assert not torch.equal(step_3["image"], make(8).batch(3)["image"])


def test_sampler_rejects_non_primary_first(sampler_datasets):
    with pytest.raises(ValueError, match="primary"):
        MultiDomainSampler(sampler_datasets[1:], 2, 0.5, 0)


def _fake_pairs(n):
    return [Pair(Path(f"images/{i}.png"), Path(f"labels/{i}.tif"), str(i)) for i in range(n)]


@pytest.mark.parametrize(
    "n, fraction, n_val",
    [(1, 0.2, 0), (2, 0.2, 1), (3, 0.2, 1), (10, 0.2, 2), (50, 0.2, 10), (2, 0.9, 1), (10, 0.0, 0)],
)
def test_split_sizes(n, fraction, n_val):
    pairs = _fake_pairs(n)
    train, val = split_train_val(pairs, fraction, seed=0)
    assert len(val) == n_val and len(train) == n - n_val
    assert sorted(p.stem for p in train + val) == sorted(p.stem for p in pairs)


def test_split_is_deterministic_and_seeded():
    pairs = _fake_pairs(30)
    assert split_train_val(pairs, 0.2, 42) == split_train_val(pairs, 0.2, 42)
    vals = {tuple(p.stem for p in split_train_val(pairs, 0.2, seed)[1]) for seed in range(5)}
    assert len(vals) > 1


def test_dataset_reports_size_mismatch(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    iio.imwrite(tmp_path / "images/a.png", np.zeros((10, 10, 3), np.uint8))
    tifffile.imwrite(tmp_path / "labels/a.tif", np.ones((12, 10), np.uint16))
    dataset = DomainDataset(find_pairs(tmp_path), 0)
    with pytest.raises(DataError, match="does not match"):
        dataset.load(0)
