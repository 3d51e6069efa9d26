"""Interactive correction: a point or a box -> one nucleus, from a cached image embedding.

micro-sam's users correct with prompts rather than brushes. Here the trained AMA-SAM model
does it in two parts:

1. *Once per window* (:meth:`PromptSession.embedding`): the image encoder runs on the S x S
   window (S = the model's input size) around the prompt; E (B,256,S/16,S/16), F_early,
   the coarse logits, the dense prompt and the normalised window are kept
   (:class:`WindowEmbedding`, a small LRU cache). Windows sit on a grid of stride S/2, so
   every prompt is at least S/4 from its window's edge (except at the image border) and
   neighbouring prompts share an embedding.
2. *Per prompt* (:meth:`PromptSession.segment`): SAM's prompt encoder turns the points
   (positive/negative) and the box into sparse tokens, which join the HR-Decoder's output
   tokens (as SAM's mask decoder appends them) on the cached embedding; no encoder run.
   Only the embedding cells around the prompt go through the decoder's upsampling and
   full-resolution refinement (its convolutions are local, so with a one-cell halo the
   result equals the full decoder's there); the prompt-independent parts (E and F_early
   upsampled, the coarse map) are cached with the window. The decoded foreground / centre
   / boundary maps are post-processed around the prompt only, and the prompt picks its
   nucleus:

   - positive points: the instance under each point (a point on background takes the
     foreground component under it at half the threshold);
   - a box: the instance with the largest area inside the box, clipped to the box;
   - negative points: pixels of the result closer to a negative point than to any
     positive one (with a box alone: than to the pixel farthest from the negative points)
     are removed, so a negative point splits off what it touches.

No Qt here: the Segment widget runs :meth:`PromptSession.segment` in a worker thread and
commits the mask into its Labels layer.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..config import PostprocessConfig
from ..errors import AmaSamError

#: Windows kept in the embedding cache (vit_b at 1024 px: about 110 MB each).
CACHED_WINDOWS = 4
#: Embedding cells (16 px each) decoded beyond the prompt's region: the decoder's 3x3
#: convolutions reach 2 px at S/4 and 2 px at S, both inside one cell.
HALO_CELLS = 1
#: Margin (pixels at the model's resolution) post-processed around the prompt.
LOCAL_MARGIN = 48


@dataclass
class Prompt:
    """One interactive prompt in image pixel coordinates (row, column order).

    Attributes
    ----------
    points : (N, 2) float array
        ``(y, x)`` of each point.
    positive : (N,) bool array
        True for a positive (foreground) point, False for a negative one.
    box : (4,) float array or None
        ``(y0, x0, y1, x1)``, inclusive-exclusive.
    """

    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    positive: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    box: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.points = np.asarray(self.points, dtype=float).reshape(-1, 2)
        self.positive = np.asarray(self.positive, dtype=bool).reshape(-1)
        if self.positive.shape[0] != self.points.shape[0]:
            raise AmaSamError(
                f"prompt: {self.points.shape[0]} points but {self.positive.shape[0]} "
                "positive/negative flags")
        if self.box is not None:
            box = np.asarray(self.box, dtype=float).reshape(-1)
            if box.shape != (4,):
                raise AmaSamError(f"prompt: a box needs 4 numbers (y0, x0, y1, x1), got {box.shape}")
            y0, y1 = sorted((box[0], box[2]))
            x0, x1 = sorted((box[1], box[3]))
            self.box = np.array([y0, x0, y1, x1])
        if not self.positive.any() and self.box is None:
            raise AmaSamError("prompt: give at least one positive point or a box")

    def centre(self) -> tuple[float, float]:
        """Where the window is centred: the box centre, else the positive points' mean."""
        if self.box is not None:
            y0, x0, y1, x1 = self.box
            return (y0 + y1) / 2, (x0 + x1) / 2
        pts = self.points[self.positive]
        return float(pts[:, 0].mean()), float(pts[:, 1].mean())

    def extent(self) -> tuple[float, float, float, float]:
        """``(y0, x0, y1, x1)`` around every point and the box."""
        coords = [self.points]
        if self.box is not None:
            coords.append(self.box.reshape(2, 2))
        every = np.concatenate(coords)
        return (every[:, 0].min(), every[:, 1].min(), every[:, 0].max(), every[:, 1].max())


