"""CA-SAM routing on a synthetic two-domain case: VAEs fitted per domain route held-out images
to their own task and images unlike both to the base path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from .helpers import tiny_model_config

from napari_amasam.inference.predictor import Predictor
from napari_amasam.model import build_amasam
from napari_amasam.model.task_router import BASE_PATH, TaskVAE
from napari_amasam.training.continual import fit_task_vae, tile_features


def _domain_image(rng: np.random.Generator, background, nucleus, size: int = 128) -> np.ndarray:
    """Blobs of one colour on a textured background of another (uint8 RGB)."""
    image = np.empty((size, size, 3), np.float32)
    image[:] = background
    image += rng.normal(0, 12, image.shape)
    yy, xx = np.mgrid[:size, :size]
    for _ in range(rng.integers(8, 16)):
        cy, cx, r = rng.integers(0, size), rng.integers(0, size), rng.integers(4, 9)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = nucleus
    return np.clip(image, 0, 255).astype(np.uint8)


def _images(seed: int, n: int, background, nucleus) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [_domain_image(rng, background, nucleus) for _ in range(n)]


PINK = ((235, 190, 215), (120, 60, 150))  # H&E-like
BROWN = ((200, 170, 120), (60, 40, 30))  # another stain


@pytest.mark.xfail(strict=False, reason="found 30 Nov: with 4 held-out tiles the 0.99-quantile "
                   "threshold is too tight and an unseen in-domain image went to the base path; "
                   "the calibration needs more held-out tiles or a margin (issue 13, open)")
def test_vae_routing_separates_two_domains_and_falls_back_to_base():
    torch.manual_seed(0)
    model = build_amasam(tiny_model_config(kind="ca-sam", num_tasks=2, trainable_backbone=False))
    model.eval()
    device = torch.device("cpu")
    for task, (colours, seed) in enumerate(((PINK, 1), (BROWN, 2))):
        fit = torch.cat(tile_features(model, _images(seed, 12, *colours), device))
        held = torch.cat(tile_features(model, _images(seed + 10, 4, *colours), device))
        report = fit_task_vae(model.router.vaes[task], fit, held, quantile=0.99, seed=task)
        assert np.isfinite(report["threshold"]) and report["fit_tiles"] == 12

    predictor = Predictor(model, model.cfg, device="cpu")
    for task, colours in enumerate((PINK, BROWN)):
        for image in _images(100 + task, 4, *colours):  # unseen images of each domain
            maps = predictor.predict_maps(image)
            assert maps.routed_task == task
    green_noise = np.random.default_rng(5).integers(0, 255, (128, 128, 3)).astype(np.uint8)
    green_noise[..., 1] = 255
    assert predictor.predict_maps(green_noise).routed_task == BASE_PATH
    assert model.router.route(torch.zeros(1, 256, 8, 8) + 50).tolist() == [BASE_PATH]


def test_uncalibrated_router_sends_everything_to_task_zero_and_scores_are_deterministic():
    vae = TaskVAE(8)
    assert not vae.calibrated
    features = torch.randn(5, 8)
    assert torch.equal(vae.score(features), vae.score(features))
    model = build_amasam(tiny_model_config(kind="ca-sam", num_tasks=2, trainable_backbone=False))
    assert model.router.route(torch.randn(3, 256, 8, 8)).tolist() == [0, 0, 0]
