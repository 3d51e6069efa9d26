"""Segment Anything backbones: a registry of builders and a checked checkpoint loader.

The SAM parts are segment_anything's own modules (``ImageEncoderViT``, ``PromptEncoder``,
``MaskDecoder`` with a ``TwoWayTransformer``) inside segment_anything's ``Sam`` container,
so ``sam.state_dict()`` has exactly the key layout of the official ``.pth`` files
(method.md 6.3): ``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``.

Variants (method.md 6.2): ``vit_b``, ``vit_l``, ``vit_h`` are the official architectures;
``tiny`` uses the same module classes with the ``ModelConfig.tiny_*`` encoder shape (the prompt
encoder and mask decoder keep SAM's 256-dim sizes, which the HR-Decoder relies on).
Every variant is built for ``cfg.image_size`` (image embedding side ``image_size // 16``);
official weights made for 1024 are resized on load (absolute position embedding bicubically,
the global blocks' relative position tables linearly), as SAMed and micro-sam do.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from ..config import RANDOM_BACKBONES, ConfigError, ModelConfig
from ..errors import CheckpointError

logger = logging.getLogger(__name__)

PATCH_SIZE = 16
PROMPT_EMBED_DIM = 256  # SAM's decoder width; the neck projects every encoder to it
PIXEL_MEAN = (123.675, 116.28, 103.53)  # SAM's normalisation on the 0-255 scale (6.4)
PIXEL_STD = (58.395, 57.12, 57.375)
# Seed for the weights of a backbone built without a checkpoint: a random ``tiny`` backbone is
# then a pure function of its config, so a model folder need not store its frozen weights.
RANDOM_BACKBONE_SEED = 0


@dataclass(frozen=True)
class SamVariant:
    """Shape of one SAM image encoder.

    Attributes
    ----------
    name : str
        Registry name (``vit_b``, ...).
    embed_dim, depth, num_heads : int
        ViT width, number of blocks and attention heads.
    global_attn_indexes : tuple of int
        Blocks with global attention; all others use windowed attention.
    window_size : int
        Side of the attention windows, in tokens.
    checkpoint_name : str
        Official checkpoint file name ("" for ``tiny``).
    """

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    checkpoint_name: str = ""


SAM_VARIANTS: dict[str, SamVariant] = {
    "vit_b": SamVariant("vit_b", 768, 12, 12, (2, 5, 8, 11), 14, "sam_vit_b_01ec64.pth"),
    "vit_l": SamVariant("vit_l", 1024, 24, 16, (5, 11, 17, 23), 14, "sam_vit_l_0b3195.pth"),
    "vit_h": SamVariant("vit_h", 1280, 32, 16, (7, 15, 23, 31), 14, "sam_vit_h_4b8939.pth"),
}


def variant_spec(cfg: ModelConfig) -> SamVariant:
    """The encoder shape ``cfg`` asks for (official table or the ``tiny_*`` fields)."""
    if cfg.backbone in SAM_VARIANTS:
        return SAM_VARIANTS[cfg.backbone]
    if cfg.tiny_embed_dim % cfg.tiny_heads != 0:
        raise ConfigError(
            f"tiny_embed_dim {cfg.tiny_embed_dim} is not divisible by tiny_heads {cfg.tiny_heads}"
        )
    bad = [i for i in cfg.tiny_global_attn if not 0 <= i < cfg.tiny_depth]
    if bad or not cfg.tiny_global_attn:
        raise ConfigError(
            f"tiny_global_attn {list(cfg.tiny_global_attn)} must name at least one block "
            f"index in 0..{cfg.tiny_depth - 1}"
        )
    return SamVariant(
        cfg.backbone,
        cfg.tiny_embed_dim,
        cfg.tiny_depth,
        cfg.tiny_heads,
        tuple(sorted(cfg.tiny_global_attn)),
        cfg.tiny_window_size,
    )


def build_sam_parts(
    spec: SamVariant, image_size: int = 1024, seed: int | None = RANDOM_BACKBONE_SEED
) -> Sam:
    """Build SAM's image encoder, prompt encoder and mask decoder with random weights.

    Parameters
    ----------
    spec : SamVariant
        Encoder shape.
    image_size : int
        Input side S; the image embedding is ``S/16 x S/16`` and the mask prompt ``S/4``.
    seed : int or None
        Seed for the random weights (the global RNG is left untouched); None: global RNG.

    Returns
    -------
    segment_anything.modeling.Sam
        In eval mode; ``state_dict()`` keys follow the official checkpoint layout.
    """
    if image_size % PATCH_SIZE:
        raise ConfigError(f"image_size must be a multiple of {PATCH_SIZE}, not {image_size}")
    side = image_size // PATCH_SIZE
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        sam = Sam(
            image_encoder=ImageEncoderViT(
                depth=spec.depth,
                embed_dim=spec.embed_dim,
                img_size=image_size,
                mlp_ratio=4,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                num_heads=spec.num_heads,
                patch_size=PATCH_SIZE,
                qkv_bias=True,
                use_rel_pos=True,
                global_attn_indexes=spec.global_attn_indexes,
                window_size=spec.window_size,
                out_chans=PROMPT_EMBED_DIM,
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=PROMPT_EMBED_DIM,
                image_embedding_size=(side, side),
                input_image_size=(image_size, image_size),
                mask_in_chans=16,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(
                    depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8
                ),
                transformer_dim=PROMPT_EMBED_DIM,
                iou_head_depth=3,
                iou_head_hidden_dim=256,
            ),
            pixel_mean=list(PIXEL_MEAN),
            pixel_std=list(PIXEL_STD),
        )
    return sam.eval()


STEM_CHANNELS = (16, 32)  # widths of the conv stem at strides 2 and 4


class ConvStemPatchEmbed(torch.nn.Module):
    """Convolutional stem in place of SAM's 16x16 patch projection (``tiny_conv``).

    Two stride-2 3x3 convolutions (plus a 3x3 at stride 4) see every pixel with overlapping
    receptive fields, then a 4x4 stride-4 projection makes the same 16-pixel tokens as
    ``PatchEmbed``; the output layout (B, S/16, S/16, C) is SAM's, so the ViT blocks, adapters,
    neck, CGRL and HR-Decoder are unchanged. The stride-4 features are kept for the
    HR-Decoder (``pop_features``): a random ViT learns little about nucleus borders from a few
    dozen images, local convolutional features do.

    Forward: (B, 3, S, S) normalised -> (B, S/16, S/16, embed_dim).
    """

    def __init__(self, embed_dim: int, channels: tuple[int, int] = STEM_CHANNELS):
        super().__init__()
        from segment_anything.modeling.common import LayerNorm2d

        half, quarter = channels
        # One normalisation, at stride 4 (a norm at stride 2 costs more than its conv on a CPU).
        self.stem = torch.nn.Sequential(
            torch.nn.Conv2d(3, half, 3, stride=2, padding=1),
            torch.nn.GELU(),
            torch.nn.Conv2d(half, quarter, 3, stride=2, padding=1),
            torch.nn.GELU(),
            torch.nn.Conv2d(quarter, quarter, 3, padding=1),
            LayerNorm2d(quarter),
            torch.nn.GELU(),
        )
        self.proj = torch.nn.Conv2d(quarter, embed_dim, PATCH_SIZE // 4, stride=PATCH_SIZE // 4)
        self.out_channels = quarter
        self._features: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stem(x)  # B, quarter, S/4, S/4
        self._features = features
        return self.proj(features).permute(0, 2, 3, 1)

    def pop_features(self) -> torch.Tensor | None:
        """The stride-4 features of the last forward (B, quarter, S/4, S/4), then forgotten."""
        features, self._features = self._features, None
        return features


def _builder(name: str) -> Callable[[ModelConfig], Sam]:
    def build(cfg: ModelConfig) -> Sam:
        sam = build_sam_parts(variant_spec(cfg), cfg.image_size)
        if name == "tiny_conv":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_BACKBONE_SEED + 1)
                sam.image_encoder.patch_embed = ConvStemPatchEmbed(cfg.tiny_embed_dim)
        return sam

    build.__name__ = f"build_sam_{name}"
    build.__doc__ = f"Random-weight SAM parts for ``{name}`` at ``cfg.image_size``."
    return build


# name -> builder(cfg) -> Sam, like segment_anything's ``sam_model_registry``.
MODEL_REGISTRY: dict[str, Callable[[ModelConfig], Sam]] = {
    name: _builder(name) for name in ("tiny", "tiny_conv", "vit_b", "vit_l", "vit_h")
}


# ---------------------------------------------------------------------------------------------
# checkpoint files

_BLOCK_KEY = re.compile(r"^image_encoder\.blocks\.(\d+)\.")


def describe_state_dict(state_dict: dict[str, torch.Tensor]) -> str:
    """Name the variant a SAM state dict looks like: ``vit_b`` ... or ``embed E, depth D``."""
    embed_dim = state_dict["image_encoder.pos_embed"].shape[-1]
    depth = 1 + max((int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k))), default=-1)
    for spec in SAM_VARIANTS.values():
        if spec.embed_dim == embed_dim and spec.depth == depth:
            return spec.name
    return f"custom (embed {embed_dim}, depth {depth})"


def _unwrap(obj: object) -> object:
    """Accept ``{"model": sd}`` / ``{"state_dict": sd}`` wrappers and DDP ``module.`` prefixes."""
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if isinstance(obj, dict) and obj and all(
        isinstance(k, str) and k.startswith("module.") for k in obj
    ):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_sam_checkpoint(path: str | Path, variant: str) -> dict[str, torch.Tensor]:
    """Read an official SAM checkpoint and check it matches ``variant``.

    Parameters
    ----------
    path : str or Path
        ``.pth`` file: a dict of name -> tensor (optionally wrapped as ``{"model": ...}`` or
        ``{"state_dict": ...}``).
    variant : str
        ``vit_b``, ``vit_l``, ``vit_h`` or ``tiny`` (any non-official shape).

    Returns
    -------
    dict of str to Tensor
        The state dict, on the CPU.

    Raises
    ------
    CheckpointError
        One line naming the file and the problem: missing, unreadable (truncated/corrupt),
        not a SAM checkpoint, or made for another variant.
    """
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types (zip, pickle, key, EOF errors)
        text = str(exc)
        # the weights-only unpickler wraps the real reason in a long paragraph: keep the reason
        reason = text.split("WeightsUnpickler error:")[-1].strip().splitlines()
        reason = (reason[0] if reason else type(exc).__name__)[:120]
        if "Unsupported global" in text:
            raise CheckpointError(
                f"{path}: not a SAM checkpoint (it holds Python objects, not just tensors: "
                f"{reason})"
            ) from None
        raise CheckpointError(
            f"{path}: cannot be read, the file is truncated, corrupt or not a PyTorch "
            f"checkpoint ({type(exc).__name__}: {reason})"
        ) from None
    state_dict = _unwrap(obj)
    if not isinstance(state_dict, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()
    ):
        raise CheckpointError(f"{path}: not a SAM checkpoint (not a dict of named tensors)")
    if "image_encoder.pos_embed" not in state_dict:
        raise CheckpointError(f"{path}: not a SAM checkpoint (no image_encoder.* weights)")
    looks_like = describe_state_dict(state_dict)
    official = looks_like in SAM_VARIANTS
    if variant in SAM_VARIANTS and looks_like != variant:
        raise CheckpointError(f"{name} looks like a {looks_like} checkpoint, not {variant}")
    if variant in RANDOM_BACKBONES and official:
        raise CheckpointError(f"{name} looks like a {looks_like} checkpoint, not {variant}")
    return state_dict


def _resize_to_model(key: str, weight: torch.Tensor, target: torch.Size) -> torch.Tensor:
    """Resize a position table made for another image size (pos_embed / rel_pos_h,w)."""
    if weight.shape == target:
        return weight
    if key.endswith("pos_embed") and weight.dim() == 4 and weight.shape[-1] == target[-1]:
        grid = weight.permute(0, 3, 1, 2).float()  # 1,C,h,w
        grid = F.interpolate(grid, size=tuple(target[1:3]), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).to(weight.dtype).contiguous()
    if key.endswith(("rel_pos_h", "rel_pos_w")) and weight.dim() == 2 and weight.shape[1] == target[1]:
        table = weight.t().unsqueeze(0).float()  # 1,head_dim,L
        table = F.interpolate(table, size=target[0], mode="linear", align_corners=False)
        return table.squeeze(0).t().to(weight.dtype).contiguous()
    return weight


def is_added_key(key: str) -> bool:
    """True for weights this package adds inside SAM modules (encoder adapters)."""
    return ".adapter." in key


def sam_official_state_dict(sam: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``sam.state_dict()`` without added weights: the official checkpoint layout."""
    return {k: v for k, v in sam.state_dict().items() if not is_added_key(k)}


