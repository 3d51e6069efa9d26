"""QuPath GeoJSON both ways: labels -> GeoJSON -> labels on the bundled MoNuSeg labels."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from napari_amasam import export
from napari_amasam._geojson_reader import get_reader
from napari_amasam.errors import DataError
from napari_amasam.qupath_import import features_to_labels, read_qupath_geojson

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "napari_amasam" / "_sample_data"


@pytest.fixture(scope="module")
def prostate():
    """Real labels (one nucleus in two pieces) with a hole punched into the largest nucleus,
    cropped to 256 x 256 to keep the test short; and the image."""
    labels = tifffile.imread(SAMPLE / "monuseg_prostate_labels.tif").astype(np.int32)[:256, :256]
    image = iio.imread(SAMPLE / "monuseg_prostate.png")[:256, :256, :3]
    ids, sizes = np.unique(labels[labels > 0], return_counts=True)
    largest = ids[np.argmax(sizes)]
    cy, cx = (int(round(c)) for c in ndi.center_of_mass(labels == largest))
    hole = np.zeros_like(labels, bool)
    hole[cy - 2 : cy + 2, cx - 1 : cx + 2] = True
    assert (labels[hole] == largest).all()
    labels[hole] = 0
    return labels, image, int(largest)


def _per_nucleus_iou(truth: np.ndarray, back: np.ndarray, features: list[dict]) -> dict[int, float]:
    ious = {}
    for k, feature in enumerate(features, start=1):
        a, b = truth == feature["properties"]["label"], back == k
        ious[feature["properties"]["label"]] = (a & b).sum() / (a | b).sum()
    return ious


def test_labels_geojson_labels_round_trip_with_holes(prostate):
    labels, image, holed = prostate
    collection = export.labels_to_geojson(labels, image=image, mpp=0.25)
    features = collection["features"]
    assert sorted(f["properties"]["label"] for f in features) == np.unique(labels)[1:].tolist()
    back = features_to_labels(features, labels.shape)
    ious = _per_nucleus_iou(labels, back, features)
    assert min(ious.values()) > 0.95, sorted(ious.items(), key=lambda kv: kv[1])[:3]
    # the polygons trace pixel edges, so nothing is lost at all
    assert all(v == 1.0 for v in ious.values())
    # the punched nucleus is a Polygon with one hole, oriented as RFC 7946 asks
    feature = next(f for f in features if f["properties"]["label"] == holed)
    assert feature["geometry"]["type"] == "Polygon"
    outer, inner = (np.asarray(r) for r in feature["geometry"]["coordinates"])
    assert export._signed_area(outer) > 0 > export._signed_area(inner)
    assert export._signed_area(inner) == -12  # the 4 x 3 pixel hole
    assert (back[labels == 0] == 0).all()


def test_multipart_nucleus_is_a_multipolygon():
    labels = np.zeros((12, 12), np.uint8)
    labels[2:5, 2:5] = 1
    labels[7:10, 7:10] = 1
    labels[5, 5] = 2  # touches label 1 only at corners
    features = export.labels_to_geojson(labels)["features"]
    assert [f["geometry"]["type"] for f in features] == ["MultiPolygon", "Polygon"]
    back = features_to_labels(features, labels.shape)
    np.testing.assert_array_equal(back, labels)


def test_diagonal_pixels_of_one_nucleus_stay_exact():
    labels = np.zeros((6, 6), np.uint8)
    labels[1, 1] = labels[2, 2] = labels[3, 1] = labels[2, 1] = 4
    labels[1, 3] = 4
    features = export.labels_to_geojson(labels)["features"]
    np.testing.assert_array_equal(features_to_labels(features, labels.shape) > 0, labels > 0)


def test_offset_and_downsample_round_trip(prostate):
    labels, _, _ = prostate
    offset = (40960.0, 12288.0)  # a slide tile's level-0 position
    collection = export.labels_to_geojson(labels, offset=offset, downsample=2.0)
    xs = [x for f in collection["features"] for x, _ in f["geometry"]["coordinates"][0]
          if f["geometry"]["type"] == "Polygon"]
    assert min(xs) >= offset[1]
    back = features_to_labels(collection["features"], labels.shape, offset=offset, downsample=2.0)
    ious = _per_nucleus_iou(labels, back, collection["features"])
    assert min(ious.values()) > 0.95
    assert collection["napari_amasam_image_shape"] == [40960 + 512, 12288 + 512]


def test_qupath_measurements_in_microns(prostate):
    labels, image, _ = prostate
    features = export.labels_to_geojson(labels, image=image, mpp=0.25)["features"]
    table = export.nucleus_measurements(labels, image)
    row = 3
    m = features[row]["properties"]["measurements"]
    assert m["Area µm^2"] == pytest.approx(table["area"][row] * 0.0625)
    assert m["Perimeter µm"] == pytest.approx(table["perimeter"][row] * 0.25)
    assert 0 < m["Solidity"] <= 1 and 0 < m["Mean intensity"] < 255
    # without mpp, full-resolution pixels (downsample scales them)
    m2 = export.labels_to_geojson(labels, downsample=2.0)["features"][row]["properties"]["measurements"]
    assert m2["Area px^2"] == pytest.approx(table["area"][row] * 4)
    assert "Mean intensity" not in m2 and "Area µm^2" not in m2
    props = features[row]["properties"]
    assert props["objectType"] == "detection" and props["classification"]["name"] == "Nucleus"


def test_napari_reader_gives_labels_of_the_image_size(tmp_path, prostate):
    labels, image, _ = prostate
    path = export.write_geojson(tmp_path / "nuclei.geojson", labels, image=image, mpp=0.25)
    reader = get_reader(str(path))
    assert reader is not None and get_reader(str(tmp_path / "x.png")) is None
    (layer,) = reader(str(path))
    data, meta, kind = layer
    assert kind == "labels" and data.shape == labels.shape
    assert len(np.unique(data)) == len(np.unique(labels))
    ious = _per_nucleus_iou(labels, data, json.loads(path.read_text())["features"])
    assert min(ious.values()) > 0.95


def test_reader_takes_a_qupath_export_with_annotations_and_cells(tmp_path):
    square = [[10, 20], [30, 20], [30, 40], [10, 40], [10, 20]]
    nucleus = [[12, 22], [16, 22], [16, 25], [12, 25], [12, 22]]
    doc = [  # QuPath's older bare-list form
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]},
         "properties": {"objectType": "annotation", "name": "ROI 1",
                        "classification": {"name": "Tumor", "colorRGB": -3670016}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]},
         "nucleusGeometry": {"type": "Polygon", "coordinates": [nucleus]},
         "properties": {"objectType": "cell"}},
        {"type": "Feature", "id": "PathDetectionObject",
         "geometry": {"type": "Polygon", "coordinates": [[[40, 5], [44, 5], [44, 8], [40, 8], [40, 5]]]},
         "properties": {}},
    ]
    path = tmp_path / "qupath.geojson"
    path.write_text(json.dumps(doc))
    objects = read_qupath_geojson(path)
    assert len(objects.annotations) == 1 and len(objects.detections) == 2
    layers = {kind: (data, meta) for data, meta, kind in get_reader(str(path))(str(path))}
    labels, _ = layers["labels"]
    assert labels.shape == (25, 44)  # smallest size holding every detection
    assert (labels == 1).sum() == 4 * 3 and (labels[22:25, 12:16] == 1).all()  # the nucleus
    assert (labels == 2).sum() == 4 * 3
    shapes, meta = layers["shapes"]
    assert meta["shape_type"] == ["polygon"] and meta["properties"]["classification"] == ["Tumor"]
    np.testing.assert_allclose(shapes[0][0], [19.5, 9.5])  # (row, col) pixel-centre frame


@pytest.mark.parametrize("text", ["{not json", '{"type": "Point", "coordinates": [1, 2]}',
                                  '{"type": "FeatureCollection", "features": [{"type": "Feature"}]}'])
def test_bad_geojson_is_a_one_line_data_error(tmp_path, text):
    path = tmp_path / "bad.geojson"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        read_qupath_geojson(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_reader_is_registered_in_the_manifest():
    import npe2

    manifest = npe2.PluginManifest.from_file(SAMPLE.parent / "napari.yaml")
    (reader,) = [r for r in manifest.contributions.readers if r.command == "napari-amasam.read_geojson"]
    assert reader.filename_patterns == ["*.geojson"]
