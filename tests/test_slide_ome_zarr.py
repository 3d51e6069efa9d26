"""OME-Zarr folders as slide inputs: levels, lazy reads, the pipeline (same labels as the
same pixels in a TIFF), the CLI, the napari reader, and bad stores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from napari_amasam.slide.reader import SlideError, is_slide_file, open_slide
from tests.slide_data import (
    MONUSEG_MPP,
    monuseg_mosaic,
    pyramid_levels,
    write_pyramidal_tiff,
    write_rgb_ome_zarr,
)
from tests.test_slide import _cli, _one_line_error


@pytest.fixture(scope="module")
def mosaic_image():
    image, _, _ = monuseg_mosaic(2, 2)  # 1024 x 1024 real H&E
    return image


def _hand_written(path: Path, image: np.ndarray, version: str = "0.4") -> Path:
    """Another tool's layout, written by hand: a bioformats2raw container holding series 0
    with axes t, c, z, y, x (t and z of length 1), channels first, the pixel size split
    between the datasets' scale (0.5 µm, 1 µm, ...) and the multiscale's (x 0.5)."""
    fmt = 2 if version == "0.4" else 3
    root = zarr.open_group(str(path), mode="w", zarr_format=fmt)
    series = root.create_group("0")
    levels = pyramid_levels(image, levels=3)
    for k, level in enumerate(levels):
        planar = np.moveaxis(level, -1, 0)[None, :, None]  # (1, 3, 1, h, w)
        array = series.create_array(str(k), shape=planar.shape, dtype=np.uint8,
                                    chunks=(1, 1, 1, 128, 128))
        array[...] = planar
    multiscales = [{
        "version": version, "name": "slide",
        "axes": [{"name": "t", "type": "time", "unit": "second"},
                 {"name": "c", "type": "channel"},
                 {"name": "z", "type": "space", "unit": "micrometer"},
                 {"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [{"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [1.0, 1.0, 1.0, 0.5 * 2**k, 0.5 * 2**k]},
            {"type": "translation", "translation": [0, 0, 0, 0, 0]}]} for k in range(3)],
        "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0, 0.5, 0.5]}],
    }]
    if version == "0.4":
        series.attrs["multiscales"] = multiscales
    else:
        series.attrs["ome"] = {"version": version, "multiscales": multiscales}
    root.attrs["bioformats2raw.layout"] = 3
    return path


# ------------------------------------------------------------------------------- reading
@pytest.mark.parametrize("axes", ["yxc", "cyx"])
def test_project_written_ome_zarr_opens_with_levels_mpp_and_reads(mosaic_image, tmp_path, axes):
    path = write_rgb_ome_zarr(tmp_path / "slide.ome.zarr", mosaic_image, MONUSEG_MPP, tile=128,
                              axes=axes)
    levels = pyramid_levels(mosaic_image, tile=128)
    assert is_slide_file(path)
    with open_slide(path) as slide:
        assert slide.backend == "ome-zarr"
        assert slide.mpp == pytest.approx(MONUSEG_MPP)
        assert slide.level_shapes == [level.shape[:2] for level in levels]
        assert slide.downsamples == [1.0, 2.0, 4.0]
        rects = [(100, 200, 64, 80), (37, 11, 200, 150), (0, 0, 256, 256)]
        for k, (y, x, h, w) in enumerate(rects):
            np.testing.assert_array_equal(slide.read(k, y, x, h, w),
                                          levels[k][y : y + h, x : x + w])
        # Past the edge reads as glass, as with every backend.
        edge = slide.read(2, 200, 200, 100, 100)
        np.testing.assert_array_equal(edge[:56, :56], levels[2][200:, 200:])
        assert (edge[56:] == 255).all()
        # A virtual level between the real ones is resampled from the finer level.
        np.testing.assert_array_equal(slide.read_scaled(5, 7, 40, 30, 2.0), levels[1][5:45, 7:37])
        lazy = slide.level_array(1)
        assert lazy.shape == (512, 512, 3)
        np.testing.assert_array_equal(np.asarray(lazy[300:340, 10:90]), levels[1][300:340, 10:90])


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_hand_written_tczyx_bioformats2raw_store(mosaic_image, tmp_path, version):
    path = _hand_written(tmp_path / f"other_{version}.zarr", mosaic_image, version)
    levels = pyramid_levels(mosaic_image, levels=3)
    with open_slide(path) as slide:
        assert slide.level_shapes == [(1024, 1024), (512, 512), (256, 256)]
        assert slide.mpp == pytest.approx(0.25)  # dataset scale 0.5 x multiscale scale 0.5
        for k in range(3):
            y, x = 50 // 2**k, 300 // 2**k
            np.testing.assert_array_equal(slide.read(k, y, x, 90, 70),
                                          levels[k][y : y + 90, x : x + 70])


def test_reads_touch_only_the_chunks_they_need(mosaic_image, tmp_path):
    """Every level-0 chunk but the four under one region is replaced by garbage: opening the
    store and reading that region still works, so nothing else of the level is loaded; a read
    that does reach a broken chunk is a one-line error naming the store."""
    path = write_rgb_ome_zarr(tmp_path / "lazy.ome.zarr", mosaic_image, MONUSEG_MPP, tile=128)
    kept = {f"{r}.{c}.0" for r in (2, 3) for c in (4, 5)}  # rows 256..511, cols 512..767
    broken = 0
    for chunk in (path / "0").iterdir():
        if not chunk.name.startswith(".") and chunk.name not in kept:
            chunk.write_bytes(b"not a zstd frame")
            broken += 1
    assert broken == 64 - 4
    with open_slide(path) as slide:
        region = slide.read(0, 256, 512, 256, 256)
        np.testing.assert_array_equal(region, mosaic_image[256:512, 512:768])
        with pytest.raises(SlideError, match=r"lazy\.ome\.zarr: cannot read pixels at level 0"):
            slide.read(0, 0, 0, 10, 10)


# ------------------------------------------------------------------------------ pipeline
def test_pipeline_and_cli_on_ome_zarr_give_the_tiff_labels(tmp_path):
    from napari_amasam.slide.pipeline import segment_slide

    image, _, _ = monuseg_mosaic(1, 2)  # 512 x 1024
    tiff = write_pyramidal_tiff(tmp_path / "strip.tif", image, MONUSEG_MPP)
    store = write_rgb_ome_zarr(tmp_path / "strip.ome.zarr", image, MONUSEG_MPP, axes="cyx")
    kwargs = dict(region_size=256, scheduler="serial")
    from_tiff = segment_slide(tiff, "classical", tmp_path / "tiff_out", **kwargs)
    from_zarr = segment_slide(store, "classical", tmp_path / "zarr_out", **kwargs)
    assert from_zarr.regions == from_tiff.regions and from_zarr.nuclei == from_tiff.nuclei > 20
    assert from_zarr.labels_path.name == "strip_labels.tif"  # the stem drops ".ome.zarr"
    expected = tifffile.imread(from_tiff.labels_path)
    np.testing.assert_array_equal(tifffile.imread(from_zarr.labels_path), expected)
    assert Path(from_zarr.geojson_path).read_text().count('"Feature"') == from_tiff.nuclei

    out = tmp_path / "cli_out"
    done = _cli("segment", store, "--model", "classical", "--out", out, "--scheduler", "serial",
                "--region-size", "256")
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(tifffile.imread(out / "strip_labels.tif"), expected)


# ------------------------------------------------------------------------------- napari
def test_napari_reader_opens_rgb_stores_and_leaves_labels_to_others(mosaic_image, tmp_path):
    from npe2 import PluginManifest

    from napari_amasam._slide_reader import get_reader

    path = write_rgb_ome_zarr(tmp_path / "slide.ome.zarr", mosaic_image, MONUSEG_MPP)
    reader = get_reader(str(path))
    assert reader is not None
    [(data, meta, kind)] = reader(str(path))
    assert kind == "image" and meta["multiscale"] and meta["rgb"] and meta["name"] == "slide"
    assert [tuple(level.shape) for level in data] == [(1024, 1024, 3), (512, 512, 3)]
    np.testing.assert_array_equal(np.asarray(data[0][500:520, 600:640]),
                                  mosaic_image[500:520, 600:640])
    assert meta["metadata"]["mpp"] == pytest.approx(MONUSEG_MPP)
    labels = _labels_store(tmp_path)
    assert get_reader(str(labels)) is None  # napari's own / ome-zarr readers take those
    manifest = PluginManifest.from_file(Path(__file__).resolve().parents[1] / "src" /
                                        "napari_amasam" / "napari.yaml")
    [slides] = [r for r in manifest.contributions.readers
                if r.command == "napari-amasam.get_slide_reader"]
    assert "*.zarr" in slides.filename_patterns and slides.accepts_directories


# ----------------------------------------------------------------------------- bad input
def _labels_store(tmp_path: Path) -> Path:
    """This project's own labels output (uint32, axes y, x): an OME-Zarr that is no slide."""
    from napari_amasam.slide.writers import ome_zarr_levels

    path = tmp_path / "nuclei_labels.ome.zarr"
    with ome_zarr_levels(path, [(64, 64)], np.uint32, "yx", 0.25, (64, 64)) as (level,):
        level[10:20, 10:20] = 7
    return path


