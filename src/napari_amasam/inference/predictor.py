"""Whole-image inference: an image of any size -> probability maps -> instance labels.

Steps (method.md sections 5 and 6.4)::

    image (any dtype/channels) -> H x W x 3 uint8 -> [rescale to the model's mpp]
      -> overlapping tiles, batched through the network (inference mode, autocast per
         ``precision``: fp32, bf16, or auto = bf16 where the device computes it natively)
      -> logits blended across tiles -> [resize to H x W, bilinear] -> sigmoid -> Maps
      -> instances_from_maps (at native resolution, pixel constants scaled) -> labels

The network part and the post-processing part are separate calls, so a caller (the Segment
widget) can re-threshold :class:`Maps` with new :class:`PostprocessConfig` values without
running the network again.

Progress is reported by generators (``iter_predict_maps``, ``iter_segment``) that yield
``{"stage": "tile", "done": i, "total": n}`` after each batch; a caller cancels by no longer
iterating (or closing the generator). No torch mode is left switched on while the generator
is suspended, so stopping at any point leaves nothing in a changed state.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, ModelConfig, PostprocessConfig
from ..device import resolve_device
from ..errors import AmaSamError
from ..precision import autocast_dtype_for, check_precision, precision_context
from .tiling import TileStitcher, tile_grid

#: Microns per pixel the classical baseline's pixel constants assume (40x, method.md 5).
CLASSICAL_MPP = 0.25
#: Smallest default tile overlap (pixels), about two nucleus diameters at 40x.
MIN_DEFAULT_OVERLAP = 32
#: Images with more pixels than this are post-processed in overlapping blocks
# (postprocess.instances_from_maps_tiled): the whole-image watershed's working memory grows
# ~35 B/px (~560 MiB at 4000 x 4000); the blocked one stays ~65 MiB plus the int32 output.
TILED_POSTPROCESS_PIXELS = 2048 * 2048

Progress = dict[str, Any]


@dataclass
class Maps:
    """Network outputs at the image's native resolution.

    Attributes
    ----------
    foreground : ndarray
        ``H x W float32`` nucleus probability in [0, 1].
    center_distance, boundary_distance : ndarray or None
        ``H x W float32`` in [0, 1] (conventions of ``data.targets``); None when the model
        has no distance heads.
    scale : float
        ``mpp_model / mpp_input`` (1.0 when either is unknown): multiplies the pixel lengths
        of the post-processing constants.
    routed_tasks : list of int or None
        CA-SAM models: the task each tile was routed to (-1 = base path); None otherwise.
    """

    foreground: np.ndarray
    center_distance: np.ndarray | None
    boundary_distance: np.ndarray | None
    scale: float = 1.0
    routed_tasks: list[int] | None = None

    @property
    def routed_task(self) -> int | None:
        """The task most tiles were routed to (ties: the lower index); None if not routed."""
        if not self.routed_tasks:
            return None
        values, counts = np.unique(self.routed_tasks, return_counts=True)
        return int(values[np.argmax(counts)])

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.foreground.shape)  # type: ignore[return-value]


@dataclass
class SegmentResult:
    """Instance labels (``H x W int32``) and the maps they came from (None for classical)."""

    labels: np.ndarray
    maps: Maps | None


def _check_mpp(value: float | None, what: str) -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number, not {value!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{what} must be a positive number of microns per pixel, not {value}")
    return value


def _rescale_image(image: np.ndarray, factor: float) -> np.ndarray:
    """Resample ``H x W x 3 uint8`` by ``factor`` (anti-aliased when shrinking) -> uint8."""
    from skimage.transform import rescale

    scaled = rescale(
        image,
        factor,
        order=1,
        channel_axis=-1,
        preserve_range=True,
        anti_aliasing=factor < 1.0,
    )
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _resize_maps(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of ``(C, h, w) float32`` logits to ``(C, height, width)``."""
    tensor = torch.from_numpy(maps)[None]
    resized = torch.nn.functional.interpolate(
        tensor, size=(height, width), mode="bilinear", align_corners=False
    )
    return resized[0].numpy()


