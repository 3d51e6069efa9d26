"""CA-SAM routing on real H&E crops of two domains (MoNuSeg, TNBC): VAEs fitted per domain
route held-out images of each domain to their own task, and images unlike a calibrated task
go to the base path."""

from __future__ import annotations

import math
from collections import Counter

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from napari_amasam.inference.predictor import Predictor
from napari_amasam.model import build_amasam
from napari_amasam.model.task_router import BASE_PATH, TaskVAE
from napari_amasam.training.continual import calibrate_task_vae, tile_features

from .helpers import DEMO_DATA, MONUSEG, TNBC, tiny_model_config

VAE_STEPS = 150  # the default (400) fits the same way, slower
CPU = torch.device("cpu")


def _images(folder) -> list[np.ndarray]:
    """The folder's 512x512 RGB images, sorted by name."""
    return [iio.imread(p)[..., :3] for p in sorted((folder / "images").iterdir())]


@pytest.fixture(scope="module")
def two_task_model():
    """Task 0 fitted on the 10 MoNuSeg training crops, task 1 on TNBC crops 01-06; TNBC 07-08
    and the 4 MoNuSeg held-out crops are never seen."""
    torch.manual_seed(0)
    model = build_amasam(tiny_model_config(kind="ca-sam", num_tasks=2, trainable_backbone=False))
    model.eval()
    tnbc = _images(TNBC)
    reports = [
        calibrate_task_vae(model.router.vaes[0], tile_features(model, _images(MONUSEG), CPU),
                           quantile=0.99, seed=0, steps=VAE_STEPS),
        calibrate_task_vae(model.router.vaes[1], tile_features(model, tnbc[:6], CPU),
                           quantile=0.99, seed=1, steps=VAE_STEPS),
    ]
    held_out = {0: _images(DEMO_DATA / "monuseg_heldout"), 1: tnbc[6:]}
    return model, reports, held_out


def test_calibration_scores_every_training_tile_by_a_vae_that_did_not_see_its_image(two_task_model):
    _, reports, _ = two_task_model
    for report, n_images in zip(reports, (10, 6), strict=True):
        assert report["folds"] == 4
        assert report["held_out_tiles"] == report["fit_tiles"] == n_images * 25  # 5x5 tiles each
        assert math.isfinite(report["threshold"])
        # a tile's score is higher when its image was held out: the threshold comes from those
        assert report["held_out_score_median"] > report["fit_score_median"]
        assert report["fit_tiles_accepted"] >= 0.99


def test_held_out_images_of_each_domain_route_to_their_own_task(two_task_model):
    model, _, held_out = two_task_model
    for task, images in held_out.items():
        assert [_majority(model, image) for image in images] == [task] * len(images)
    # the same through the predictor (its overlapping tiles, the model's own routing)
    predictor = Predictor(model, model.cfg, device="cpu")
    for task, images in held_out.items():
        maps = predictor.predict_maps(images[-1])
        assert len(maps.routed_tasks) == 25
        assert maps.routed_task == task, Counter(maps.routed_tasks)


def test_images_unlike_every_calibrated_task_take_the_base_path(two_task_model):
    model, _, held_out = two_task_model
    # a fluorescence-like rendering of an H&E crop: dark background, bright blue nuclei
    he = held_out[0][0].astype(np.float32)
    dapi = np.zeros_like(he)
    dapi[..., 2] = 255 - he.mean(axis=2)
    routes = model.router.route(_embeddings(model, dapi.astype(np.uint8)))
    assert (routes == BASE_PATH).float().mean() > 0.5, routes.tolist()
    assert model.router.route(torch.zeros(1, 256, 8, 8) + 50).tolist() == [BASE_PATH]

    # with only TNBC calibrated, MoNuSeg crops (other organs, other labs) fall back to the
    # base path, while TNBC crops keep their task
    vae = model.router.vaes[0]
    saved = vae.threshold.clone()
    try:
        vae.threshold.fill_(math.inf)
        monuseg_base = [_majority(model, image) == BASE_PATH for image in held_out[0]]
        assert sum(monuseg_base) >= 3, monuseg_base
        assert all(_majority(model, image) == 1 for image in held_out[1])
    finally:
        vae.threshold.copy_(saved)


def _embeddings(model, image: np.ndarray) -> torch.Tensor:
    """The frozen encoder's E (n_tiles, 256, h, w) of the predictor's tiles of ``image``."""
    from napari_amasam.model.adapters import encode_with_early_features

    size = model.cfg.image_size
    tiles = [image[r:r + size, c:c + size] for r in range(0, image.shape[0] - size + 1, size)
             for c in range(0, image.shape[1] - size + 1, size)]
    x = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        embedding, _ = encode_with_early_features(model.sam.image_encoder, model.preprocess(x),
                                                  model.early_index)
    return embedding


def _majority(model, image: np.ndarray) -> int:
    routes = model.router.route(_embeddings(model, image)).tolist()
    return Counter(routes).most_common(1)[0][0]


def test_uncalibrated_router_sends_everything_to_task_zero_and_scores_are_deterministic():
    vae = TaskVAE(8)
    assert not vae.calibrated
    features = torch.randn(5, 8)
    assert torch.equal(vae.score(features), vae.score(features))
    model = build_amasam(tiny_model_config(kind="ca-sam", num_tasks=2, trainable_backbone=False))
    assert model.router.route(torch.randn(3, 256, 8, 8)).tolist() == [0, 0, 0]
