"""Slide widget: a slide opened by the reader, segmented in a Shapes region or the field of
view, comes back as a multiscale Labels layer aligned with the slide."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from tests.slide_data import MONUSEG_MPP, monuseg_mosaic, write_pyramidal_tiff


@pytest.fixture
def slide_viewer(make_napari_viewer, tmp_path):
    from napari_amasam._slide_reader import read_slide

    image, _, _ = monuseg_mosaic(1, 2)
    path = write_pyramidal_tiff(tmp_path / "strip.tif", image, MONUSEG_MPP)
    viewer = make_napari_viewer()
    [(data, meta, _)] = read_slide(str(path))
    viewer.add_image(data, **meta)
    return viewer, path


def _widget(viewer, tmp_path):
    from napari_amasam._widgets._slide import SlideWidget

    widget = SlideWidget(viewer)
    widget.out_picker.setText(str(tmp_path / "out"))
    widget.scheduler_edit.setText("serial")
    return widget


def test_shapes_region_gives_aligned_multiscale_labels(slide_viewer, tmp_path):
    viewer, _ = slide_viewer
    # Rows 100-400, columns 600-900 (inside the right tile), in slide pixels.
    viewer.add_shapes([np.array([[100, 600], [100, 900], [400, 900], [400, 600]])],
                      shape_type="polygon", name="region")
    widget = _widget(viewer, tmp_path)
    assert widget.slide_combo.currentText() == "strip"
    widget.area_combo.setCurrentText("Shapes layer")
    widget.shapes_combo.setCurrentText("region")
    widget.run()
    assert widget.last_error is None, widget.last_error
    result = widget.last_result
    assert result.nuclei > 5
    layer = viewer.layers["strip nuclei"]
    assert layer.multiscale
    full = tifffile.imread(result.labels_path)
    np.testing.assert_array_equal(np.asarray(layer.data[0][:, :]), full)
    # Same processing resolution as the slide here: labels pixel (r, c) sits on slide (r, c).
    np.testing.assert_allclose(layer.scale, viewer.layers["strip"].scale)
    np.testing.assert_allclose(layer.translate, viewer.layers["strip"].translate)
    rows, cols = np.nonzero(full)
    # Nuclei are kept by centroid: their pixels stay near the drawn region.
    assert rows.min() > 100 - 40 and rows.max() < 400 + 40
    assert cols.min() > 600 - 40 and cols.max() < 900 + 40
    assert "nuclei" in widget.status.text()
    # The job's end (common.end_job): progress closed, Run back on, Cancel off.
    assert widget._progress is None
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()


def test_field_of_view_is_what_gets_segmented(slide_viewer, tmp_path):
    viewer, _ = slide_viewer
    camera = getattr(viewer, "scene", viewer).camera
    camera.center = (256, 256)
    camera.zoom = max(viewer.canvas.size) / 200  # about 200 slide pixels across
    widget = _widget(viewer, tmp_path)
    widget.area_combo.setCurrentText("Current field of view")
    fov = widget.field_of_view(viewer.layers["strip"])
    assert fov[:, 0].min() > 100 and fov[:, 0].max() < 412  # x around 256
    widget.run()
    assert widget.last_error is None, widget.last_error
    full = tifffile.imread(widget.last_result.labels_path)
    rows, cols = np.nonzero(full)
    assert len(rows) and cols.min() > fov[:, 0].min() - 40 and cols.max() < fov[:, 0].max() + 40


def test_no_slide_layer_is_reported(make_napari_viewer, tmp_path):
    from napari_amasam._widgets._slide import SlideWidget

    widget = SlideWidget(make_napari_viewer())
    widget.run()
    assert "open a slide" in str(widget.last_error)
