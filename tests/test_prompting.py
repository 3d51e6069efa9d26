"""Interactive prompts (inference/prompting.py): selection rules, commit, cached embedding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_amasam.config import ModelConfig, PostprocessConfig
from napari_amasam.errors import AmaSamError
from napari_amasam.inference.prompting import NucleusMask, Prompt, PromptSession, commit_mask

TINY = dict(backbone="tiny", image_size=128, tiny_embed_dim=32, tiny_depth=2, tiny_heads=2,
            tiny_global_attn=(1,))


def _disc(shape, centre, radius):
    rows, cols = np.mgrid[:shape[0], :shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius ** 2


def _maps_with_two_nuclei():
    """(3, 64, 64) maps: foreground, centre and boundary distances of two discs."""
    from scipy import ndimage

    a, b = _disc((64, 64), (20, 20), 8), _disc((64, 64), (40, 44), 9)
    fg = np.where(a | b, 0.95, 0.02).astype(np.float32)
    dist = np.zeros((64, 64), np.float32)
    for disc in (a, b):
        d = ndimage.distance_transform_edt(disc)
        dist = np.maximum(dist, d / d.max())
    return np.stack([fg, dist, dist]), a, b


def _session_stub():
    """A PromptSession's selection step without a model (its maps are given directly)."""
    session = PromptSession.__new__(PromptSession)
    session.thresholds = PostprocessConfig()
    session.scale = 1.0
    return session


def test_prompt_validation():
    with pytest.raises(AmaSamError, match="positive point or a box"):
        Prompt([[1, 2]], [False])
    with pytest.raises(AmaSamError, match="4 numbers"):
        Prompt(box=[1, 2, 3])
    prompt = Prompt(box=[10, 20, 0, 5])  # corners in any order
    assert list(prompt.box) == [0, 5, 10, 20] and prompt.centre() == (5, 12.5)


def test_selection_rules_on_known_maps():
    maps, a, b = _maps_with_two_nuclei()
    session = _session_stub()
    # A positive point picks the nucleus under it, and only that one.
    mask = session._select(maps, Prompt([[20, 20]], [True]), (0, 0), 1.0)
    assert (mask & a).sum() >= 0.9 * a.sum() and not (mask & b).any()
    # A box picks the nucleus with most area inside it.
    mask = session._select(maps, Prompt(box=[28, 30, 54, 58]), (0, 0), 1.0)
    assert (mask & b).sum() >= 0.9 * b.sum() and not (mask & a).any()
    # A negative point splits off the side it touches.
    mask = session._select(maps, Prompt([[40, 38], [40, 50]], [True, False]), (0, 0), 1.0)
    assert mask[40, 38] and not mask[40, 50] and mask.sum() < b.sum()
    # A point on background far from everything: nothing.
    assert not session._select(maps, Prompt([[60, 2]], [True]), (0, 0), 1.0).any()


def test_commit_mask_new_id_and_replace():
    labels = np.zeros((20, 20), np.int32)
    labels[2:6, 2:6] = 3
    labels[10:14, 10:14] = 7
    nucleus = NucleusMask(slice(1, 8), slice(1, 8), np.zeros((7, 7), bool))
    nucleus.mask[2:5, 2:5] = True  # rows/cols 3..5 in the image
    (rows, cols), values, new_id = commit_mask(labels, nucleus, replace=3)
    assert new_id == 8
    out = labels.copy()
    out[rows, cols] = values
    assert (out == 3).sum() == 0  # the replaced nucleus is gone ...
    assert (out == 8).sum() == 9 and out[3:6, 3:6].min() == 8  # ... the new one is there
    assert (out == 7).sum() == 16  # others untouched


