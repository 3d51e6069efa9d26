"""AMA-SAM: frozen SAM + encoder adapters + CGRL discriminator + coarse head + HR-Decoder.

Pipeline (method.md 1.3), S = ``cfg.image_size``, h = S/16::

    images B,3,S,S (0-255) -> preprocess (SAM mean/std)
    -> SAM ViT with adapters -> E: B,256,h,h and F_early (first global block)
    -> [CA-SAM alignment layer on E, when alignment_layer_blocks > 0]
    -> [when domain is given] CGRL / GRL (E) -> discriminator -> B,1 logit of P(primary)
    -> coarse head (E) -> B,1,4h,4h; sigmoid(detach) >= threshold -> SAM dense mask prompt
    -> HR-Decoder(E, F_early, dense prompt) -> fine B,1,S,S [+ distance B,2,S,S]

Only the added parts train (``trainable_state_dict``); SAM's weights stay frozen unless
``cfg.trainable_backbone`` (then the image encoder trains too).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from segment_anything.modeling import Sam
from torch import nn

from ..config import ModelConfig
from ..errors import CheckpointError
from .adapters import encode_with_early_features, first_global_block, insert_adapters
from .backbone import (
    PIXEL_MEAN,
    PIXEL_STD,
    ConvStemPatchEmbed,
    build_sam_from_config,
    key_mismatch,
    load_sam_weights,
    sam_official_state_dict,
    variant_spec,
)
from .cgrl import DomainDiscriminator, align_features
from .coarse_head import CoarseHead
from .fast_attention import enable_fast_attention, enable_fast_mlp
from .fast_layers import enable_fast_layers
from .hr_decoder import HRDecoder
from .variants import AlignmentLayer, DecoderAdapter


@dataclass
class AmaSamOutput:
    """Outputs of :meth:`AmaSam.forward` (all logits).

    Attributes
    ----------
    fine_logits : Tensor
        (B, 1, S, S) nucleus logits.
    coarse_logits : Tensor
        (B, 1, S/4, S/4) coarse-head logits.
    distance_logits : Tensor or None
        (B, 2, S, S): channel 0 centre distance, 1 boundary distance (sigmoid -> [0, 1]);
        None without distance heads.
    domain_logits : Tensor or None
        (B, 1) logit of P(primary); only with ``domain`` given, alignment != none and
        num_domains > 1.
    task : Tensor or None
        (B,) long: the CA-SAM task each image was routed to (-1 = base path); None for the
        other kinds.
    """

    fine_logits: torch.Tensor
    coarse_logits: torch.Tensor
    distance_logits: torch.Tensor | None = None
    domain_logits: torch.Tensor | None = None
    task: torch.Tensor | None = None


class AmaSam(nn.Module):
    """The AMA-SAM network.

    Parameters
    ----------
    cfg : ModelConfig
        Architecture.
    sam : segment_anything.modeling.Sam, optional
        SAM parts (with their final weights: the slice tokens and hypernetwork are initialised
        from the mask decoder). Default: random weights from the registry.
    """

    def __init__(self, cfg: ModelConfig, sam: Sam | None = None):
        super().__init__()
        self.cfg = cfg
        self.sam = sam if sam is not None else build_sam_from_config(cfg)
        encoder = self.sam.image_encoder
        if encoder.img_size != cfg.image_size:
            raise ValueError(
                f"SAM parts built for image size {encoder.img_size}, config says {cfg.image_size}"
            )
        self.sam.requires_grad_(False)
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), False)

        spec = variant_spec(cfg)
        if cfg.kind == "amasam":  # the variants keep the encoder frozen as it is
            insert_adapters(encoder, cfg.adapter_ratio, cfg.adapter_scale)  # trainable
        if cfg.trainable_backbone:
            encoder.requires_grad_(True)
        self.early_index = first_global_block(encoder)

        # ca-sam keeps one alignment layer per task instead (model.ca_sam.CaSam)
        self.alignment_layer = (
            AlignmentLayer(cfg.alignment_layer_blocks)
            if cfg.alignment_layer_blocks > 0 and cfg.kind == "amasam"
            else None
        )
        self.discriminator = (
            DomainDiscriminator(encoder.neck[0].out_channels)
            if cfg.alignment != "none" and cfg.num_domains > 1
            else None
        )
        self.coarse_head = CoarseHead(encoder.neck[0].out_channels)
        mask_decoder = self.sam.mask_decoder
        stem = encoder.patch_embed
        self.hr_decoder = HRDecoder(
            mask_decoder,
            encoder_dim=spec.embed_dim,
            num_slice_tokens=cfg.num_slice_tokens,
            distance_heads=cfg.distance_heads,
            fuse_image=cfg.fuse_image,
            train_transformer=cfg.train_decoder_transformer,
            decoder_adapter=(
                DecoderAdapter(depth=len(mask_decoder.transformer.layers))
                if cfg.decoder_adapter
                else None
            ),
            skip_channels=stem.out_channels if isinstance(stem, ConvStemPatchEmbed) else 0,
        )
        if cfg.fast_attention:
            # Exact re-implementations (float rounding aside) of SAM's attention/MLP forward,
            # of every LayerNorm2d and adapter, and of the HR-Decoder's full-resolution
            # stage; state_dict unchanged. reference_attention() selects the originals.
            enable_fast_attention(self.sam)
            enable_fast_mlp(self.sam)
            enable_fast_layers(self)
            self.hr_decoder.fast_fusion = True
        # fixed at construction, so a trainer that freezes parts temporarily saves the same set
        self._trainable_names = tuple(n for n, p in self.named_parameters() if p.requires_grad)

    # ------------------------------------------------------------------------------- forward

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) on the 0-255 scale -> SAM-normalised (mean/std), same shape."""
        return (images - self.pixel_mean) / self.pixel_std

    def dense_prompt(self, coarse_logits: torch.Tensor) -> torch.Tensor:
        """SAM dense prompt (B, 256, h, w) from the coarse logits (B, 1, 4h, 4w).

        With ``coarse_as_prompt`` the detached mask ``sigmoid >= threshold`` goes through SAM's
        frozen mask path; otherwise SAM's ``no_mask_embed``.
        """
        masks = None
        if self.cfg.coarse_as_prompt:
            probs = torch.sigmoid(coarse_logits.detach())
            masks = (probs >= self.cfg.coarse_prompt_threshold).to(coarse_logits.dtype)
        _, dense = self.sam.prompt_encoder(points=None, boxes=None, masks=masks)
        if masks is None:
            dense = dense.expand(coarse_logits.shape[0], -1, -1, -1)
        return dense

    def forward(
        self,
        images: torch.Tensor,
        domain: torch.Tensor | None = None,
        lam: float = 0.0,
        valid: torch.Tensor | None = None,
    ) -> AmaSamOutput:
        """Segment a batch.

        Parameters
        ----------
        images : Tensor
            (B, 3, S, S) float, 0-255 scale, S = ``cfg.image_size``.
        domain : Tensor, optional
            (B,) long domain ids (0 = primary); enables ``domain_logits`` in training.
        lam : float
            Gradient-reversal strength for this step.
        valid : Tensor, optional
            (B, S, S) bool, False on crop padding: kept out of the discriminator's evidence.

        Returns
        -------
        AmaSamOutput
        """
        size = self.cfg.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(
                f"images must be B,3,{size},{size} (image_size {size}), got {tuple(images.shape)}"
            )
        if domain is not None and (domain.dim() != 1 or domain.shape[0] != images.shape[0]):
            raise ValueError(
                f"domain must have shape ({images.shape[0]},), got {tuple(domain.shape)}"
            )
        x = self.preprocess(images)
        embedding, early = encode_with_early_features(self.sam.image_encoder, x, self.early_index)
        stem = self.sam.image_encoder.patch_embed
        skip = stem.pop_features() if isinstance(stem, ConvStemPatchEmbed) else None
        embedding, early, task = self.align_features(embedding, early)

        domain_logits = None
        if domain is not None and self.discriminator is not None:
            routed = align_features(embedding, domain, lam, self.cfg.alignment)
            domain_logits = self.discriminator(routed, valid)

        coarse = self.coarse_head(embedding)
        fine, distance = self.hr_decoder(
            embedding,
            early,
            self.dense_prompt(coarse),
            self.sam.prompt_encoder.get_dense_pe(),
            coarse,
            x if self.cfg.fuse_image else None,
            skip=skip,
        )
        return AmaSamOutput(fine, coarse, distance, domain_logits, task)

    def align_features(self, embedding: torch.Tensor, early: torch.Tensor):
        """(E, F_early) -> (E for the decoder, F_early or None, routed task or None).

        AMA-SAM: the optional alignment layer on E. CA-SAM (``model.ca_sam``) overrides it.
        """
        if self.alignment_layer is not None:
            embedding = self.alignment_layer(embedding)
        return embedding, early, None

    # --------------------------------------------------------------------------- weights

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The added (and, with ``trainable_backbone``, encoder) weights, detached copies."""
        params = dict(self.named_parameters())
        return {name: params[name].detach().clone() for name in self._trainable_names}

    def load_trainable_state_dict(
        self, state_dict: dict[str, torch.Tensor], source: str = "trainable weights"
    ) -> None:
        """Load what :meth:`trainable_state_dict` saved, strictly.

        Raises
        ------
        CheckpointError
            One line naming ``source`` and the first missing, unexpected or misfitting key.
        """
        mismatch = key_mismatch(sorted(self._trainable_names), sorted(state_dict))
        if mismatch:
            raise CheckpointError(f"{source}: do not match this model's configuration ({mismatch})")
        params = dict(self.named_parameters())
        for name in self._trainable_names:
            if tuple(state_dict[name].shape) != tuple(params[name].shape):
                raise CheckpointError(
                    f"{source}: {name} has shape {tuple(state_dict[name].shape)}, this model "
                    f"needs {tuple(params[name].shape)}"
                )
        with torch.no_grad():
            for name in self._trainable_names:
                params[name].copy_(state_dict[name])

    def sam_state_dict(self) -> dict[str, torch.Tensor]:
        """SAM's weights in the official checkpoint layout (adapters excluded)."""
        return sam_official_state_dict(self.sam)

    def load_sam_state_dict(self, state_dict: dict[str, torch.Tensor], source: str = "SAM weights") -> None:
        """Load official-layout SAM weights strictly (see ``backbone.load_sam_weights``)."""
        load_sam_weights(self.sam, state_dict, source)

    def parameter_report(self) -> dict:
        """Parameter counts: ``total``, ``trainable``, ``share`` (trainable / total) and
        ``modules`` (trainable count per added part)."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        adapters = sum(
            p.numel() for n, p in self.sam.image_encoder.named_parameters() if ".adapter." in n
        )
        modules = {"encoder adapters": adapters}
        for name in ("alignment_layer", "coarse_head", "hr_decoder", "discriminator"):
            module = getattr(self, name)
            if module is not None:
                modules[name] = sum(p.numel() for p in module.parameters() if p.requires_grad)
        return {
            "total": total,
            "trainable": trainable,
            "share": trainable / total if total else 0.0,
            "modules": modules,
        }


def build_amasam(cfg: ModelConfig, checkpoint: str | Path | None = None) -> AmaSam:
    """Build AMA-SAM from its config, with official SAM weights from ``checkpoint``.

    ``vit_*`` without a checkpoint gets random (seeded) SAM weights and a logged warning;
    ``tiny`` always has seeded random SAM weights. The added parts are initialised after the
    SAM weights are loaded (slice tokens and hypernetwork start from the mask decoder).

    Raises
    ------
    CheckpointError
        The checkpoint is missing, unreadable, not SAM, or for another variant.
    """
    sam = build_sam_from_config(cfg, checkpoint)
    if cfg.kind != "amasam":
        from .kinds import build_variant_model

        return build_variant_model(cfg, sam)
    return AmaSam(cfg, sam)
