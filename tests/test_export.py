"""Export: TIFF dtype and round trip, GeoJSON polygons back to pixels, measurements CSV."""

from __future__ import annotations

import csv
import json
import uuid

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from napari_amasam import export
from napari_amasam.qupath_import import features_to_labels

from .helpers import TNBC

TNBC_ID = "01_1"


@pytest.fixture(scope="module")
def real_crop() -> tuple[np.ndarray, np.ndarray]:
    """A 256x256 crop of a real TNBC label map (ids kept as in the file) and its image."""
    labels = tifffile.imread(TNBC / f"labels/{TNBC_ID}.tif").astype(np.int32)
    image = iio.imread(TNBC / f"images/{TNBC_ID}.png")[..., :3]
    return labels[100:356, 120:376], image[100:356, 120:376]


def _rasterise(feature: dict, shape, offset=(0.0, 0.0), downsample=1.0) -> np.ndarray:
    return features_to_labels([feature], shape, offset, downsample) > 0


def test_geojson_polygons_rasterise_back_to_the_labels(real_crop):
    labels, image = real_crop
    ids = np.unique(labels)[1:]
    assert ids.size > 10  # the crop holds a meaningful number of nuclei
    collection = export.labels_to_geojson(labels, image=image)
    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    assert sorted(f["properties"]["label"] for f in features) == ids.tolist()
    ious = []
    for feature in features:
        geometry = feature["geometry"]
        polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
        for ring in (r for polygon in polygons for r in polygon):
            assert ring[0] == ring[-1] and len(ring) >= 5  # closed ring, at least 4 corners
        truth = labels == feature["properties"]["label"]
        drawn = _rasterise(feature, labels.shape)
        ious.append((truth & drawn).sum() / (truth | drawn).sum())
    assert min(ious) > 0.9, sorted(ious)[:5]
    # Properties QuPath reads.
    props = features[0]["properties"]
    assert props["objectType"] == "detection"
    assert props["classification"] == {"name": "Nucleus", "color": list(export.DEFAULT_COLOR)}
    assert props["measurements"]["Area px^2"] == (labels == props["label"]).sum()
    assert 0 <= props["measurements"]["Mean intensity"] <= 255
    uuid.UUID(features[0]["id"])
    assert len({f["id"] for f in features}) == len(features)


def test_geojson_single_pixel_uses_pixel_edges():
    labels = np.zeros((10, 12), np.uint8)
    labels[5, 7] = 3
    (feature,) = export.labels_to_geojson(labels)["features"]
    ring = np.asarray(feature["geometry"]["coordinates"][0])
    assert ring[:, 0].min() == 7.0 and ring[:, 0].max() == 8.0  # x spans the pixel's column
    assert ring[:, 1].min() == 5.0 and ring[:, 1].max() == 6.0


def test_geojson_offset_and_downsample(real_crop):
    labels, _ = real_crop
    offset, downsample = (1000.0, 2500.0), 4.0
    plain = export.labels_to_geojson(labels)["features"]
    moved = export.labels_to_geojson(
        labels, offset=offset, downsample=downsample, classification="Tumor", color=(1, 2, 3)
    )["features"]
    for a, b in zip(plain, moved, strict=True):
        xy_plain = np.asarray(a["geometry"]["coordinates"][0])
        xy_moved = np.asarray(b["geometry"]["coordinates"][0])
        np.testing.assert_allclose(xy_moved[:, 0], offset[1] + downsample * xy_plain[:, 0])
        np.testing.assert_allclose(xy_moved[:, 1], offset[0] + downsample * xy_plain[:, 1])
    feature = moved[len(moved) // 2]
    truth = labels == feature["properties"]["label"]
    drawn = _rasterise(feature, labels.shape, offset, downsample)
    assert (truth & drawn).sum() / (truth | drawn).sum() > 0.9
    assert feature["properties"]["classification"] == {"name": "Tumor", "color": [1, 2, 3]}


def test_write_geojson_is_valid_json(tmp_path, real_crop):
    labels, _ = real_crop
    path = export.write_geojson(tmp_path / "out" / "nuclei.geojson", labels, offset=(5, 6))
    loaded = json.loads(path.read_text())
    assert len(loaded["features"]) == np.unique(labels).size - 1
    assert "NaN" not in path.read_text()  # mean_intensity left out without an image
    assert [p.name for p in path.parent.iterdir()] == ["nuclei.geojson"]  # no temp file left


def test_empty_labels_give_empty_outputs(tmp_path):
    empty = np.zeros((16, 16), np.int32)
    assert export.labels_to_geojson(empty)["features"] == []
    path = export.write_csv(tmp_path / "empty.csv", empty)
    assert path.read_text().splitlines() == [",".join(export.MEASUREMENT_COLUMNS)]
    columns = export.nucleus_measurements(empty)
    assert all(len(v) == 0 for v in columns.values())


@pytest.mark.parametrize(
    "max_label, dtype", [(200, np.uint8), (255, np.uint8), (256, np.uint16), (70000, np.uint32)]
)
def test_tiff_round_trip_with_smallest_dtype(tmp_path, max_label, dtype):
    labels = np.zeros((40, 50), np.int64)
    labels[3:9, 4:10] = 1
    labels[20:30, 20:35] = max_label
    path = export.write_labels_tiff(tmp_path / "labels.tif", labels)
    back = tifffile.imread(path)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, labels)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE


