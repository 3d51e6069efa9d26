"""SAM-DA as a model kind (``ModelConfig.kind = "sam-da"``, method.md 3.1).

SAM's image encoder and mask decoder stay frozen and are used as they are; the only trained
weights are the decoder adapter (``model.variants.DecoderAdapter``: learnable prompt tokens
in each two-way block and zero-initialised residual adapters on the token and image streams)
and a per-map output affine (2 numbers per map). With S the input side and h = S/16::

    images B,3,S,S (0-255) -> preprocess -> frozen ViT -> E: B,256,h,h
    -> SAM's frozen two-way transformer wrapped by the DecoderAdapter
       (queries: SAM's IoU token + 4 mask tokens [+ prompts], keys: E + no-mask dense prompt)
    -> SAM's frozen output_upscaling -> B,32,4h,4h
    -> SAM's frozen hypernetworks of mask tokens 0, 1, 2 -> B,3,4h,4h
       (nucleus, centre distance, boundary distance: the adapter repurposes SAM's first three
       mask outputs, so no new head is needed)
    -> affine per map -> bilinear x4 -> fine B,1,S,S + distance B,2,S,S

The coarse logits are the nucleus map at 4h (the trainer's coarse loss supervises it at that
resolution). vit_b: 70,790 trainable of about 93.8 M parameters (0.075 %).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.modeling.mask_decoder import MaskDecoder
from torch import nn

from ..config import ModelConfig
from .amasam import AmaSam, AmaSamOutput
from .backbone import PIXEL_MEAN, PIXEL_STD
from .fast_attention import enable_fast_attention, enable_fast_mlp
from .variants import DecoderAdapter


class SamDaDecoder(nn.Module):
    """SAM's mask decoder (frozen, referenced) run through a trainable :class:`DecoderAdapter`.

    Parameters
    ----------
    mask_decoder : MaskDecoder
        SAM's decoder; registered under ``SamDa.sam``, only referenced here.
    num_maps : int
        1 (nucleus) or 3 (nucleus + centre + boundary distance); at most SAM's 4 mask tokens.
    num_prompts, hidden : int
        Prompt tokens per block and adapter bottleneck (method.md: 8 and 32).
    """

    def __init__(self, mask_decoder: MaskDecoder, num_maps: int = 3, num_prompts: int = 8,
                 hidden: int = 32):
        super().__init__()
        if not 1 <= num_maps <= mask_decoder.num_mask_tokens:
            raise ValueError(f"num_maps must be 1..{mask_decoder.num_mask_tokens}, not {num_maps}")
        self.__dict__["_sam_decoder"] = mask_decoder  # not a submodule: SAM's keys stay in .sam
        self.num_maps = num_maps
        self.decoder_adapter = DecoderAdapter(
            depth=len(mask_decoder.transformer.layers), dim=mask_decoder.transformer_dim,
            num_prompts=num_prompts, hidden=hidden,
        )
        self.output_scale = nn.Parameter(torch.ones(num_maps))
        self.output_bias = nn.Parameter(torch.zeros(num_maps))

    @property
    def sam_decoder(self) -> MaskDecoder:
        return self.__dict__["_sam_decoder"]

    def forward(self, embedding: torch.Tensor, dense_prompt: torch.Tensor,
                image_pe: torch.Tensor) -> torch.Tensor:
        """E (B, 256, h, w), dense prompt (B, 256, h, w), PE (1, 256, h, w) -> (B, M, 4h, 4w)."""
        sam = self.sam_decoder
        batch, dim, h, w = embedding.shape
        tokens = torch.cat([sam.iou_token.weight, sam.mask_tokens.weight], dim=0)
        tokens = tokens.unsqueeze(0).expand(batch, -1, -1)
        pos = image_pe.expand(batch, -1, -1, -1)
        hs, src = self.decoder_adapter(sam.transformer, embedding + dense_prompt, pos, tokens)
        upscaled = sam.output_upscaling(src.transpose(1, 2).reshape(batch, dim, h, w))
        hyper = torch.stack(
            [sam.output_hypernetworks_mlps[i](hs[:, 1 + i]) for i in range(self.num_maps)], dim=1
        )  # B, M, 32
        maps = (hyper @ upscaled.flatten(2)).reshape(batch, self.num_maps, *upscaled.shape[-2:])
        return maps * self.output_scale.view(1, -1, 1, 1) + self.output_bias.view(1, -1, 1, 1)


class SamDa(AmaSam):
    """Frozen SAM + decoder adapter. Same forward contract and weight bookkeeping as
    :class:`AmaSam` (``trainable_state_dict``, ``load_trainable_state_dict``, SAM layout).

    Forward: images (B, 3, S, S) 0-255 -> :class:`AmaSamOutput` (``domain_logits`` None).
    """

    def __init__(self, cfg: ModelConfig, sam: Sam):
        nn.Module.__init__(self)  # AmaSam's own parts (adapters, HR-Decoder) are not built
        self.cfg = cfg
        self.sam = sam
        if sam.image_encoder.img_size != cfg.image_size:
            raise ValueError(
                f"SAM parts built for image size {sam.image_encoder.img_size}, config says "
                f"{cfg.image_size}"
            )
        self.sam.requires_grad_(False)
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), False)
        self.alignment_layer = self.discriminator = self.coarse_head = self.hr_decoder = None
        self.decoder = SamDaDecoder(sam.mask_decoder, 3 if cfg.distance_heads else 1)
        if cfg.fast_attention:
            enable_fast_attention(self.sam)
            enable_fast_mlp(self.sam)
        self._trainable_names = tuple(n for n, p in self.named_parameters() if p.requires_grad)

    def forward(self, images: torch.Tensor, domain: torch.Tensor | None = None,
                lam: float = 0.0, valid: torch.Tensor | None = None) -> AmaSamOutput:
        """``domain``, ``lam`` and ``valid`` are accepted for the trainer's contract and unused
        (SAM-DA has no discriminator)."""
        size = self.cfg.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(
                f"images must be B,3,{size},{size} (image_size {size}), got {tuple(images.shape)}"
            )
        embedding = self.sam.image_encoder(self.preprocess(images))
        _, dense = self.sam.prompt_encoder(points=None, boxes=None, masks=None)
        maps = self.decoder(embedding, dense.expand(images.shape[0], -1, -1, -1),
                            self.sam.prompt_encoder.get_dense_pe())
        full = F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)
        distance = full[:, 1:] if maps.shape[1] > 1 else None
        return AmaSamOutput(full[:, :1], maps[:, :1], distance, None)

    def parameter_report(self) -> dict:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        adapter = sum(p.numel() for p in self.decoder.decoder_adapter.parameters())
        return {
            "total": total,
            "trainable": trainable,
            "share": trainable / total if total else 0.0,
            "modules": {"decoder adapter + prompts": adapter,
                        "output affine": self.decoder.output_scale.numel()
                        + self.decoder.output_bias.numel()},
        }