def test_bad_ome_zarr_stores_give_one_line_errors_naming_them(mosaic_image, tmp_path):
    small = mosaic_image[:256, :256]
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w", zarr_format=2).create_array(
        "0", shape=(8, 8, 3), dtype=np.uint8)
    grey = write_rgb_ome_zarr(tmp_path / "grey.ome.zarr", small, 0.25, tile=64)
    shutil.rmtree(grey / "0")
    zarr.open_group(str(grey), mode="a", zarr_format=2).create_array(
        "0", shape=(256, 256, 1), dtype=np.uint8)
    missing = write_rgb_ome_zarr(tmp_path / "missing.ome.zarr", small, 0.25, tile=64, levels=3)
    shutil.rmtree(missing / "2")
    no_unit = write_rgb_ome_zarr(tmp_path / "no_unit.ome.zarr", small, 0.25, tile=64)
    attrs = json.loads((no_unit / ".zattrs").read_text())
    for axis in attrs["multiscales"][0]["axes"]:
        axis.pop("unit", None)
    (no_unit / ".zattrs").write_text(json.dumps(attrs))
    folder = tmp_path / "just_a_folder"
    folder.mkdir()
    cases = [
        (plain, "not an OME-Zarr image: no NGFF 'multiscales'"),
        (_labels_store(tmp_path), "pixel type uint32; a slide must be RGB uint8"),
        (grey, "1 channels; a slide must be RGB"),
        (missing, r"level 2 \(dataset '2'\) is missing"),
        (no_unit, r"no microns-per-pixel in its metadata \(axis y has no unit\); give it "
                  "with --mpp"),
        (folder, "a folder, not a slide file or an OME-Zarr"),
    ]
    for path, problem in cases:
        with pytest.raises(SlideError, match=f"{path.name}: {problem}") as caught:
            open_slide(path)
        assert "\n" not in str(caught.value)
    # Without a unit, --mpp stands in for it.
    with open_slide(no_unit, mpp=0.25) as slide:
        assert slide.mpp == 0.25 and slide.level_shapes[0] == (256, 256)
    # The CLI reports a bad store in one line and writes nothing under its name.
    out = tmp_path / "out"
    line = _one_line_error(_cli("segment", missing, "--model", "classical", "--out", out,
                                "--scheduler", "serial"), "missing.ome.zarr")
    assert line.startswith("skipped:") and "level 2" in line
    assert not list(out.glob("missing*"))
