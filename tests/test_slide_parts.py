"""Slide parts: one owner per nucleus and per pixel where two regions' results overlap, and
outlines that keep their holes, OME-Zarr labels (built parts, no model: the parts' own
logic under test)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile
from skimage.draw import disk

from napari_amasam.slide.ownership import first_wins, settle_overlaps
from napari_amasam.slide.parts import PartStore, load_part, save_nuclei
from napari_amasam.slide.writers import write_csv, write_geojson, write_labels_pyramid

SHAPE = (100, 200)
#: Two regions side by side: cores split at column 100; windows reach 50 px past it.
CORES = {0: (0, 0, 100, 100), 1: (0, 100, 100, 200)}
WINDOWS = {0: (0, 0, 100, 150), 1: (0, 50, 100, 200)}


def _grey(y, x, h, w):
    return np.full((h, w, 3), 128, np.uint8)


def _disk(center, radius):
    mask = np.zeros(SHAPE, bool)
    mask[disk(center, radius, shape=SHAPE)] = True
    return mask


def _parts(tmp_path):
    """Region 0 and 1 as their workers would write them (slide coordinates, then cropped).

    - the same nucleus seen by both windows, shifted by 2 px: region 0's version centred at
      column 99 (its core), region 1's at column 101 (its core); their union's centroid is at
      column 100, in region 1's core;
    - two different nuclei sharing a 3 px wide strip (columns 100-102, region 1's core);
    - one nucleus of region 0 that touches nothing.
    """
    store = PartStore(tmp_path / "s.parts", {"test": 1})
    store.open()
    slide = {0: np.zeros(SHAPE, np.uint32), 1: np.zeros(SHAPE, np.uint32)}
    slide[0][_disk((50, 99), 8)] = 1
    slide[0][10:20, 90:103] = 2
    slide[0][_disk((80, 30), 6)] = 3
    slide[1][_disk((50, 101), 8)] = 1
    slide[1][10:20, 100:115] = 2
    for index, (y0, x0, y1, x1) in WINDOWS.items():
        save_nuclei(store.folder, index, slide[index][y0:y1, x0:x1], (y0, x0),
                    _grey(0, 0, y1 - y0, x1 - x0), 1.0)
    return store


def _settle_and_write(store, tmp_path):
    infos = store.infos([0, 1])
    assert list(settle_overlaps(store, infos, CORES, _grey, 1.0)) == [0, 1]
    settled = store.infos([0, 1], settled=True)
    labels_path = write_labels_pyramid(tmp_path / "labels.tif", SHAPE, settled, 0.25)
    geojson_path = write_geojson(tmp_path / "s.geojson", settled, 0.25, 1.0)
    csv_path = write_csv(tmp_path / "s.csv", settled, 0.25, 1.0)
    return settled, tifffile.imread(labels_path), geojson_path, csv_path


def test_rule_is_the_same_from_both_sides():
    y = np.array([5, 5, 5, 150])
    x = np.array([99, 100, 160, 160])  # core 0, core 1, core 1, neither (below both)
    assert first_wins(0, 1, CORES, y, x).tolist() == [True, False, False, True]
    assert (first_wins(1, 0, CORES, y, x) == ~first_wins(0, 1, CORES, y, x)).all()


def test_overlaps_get_one_owner_in_every_output(tmp_path):
    store = _parts(tmp_path)
    settled, labels, geojson_path, csv_path = _settle_and_write(store, tmp_path)
    assert [i.count for i in settled] == [2, 2]  # region 0's copy of the shared nucleus gone
    # The same nuclei, once each, in the TIFF, the GeoJSON and the CSV.
    tiff_ids = set(np.unique(labels)) - {0}
    features = json.loads(geojson_path.read_text())["features"]
    geojson_ids = {f["properties"]["label"] for f in features}
    rows = list(csv.DictReader(open(csv_path)))
    csv_ids = {int(r["label"]) for r in rows}
    assert tiff_ids == geojson_ids == csv_ids == {1, 2, 3, 4}
    # The shared nucleus is region 1's version (its union centroid is in region 1's core).
    shared = labels[50, 101]
    np.testing.assert_array_equal(labels == shared, _disk((50, 101), 8))
    # Different nuclei: the shared strip (columns 100-102) went to region 1's nucleus.
    left, right = labels[15, 95], labels[15, 110]
    assert left != right and (labels[10:20, 100:103] == right).all()
    assert (labels == left).sum() == 10 * 10 and (labels == right).sum() == 10 * 15
    # CSV areas are the TIFF's pixels (0.25 µm/px).
    areas = {int(r["label"]): float(r["area_um2"]) for r in rows}
    for label in tiff_ids:
        assert areas[label] == pytest.approx((labels == label).sum() * 0.0625)


def test_settling_resumes_to_the_same_parts(tmp_path):
    store = _parts(tmp_path)
    settled, labels, _, _ = _settle_and_write(store, tmp_path)
    first = {i.index: load_part(i.path)["labels"].copy() for i in settled}
    # A run killed after settling region 0 only: region 1 is settled again on resume.
    (store.settled / settled[1].path.name).unlink()
    again = list(settle_overlaps(store, store.infos([0, 1]), CORES, _grey, 1.0))
    assert again == [1]
    for info in store.infos([0, 1], settled=True):
        np.testing.assert_array_equal(load_part(info.path)["labels"], first[info.index])


def test_ring_nucleus_keeps_its_hole_in_the_slide_geojson(tmp_path):
    from skimage.draw import polygon as fill

    store = PartStore(tmp_path / "r.parts", {"test": 2})
    store.open()
    ring = _disk((50, 60), 20) & ~_disk((50, 60), 9)
    save_nuclei(store.folder, 0, ring.astype(np.uint32), (0, 0), _grey(0, 0, *SHAPE), 2.0)
    infos = store.infos([0])
    path = write_geojson(tmp_path / "r.geojson", infos, 0.5, 2.0)
    (feature,) = json.loads(path.read_text())["features"]
    geometry = feature["geometry"]
    assert geometry["type"] == "Polygon" and len(geometry["coordinates"]) == 2
    # Filling the outer ring and clearing the hole (level-0 px, downsample 2) gives the ring.
    outer, hole = (np.asarray(r) / 2.0 for r in geometry["coordinates"])
    drawn = np.zeros(SHAPE, bool)
    drawn[fill(outer[:, 1] - 0.5, outer[:, 0] - 0.5, SHAPE)] = True
    drawn[fill(hole[:, 1] - 0.5, hole[:, 0] - 0.5, SHAPE)] = False
    assert (drawn == ring).mean() > 0.99
    assert not drawn[50, 60]


def test_ome_zarr_labels_match_the_tiff_level_by_level(tmp_path):
    import zarr

    from napari_amasam.slide.writers import write_labels_ome_zarr

    store = _parts(tmp_path)
    list(settle_overlaps(store, store.infos([0, 1]), CORES, _grey, 1.0))
    settled = store.infos([0, 1], settled=True)
    big = (600, 1100)  # the parts in the top-left corner of a slide with 4 levels
    tiff = write_labels_pyramid(tmp_path / "big.tif", big, settled, 0.25)
    path = write_labels_ome_zarr(tmp_path / "big_labels.ome.zarr", big, settled, 0.25)
    group = zarr.open_group(str(path), mode="r")
    (multiscale,) = group.attrs["multiscales"]
    assert multiscale["version"] == "0.4"
    assert [a["name"] for a in multiscale["axes"]] == ["y", "x"]
    scales = [d["coordinateTransformations"][0]["scale"] for d in multiscale["datasets"]]
    assert scales == [[0.25 * 2**k] * 2 for k in range(4)]
    levels = zarr.open_group(tifffile.imread(tiff, aszarr=True), mode="r")
    for k, dataset in enumerate(multiscale["datasets"]):
        np.testing.assert_array_equal(group[dataset["path"]][:], levels[str(k)][:])
    assert group["0"][:].any() and group["0"].shape == big
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary folder was renamed
