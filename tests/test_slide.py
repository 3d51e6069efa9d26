"""Whole-slide images: reading (real SVS + pyramidal TIFF), tissue, regions, streaming
segmentation scored on a mosaic of real MoNuSeg tiles, resume, Dask, outputs, bad slides."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_amasam.slide.reader import SlideError, is_slide_file, open_slide
from tests.slide_data import FIXTURES, MONUSEG_MPP, monuseg_mosaic, write_pyramidal_tiff

SMALL_SVS = FIXTURES / "openslide" / "small.svs"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory):
    """A 2 x 2 mosaic of real 512 px MoNuSeg tiles as a pyramidal TIFF at 0.25 µm/px."""
    folder = tmp_path_factory.mktemp("mosaic")
    image, labels, tiles = monuseg_mosaic(2, 2)
    path = write_pyramidal_tiff(folder / "mosaic.tif", image, MONUSEG_MPP)
    return path, image, labels, tiles


@pytest.fixture(scope="module")
def strip(tmp_path_factory):
    """A 1 x 2 mosaic (512 x 1024), for the runs that go through the pipeline twice."""
    folder = tmp_path_factory.mktemp("strip")
    image, labels, _ = monuseg_mosaic(1, 2)
    return write_pyramidal_tiff(folder / "strip.tif", image, MONUSEG_MPP), image


@pytest.fixture(scope="module")
def mosaic_run(mosaic, tmp_path_factory):
    """The mosaic segmented with the classical baseline in 384 px regions (serial)."""
    from napari_amasam.slide.pipeline import iter_segment_slide

    out = tmp_path_factory.mktemp("mosaic_out")
    generator = iter_segment_slide(mosaic[0], "classical", out, region_size=384,
                                   scheduler="serial")
    records = []
    while True:
        try:
            records.append(next(generator))
        except StopIteration as stop:
            return stop.value, records


def _run(*args, **kwargs):
    from napari_amasam.slide.pipeline import segment_slide

    return segment_slide(*args, **kwargs)


# ------------------------------------------------------------------------------- reading
def test_real_svs_opens_with_openslide_and_its_mpp():
    with open_slide(SMALL_SVS) as slide:
        assert slide.backend == "openslide"
        assert slide.shape == (16, 16)
        assert slide.mpp == pytest.approx(0.499)
        pixels = slide.read(0, 0, 0, 16, 16)
        assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
        assert pixels.std() > 0  # real image content, not a blank
        # Outside the slide reads as glass.
        assert (slide.read(0, 10, 10, 12, 12)[8:, 8:] == 255).all()
    assert is_slide_file(SMALL_SVS)


def test_pyramidal_tiff_levels_mpp_and_scaled_reads(mosaic):
    path, image, _, _ = mosaic
    with open_slide(path) as slide:
        assert slide.backend == "tifffile"
        assert slide.mpp == pytest.approx(MONUSEG_MPP)
        assert slide.level_shapes[0] == (1024, 1024) and len(slide.level_shapes) >= 2
        np.testing.assert_array_equal(slide.read(0, 100, 200, 64, 80), image[100:164, 200:280])
        # A virtual level equal to a real one copies its pixels exactly.
        np.testing.assert_array_equal(slide.read_scaled(5, 7, 40, 30, 2.0),
                                      slide.read(1, 5, 7, 40, 30))
        # Any other scale is resampled from the finer level: close to a block mean.
        scaled = slide.read_scaled(0, 0, 256, 256, 4.0).astype(float)
        block_mean = image.reshape(256, 4, 256, 4, 3).mean(axis=(1, 3))
        assert np.abs(scaled - block_mean).mean() < 8
        lazy = slide.level_array(1)
        assert lazy.shape == (512, 512, 3)
        np.testing.assert_array_equal(np.asarray(lazy[10:20, 30:40]), slide.read(1, 10, 30, 10, 10))


def test_small_plain_tiff_is_not_a_slide(tmp_path):
    tifffile.imwrite(tmp_path / "small.tif", np.zeros((64, 64, 3), np.uint8))
    assert not is_slide_file(tmp_path / "small.tif")


# ----------------------------------------------------------------------------- tissue
def test_tissue_detection_skips_glass(tmp_path):
    from napari_amasam.slide.pipeline import iter_segment_slide

    image, _, _ = monuseg_mosaic(1, 1)
    glass = np.full((2048, 2048, 3), 242, np.uint8)
    glass[1024:1536, 512:1024] = image  # one real tile on a glass slide
    path = write_pyramidal_tiff(tmp_path / "glass.tif", glass, MONUSEG_MPP)
    generator = iter_segment_slide(path, "classical", tmp_path / "out", region_size=512,
                                   scheduler="serial")
    plan = next(generator)
    generator.close()
    # 16 regions in the grid; the tile (plus the 50 µm tissue margin) touches the 3 x 3
    # regions around it, the glass elsewhere is skipped.
    assert plan["regions_total"] == 16
    assert 4 <= plan["regions"] <= 9
    # The tile is 1/16 of the slide; the margin widens it by 50 µm on every side.
    assert 1 / 16 < plan["tissue_fraction"] < 0.25


# ----------------------------------------------------------------- mosaic vs ground truth
def test_mosaic_segmentation_matches_per_tile_and_ground_truth(mosaic, mosaic_run):
    from napari_amasam.inference.predictor import Predictor
    from napari_amasam.metrics import evaluate_pair

    _, _, gt, tiles = mosaic
    result, records = mosaic_run
    labels = tifffile.imread(result.labels_path)
    assert labels.shape == gt.shape and labels.dtype == np.uint32
    slide_aji = evaluate_pair(gt, labels.astype(np.int32))["aji"]
    predictor = Predictor.classical()
    per_tile = []
    for tile_image, tile_gt in tiles:
        per_tile.append(evaluate_pair(tile_gt, predictor.segment(tile_image))["aji"])
    # Region borders at 384 and 768 px cross nuclei and the tile seams at 512 px: the slide
    # path scores close to segmenting each tile alone (the classical threshold is one for
    # the slide, while each tile alone gets its own: four patients' stains differ a little;
    # see benchmarks/bench_slide.py for whole images).
    assert slide_aji > 0.40
    assert slide_aji > np.mean(per_tile) - 0.04
    # Progress: one record per region, nuclei counts increasing to the total.
    regions = [r for r in records if r["stage"] == "region"]
    assert [r["done"] for r in regions] == list(range(1, 10))
    # (settling the overlaps afterwards drops the second version of a few border nuclei)
    assert regions[-1]["nuclei"] >= result.nuclei > 0.98 * regions[-1]["nuclei"]


def test_nuclei_on_region_borders_appear_once(mosaic_run):
    result, _ = mosaic_run
    labels = tifffile.imread(result.labels_path)
    features = json.loads(Path(result.geojson_path).read_text())["features"]
    assert len(features) == result.nuclei
    ids = [f["properties"]["label"] for f in features]
    assert ids == list(range(1, result.nuclei + 1))  # unique across the slide
    # A nucleus written by two regions would give two objects with the same centroid.
    centroids = np.array([np.mean(f["geometry"]["coordinates"][0], axis=0) for f in features])
    from scipy.spatial import cKDTree

    pairs = cKDTree(centroids).query_pairs(r=3.0)
    assert not pairs
    # Objects straddling a region border (x or y = 384, 768) exist and are whole.
    straddling = 0
    for border in (384, 768):
        left, right = labels[:, border - 1], labels[:, border]
        straddling += len(set(left[left > 0]) & set(right[right > 0]))
    assert straddling > 5
    # One ownership rule for all outputs: the TIFF, the GeoJSON and the CSV hold the same ids.
    import csv

    csv_ids = {int(row["label"]) for row in csv.DictReader(open(result.csv_path))}
    assert set(np.unique(labels)) - {0} == set(ids) == csv_ids


def test_region_borders_cost_nothing_when_windows_see_the_same_pixels(strip, tmp_path):
    """A halo covering the whole strip gives every region the same window: the slide path
    must then give exactly the strip segmented in one call, nucleus for nucleus and pixel
    for pixel, though its 384 px region borders cut through many nuclei."""
    from napari_amasam.inference.predictor import Predictor

    path, image = strip
    result = _run(path, "classical", tmp_path / "out", region_size=384, halo=1024,
                  scheduler="serial", tissue=False)
    labels = tifffile.imread(result.labels_path).astype(np.int64)
    alone = Predictor.classical().segment(image).astype(np.int64)
    assert ((labels > 0) == (alone > 0)).all()
    # One-to-one ids: as many distinct (slide id, alone id) pairs as ids on either side.
    fg = alone > 0
    pairs = np.unique(labels[fg] * (int(alone.max()) + 1) + alone[fg])
    assert len(pairs) == len(np.unique(alone[fg])) == len(np.unique(labels[fg])) == result.nuclei
    straddling = sum(len(set(labels[:, b - 1][labels[:, b - 1] > 0]) &
                         set(labels[:, b][labels[:, b] > 0])) for b in (384, 768))
    assert straddling > 5


def test_outputs_pyramid_geojson_csv(mosaic_run):
    import zarr

    result, _ = mosaic_run
    labels = tifffile.imread(result.labels_path)
    with tifffile.TiffFile(result.labels_path) as tif:
        page = tif.pages[0]
        assert page.is_tiled and tif.is_bigtiff and page.compression != 1
        levels = tif.series[0].levels
        assert len(levels) >= 3
        x_res = page.tags["XResolution"].value
        assert 1e4 / (x_res[0] / x_res[1]) == pytest.approx(result.mpp, rel=1e-3)
    group = zarr.open(tifffile.imread(result.labels_path, aszarr=True), mode="r")
    np.testing.assert_array_equal(group["0"][100:200, 300:400], labels[100:200, 300:400])
    np.testing.assert_array_equal(group["1"][:], labels[::2, ::2])
    np.testing.assert_array_equal(group["2"][:], labels[::4, ::4])
    # GeoJSON: level-0 pixel polygons that rasterise onto the labels.
    feature = json.loads(Path(result.geojson_path).read_text())["features"][10]
    ring = np.array(feature["geometry"]["coordinates"][0])
    from skimage.draw import polygon

    rr, cc = polygon(ring[:, 1] - 0.5, ring[:, 0] - 0.5, labels.shape)
    assert np.mean(labels[rr, cc] == feature["properties"]["label"]) > 0.9
    # CSV: µm and µm² at 0.25 µm/px.
    import csv

    rows = list(csv.DictReader(open(result.csv_path)))
    assert len(rows) == result.nuclei
    row = rows[10]
    label = int(row["label"])
    area_px = int((labels == label).sum())
    assert float(row["area_um2"]) == pytest.approx(area_px * 0.0625, rel=0.05)
    # (both columns are rounded to 6 significant digits)
    assert float(row["centroid_x_um"]) == pytest.approx(float(row["centroid_x"]) * 0.25,
                                                         rel=1e-5)
    assert not list(Path(result.labels_path).parent.glob("*.parts"))  # work folder removed


def test_roi_keeps_only_nuclei_inside(strip, tmp_path):
    path, _ = strip
    roi = tmp_path / "roi.geojson"
    polygon = [[100, 50], [400, 50], [400, 450], [100, 450], [100, 50]]
    roi.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [polygon]},
         "properties": {}}]}))
    result = _run(path, "classical", tmp_path / "out", roi=roi, region_size=256,
                  scheduler="serial", tissue=False)
    assert result.regions == 4  # of 8: the polygon spans two region columns and two rows
    assert result.nuclei > 10
    import csv

    rows = list(csv.DictReader(open(result.csv_path)))
    xs = np.array([float(r["centroid_x"]) for r in rows])
    ys = np.array([float(r["centroid_y"]) for r in rows])
    assert xs.min() >= 99 and xs.max() <= 401 and ys.min() >= 49 and ys.max() <= 451


# -------------------------------------------------------------------- cancel and resume
def test_cancelled_run_resumes_from_written_regions(strip, tmp_path):
    from napari_amasam.slide.pipeline import iter_segment_slide

    path, _ = strip
    out = tmp_path / "out"
    kwargs = dict(region_size=256, scheduler="serial", tissue=False)
    generator = iter_segment_slide(path, "classical", out, **kwargs)
    records = [next(generator) for _ in range(4)]  # plan + 3 regions
    generator.close()  # cancel
    assert records[-1]["done"] == 3
    parts = out / "strip.parts"
    assert len(list(parts.glob("region_*.npz"))) == 3
    assert not (out / "strip_labels.tif").exists()  # nothing final from a cancelled run
    # A half-written part (a temporary file) is not mistaken for a finished region.
    (parts / ".region_0000007.npz.x.tmp").write_bytes(b"partial")
    generator = iter_segment_slide(path, "classical", out, **kwargs)
    plan = next(generator)
    assert plan["done"] == 3 and plan["regions"] == 8
    regions = []
    while True:
        try:
            regions.append(next(generator))
        except StopIteration as stop:
            resumed = stop.value
            break
    assert [r["done"] for r in regions if r["stage"] == "region"] == [4, 5, 6, 7, 8]
    fresh = _run(path, "classical", tmp_path / "fresh", **kwargs)
    np.testing.assert_array_equal(tifffile.imread(resumed.labels_path),
                                  tifffile.imread(fresh.labels_path))


def test_changed_settings_do_not_reuse_old_regions(strip, tmp_path):
    from napari_amasam.slide.pipeline import iter_segment_slide

    path, _ = strip
    out = tmp_path / "out"
    generator = iter_segment_slide(path, "classical", out, region_size=256, scheduler="serial",
                                   tissue=False)
    next(generator), next(generator)
    generator.close()
    generator = iter_segment_slide(path, "classical", out, region_size=256, halo=96,
                                   scheduler="serial", tissue=False)
    assert next(generator)["done"] == 0
    generator.close()


# ------------------------------------------------------------------------------ Dask
def test_two_worker_local_cluster_gives_the_serial_result(strip, tmp_path):
    path, _ = strip
    serial = _run(path, "classical", tmp_path / "serial", region_size=256, scheduler="serial",
                  tissue=False)
    dask = _run(path, "classical", tmp_path / "dask", region_size=256, workers=2, tissue=False)
    np.testing.assert_array_equal(tifffile.imread(dask.labels_path),
                                  tifffile.imread(serial.labels_path))
    assert dask.nuclei == serial.nuclei > 20


# ------------------------------------------------------------------------- bad slides
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "napari_amasam.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO / "src")})


def test_cli_segments_the_real_svs(tmp_path):
    out = tmp_path / "out"
    done = _cli("segment", SMALL_SVS, "--model", "classical", "--out", out,
                "--scheduler", "serial", "--no-tissue-detection")
    assert done.returncode == 0, done.stderr
    labels = tifffile.imread(out / "small_labels.tif")
    # 16 px at 0.499 µm/px processed at the classical baseline's 0.25 µm/px.
    assert labels.shape == (32, 32)
    assert (out / "small.geojson").is_file() and (out / "small.csv").is_file()
    assert "region 1/1" in done.stderr


def _one_line_error(done, name):
    assert done.returncode != 0
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in done.stderr
    errors = [line for line in lines if name in line]
    assert errors, done.stderr
    return errors[0]


def test_bad_slides_give_one_line_errors_naming_the_file(mosaic, tmp_path):
    path = mosaic[0]
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(SlideError, match="truncated.tif"):
        open_slide(truncated)
    unsupported = tmp_path / "notes.svs"
    unsupported.write_text("this is not a slide\n" * 100)
    with pytest.raises(SlideError, match="notes.svs.*not a slide format"):
        open_slide(unsupported)
    image, _, _ = monuseg_mosaic(1, 1)
    no_mpp = write_pyramidal_tiff(tmp_path / "no_mpp.tif", np.tile(image, (9, 9, 1)), None)
    with pytest.raises(SlideError, match="no_mpp.tif.*--mpp"):
        open_slide(no_mpp)
    assert open_slide(no_mpp, mpp=0.25).mpp == 0.25

    out = tmp_path / "out"
    for bad, name in ((truncated, "truncated.tif"), (no_mpp, "no_mpp.tif")):
        done = _cli("segment", bad, "--model", "classical", "--out", out, "--scheduler", "serial")
        line = _one_line_error(done, name)
        assert line.startswith("skipped:")
    roi = tmp_path / "far.geojson"
    roi.write_text(json.dumps({"type": "Polygon", "coordinates": [
        [[5000, 5000], [6000, 5000], [6000, 6000], [5000, 5000]]]}))
    done = _cli("segment", path, "--model", "classical", "--out", out, "--scheduler", "serial",
                "--roi", roi)
    assert "outside the slide" in _one_line_error(done, "far.geojson")
    assert not list(out.glob("*_labels.tif"))  # nothing (half-)written under a final name


def test_slide_error_survives_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(SlideError("/data/a.svs", "cannot read pixels")))
    assert str(error) == "/data/a.svs: cannot read pixels"
    assert isinstance(error, SlideError)


# -------------------------------------------------------------------- npe2 reader
def test_reader_gives_lazy_multiscale_layer(mosaic, tmp_path):
    from napari_amasam._slide_reader import get_reader

    path, image, _, _ = mosaic
    reader = get_reader(str(path))
    assert reader is not None
    [(data, meta, kind)] = reader(str(path))
    assert kind == "image" and meta["multiscale"] and meta["rgb"]
    assert [tuple(level.shape) for level in data][:2] == [(1024, 1024, 3), (512, 512, 3)]
    np.testing.assert_array_equal(np.asarray(data[0][500:520, 600:640]), image[500:520, 600:640])
    assert meta["metadata"]["mpp"] == pytest.approx(0.25)
    assert get_reader(str(SMALL_SVS)) is not None
    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((32, 32), np.uint8))
    assert get_reader(str(tmp_path / "plain.tif")) is None


def test_manifest_registers_reader_and_widget():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(REPO / "src" / "napari_amasam" / "napari.yaml")
    readers = manifest.contributions.readers
    assert any(r.command == "napari-amasam.get_slide_reader" and "*.svs" in r.filename_patterns
               for r in readers)
    assert any(w.command == "napari-amasam.slide_widget" for w in manifest.contributions.widgets)


def test_fixture_licence_is_shipped():
    assert (FIXTURES / "openslide" / "COPYING.LESSER").is_file()
    assert "GNU Lesser General Public License" in (FIXTURES / "openslide" / "README.md").read_text()


def test_mpp_from_metadata_sources():
    from napari_amasam.slide import mpp

    assert mpp.mpp_from_openslide({"openslide.mpp-x": "0.2527", "openslide.mpp-y": "0.2527"}) \
        == pytest.approx(0.2527)
    assert mpp.mpp_from_openslide({}) is None
    ome = ('<OME><Image><Pixels ID="Pixels:0" PhysicalSizeX="0.5" PhysicalSizeXUnit="µm" '
           'PhysicalSizeY="500" PhysicalSizeYUnit="nm" SizeX="10"/></Image></OME>')
    assert mpp.mpp_from_ome(ome) == pytest.approx(0.5)
    assert mpp.mpp_from_aperio("Aperio Image Library v12|AppMag = 20|MPP = 0.4990|") == \
        pytest.approx(0.499)
    # 4 pixels per micron in centimetres; 72 dpi is a placeholder, not a slide resolution.
    assert mpp.mpp_from_tiff_resolution((40000, 1), (40000, 1), 3) == pytest.approx(0.25)
    assert mpp.mpp_from_tiff_resolution((72, 1), (72, 1), 2) is None
    assert mpp.mpp_from_tiff_resolution((40000, 1), (40000, 1), 1) is None