def test_tiff_rejects_bad_labels(tmp_path):
    with pytest.raises(ValueError, match="negative"):
        export.write_labels_tiff(tmp_path / "x.tif", np.full((4, 4), -1))
    with pytest.raises(ValueError, match="integer"):
        export.write_labels_tiff(tmp_path / "x.tif", np.zeros((4, 4), float))
    with pytest.raises(ValueError, match="uint32"):
        export.write_labels_tiff(tmp_path / "x.tif", np.full((2, 2), 2**32, np.int64))
    assert not list(tmp_path.iterdir())  # nothing written, no temp file left behind


def test_tiff_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = export.write_labels_tiff(tmp_path / "labels.tif", np.ones((4, 4), np.int32))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tifffile, "imwrite", broken)
    with pytest.raises(OSError):
        export.write_labels_tiff(path, np.full((4, 4), 2, np.int32))
    np.testing.assert_array_equal(tifffile.imread(path), 1)
    assert [p.name for p in tmp_path.iterdir()] == ["labels.tif"]


def test_csv_columns_and_rows(tmp_path, real_crop):
    labels, image = real_crop
    ids = np.unique(labels)[1:]
    path = export.write_csv(tmp_path / "m.csv", labels, image=image)
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(export.MEASUREMENT_COLUMNS)
    assert [int(r["label"]) for r in rows] == ids.tolist()
    first = rows[0]
    mask = labels == int(first["label"])
    assert int(first["area"]) == mask.sum()
    rr, cc = np.nonzero(mask)
    assert float(first["centroid_y"]) == pytest.approx(rr.mean(), rel=1e-5)
    assert float(first["centroid_x"]) == pytest.approx(cc.mean(), rel=1e-5)
    grey = image.astype(float) @ np.array([0.2125, 0.7154, 0.0721])
    assert float(first["mean_intensity"]) == pytest.approx(grey[mask].mean(), rel=1e-5)
    assert all(0 <= float(r["eccentricity"]) <= 1 for r in rows)
    assert all(float(r["perimeter"]) > 0 for r in rows)


def test_measurements_without_image_are_nan_and_shapes_checked(real_crop):
    labels, image = real_crop
    columns = export.nucleus_measurements(labels)
    assert np.isnan(columns["mean_intensity"]).all()
    assert set(columns) == set(export.MEASUREMENT_COLUMNS)
    with pytest.raises(ValueError, match="differs"):
        export.nucleus_measurements(labels, image[:10])


def test_csv_with_pixel_size_adds_micron_columns(tmp_path, real_crop):
    labels, image = real_crop
    plain = export.write_csv(tmp_path / "px.csv", labels, image=image)
    microns = export.write_csv(tmp_path / "um.csv", labels, image=image, mpp=0.25)
    with open(plain, newline="") as a, open(microns, newline="") as b:
        rows_px, rows_um = list(csv.DictReader(a)), list(csv.DictReader(b))
    assert list(rows_um[0]) == [*export.MEASUREMENT_COLUMNS, *export.MICRON_COLUMNS]
    assert len(rows_um) == len(rows_px) > 0
    for px, um in zip(rows_px, rows_um, strict=True):
        assert {k: um[k] for k in px} == px  # the pixel columns are unchanged
        assert float(um["area_um2"]) == pytest.approx(int(px["area"]) * 0.0625, rel=1e-5)
        assert float(um["perimeter_um"]) == pytest.approx(float(px["perimeter"]) * 0.25, rel=1e-5)