def test_session_caches_the_embedding_and_the_prompt_reaches_the_decoder():
    from napari_amasam._sample_data import load_sample
    from napari_amasam.model.amasam import build_amasam

    torch.manual_seed(0)
    model = build_amasam(ModelConfig(**TINY)).eval()
    image, _ = load_sample("monuseg_breast")
    calls = []
    model.sam.image_encoder.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    session = PromptSession(model, image[:200, :200])
    first = Prompt([[50, 50]], [True])
    cached = session.prepare(first)
    maps_a = session.decode(first, cached)
    maps_b = session.decode(Prompt([[50, 50], [60, 60]], [True, False]), session.prepare(first))
    assert len(calls) == 1 and session.encoder_runs == 1  # no encoder re-run
    assert maps_a.shape == (3, 128, 128)
    assert not np.allclose(maps_a, maps_b)  # the prompt tokens change the decoder's output
    # Windows sit on a grid of stride S/2, clamped to the image.
    assert session.window_origin(50, 50) == (0, 0)
    assert session.window_origin(190, 190) == (72, 72)
    result = session.segment(Prompt(box=[40, 40, 70, 70]))
    assert result.mask.shape == (result.rows.stop - result.rows.start,
                                 result.cols.stop - result.cols.start)
    rows, cols = np.nonzero(result.mask)
    if len(rows):
        assert rows.min() + result.rows.start >= 40 and rows.max() + result.rows.start < 70
        assert cols.min() + result.cols.start >= 40 and cols.max() + result.cols.start < 70
    assert session.encoder_runs == 1


def test_cached_embedding_reproduces_the_model_forward():
    """Encoder outputs cached by the session + the decoder with no prompt tokens give
    exactly the model's own forward (the cache holds the right things)."""
    from napari_amasam.model.amasam import build_amasam

    torch.manual_seed(0)
    model = build_amasam(ModelConfig(**TINY)).eval()
    image = (np.random.default_rng(0).random((128, 128, 3)) * 255).astype(np.uint8)
    session = PromptSession(model, image)
    cached = session.embedding((0, 0))
    with torch.no_grad():
        expected = model(torch.from_numpy(image).permute(2, 0, 1)[None].float())
        fine, distance = model.hr_decoder(
            cached.embedding, cached.early, cached.dense,
            model.sam.prompt_encoder.get_dense_pe(), cached.coarse, cached.image,
            sparse_prompt=torch.zeros(1, 0, 256))
    torch.testing.assert_close(fine, expected.fine_logits)
    torch.testing.assert_close(distance, expected.distance_logits)


@pytest.mark.parametrize("backbone", ["tiny", "tiny_conv"])
def test_regional_decode_equals_the_full_decoder(backbone):
    """The decoder run on the prompt's cells (plus halo) gives the full decoder's values."""
    from napari_amasam.model.amasam import build_amasam

    torch.manual_seed(0)
    model = build_amasam(ModelConfig(**{**TINY, "backbone": backbone})).eval()
    image = (np.random.default_rng(1).random((128, 128, 3)) * 255).astype(np.uint8)
    session = PromptSession(model, image)
    cached = session.embedding((0, 0))
    prompt = Prompt([[70, 40], [80, 50]], [True, False], box=[60, 30, 90, 60])
    full = session.decode(prompt, cached)
    # The full path equals HRDecoder.forward with the same prompt tokens.
    points = torch.tensor([[[40.0, 70.0], [50.0, 80.0]]])
    sparse, _ = model.sam.prompt_encoder(points=(points, torch.tensor([[1, 0]])),
                                         boxes=torch.tensor([[30.0, 60.0, 60.0, 90.0]]),
                                         masks=None)
    with torch.no_grad():
        stem = model.sam.image_encoder.patch_embed
        skip = None
        if hasattr(stem, "pop_features"):  # the conv stem's features, as AmaSam.forward
            model(torch.from_numpy(image).permute(2, 0, 1)[None].float())
            model.sam.image_encoder(model.preprocess(
                torch.from_numpy(image).permute(2, 0, 1)[None].float()))
            skip = stem.pop_features()
        fine, distance = model.hr_decoder(
            cached.embedding, cached.early, cached.dense, model.sam.prompt_encoder.get_dense_pe(),
            cached.coarse, cached.image, skip=skip, sparse_prompt=sparse)
    expected = torch.sigmoid(torch.cat([fine, distance], dim=1)[0]).numpy()
    np.testing.assert_allclose(full, expected, atol=1e-5)
    for region in [(50, 100, 20, 70), (0, 20, 100, 128), (33, 34, 65, 97)]:
        a, b, c, d = region
        np.testing.assert_allclose(session.decode(prompt, cached, region),
                                   full[:, a:b, c:d], atol=1e-5)
