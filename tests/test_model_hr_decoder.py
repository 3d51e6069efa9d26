"""HR-Decoder: pixel ensemble layout, token/hypernetwork initialisation, use of the slices."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_amasam.config import ModelConfig
from napari_amasam.model.backbone import build_sam_parts, variant_spec
from napari_amasam.model.hr_decoder import HRDecoder, pixel_ensemble


def test_pixel_ensemble_layout():
    torch.manual_seed(0)
    slices = torch.randn(2, 32, 5, 3)  # two groups of 16
    out = pixel_ensemble(slices)
    assert out.shape == (2, 2, 20, 12)
    for g in range(2):
        for y in range(5):
            for x in range(3):
                for i in range(4):
                    for j in range(4):
                        assert out[1, g, 4 * y + i, 4 * x + j] == slices[1, 16 * g + 4 * i + j, y, x]
    assert torch.equal(out, F.pixel_shuffle(slices, 4))
    with pytest.raises(ValueError, match="cannot form"):
        pixel_ensemble(torch.randn(1, 15, 2, 2))


def _sam(image_size=128):
    cfg = ModelConfig(backbone="tiny", image_size=image_size, tiny_embed_dim=64, tiny_depth=2,
                      tiny_heads=2, tiny_global_attn=(1,))
    return build_sam_parts(variant_spec(cfg), image_size, seed=0)


def _inputs(sam, batch=2, side=8):
    torch.manual_seed(1)
    emb = torch.randn(batch, 256, side, side)
    early = torch.randn(batch, 64, side, side)
    dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, side, side)
    pe = sam.prompt_encoder.get_dense_pe()
    coarse = torch.randn(batch, 1, 4 * side, 4 * side)
    image = torch.randn(batch, 3, 16 * side, 16 * side)
    return emb, early, dense, pe, coarse, image


def test_initialisation_from_sam_decoder():
    sam = _sam()
    dec = HRDecoder(sam.mask_decoder, encoder_dim=64)
    seed = sam.mask_decoder.mask_tokens.weight[0]
    assert dec.slice_tokens.shape == (48, 256)
    assert (dec.slice_tokens - seed).abs().max() < 0.15  # mask token + small noise
    assert not torch.equal(dec.slice_tokens[0], dec.slice_tokens[1])
    for ours, sams in zip(dec.hypernetwork.parameters(),
                          sam.mask_decoder.output_hypernetworks_mlps[0].parameters(), strict=True):
        assert torch.equal(ours, sams) and ours.requires_grad and ours is not sams
    assert dec.transformer is sam.mask_decoder.transformer  # shared, frozen, official keys
    assert not any(k.startswith(("transformer.", "_sam")) for k in dec.state_dict())
    copy_dec = HRDecoder(sam.mask_decoder, encoder_dim=64, train_transformer=True)
    assert copy_dec.transformer is not sam.mask_decoder.transformer
    assert all(p.requires_grad for p in copy_dec.transformer.parameters())
    with pytest.raises(ValueError, match="must be 16"):
        HRDecoder(sam.mask_decoder, encoder_dim=64, num_slice_tokens=8)


def test_shapes_and_zero_refinement_at_init():
    sam = _sam()
    emb, early, dense, pe, coarse, image = _inputs(sam)
    dec = HRDecoder(sam.mask_decoder, encoder_dim=64)
    with torch.no_grad():
        fine, dist = dec(emb, early, dense, pe, coarse, image)
        assert fine.shape == (2, 1, 128, 128) and dist.shape == (2, 2, 128, 128)
        no_dist = HRDecoder(sam.mask_decoder, encoder_dim=64, distance_heads=False, fuse_image=False)
        fine2, dist2 = no_dist(emb, early, dense, pe, coarse)
        assert fine2.shape == (2, 1, 128, 128) and dist2 is None
        with pytest.raises(ValueError, match="fuse_image"):
            dec(emb, early, dense, pe, coarse, None)


def test_fine_output_depends_on_the_slice_tokens():
    # failure signature "blurry masks": the slice tokens unused, the decoder a mere upsampler
    sam = _sam()
    emb, early, dense, pe, coarse, image = _inputs(sam, batch=1)
    dec = HRDecoder(sam.mask_decoder, encoder_dim=64)
    with torch.no_grad():
        before, _ = dec(emb, early, dense, pe, coarse, image)
        dec.slice_tokens[5] += 1.0
        after, _ = dec(emb, early, dense, pe, coarse, image)
    assert (after - before).abs().max() > 1e-4


def test_each_slice_owns_one_pixel_of_every_4x4_cell():
    # failure signature "grid lines": a wrong redistribution. Change only the producer's vector
    # of slice 6 = (i=1, j=2): only pixels with (row % 4, col % 4) == (1, 2) may change
    # (R's last conv is zero at init, so nothing blurs the layout).
    sam = _sam()
    emb, early, dense, pe, coarse, image = _inputs(sam, batch=1)
    dec = HRDecoder(sam.mask_decoder, encoder_dim=64)
    with torch.no_grad():
        before, dist_before = dec(emb, early, dense, pe, coarse, image)

        def bump(module, inputs, output):
            output = output.clone()
            output[:, 6] += 0.5
            return output

        handle = dec.hypernetwork.register_forward_hook(bump)
        after, dist_after = dec(emb, early, dense, pe, coarse, image)
        handle.remove()
    changed = (after - before).abs()[0, 0] > 0
    rows, cols = torch.nonzero(changed, as_tuple=True)
    assert len(rows) == 32 * 32  # one pixel in every cell
    assert bool(((rows % 4 == 1) & (cols % 4 == 2)).all())
    assert torch.equal(dist_after, dist_before)  # slice 6 belongs to the mask group only
