"""Reading images and labels: formats, conversions and clear errors."""

from __future__ import annotations

import warnings

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from napari_amasam.data.io import (
    BinaryLabelsWarning,
    as_rgb_uint8,
    labels_from_array,
    read_image,
    read_labels,
)
from napari_amasam.errors import DataError

from .helpers import TNBC


@pytest.fixture
def rgb() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)


def test_real_png_and_tif_read_as_canonical_arrays():
    image = read_image(TNBC / "images/01_1.png")
    labels = read_labels(TNBC / "labels/01_1.tif")
    assert image.shape == (512, 512, 3) and image.dtype == np.uint8
    assert labels.shape == (512, 512) and labels.dtype == np.int32
    # stats.json: 69 nuclei in 01_1, ids sequential.
    assert len(np.unique(labels)) - 1 == 69 == labels.max()


def test_rgb_png_roundtrip(tmp_path, rgb):
    iio.imwrite(tmp_path / "a.png", rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgb)


def test_grayscale_is_replicated(tmp_path, rgb):
    gray = rgb[:, :, 0]
    iio.imwrite(tmp_path / "g.png", gray)
    image = read_image(tmp_path / "g.png")
    assert image.shape == (20, 30, 3)
    for channel in range(3):
        np.testing.assert_array_equal(image[:, :, channel], gray)


def test_rgba_alpha_dropped(tmp_path, rgb):
    rgba = np.concatenate([rgb, np.full((20, 30, 1), 7, np.uint8)], axis=2)
    iio.imwrite(tmp_path / "a.png", rgba)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgb)


def test_16bit_rescaled_by_percentiles(tmp_path):
    ramp = np.linspace(1000, 41000, 100 * 100).reshape(100, 100).astype(np.uint16)
    ramp[0, 0] = 65535  # a hot pixel must not compress the range
    tifffile.imwrite(tmp_path / "deep.tif", ramp)
    image = read_image(tmp_path / "deep.tif")
    assert image.dtype == np.uint8 and image.shape == (100, 100, 3)
    flat = image[:, :, 0].ravel()
    assert flat[1] == 0 and flat[-1] == 255
    # The middle of the ramp lands near the middle of 0..255 (not squashed by the hot pixel).
    assert 110 <= flat[5000] <= 145
    assert np.all(np.diff(flat[1:].astype(int)) >= 0)


def test_float_image_rescaled():
    values = np.random.default_rng(1).random((16, 16, 3)).astype(np.float32)
    image = as_rgb_uint8(values)
    assert image.dtype == np.uint8
    assert image.min() == 0 and image.max() == 255
    # Order of intensities is kept.
    order = np.argsort(values.ravel())
    assert np.all(np.diff(image.ravel()[order].astype(int)) >= 0)


def test_wide_integer_with_8bit_values_kept(rgb):
    np.testing.assert_array_equal(as_rgb_uint8(rgb.astype(np.uint16)), rgb)


def test_channel_first_tiff(tmp_path, rgb):
    tifffile.imwrite(tmp_path / "cf.tif", np.moveaxis(rgb, -1, 0), photometric="minisblack")
    assert tifffile.imread(tmp_path / "cf.tif").shape == (3, 20, 30)
    np.testing.assert_array_equal(read_image(tmp_path / "cf.tif"), rgb)


def test_bad_image_shapes_raise():
    with pytest.raises(DataError, match="layer x"):
        as_rgb_uint8(np.zeros((5, 6, 7, 8)), source="layer x")
    with pytest.raises(DataError, match="expected H x W x 3"):
        as_rgb_uint8(np.zeros((8, 9, 10)))


@pytest.mark.parametrize("name", ["broken.png", "broken.tif", "broken.jpg"])
def test_corrupt_file_names_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(DataError, match="cannot be read") as info:
        read_image(path)
    assert str(info.value).startswith(str(path))
    with warnings.catch_warnings(record=True) as caught, pytest.raises(DataError, match="cannot"):
        warnings.simplefilter("always")
        read_labels(path)
    # Labels saved as JPEG are lossy: the user is told even before decoding.
    assert any("lossy" in str(w.message) for w in caught) == name.endswith(".jpg")


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "a.bmp").write_bytes(b"x")
    with pytest.raises(DataError, match="unsupported file type .bmp"):
        read_image(tmp_path / "a.bmp")


def test_integral_float_labels_accepted(tmp_path):
    labels = np.zeros((10, 10), np.float32)
    labels[2:4, 2:4] = 3
    labels[6:8, 6:8] = 7
    tifffile.imwrite(tmp_path / "l.tif", labels)
    out = read_labels(tmp_path / "l.tif")
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, labels.astype(np.int32))


def test_non_integer_labels_rejected(tmp_path):
    labels = np.zeros((10, 10), np.float32)
    labels[2:4, 2:4] = 0.5
    tifffile.imwrite(tmp_path / "prob.tif", labels)
    with pytest.raises(DataError, match="labels are not integers") as info:
        read_labels(tmp_path / "prob.tif")
    assert "prob.tif" in str(info.value)


def test_multichannel_labels_rejected(tmp_path, rgb):
    iio.imwrite(tmp_path / "rgb_label.png", rgb)
    with pytest.raises(DataError, match="single-channel") as info:
        read_labels(tmp_path / "rgb_label.png")
    assert "rgb_label.png" in str(info.value)


def test_negative_labels_rejected():
    with pytest.raises(DataError, match="negative"):
        labels_from_array(np.array([[0, -1], [2, 3]]))


@pytest.mark.parametrize("on_value", [1, 255])
def test_binary_mask_warns_and_is_split(tmp_path, on_value):
    mask = np.zeros((20, 20), np.uint8)
    mask[2:6, 2:6] = on_value
    mask[10:15, 12:18] = on_value
    iio.imwrite(tmp_path / "binary.png", mask)
    with pytest.warns(BinaryLabelsWarning, match="binary.png"):
        labels = read_labels(tmp_path / "binary.png")
    assert labels.dtype == np.int32
    assert sorted(np.unique(labels).tolist()) == [0, 1, 2]
    # Each blob is one id and the background stays 0.
    assert len(np.unique(labels[2:6, 2:6])) == 1 and len(np.unique(labels[10:15, 12:18])) == 1
    assert labels[2, 2] != labels[10, 12]
    assert (labels > 0).sum() == (mask > 0).sum()


def test_single_nucleus_label_is_not_treated_as_binary():
    labels = np.zeros((8, 8), np.uint16)
    labels[2:5, 2:5] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = labels_from_array(labels)
    np.testing.assert_array_equal(out, labels)


def test_instance_map_with_ids_1_and_2_is_not_split():
    labels = np.zeros((8, 8), np.uint16)
    labels[:, :4] = 1
    labels[:, 4:] = 2  # touching objects: splitting by components would merge them
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(labels_from_array(labels), labels)


def test_16bit_rgb_scaled_by_type_range_not_percentiles(rgb):
    # The same colours at 16 bits (x257) come back exactly: no stretch shifts the stain.
    np.testing.assert_array_equal(as_rgb_uint8(rgb.astype(np.uint16) * 257), rgb)
    dim = (rgb.astype(np.uint16) * 257 // 4).astype(np.uint16)  # a darker scan stays darker
    assert as_rgb_uint8(dim).max() <= 64
    # A declared 12-bit depth in uint16 storage.
    twelve = (rgb.astype(np.float64) * 4095 / 255).round().astype(np.uint16)
    assert np.abs(as_rgb_uint8(twelve, bit_depth=12).astype(int) - rgb).max() <= 1