@dataclass
class WindowEmbedding:
    """Encoder outputs of one S x S window (batch of 1), on the model's device."""

    origin: tuple[int, int]  # (row, column) of the window in the (rescaled) image
    embedding: torch.Tensor  # E, 1 x 256 x S/16 x S/16
    early: torch.Tensor  # F_early, 1 x C x S/16 x S/16
    coarse: torch.Tensor  # 1 x 1 x S/4 x S/4 logits
    dense: torch.Tensor  # 1 x 256 x S/16 x S/16 dense prompt
    image: torch.Tensor  # 1 x 3 x S x S normalised window
    prior: torch.Tensor  # 1 x 32 x S/4 x S/4: convT(E) + convT(F_early) (+ stem skip)
    feature_up: torch.Tensor  # 1 x 16 x S x S: the HR-Decoder's F_up
    coarse_up: torch.Tensor  # 1 x 1 x S x S: the coarse logits upsampled


@dataclass
class NucleusMask:
    """A prompt's nucleus: ``mask`` (bool) covers ``image[rows, cols]``."""

    rows: slice
    cols: slice
    mask: np.ndarray

    @property
    def area(self) -> int:
        return int(self.mask.sum())


class PromptSession:
    """Prompts on one image with one trained model; encoder outputs are cached per window.

    Parameters
    ----------
    model : AmaSam
        A trained model (``Predictor.model``), in eval mode.
    image : ndarray
        The image (anything ``data.io.as_rgb_uint8`` accepts).
    thresholds : PostprocessConfig, optional
        Post-processing settings (the model folder's or the widget's).
    scale : float
        ``mpp_model / mpp_input`` (as ``Predictor._scale_for``): the image is resampled by
        ``1 / scale`` once, prompts and masks are mapped between the two frames.
    device : torch.device, optional
        Default: the model's.
    """

    def __init__(self, model, image: np.ndarray, thresholds: PostprocessConfig | None = None,
                 scale: float = 1.0, device: torch.device | None = None):
        from ..data.io import as_rgb_uint8
        from .predictor import _rescale_image

        if not hasattr(model, "hr_decoder") or not hasattr(model, "sam"):
            raise AmaSamError("prompts need a trained AMA-SAM model, not the classical baseline")
        self.model = model
        self.device = device or next(model.parameters()).device
        self.size = int(model.cfg.image_size)
        self.thresholds = thresholds or PostprocessConfig()
        self.scale = float(scale)
        rgb = as_rgb_uint8(image, "image")
        self.native_shape = rgb.shape[:2]
        self.rgb = _rescale_image(rgb, 1.0 / self.scale) if self.scale != 1.0 else rgb
        self._cache: OrderedDict[tuple[int, int], WindowEmbedding] = OrderedDict()
        self.encoder_runs = 0

    # ------------------------------------------------------------------------- windows
    def window_origin(self, y: float, x: float) -> tuple[int, int]:
        """Top-left of the grid window (stride S/2) whose centre is nearest to ``(y, x)``
        in the rescaled frame, clamped to the image."""
        half = self.size // 2
        height, width = self.rgb.shape[:2]

        def snap(value: float, extent: int) -> int:
            start = int(round((value - half) / half)) * half
            return int(min(max(start, 0), max(extent - self.size, 0)))

        return snap(y, height), snap(x, width)

    @torch.inference_mode()
    def embedding(self, origin: tuple[int, int]) -> WindowEmbedding:
        """The cached encoder outputs of the window at ``origin`` (encoder runs on a miss)."""
        if origin in self._cache:
            self._cache.move_to_end(origin)
            return self._cache[origin]
        from ..model.adapters import encode_with_early_features

        model, size = self.model, self.size
        y0, x0 = origin
        window = np.zeros((size, size, 3), np.uint8)  # zero padding, as the predictor pads
        crop = self.rgb[y0:y0 + size, x0:x0 + size]
        window[:crop.shape[0], :crop.shape[1]] = crop
        images = torch.from_numpy(window).to(self.device).permute(2, 0, 1)[None].float()
        x = model.preprocess(images)
        embedding, early = encode_with_early_features(model.sam.image_encoder, x,
                                                      model.early_index)
        stem = model.sam.image_encoder.patch_embed
        # The CPU backbone's convolutional stem hands its features to the decoder (skip).
        skip = stem.pop_features() if hasattr(stem, "pop_features") else None
        if getattr(model, "alignment_layer", None) is not None:
            embedding = model.alignment_layer(embedding)
        coarse = model.coarse_head(embedding)
        decoder = model.hr_decoder
        full = (size, size)
        prior = decoder.embedding_up(embedding) + decoder.early_up(early)
        if getattr(decoder, "skip_proj", None) is not None:  # prompt-independent too
            prior = prior + decoder.skip_proj(skip)
        feature_up = F.interpolate(decoder.feature_proj(embedding), size=full, mode="bilinear",
                                   align_corners=False)
        coarse_up = F.interpolate(coarse, size=full, mode="bilinear", align_corners=False)
        cached = WindowEmbedding(origin, embedding, early, coarse, model.dense_prompt(coarse), x,
                                 prior, feature_up, coarse_up)
        self.encoder_runs += 1
        self._cache[origin] = cached
        while len(self._cache) > CACHED_WINDOWS:
            self._cache.popitem(last=False)
        return cached

    def prepare(self, prompt: Prompt) -> WindowEmbedding:
        """Encode (or fetch) the window a prompt will use."""
        y, x = prompt.centre()
        return self.embedding(self.window_origin(y / self.scale, x / self.scale))

    # ------------------------------------------------------------------------- decoding
    @torch.inference_mode()
    def decode(self, prompt: Prompt, cached: WindowEmbedding,
               region: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """Prompted maps: ``(C, rows, cols) float32`` probabilities (foreground, and
        centre/boundary distances when the model has them) of ``region``
        ``(row0, row1, col0, col1)`` of the window (default: all of it).

        The HR-Decoder's steps (model/hr_decoder.py) with the prompt tokens appended, the
        transformer on the whole embedding and everything after it on the region's cells
        plus a halo; ``tests/test_prompting.py`` checks it against ``HRDecoder.forward``.
        """
        from ..model.hr_decoder import pixel_ensemble

        model, size = self.model, self.size
        decoder = model.hr_decoder
        sam = decoder.sam_decoder
        a, b, c, d = region if region is not None else (0, size, 0, size)
        cells = size // 16
        ha, hb = max(a // 16 - HALO_CELLS, 0), min(-(-b // 16) + HALO_CELLS, cells)
        hc, hd = max(c // 16 - HALO_CELLS, 0), min(-(-d // 16) + HALO_CELLS, cells)

        y0, x0 = cached.origin
        factor = 1.0 / self.scale
        points = labels = boxes = None
        if len(prompt.points):
            xy = np.stack([prompt.points[:, 1] * factor - x0,
                           prompt.points[:, 0] * factor - y0], axis=1)
            points = torch.as_tensor(xy, dtype=torch.float32, device=self.device)[None]
            labels = torch.as_tensor(prompt.positive.astype(np.int64), device=self.device)[None]
        if prompt.box is not None:
            by0, bx0, by1, bx1 = prompt.box * factor
            boxes = torch.tensor([[bx0 - x0, by0 - y0, bx1 - x0, by1 - y0]],
                                 dtype=torch.float32, device=self.device)
        sparse, _ = model.sam.prompt_encoder(
            points=(points, labels) if points is not None else None, boxes=boxes, masks=None)

        sam_tokens = torch.cat([sam.iou_token.weight, sam.mask_tokens.weight], dim=0)
        n_sam, n_slices = sam_tokens.shape[0], decoder.slice_tokens.shape[0]
        tokens = torch.cat([sam_tokens, decoder.slice_tokens], dim=0)[None]
        tokens = torch.cat([tokens, sparse.to(tokens.dtype)], dim=1)
        src = cached.embedding + cached.dense
        pos = model.sam.prompt_encoder.get_dense_pe()
        if decoder.decoder_adapter is not None:
            hs, src = decoder.decoder_adapter(decoder.transformer, src, pos, tokens)
        else:
            hs, src = decoder.transformer(src, pos, tokens)
        dim = cached.embedding.shape[1]
        src = src.transpose(1, 2).reshape(1, dim, cells, cells)[..., ha:hb, hc:hd]
        features = (decoder.upscaled_proj(sam.output_upscaling(src))
                    + cached.prior[..., 4 * ha:4 * hb, 4 * hc:4 * hd])
        hyper = decoder.hypernetwork(hs[:, n_sam:n_sam + n_slices])
        slices = (hyper @ features.flatten(2)).reshape(1, -1, *features.shape[2:])
        maps = pixel_ensemble(slices)  # 1, num_maps, 16 (hb - ha), 16 (hd - hc)
        rows, cols = slice(16 * ha, 16 * hb), slice(16 * hc, 16 * hd)
        parts = [maps, cached.feature_up[..., rows, cols]]
        if decoder.fuse_image:
            parts.append(cached.image[..., rows, cols])
        residual = decoder.refine(torch.cat(parts, dim=1))
        fine = maps[:, :1] + cached.coarse_up[..., rows, cols] + residual[:, :1]
        out = [fine] if decoder.num_maps == 1 else [fine, maps[:, 1:] + residual[:, 1:]]
        probabilities = torch.sigmoid(torch.cat(out, dim=1)[0].float())
        crop = probabilities[:, a - 16 * ha:b - 16 * ha, c - 16 * hc:d - 16 * hc]
        return crop.cpu().numpy()

    def segment(self, prompt: Prompt) -> NucleusMask:
        """The nucleus a prompt selects, in native image coordinates (may be empty)."""
        from skimage.transform import resize

        cached = self.prepare(prompt)
        factor = 1.0 / self.scale
        y0, x0 = cached.origin
        height, width = self.rgb.shape[:2]
        # The post-processed region: the prompt's extent plus a margin, inside the window.
        ey0, ex0, ey1, ex1 = (v * factor for v in prompt.extent())
        margin = LOCAL_MARGIN
        r0 = int(max(math.floor(ey0) - margin, y0, 0))
        c0 = int(max(math.floor(ex0) - margin, x0, 0))
        r1 = int(min(math.ceil(ey1) + margin + 1, y0 + self.size, height))
        c1 = int(min(math.ceil(ex1) + margin + 1, x0 + self.size, width))
        local = self.decode(prompt, cached, (r0 - y0, r1 - y0, c0 - x0, c1 - x0))
        mask = self._select(local, prompt, (r0, c0), factor)
        # Back to the native frame.
        n0, m0 = int(math.floor(r0 * self.scale)), int(math.floor(c0 * self.scale))
        n1 = min(int(math.ceil(r1 * self.scale)), self.native_shape[0])
        m1 = min(int(math.ceil(c1 * self.scale)), self.native_shape[1])
        if mask.shape != (n1 - n0, m1 - m0):
            mask = resize(mask.astype(np.uint8), (n1 - n0, m1 - m0), order=0,
                          preserve_range=True, anti_aliasing=False).astype(bool)
        if prompt.box is not None:  # never outside the box the user drew
            by0, bx0, by1, bx1 = prompt.box
            rows = np.arange(n0, n1)[:, None]
            cols = np.arange(m0, m1)[None, :]
            mask &= (rows >= by0) & (rows < by1) & (cols >= bx0) & (cols < bx1)
        return NucleusMask(slice(n0, n1), slice(m0, m1), mask)

    def _select(self, local: np.ndarray, prompt: Prompt, offset: tuple[int, int],
                factor: float) -> np.ndarray:
        """Pick the prompted nucleus in the local maps ``(C, h, w)``; bool ``(h, w)``."""
        from scipy import ndimage

        from .postprocess import instances_from_maps

        fg = local[0]
        centre = local[1] if local.shape[0] >= 3 else None
        boundary = local[2] if local.shape[0] >= 3 else None
        cfg = self.thresholds
        instances = instances_from_maps(fg, centre, boundary, cfg, scale=self.scale)
        h, w = fg.shape

        def at(point: np.ndarray) -> tuple[int, int]:
            r = int(np.clip(round(point[0] * factor) - offset[0], 0, h - 1))
            c = int(np.clip(round(point[1] * factor) - offset[1], 0, w - 1))
            return r, c

        mask = np.zeros((h, w), bool)
        positives = [at(p) for p in prompt.points[prompt.positive]]
        negatives = [at(p) for p in prompt.points[~prompt.positive]]
        weak = None
        for r, c in positives:
            if instances[r, c]:
                mask |= instances == instances[r, c]
                continue
            if weak is None:  # a point on background: the weak foreground under it
                weak, _ = ndimage.label(fg >= cfg.foreground_threshold / 2)
            if weak[r, c]:
                mask |= weak == weak[r, c]
        if prompt.box is not None and not positives:
            by0, bx0, by1, bx1 = prompt.box * factor
            rows = slice(int(max(by0 - offset[0], 0)), int(min(by1 - offset[0], h)))
            cols = slice(int(max(bx0 - offset[1], 0)), int(min(bx1 - offset[1], w)))
            inside = instances[rows, cols]
            ids, counts = np.unique(inside[inside > 0], return_counts=True)
            if len(ids):
                mask = instances == ids[np.argmax(counts)]
            else:  # nothing found in the box: its weak foreground, largest component
                weak, n = ndimage.label(fg >= cfg.foreground_threshold / 2)
                inside = weak[rows, cols]
                ids, counts = np.unique(inside[inside > 0], return_counts=True)
                if len(ids):
                    mask = weak == ids[np.argmax(counts)]
        if negatives and mask.any():
            rows, cols = np.nonzero(mask)
            to_neg = np.min([(rows - r) ** 2 + (cols - c) ** 2 for r, c in negatives], axis=0)
            # Without positive points the part farthest from the negative ones is the sure one.
            far = int(np.argmax(to_neg))
            seeds = positives or [(int(rows[far]), int(cols[far]))]
            to_pos = np.min([(rows - r) ** 2 + (cols - c) ** 2 for r, c in seeds], axis=0)
            mask[rows[to_neg < to_pos], cols[to_neg < to_pos]] = False
            if positives:  # keep the part connected to the positive points
                parts, _ = ndimage.label(mask)
                keep = {parts[r, c] for r, c in positives} - {0}
                mask = np.isin(parts, list(keep)) if keep else mask
        return mask


def commit_mask(labels: np.ndarray, nucleus: NucleusMask, replace: int = 0) -> tuple[tuple, int]:
    """Where and what to write for a prompt's nucleus: ``(indices, new_id)``.

    ``indices`` (a tuple of row and column arrays, for ``Labels.data_setitem``) covers the
    new nucleus and, when ``replace`` is a nucleus id, that nucleus's old pixels (written 0
    outside the new mask). The new id is ``labels.max() + 1``; other nuclei the mask
    overlaps keep nothing of the overlap (the prompt wins, as a brush stroke would).

    Returns
    -------
    (rows, cols), values, new_id
    """
    new_id = int(np.max(labels)) + 1 if labels.size else 1
    rows, cols = np.nonzero(nucleus.mask)
    rows = rows + nucleus.rows.start
    cols = cols + nucleus.cols.start
    values = np.full(rows.shape, new_id, dtype=np.int64)
    if replace:
        old_r, old_c = np.nonzero(labels == replace)
        keep = np.ones(old_r.shape, bool)
        inside = (old_r >= nucleus.rows.start) & (old_r < nucleus.rows.stop) & \
                 (old_c >= nucleus.cols.start) & (old_c < nucleus.cols.stop)
        keep[inside] = ~nucleus.mask[old_r[inside] - nucleus.rows.start,
                                     old_c[inside] - nucleus.cols.start]
        rows = np.concatenate([rows, old_r[keep]])
        cols = np.concatenate([cols, old_c[keep]])
        values = np.concatenate([values, np.zeros(int(keep.sum()), np.int64)])
    return (rows, cols), values, new_id
