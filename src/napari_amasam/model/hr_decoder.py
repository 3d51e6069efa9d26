"""HR-Decoder: full-resolution masks from slice tokens (method.md 1.3 D).

With S the input side and h = S/16 the embedding side:

1. *Tokens.* 16 slice tokens (initialised as SAM's ``mask_tokens[0]`` plus small noise) join
   SAM's own output tokens (IoU + 4 mask tokens) in SAM's two-way transformer, which attends
   to ``E + dense prompt`` with ``get_dense_pe()``. The transformer is SAM's own, frozen
   (shared with ``AmaSam.sam.mask_decoder``, so it loads from the official ``mask_decoder.*``
   keys); with ``train_decoder_transformer`` a trainable deep copy is used instead.
2. *Features at 4h.* ``U = conv(SAM output_upscaling(src)) + convT(E) + convT(F_early)``
   (HQ-SAM style), (B, 32, 4h, 4w).
3. *Multi-token slices producer.* A shared hypernetwork MLP 256->256->256->32 (initialised
   from SAM's ``output_hypernetworks_mlps.0``) maps every token to a 32-vector; its dot
   product with U gives the slices S: (B, 16, 4h, 4w).
4. *Pixel ensemble.* ``P = PixelShuffle(4)(S)``: (B, 1, 16h, 16w) = (B, 1, S, S) with
   ``P[4y+i, 4x+j] = S[4i+j, y, x]``.
5. *Full-resolution fusion.* ``F_up = bilinear_x16(Conv1x1(E, 256->16))``;
   ``fine = P + up4(coarse) + R([P, F_up, image])`` with R = Conv3x3 -> GELU -> Conv3x3,
   last conv zero-initialised (the image is concatenated when ``fuse_image``).
6. *Distance heads* (``distance_heads``; our choice among method.md's options): two more
   groups of 16 slice tokens through the same producer and pixel ensemble give the centre-
   and boundary-distance logits at full resolution; R gets them as input too and adds a
   zero-initialised residual to each (R has 1 + 2 output channels).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MaskDecoder
from torch import nn

from .fast_attention import fast_attention_enabled
from .fast_layers import conv2d_gelu, to_channels_last
from .variants import DecoderAdapter

ENSEMBLE_FACTOR = 4  # slices live at S/4; a 4x4 pixel ensemble restores S
SLICES_PER_MAP = ENSEMBLE_FACTOR**2
UPSCALED_DIM = 32  # channels of SAM's output_upscaling (transformer_dim // 8)
FUSION_DIM = 16  # channels of F_up and of the refinement R


def pixel_ensemble(
    slices: torch.Tensor, factor: int = ENSEMBLE_FACTOR, channels_last: bool = False
) -> torch.Tensor:
    """Pixel Ensemble Module: redistribute ``factor**2`` slices into one map per group.

    Parameters
    ----------
    slices : Tensor
        (B, G * factor**2, h, w).

    Returns
    -------
    Tensor
        (B, G, factor*h, factor*w) with ``out[g, factor*y + i, factor*x + j] =
        slices[g*factor**2 + factor*i + j, y, x]`` (i.e. ``PixelShuffle(factor)``); with
        ``channels_last`` the same values written in channels-last memory (the one copy
        this makes goes straight to the layout the full-resolution convolutions prefer).
    """
    batch, channels, h, w = slices.shape
    groups = channels // (factor * factor)
    if groups * factor * factor != channels:
        raise ValueError(f"{channels} slices cannot form {factor}x{factor} pixel ensembles")
    x = slices.reshape(batch, groups, factor, factor, h, w)  # b, g, i, j, y, x
    if channels_last:
        x = x.permute(0, 4, 2, 5, 3, 1)  # b, y, i, x, j, g
        return x.reshape(batch, factor * h, factor * w, groups).permute(0, 3, 1, 2)
    x = x.permute(0, 1, 4, 2, 5, 3)  # b, g, y, i, x, j
    return x.reshape(batch, groups, factor * h, factor * w)


class HRDecoder(nn.Module):
    """High-resolution decoder on SAM's (frozen) two-way transformer.

    Parameters
    ----------
    mask_decoder : MaskDecoder
        SAM's mask decoder. Its transformer, output tokens and output_upscaling are used
        frozen and *referenced*, not registered here (they are registered once, under
        ``AmaSam.sam``); the hypernetwork and slice tokens are initialised from it.
    encoder_dim : int
        Channels of F_early (the ViT embed dim).
    num_slice_tokens : int
        Slice tokens for the mask (must be 16 for the 4x4 pixel ensemble).
    distance_heads : bool
        Add the centre/boundary distance maps (32 more tokens).
    fuse_image : bool
        Feed the normalised image into the refinement R.
    train_transformer : bool
        Use a trainable deep copy of SAM's transformer.
    decoder_adapter : DecoderAdapter, optional
        SAM-DA adapter run around the transformer.
    early_hidden : int
        Width of the first transposed conv on F_early (HQ-SAM uses 256; 64 keeps ViT-B's
        trainable share under 5 %).
    token_noise : float
        Std of the noise added to ``mask_tokens[0]`` to initialise the slice tokens.
    skip_channels : int
        Channels of stride-4 encoder-stem features (``tiny_conv``) added to U through a
        3x3 conv; 0 = none.
    """

    def __init__(
        self,
        mask_decoder: MaskDecoder,
        encoder_dim: int,
        num_slice_tokens: int = SLICES_PER_MAP,
        distance_heads: bool = True,
        fuse_image: bool = True,
        train_transformer: bool = False,
        decoder_adapter: DecoderAdapter | None = None,
        early_hidden: int = 64,
        token_noise: float = 0.02,
        skip_channels: int = 0,
    ):
        super().__init__()
        if num_slice_tokens != SLICES_PER_MAP:
            raise ValueError(
                f"num_slice_tokens must be {SLICES_PER_MAP} for the 4x4 pixel ensemble, "
                f"not {num_slice_tokens}"
            )
        dim = mask_decoder.transformer_dim
        # a plain attribute, not a submodule: SAM's weights are registered once, in AmaSam.sam
        self.__dict__["_sam_decoder"] = mask_decoder
        self.transformer_copy = (
            copy.deepcopy(mask_decoder.transformer).requires_grad_(True)
            if train_transformer
            else None
        )
        self.decoder_adapter = decoder_adapter
        self.num_maps = 3 if distance_heads else 1
        self.fuse_image = fuse_image

        with torch.no_grad():
            seed_token = mask_decoder.mask_tokens.weight[0].detach().clone()
            tokens = seed_token.expand(self.num_maps * SLICES_PER_MAP, dim).clone()
            tokens += token_noise * torch.randn_like(tokens)
        self.slice_tokens = nn.Parameter(tokens)  # (16 * num_maps, 256)
        self.hypernetwork = copy.deepcopy(mask_decoder.output_hypernetworks_mlps[0])
        self.hypernetwork.requires_grad_(True)

        self.upscaled_proj = nn.Sequential(  # conv(SAM output_upscaling(src))
            nn.Conv2d(UPSCALED_DIM, 2 * UPSCALED_DIM, 3, padding=1),
            LayerNorm2d(2 * UPSCALED_DIM),
            nn.GELU(),
            nn.Conv2d(2 * UPSCALED_DIM, UPSCALED_DIM, 3, padding=1),
        )
        self.embedding_up = nn.Sequential(  # convT(E): h -> 4h
            nn.ConvTranspose2d(dim, dim // 4, 2, stride=2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, UPSCALED_DIM, 2, stride=2),
        )
        self.early_up = nn.Sequential(  # convT(F_early): h -> 4h
            nn.ConvTranspose2d(encoder_dim, early_hidden, 2, stride=2),
            LayerNorm2d(early_hidden),
            nn.GELU(),
            nn.ConvTranspose2d(early_hidden, UPSCALED_DIM, 2, stride=2),
        )
        self.skip_proj = (  # stem features at 4h -> U (a U-Net style skip)
            nn.Sequential(
                nn.Conv2d(skip_channels, UPSCALED_DIM, 3, padding=1),
                LayerNorm2d(UPSCALED_DIM),
                nn.GELU(),
                nn.Conv2d(UPSCALED_DIM, UPSCALED_DIM, 3, padding=1),
            )
            if skip_channels > 0
            else None
        )
        self.feature_proj = nn.Conv2d(dim, FUSION_DIM, 1)  # E -> F_up before the x16 upsample
        refine_in = self.num_maps + FUSION_DIM + (3 if fuse_image else 0)
        self.refine = nn.Sequential(
            nn.Conv2d(refine_in, FUSION_DIM, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(FUSION_DIM, self.num_maps, 3, padding=1),
        )
        nn.init.zeros_(self.refine[-1].weight)  # fine == P + up4(coarse) at step 0
        nn.init.zeros_(self.refine[-1].bias)
        #: full-resolution stage channels-last with the GELU fused (``model.fast_layers``);
        #: set by AmaSam when ``ModelConfig.fast_attention`` is on
        self.fast_fusion = False

    @property
    def sam_decoder(self) -> MaskDecoder:
        """SAM's mask decoder (referenced)."""
        return self.__dict__["_sam_decoder"]

    @property
    def transformer(self) -> nn.Module:
        """The two-way transformer in use (SAM's frozen one or the trainable copy)."""
        return self.transformer_copy if self.transformer_copy is not None else self.sam_decoder.transformer

    def forward(
        self,
        embedding: torch.Tensor,
        early: torch.Tensor,
        dense_prompt: torch.Tensor,
        image_pe: torch.Tensor,
        coarse_logits: torch.Tensor,
        image: torch.Tensor | None = None,
        skip: torch.Tensor | None = None,
        sparse_prompt: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decode full-resolution logits.

        Parameters
        ----------
        embedding : Tensor
            E, (B, 256, h, w).
        early : Tensor or None
            F_early, (B, C_enc, h, w); None (CA-SAM) skips the early-feature path.
        dense_prompt : Tensor
            (B, 256, h, w) from SAM's prompt encoder.
        image_pe : Tensor
            (1, 256, h, w) ``prompt_encoder.get_dense_pe()``.
        coarse_logits : Tensor
            (B, 1, 4h, 4w).
        image : Tensor, optional
            (B, 3, 16h, 16w) normalised input; required when ``fuse_image``.
        skip : Tensor, optional
            (B, skip_channels, 4h, 4w) stem features; required when ``skip_channels`` > 0.
        sparse_prompt : Tensor, optional
            (B, N, 256) point/box tokens from SAM's prompt encoder, appended to the output
            tokens as SAM's mask decoder does (interactive correction, inference/prompting.py).

        Returns
        -------
        fine_logits : Tensor
            (B, 1, 16h, 16w).
        distance_logits : Tensor or None
            (B, 2, 16h, 16w): centre distance, boundary distance.
        """
        batch, dim, h, w = embedding.shape
        sam = self.sam_decoder
        sam_tokens = torch.cat([sam.iou_token.weight, sam.mask_tokens.weight], dim=0)
        n_sam = sam_tokens.shape[0]
        tokens = torch.cat([sam_tokens, self.slice_tokens], dim=0)
        tokens = tokens.unsqueeze(0).expand(batch, -1, -1)
        if sparse_prompt is not None:
            tokens = torch.cat([tokens, sparse_prompt.to(tokens.dtype)], dim=1)
        src = embedding + dense_prompt
        pos = image_pe.expand(batch, -1, -1, -1)
        if self.decoder_adapter is not None:
            hs, src = self.decoder_adapter(self.transformer, src, pos, tokens)
        else:
            hs, src = self.transformer(src, pos, tokens)
        slice_out = hs[:, n_sam : n_sam + self.slice_tokens.shape[0]]  # B, 16*num_maps, 256
        src = src.transpose(1, 2).reshape(batch, dim, h, w)

        features = self.upscaled_proj(sam.output_upscaling(src)) + self.embedding_up(embedding)
        if early is not None and self.early_up is not None:  # CA-SAM has no early path
            features = features + self.early_up(early)  # B, 32, 4h, 4w
        if self.skip_proj is not None:
            if skip is None:
                raise ValueError("this HR-Decoder has a stem skip: it needs the stem features")
            features = features + self.skip_proj(skip)
        hyper = self.hypernetwork(slice_out)  # B, 16*num_maps, 32
        slices = (hyper @ features.flatten(2)).reshape(batch, -1, 4 * h, 4 * w)
        # The full-resolution stage (22 channels at 16h x 16w) dominates the decoder's time:
        # the fast path keeps it channels-last and fuses the GELU (same values to rounding).
        fast = self.fast_fusion and fast_attention_enabled()
        maps = pixel_ensemble(slices, channels_last=fast)  # B, num_maps, 16h, 16w

        full = (16 * h, 16 * w)
        projected = self.feature_proj(embedding)
        if fast:
            projected = to_channels_last(projected)
        feature_up = F.interpolate(projected, size=full, mode="bilinear", align_corners=False)
        parts = [maps, feature_up]
        if self.fuse_image:
            if image is None:
                raise ValueError("fuse_image is on: the HR-Decoder needs the normalised image")
            parts.append(to_channels_last(image) if fast else image)
        fused = torch.cat(parts, dim=1)
        if fast and type(self.refine[1]) is nn.GELU and self.refine[1].approximate == "none":
            residual = self.refine[2](conv2d_gelu(self.refine[0], fused))
        else:
            residual = self.refine(fused)
        coarse_up = F.interpolate(coarse_logits, size=full, mode="bilinear", align_corners=False)
        fine = maps[:, :1] + coarse_up + residual[:, :1]
        distance = None
        if self.num_maps > 1:
            distance = (maps[:, 1:] + residual[:, 1:]).contiguous()
        return fine, distance