def key_mismatch(expected, found, missing_what: str = "missing") -> str:
    """``""`` when ``found`` has exactly the keys of ``expected``; otherwise one clause such
    as ``"3 missing, e.g. a.b; 1 unexpected, e.g. c.d"`` (first key of each kind, in order)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    parts = []
    if missing:
        parts.append(f"{len(missing)} {missing_what}, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
    return "; ".join(parts)


def load_sam_weights(
    sam: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Load an official-layout state dict strictly into the SAM parts.

    Adapter weights that this package inserted into the encoder blocks are the only keys
    allowed to be absent; every official key must be present and fit. Position tables made for
    another image size are resized to the model's.

    Raises
    ------
    CheckpointError
        One line naming ``source`` and the first missing, unexpected or misfitting key.
    """
    expected = sam_official_state_dict(sam)
    mismatch = key_mismatch(expected, state_dict, missing_what="SAM weight(s) missing")
    if mismatch:
        raise CheckpointError(f"{source}: does not fit this SAM model: {mismatch}")
    resized = {}
    for key, target in expected.items():
        weight = _resize_to_model(key, state_dict[key], target.shape)
        if weight.shape != target.shape:
            raise CheckpointError(
                f"{source}: does not fit this SAM model: {key} has shape "
                f"{tuple(weight.shape)}, the model needs {tuple(target.shape)}"
            )
        resized[key] = weight
    result = sam.load_state_dict(resized, strict=False)
    # strict=False only so that the added adapter weights may stay as initialised
    leftover = [k for k in result.missing_keys if not is_added_key(k)] + list(result.unexpected_keys)
    if leftover:  # pragma: no cover - guarded by the key check above
        raise CheckpointError(f"{source}: does not fit this SAM model: {leftover[0]}")


def build_sam_from_config(cfg: ModelConfig, checkpoint: str | Path | None = None) -> Sam:
    """``MODEL_REGISTRY[cfg.backbone](cfg)`` plus the checkpoint's weights when given."""
    sam = MODEL_REGISTRY[cfg.backbone](cfg)
    if checkpoint is not None:
        load_sam_weights(sam, load_sam_checkpoint(checkpoint, cfg.backbone), str(checkpoint))
    elif cfg.backbone not in RANDOM_BACKBONES:
        logger.warning(
            "%s built without a checkpoint: random SAM weights (pass the official %s for "
            "meaningful features)",
            cfg.backbone,
            SAM_VARIANTS[cfg.backbone].checkpoint_name,
        )
    return sam