def _sigmoid_inplace(array: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function, in place on a float32 array."""
    torch.sigmoid_(torch.from_numpy(array))
    return array


def _run_to_end(generator: Generator[Progress, None, Any]) -> Any:
    """Exhaust a progress generator, discarding its records; returns its return value."""
    while True:
        try:
            next(generator)
        except StopIteration as stop:
            return stop.value


class Predictor:
    """Segment nuclei in images of any size with a trained AMA-SAM model.

    Parameters
    ----------
    model : torch.nn.Module or None
        An ``AmaSam`` (or anything obeying its forward contract:
        ``images B,3,S,S float 0-255 -> object with fine_logits B,1,S,S and
        distance_logits B,2,S,S or None``). None for the classical baseline
        (use :meth:`classical`).
    model_config : ModelConfig or None
        Architecture; ``image_size`` is the network input side S.
    thresholds : PostprocessConfig or None
        Default post-processing settings (a model folder's ``thresholds.json``).
    mpp : float or None
        Microns per pixel the network works at (the model folder's ``mpp``; None: unknown,
        images are used as they are).
    device : str or torch.device
        ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
    precision : str or None
        ``fp32``, ``bf16`` or ``auto`` (see ``napari_amasam.precision``); None: the model
        config's ``precision`` (``auto`` when there is no config).
    data_mpp : float or None
        Microns per pixel assumed for an image whose ``input_mpp`` is not given: the scale of
        the data the model was trained on (a model working at 20x from 40x training images
        still gets 40x inputs rescaled when the caller says nothing). None: such images are
        used at the working scale as they are.
    """

    def __init__(
        self,
        model: torch.nn.Module | None,
        model_config: ModelConfig | None,
        thresholds: PostprocessConfig | None = None,
        mpp: float | None = None,
        device: str | torch.device = "auto",
        precision: str | None = None,
        data_mpp: float | None = None,
    ):
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        if precision is None:
            precision = model_config.precision if model_config is not None else "auto"
        #: the requested precision (``auto``, ``fp32`` or ``bf16``)
        self.precision = check_precision(precision)
        #: what it means on this device: the autocast dtype, None for float32
        self.autocast_dtype = autocast_dtype_for(self.precision, self.device)
        self.model_config = model_config
        self.thresholds = thresholds if thresholds is not None else PostprocessConfig()
        self.mpp = _check_mpp(mpp, "model mpp")
        self.data_mpp = _check_mpp(data_mpp, "training data mpp")
        self.model = model
        self._classical_cfg: Any = None
        self._classical_threshold: float | None = None
        # CA-SAM: post-processing settings per task; an image takes its routed task's
        self.task_thresholds: dict[int, PostprocessConfig] = {}
        if model is not None:
            if model_config is None:
                raise ConfigError("a model needs its ModelConfig (for the tile size)")
            # The mode is not switched here: a trainer validating through a predictor keeps its
            # model in train mode; each forward runs in eval mode and restores the mode after.
            self.model = model.to(self.device)

    # ----------------------------------------------------------------------------- builders
    @classmethod
    def from_folder(
        cls,
        model_dir: str | Path,
        checkpoint: str | Path | None = None,
        device: str | torch.device = "auto",
        precision: str | None = None,
    ) -> Predictor:
        """Load a trained model folder (see ``napari_amasam.model_folder``).

        Parameters
        ----------
        model_dir : str or Path
            The folder written by training (``config.json``, ``weights.pt``, ...).
        checkpoint : str or Path, optional
            Official SAM checkpoint for vit_* backbones, if not at its recorded path.
        device : str or torch.device
        precision : str or None
            ``fp32``, ``bf16`` or ``auto``; None: the folder's ``config.json`` default.

        Raises
        ------
        CheckpointError
            If the folder or its weights cannot be loaded.
        """
        # Imported here: loading builds the model, which pulls in segment_anything.
        from ..model_folder import load_model

        resolved = device if isinstance(device, torch.device) else resolve_device(device)
        if precision is not None:
            check_precision(precision)  # before the (slow) model build
        from ..task_list import task_thresholds

        model, folder = load_model(model_dir, checkpoint=checkpoint, device=resolved)
        predictor = cls(model.eval(), folder.model, folder.thresholds, folder.mpp, resolved,
                        precision, data_mpp=folder.data_mpp)
        predictor.task_thresholds = task_thresholds(folder.path)
        return predictor

    @classmethod
    def classical(cls, cfg: Any = None, mpp: float | None = CLASSICAL_MPP,
                  threshold: float | None = None) -> Predictor:
        """The colour-deconvolution baseline behind the same interface.

        It produces labels only: :meth:`predict_maps` and :meth:`postprocess` raise, and
        :meth:`iter_segment` returns ``SegmentResult(labels, maps=None)``.

        Parameters
        ----------
        cfg : optional
            Settings passed to ``classical.segment_classical`` (None: its defaults).
        mpp : float or None
            Resolution its pixel constants assume (40x by default).
        threshold : float, optional
            Haematoxylin threshold for every image (a slide's, shared by its regions);
            default: Otsu on each image.
        """
        predictor = cls(None, None, None, mpp, "cpu", "fp32")
        predictor._classical_cfg = cfg
        predictor._classical_threshold = threshold
        return predictor

    @property
    def is_classical(self) -> bool:
        return self.model is None

    # ------------------------------------------------------------------------- internals
    def _scale_for(self, input_mpp: float | None) -> float:
        """``mpp_model / mpp_input`` (``data_mpp`` standing in for an unknown input mpp), or
        1.0 when either is unknown."""
        input_mpp = _check_mpp(input_mpp, "input mpp")
        if input_mpp is None:
            if self.data_mpp is None or self.mpp is None:
                return 1.0
            input_mpp = self.data_mpp
        if self.mpp is None:
            warnings.warn(
                f"input mpp {input_mpp} given but the model's training mpp is unknown; "
                "the image is used at its native scale",
                stacklevel=3,
            )
            return 1.0
        return self.mpp / input_mpp

    def _tile_parameters(self, tile_size: int | None, overlap: int | None) -> tuple[int, int]:
        network_size = self.model_config.image_size
        tile = network_size if tile_size is None else int(tile_size)
        if tile < 1 or tile > network_size:
            raise ConfigError(
                f"tile size {tile_size} must be between 1 and the model input size {network_size}"
            )
        if overlap is None:
            overlap = min(max(tile // 8, MIN_DEFAULT_OVERLAP), tile // 2)
        overlap = int(overlap)
        if not 0 <= overlap < tile:
            raise ConfigError(f"tile overlap {overlap} must be in [0, {tile}) for tile size {tile}")
        return tile, overlap

    def _autocast(self) -> contextlib.AbstractContextManager:
        return precision_context(self.autocast_dtype, self.device)

    def _run_batch(self, batch: np.ndarray, tta: bool = False,
                   routed: list[int] | None = None) -> np.ndarray:
        """``(B, S, S, 3) uint8`` tiles -> ``(B, C, S, S) float32`` logits on the CPU.

        With ``tta`` the logits are the mean over the 8 flips/90-degree rotations of each tile
        (each mapped back before averaging; the maps are scalar fields, so they average as is).
        ``routed`` (a list) receives the CA-SAM task of each tile when the model routes (with
        ``tta``, the routing of the untransformed tile).
        """
        images = torch.from_numpy(batch)
        if self.device.type == "cuda":
            # page-locked host memory: the copy runs asynchronously, at full PCIe speed
            images = images.pin_memory().to(self.device, non_blocking=True)
        images = images.to(self.device).permute(0, 3, 1, 2).float()
        # Modes are entered and left within this call: the generator never yields inside them.
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode(), self._autocast():
                logits = (self._forward_tta(images, routed) if tta
                          else self._forward_logits(images, routed))
        finally:
            self.model.train(was_training)
        size = batch.shape[1]
        if logits.shape[0] != batch.shape[0] or logits.shape[2:] != (size, size):
            raise AmaSamError(
                f"model output has shape {tuple(logits.shape)} for {batch.shape[0]} tiles of "
                f"{size}x{size}; expected B x C x {size} x {size}"
            )
        return logits.cpu().numpy()

    def _forward_logits(self, images: torch.Tensor,
                        routed: list[int] | None = None) -> torch.Tensor:
        """``(B, 3, S, S)`` 0-255 -> ``(B, C, S, S)`` float logits: fine [+ distances].

        ``routed`` (a list) receives the CA-SAM task of each image when the model routes.
        """
        output = self.model(images)
        if routed is not None and getattr(output, "task", None) is not None:
            routed.extend(int(t) for t in output.task.tolist())
        channels = [output.fine_logits]
        if output.distance_logits is not None:
            channels.append(output.distance_logits)
        return torch.cat(channels, dim=1).float()

    def _forward_tta(self, images: torch.Tensor,
                     routed: list[int] | None = None) -> torch.Tensor:
        """Mean logits over the dihedral group D4 (identity, rotations, flipped rotations).

        ``routed`` receives the CA-SAM routing of the identity pass only.
        """
        total = None
        for flip in (False, True):
            flipped = images.flip(-1) if flip else images
            for turns in range(4):
                logits = self._forward_logits(
                    torch.rot90(flipped, turns, dims=(-2, -1)),
                    routed if (not flip and turns == 0) else None,
                )
                logits = torch.rot90(logits, -turns, dims=(-2, -1))
                logits = logits.flip(-1) if flip else logits
                total = logits if total is None else total + logits
        return total / 8.0

    # ---------------------------------------------------------------------------- public
    def iter_predict_maps(
        self,
        image: np.ndarray,
        *,
        tile_size: int | None = None,
        overlap: int | None = None,
        batch_size: int = 4,
        input_mpp: float | None = None,
        tta: bool = False,
    ) -> Generator[Progress, None, Maps]:
        """Run the network over an image tile by tile.

        Parameters
        ----------
        image : ndarray
            ``H x W`` grayscale, ``H x W x C`` (RGB/RGBA) or ``C x H x W``, any dtype
            (see ``data.io.as_rgb_uint8``).
        tile_size : int, optional
            Tile side, at most the model input size (default: the model input size; smaller
            tiles are zero-padded to it, as training pads small crops).
        overlap : int, optional
            Overlap between tiles (default ``tile_size // 8``, at least 32).
        batch_size : int
            Tiles per forward pass.
        input_mpp : float, optional
            Microns per pixel of ``image``; with the model's mpp the image is rescaled to the
            training resolution before tiling and the maps are resized back.
        tta : bool
            Test-time augmentation: average each tile's logits over its 8 flips/rotations
            (8x the network time).

        Yields
        ------
        dict
            ``{"stage": "tile", "done": tiles_done, "total": n_tiles}`` after each batch.

        Returns
        -------
        Maps
            At the image's native ``H x W`` (via ``StopIteration.value``; see
            :meth:`predict_maps`).
        """
        if self.is_classical:
            raise AmaSamError("the classical baseline produces labels only, not probability maps")
        from ..data.io import as_rgb_uint8

        if int(batch_size) < 1:
            raise ConfigError(f"batch size must be at least 1, not {batch_size}")
        batch_size = int(batch_size)
        tile, overlap = self._tile_parameters(tile_size, overlap)
        network_size = self.model_config.image_size

        rgb = as_rgb_uint8(image, "image")
        height, width = rgb.shape[:2]
        scale = self._scale_for(input_mpp)
        if scale != 1.0:
            # Network sees the training resolution: factor = mpp_input / mpp_model.
            rgb = _rescale_image(rgb, 1.0 / scale)
        scaled_h, scaled_w = rgb.shape[:2]

        stitcher: TileStitcher | None = None
        routed: list[int] = []
        tiles = tile_grid(scaled_h, scaled_w, tile, overlap)
        total = len(tiles)
        for start in range(0, total, batch_size):
            batch_tiles = tiles[start : start + batch_size]
            # Zero (black) padding, as the training dataset pads crops smaller than S.
            batch = np.zeros((len(batch_tiles), network_size, network_size, 3), dtype=np.uint8)
            for i, t in enumerate(batch_tiles):
                rows, cols = t.image_slices
                batch[i, : t.height, : t.width] = rgb[rows, cols]
            logits = self._run_batch(batch, tta, routed)
            if stitcher is None:
                stitcher = TileStitcher(logits.shape[1], scaled_h, scaled_w, tile, overlap)
            for i, t in enumerate(batch_tiles):
                stitcher.add(t, logits[i, :, :tile, :tile])
            del batch, logits
            yield {"stage": "tile", "done": start + len(batch_tiles), "total": total}

        blended = stitcher.result()
        del stitcher, rgb
        if (scaled_h, scaled_w) != (height, width):
            # Resize logits (not probabilities) back to native size, then squash (method.md 5).
            blended = _resize_maps(blended, height, width)
        probabilities = _sigmoid_inplace(blended)
        has_distances = probabilities.shape[0] >= 3
        return Maps(
            foreground=probabilities[0],
            center_distance=probabilities[1] if has_distances else None,
            boundary_distance=probabilities[2] if has_distances else None,
            scale=float(scale),
            routed_tasks=routed or None,
        )

    def predict_maps(self, image: np.ndarray, **kwargs: Any) -> Maps:
        """:meth:`iter_predict_maps` run to the end; returns its :class:`Maps`."""
        return _run_to_end(self.iter_predict_maps(image, **kwargs))

    def postprocess(self, maps: Maps, thresholds: PostprocessConfig | None = None) -> np.ndarray:
        """Instance labels from :class:`Maps` (no network involved).

        Parameters
        ----------
        maps : Maps
            From :meth:`predict_maps`.
        thresholds : PostprocessConfig, optional
            Overrides this predictor's thresholds (default: the routed task's for a CA-SAM
            model, else the model's).

        Returns
        -------
        ndarray
            ``H x W int32``, 0 = background, nuclei 1..N.
        """
        if maps is None:
            raise AmaSamError("the classical baseline has no maps to post-process; segment again")
        from .postprocess import instances_from_maps, instances_from_maps_tiled

        height, width = maps.shape
        # Small images keep the exact whole-image result; large ones trade it for bounded
        # memory (objects match the whole-image ones, see instances_from_maps_tiled).
        run = (
            instances_from_maps_tiled
            if height * width > TILED_POSTPROCESS_PIXELS
            else instances_from_maps
        )
        if thresholds is None:
            thresholds = self.task_thresholds.get(maps.routed_task, self.thresholds)
        labels = run(
            maps.foreground,
            maps.center_distance,
            maps.boundary_distance,
            thresholds,
            scale=maps.scale,
        )
        return np.asarray(labels, dtype=np.int32)

    def iter_segment(
        self,
        image: np.ndarray,
        *,
        tile_size: int | None = None,
        overlap: int | None = None,
        batch_size: int = 4,
        input_mpp: float | None = None,
        thresholds: PostprocessConfig | None = None,
        tta: bool = False,
    ) -> Generator[Progress, None, SegmentResult]:
        """Tile records (as :meth:`iter_predict_maps`), then ``{"stage": "postprocess"}``.

        Returns
        -------
        SegmentResult
            ``labels`` ``H x W int32`` and the maps (None for the classical baseline).
        """
        if self.is_classical:
            from ..data.io import as_rgb_uint8
            from .classical import segment_classical

            rgb = as_rgb_uint8(image, "image")
            scale = self._scale_for(input_mpp)
            yield {"stage": "postprocess"}
            labels = segment_classical(rgb, scale=scale, cfg=self._classical_cfg,
                                       threshold=self._classical_threshold)
            return SegmentResult(np.asarray(labels, dtype=np.int32), None)
        maps = yield from self.iter_predict_maps(
            image,
            tile_size=tile_size,
            overlap=overlap,
            batch_size=batch_size,
            input_mpp=input_mpp,
            tta=tta,
        )
        yield {"stage": "postprocess"}
        return SegmentResult(self.postprocess(maps, thresholds), maps)

    def segment(self, image: np.ndarray, **kwargs: Any) -> np.ndarray:
        """:meth:`iter_segment` run to the end; returns the ``H x W int32`` labels."""
        return _run_to_end(self.iter_segment(image, **kwargs)).labels
