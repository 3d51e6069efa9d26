"""Whole-image prediction (napari_amasam.inference.predictor).

Most tests use small fake networks that obey the AmaSam forward contract (images B,3,S,S on
the 0-255 scale -> fine_logits B,1,S,S and distance_logits B,2,S,S or None) and are
translation-equivariant, so a tiled prediction can be compared with an untiled one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_amasam.config import ConfigError, ModelConfig, PostprocessConfig
from napari_amasam.errors import AmaSamError
from napari_amasam.inference.predictor import Maps, Predictor
from napari_amasam.inference.tiling import tile_grid

from .helpers import MONUSEG as MONUSEG_DIR
from .helpers import drain

MONUSEG = sorted(str(p) for p in (MONUSEG_DIR / "images").glob("*.png"))


@dataclass
class FakeOutput:
    fine_logits: torch.Tensor
    coarse_logits: torch.Tensor
    distance_logits: torch.Tensor | None
    domain_logits: torch.Tensor | None = None


class DarkNucleusNet(torch.nn.Module):
    """Foreground = dark pixels, optionally smoothed 5x5 (then translation-equivariant except
    within its receptive-field radius of the input border, which blended overlaps must hide).

    Distances come from a 9x9 blur of the foreground probability. Unsmoothed, the foreground
    is per-pixel, so the black padding of tiles larger than the image cannot leak into it.
    """

    def __init__(self, distances: bool = True, smooth: bool = False):
        super().__init__()
        self.distances = distances
        self.smooth = smooth
        self.calls = 0
        self.scale = torch.nn.Parameter(torch.tensor(12.0))  # a parameter, so .to() matters

    def forward(self, images, domain=None, lam=0.0):
        self.calls += 1
        assert images.ndim == 4 and images.shape[1] == 3 and images.dtype == torch.float32
        gray = images.mean(dim=1, keepdim=True) / 255.0
        if self.smooth:
            gray = F.avg_pool2d(gray, 5, stride=1, padding=2, count_include_pad=False)
        fine = self.scale * (0.55 - gray)
        coarse = F.avg_pool2d(fine, 4)
        distance = None
        if self.distances:
            blurred = F.avg_pool2d(torch.sigmoid(fine), 9, stride=1, padding=4, count_include_pad=False)
            boundary = 8.0 * (0.75 - blurred)
            distance = torch.cat([boundary, boundary], dim=1)
        return FakeOutput(fine, coarse, distance)


def _predictor(model=None, image_size=256, **kwargs):
    model = model if model is not None else DarkNucleusNet()
    return Predictor(model, ModelConfig(backbone="tiny", image_size=image_size), device="cpu", **kwargs)


def _disc_image(height, width, centres, radius=10):
    """White background (230) with dark discs (60); returns the RGB image and the truth labels."""
    yy, xx = np.mgrid[:height, :width]
    image = np.full((height, width, 3), 230, dtype=np.uint8)
    truth = np.zeros((height, width), dtype=np.int32)
    for label, (cy, cx) in enumerate(centres, start=1):
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        image[disc] = 60
        truth[disc] = label
    return image, truth


def _dice(a, b):
    a, b = a > 0, b > 0
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


@pytest.fixture(scope="module")
def monuseg_crop():
    from napari_amasam.data.io import read_image

    return read_image(MONUSEG[0])[100:356, 200:456]


def test_tiled_prediction_matches_untiled(monuseg_crop):
    # Same network at input sizes 256 (the crop is one tile, no padding) and 128 (3 x 3 tiles).
    model = DarkNucleusNet(smooth=True)
    predictor = _predictor(model, image_size=256)
    whole = predictor.predict_maps(monuseg_crop)
    tiled = _predictor(model, image_size=128).predict_maps(monuseg_crop, overlap=32)
    assert whole.foreground.shape == tiled.foreground.shape == (256, 256)
    assert np.abs(whole.foreground - tiled.foreground).max() < 0.05
    assert np.abs(whole.boundary_distance - tiled.boundary_distance).max() < 0.05
    labels_whole = predictor.postprocess(whole)
    labels_tiled = predictor.postprocess(tiled)
    assert labels_whole.max() > 5  # the comparison is about real nuclei, not empty maps
    assert _dice(labels_whole, labels_tiled) > 0.98


def test_no_blending_would_show_seams(monuseg_crop):
    # Guard that the comparison above can fail: tiles without overlap disagree at their borders.
    model = DarkNucleusNet(smooth=True)
    whole = _predictor(model, image_size=256).predict_maps(monuseg_crop)
    abutting = _predictor(model, image_size=128).predict_maps(monuseg_crop, overlap=0)
    assert np.abs(whole.foreground - abutting.foreground).max() > 0.05


@pytest.mark.parametrize("distances", [True, False])
def test_nucleus_on_a_tile_seam_stays_one_instance(distances):
    # Tiles of 128 with overlap 32 start at 0, 96, 128: 112 is the middle of an overlap
    # (here a four-tile corner) and 128 is the border of the first tile.
    centres = [(112, 112), (40, 128), (128, 40), (200, 200), (180, 60)]
    image, truth = _disc_image(256, 256, centres)
    predictor = _predictor(DarkNucleusNet(distances=distances, smooth=True), image_size=128)
    labels = predictor.segment(image, overlap=32)
    assert labels.shape == (256, 256) and labels.dtype == np.int32
    assert len(np.unique(labels[labels > 0])) == len(centres)
    for label in range(1, len(centres) + 1):
        found = np.unique(labels[truth == label])
        found = found[found > 0]
        assert len(found) == 1, f"disc {label} split into {found}"
        assert _dice(labels == found[0], truth == label) > 0.9


@pytest.mark.parametrize(
    "image",
    [
        pytest.param(np.full((97, 131), 200, np.uint8), id="gray-small"),
        pytest.param(np.full((300, 517, 4), 200, np.uint8), id="rgba-odd"),
        pytest.param(np.full((140, 150, 3), 50000, np.uint16), id="uint16"),
        pytest.param(np.full((3, 90, 70), 0.8, np.float32), id="channel-first-float"),
    ],
)
def test_input_kinds_give_native_size_labels(image):
    image = image.copy()
    spatial = image.shape[1:] if image.shape[0] == 3 else image.shape[:2]
    # Two dark discs so there is something to find; the same positions in every layout.
    yy, xx = np.mgrid[: spatial[0], : spatial[1]]
    disc = (yy - spatial[0] // 2) ** 2 + (xx - spatial[1] // 3) ** 2 <= 64
    if image.shape[0] == 3:
        image[:, disc] = image.max() * 0.2
    else:
        image[disc] = image.max() // 5
    labels = _predictor(image_size=128).segment(image, overlap=32)
    assert labels.shape == spatial and labels.dtype == np.int32
    assert (labels[disc] > 0).mean() > 0.9 and labels.max() == 1


def test_progress_records_and_generator_return():
    image, _ = _disc_image(300, 517, [(150, 250)])
    predictor = _predictor()
    expected_total = len(tile_grid(300, 517, 128, 32))
    generator = predictor.iter_segment(image, tile_size=128, overlap=32, batch_size=3)
    records, result = drain(generator)
    tile_records = [r for r in records if r["stage"] == "tile"]
    assert records[-1] == {"stage": "postprocess"}
    assert [r["done"] for r in tile_records] == sorted({min(i, expected_total) for i in range(3, expected_total + 3, 3)})
    assert all(r["total"] == expected_total for r in tile_records)
    assert predictor.model.calls == len(tile_records)
    assert result.labels.shape == (300, 517) and result.maps.foreground.shape == (300, 517)
    assert result.labels.max() == 1


def test_closing_the_generator_early_leaves_torch_and_predictor_usable():
    image, _ = _disc_image(300, 300, [(150, 150)])
    predictor = _predictor()
    generator = predictor.iter_predict_maps(image, tile_size=128, overlap=32, batch_size=1)
    first = next(generator)
    assert first == {"stage": "tile", "done": 1, "total": 9}
    # While suspended the caller's thread is not in inference mode.
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    next(generator)
    generator.close()
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    assert predictor.model.calls == 2
    maps = predictor.predict_maps(image, tile_size=128, overlap=32)
    assert maps.foreground.shape == (300, 300)
    assert maps.foreground[150, 150] > 0.9 and maps.foreground[10, 10] < 0.1


def test_rethresholding_does_not_run_the_network():
    image, truth = _disc_image(200, 200, [(60, 60), (140, 140)], radius=14)
    predictor = _predictor()
    maps = predictor.predict_maps(image, tile_size=128, overlap=32)
    calls = predictor.model.calls
    default = predictor.postprocess(maps)
    strict = predictor.postprocess(maps, PostprocessConfig(foreground_threshold=0.95))
    assert predictor.model.calls == calls
    assert default.max() == 2 and (strict > 0).sum() < (default > 0).sum()
    # The predictor's own thresholds are the default.
    assert np.array_equal(predictor.postprocess(maps, predictor.thresholds), default)


def test_mpp_rescaling_returns_maps_at_the_original_size():
    image, truth = _disc_image(240, 330, [(120, 100), (60, 250)], radius=16)
    predictor = _predictor(mpp=0.5)
    generator = predictor.iter_predict_maps(image, tile_size=128, overlap=32, input_mpp=0.25)
    records, maps = drain(generator)
    # The network saw a half-size image (120 x 165): two tiles, not the six of full size.
    assert records[-1]["total"] == len(tile_grid(120, 165, 128, 32)) == 2
    assert maps.foreground.shape == (240, 330) and maps.foreground.dtype == np.float32
    # Lengths at the input resolution are twice those at training: constants scale by 2.
    assert maps.scale == pytest.approx(2.0)
    assert _dice(maps.foreground > 0.5, truth) > 0.9
    labels = predictor.postprocess(maps)
    assert labels.shape == (240, 330) and labels.max() == 2


def test_unknown_model_mpp_warns_and_uses_native_scale():
    image, _ = _disc_image(100, 100, [(50, 50)])
    with pytest.warns(UserWarning, match="mpp"):
        maps = _predictor().predict_maps(image, tile_size=128, input_mpp=0.5)
    assert maps.scale == 1.0 and maps.foreground.shape == (100, 100)


def test_model_without_distance_heads_gives_none_distances():
    image, _ = _disc_image(100, 100, [(50, 50)])
    maps = _predictor(DarkNucleusNet(distances=False)).predict_maps(image, tile_size=128)
    assert isinstance(maps, Maps)
    assert maps.center_distance is None and maps.boundary_distance is None
    assert ((maps.foreground >= 0) & (maps.foreground <= 1)).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tile_size": 512}, "tile size"),
        ({"tile_size": 128, "overlap": 128}, "overlap"),
        ({"batch_size": 0}, "batch size"),
        ({"input_mpp": -1.0}, "input mpp"),
    ],
)
def test_bad_arguments_raise_one_line_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        _predictor(mpp=0.25).predict_maps(np.zeros((64, 64, 3), np.uint8), **kwargs)


def test_bad_image_raises_data_error():
    from napari_amasam.errors import DataError

    with pytest.raises(DataError, match="image"):
        _predictor().predict_maps(np.zeros((2, 3, 4, 5), np.uint8))


def test_default_tile_and_overlap():
    image, _ = _disc_image(300, 300, [(150, 150)])
    records = list(_predictor(image_size=256).iter_predict_maps(image))
    # Tile 256, overlap max(256 // 8, 32) = 32: starts 0, 44 per axis.
    assert records[-1]["total"] == len(tile_grid(300, 300, 256, 32)) == 4


def test_classical_predictor_has_no_maps():
    predictor = Predictor.classical()
    assert predictor.is_classical
    with pytest.raises(AmaSamError, match="classical"):
        predictor.predict_maps(np.zeros((64, 64, 3), np.uint8))


def test_classical_predictor_segments_monuseg():
    from napari_amasam.data.io import read_image, read_labels

    image_path = MONUSEG[0]
    label_path = image_path.replace("/images/", "/labels/").replace(".png", ".tif")
    image = read_image(image_path)[:400, :400]
    truth = read_labels(label_path)[:400, :400]
    generator = Predictor.classical().iter_segment(image)
    records, result = drain(generator)
    assert records == [{"stage": "postprocess"}] and result.maps is None
    assert result.labels.shape == (400, 400) and result.labels.dtype == np.int32
    # A colour-deconvolution baseline finds most nuclei pixels on real H&E.
    assert _dice(result.labels, truth) > 0.5
    assert result.labels.max() > 10


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    """A model folder holding a random-weight ``tiny`` AMA-SAM (64-pixel input)."""
    from napari_amasam.model import build_amasam
    from napari_amasam.model_folder import (
        atomic_torch_save,
        write_config,
        write_thresholds,
    )

    torch.manual_seed(0)
    config = ModelConfig(backbone="tiny", image_size=64)
    model = build_amasam(config)
    folder = tmp_path_factory.mktemp("tiny_model")
    atomic_torch_save(model.sam_state_dict(), folder / "base_sam.pt")
    atomic_torch_save(model.trainable_state_dict(), folder / "weights.pt")
    write_config(folder, config, None, {"name": "tiny"}, mpp=0.5)
    write_thresholds(folder, PostprocessConfig(foreground_threshold=0.4))
    return folder


def test_real_tiny_model_from_folder_segments_odd_sized_images(tiny_model_folder, monuseg_crop):
    predictor = Predictor.from_folder(tiny_model_folder, device="cpu")
    assert predictor.mpp == 0.5 and predictor.thresholds.foreground_threshold == 0.4
    image = monuseg_crop[:150, :203]
    generator = predictor.iter_segment(image, batch_size=8)
    records, result = drain(generator)
    # Tile 64, default overlap 32: 4 x 6 tiles.
    assert records[-2] == {"stage": "tile", "done": 24, "total": 24}
    maps = result.maps
    assert result.labels.shape == (150, 203) and result.labels.dtype == np.int32
    for channel in (maps.foreground, maps.center_distance, maps.boundary_distance):
        assert channel.shape == (150, 203) and channel.dtype == np.float32
        assert np.isfinite(channel).all() and channel.min() >= 0 and channel.max() <= 1
    # No seam explosion: steps across the tile borders are like steps anywhere else.
    step = np.abs(np.diff(maps.foreground, axis=1))
    borders = sorted({t.x + t.width - 1 for t in tile_grid(150, 203, 64, 32)} - {202})
    # (Measured: ~1.3x with blending, ~5x with abutting tiles.)
    assert step[:, borders].mean() < 2 * step.mean() + 1e-3
    # Re-thresholding the stored maps is deterministic and leaves the network alone.
    assert np.array_equal(predictor.postprocess(maps), result.labels)


def test_from_folder_loads_the_folder_weights_settings_and_device(tiny_model_folder):
    # No mock: the predictor holds exactly the saved weights, thresholds, mpp and config.
    predictor = Predictor.from_folder(tiny_model_folder, device="cpu")
    saved = torch.load(tiny_model_folder / "weights.pt", weights_only=True)
    loaded = predictor.model.trainable_state_dict()
    assert set(loaded) == set(saved)
    for key, value in saved.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    assert not predictor.model.training
    assert all(p.device.type == "cpu" for p in predictor.model.parameters())
    assert predictor.thresholds == PostprocessConfig(foreground_threshold=0.4)
    assert predictor.mpp == 0.5 and predictor.model_config.image_size == 64


def test_real_tiny_model_mpp_rescaling(tiny_model_folder):
    predictor = Predictor.from_folder(tiny_model_folder, device="cpu")
    image, _ = _disc_image(90, 130, [(45, 60)])
    maps = predictor.predict_maps(image, input_mpp=1.0)  # coarser than training: upsampled x2
    assert maps.foreground.shape == (90, 130) and maps.scale == pytest.approx(0.5)
