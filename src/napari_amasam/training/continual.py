"""CA-SAM continual learning: add a task to a ``ca-sam`` model folder without forgetting.

``train --continue-from M --primary NEW --out M2`` (``TrainConfig.continue_from``):

1. ``next_task_config``: M's architecture with one more task.
2. ``load_previous_tasks``: M's weights; the new alignment layer starts as a copy of A_0, the
   new VAE is fresh (uncalibrated).
3. ``prepare_model_for_training``: the newest task is active; for a later task everything
   but its alignment layer is frozen (the heads and the earlier layers stay bit-identical).
4. The ordinary trainer loop runs on NEW (validation and threshold tuning use the new task).
5. ``finish_task``: the new task's VAE is fitted on pooled frozen-encoder features of NEW's
   training tiles and its routing threshold is calibrated (``calibrate_task_vae``: the
   ``TrainConfig.router_quantile`` of the scores of the training tiles cross-fitted by image,
   each scored by a VAE that did not see its image); ``weights.pt``/``best.pt`` get the
   router and ``tasks.json`` lists every task with its data and threshold.

The first ``ca-sam`` training (task 0) goes through steps 3-5 too. Nothing here runs for the
other kinds.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import CheckpointError
from ..model_folder import ModelFolder, atomic_torch_save, torch_load
from ..task_list import read_tasks, write_tasks

__all__ = ["calibrate_task_vae", "finish_task", "fit_task_vae", "load_previous_tasks", "next_task_config",
           "prepare_model_for_training", "read_tasks", "tile_features", "write_tasks"]
VAE_STEPS = 400
VAE_LR = 1e-3
Record = dict[str, Any]


def is_continual_model(model) -> bool:
    from ..model.ca_sam import CaSam

    return isinstance(model, CaSam)


def next_task_config(folder: ModelFolder) -> ModelConfig:
    """M's architecture with one task more; M must be a ``ca-sam`` model with weights."""
    if folder.model.kind != "ca-sam":
        raise CheckpointError(
            f"{folder.path}: adding a task (--continue-from) needs a ca-sam model, this one is "
            f"kind {folder.model.kind} (train the first task with --kind ca-sam)"
        )
    if not folder.has_weights:
        raise CheckpointError(f"{folder.path}: model folder has no weights.pt to continue from")
    return dataclasses.replace(folder.model, num_tasks=folder.model.num_tasks + 1)


def load_previous_tasks(model, path: Path) -> None:
    """Load M's weights (T-1 tasks) into the T-task ``model``.

    The new alignment layer is initialised from A_0 (it starts where the heads expect their
    input); the new VAE keeps its fresh, uncalibrated weights. A discriminator is started or
    dropped as in ordinary fine-tuning.
    """
    state = torch_load(path, "model weights")
    current = model.trainable_state_dict()
    new = model.num_tasks - 1
    layer_prefix, vae_prefix = f"alignment_layers.{new}.", f"router.vaes.{new}."
    for key, value in current.items():
        if key in state:
            continue
        if key.startswith(layer_prefix):
            source = "alignment_layers.0." + key[len(layer_prefix):]
            state[key] = state[source].clone() if source in state else value
        elif key.startswith(vae_prefix) or key.startswith("discriminator."):
            state[key] = value
    state = {k: v for k, v in state.items() if k in current}
    model.load_trainable_state_dict(state, str(path))


def prepare_model_for_training(model) -> None:
    """Make the newest task the active one; freeze all but its layer for a later task."""
    if not is_continual_model(model):
        return
    task = model.num_tasks - 1
    model.active_task = task
    if task > 0:
        model.freeze_except_task(task)


def tile_features(model, images: list[np.ndarray], device: torch.device, batch_size: int = 4,
                  rescale: float = 1.0) -> list[torch.Tensor]:
    """Pooled frozen-encoder features of every inference tile of each image.

    The tiles are the predictor's (same size, overlap and zero padding; images first rescaled
    by ``rescale``, data mpp / working mpp, as the predictor does), so the VAE sees the
    distribution it will score at inference. Returns one (n_tiles, 512) tensor per image.
    """
    from ..data.io import as_rgb_uint8
    from ..inference.predictor import MIN_DEFAULT_OVERLAP, _rescale_image
    from ..inference.tiling import tile_grid

    size = model.cfg.image_size
    overlap = min(max(size // 8, MIN_DEFAULT_OVERLAP), size // 2)
    was_training = model.training
    model.eval()
    out = []
    try:
        for image in images:
            rgb = as_rgb_uint8(image, "image")
            if rescale != 1.0:
                rgb = _rescale_image(rgb, rescale)
            tiles = tile_grid(rgb.shape[0], rgb.shape[1], size, overlap)
            feats = []
            for start in range(0, len(tiles), batch_size):
                chunk = tiles[start:start + batch_size]
                batch = np.zeros((len(chunk), size, size, 3), dtype=np.uint8)
                for i, t in enumerate(chunk):
                    rows, cols = t.image_slices
                    batch[i, : t.height, : t.width] = rgb[rows, cols]
                x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float()
                feats.append(model.task_features(x).cpu())
            out.append(torch.cat(feats))
    finally:
        model.train(was_training)
    return out


def fit_task_vae(vae, fit: torch.Tensor, seed: int = 0, steps: int = VAE_STEPS) -> None:
    """Standardise with ``fit``'s statistics and train ``vae`` on ``fit`` (N, D) features.

    The threshold is reset to +inf (uncalibrated) and the noise variance to 1: see
    :func:`calibrate_task_vae`.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    for module in vae.modules():
        if isinstance(module, torch.nn.Linear):
            module.reset_parameters()
    with torch.no_grad():
        vae.feature_mean.copy_(fit.mean(dim=0))
        vae.feature_std.copy_(fit.std(dim=0, unbiased=False).clamp_min(1e-4))
        vae.noise_log_var.zero_()
        vae.threshold.fill_(float("inf"))
    params = list(vae.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=VAE_LR)
    vae.train()
    batch = min(256, fit.shape[0])
    with torch.enable_grad():
        for _ in range(steps):
            rows = torch.randint(0, fit.shape[0], (batch,), generator=generator)
            loss = vae.loss(fit[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    vae.eval()
    for p in params:
        p.requires_grad_(False)


def _folds(per_image: list[torch.Tensor], folds: int, seed: int) -> list[list[torch.Tensor]]:
    """Split the tiles into cross-fitting groups: by image (tiles of one image are alike, so
    a held-out image is the honest test), or by tile when there is a single image."""
    rng = np.random.default_rng(seed)
    if len(per_image) >= 2:
        k = min(folds, len(per_image))
        order = rng.permutation(len(per_image))
        return [[per_image[i] for i in order[f::k]] for f in range(k)]
    tiles = per_image[0] if per_image else torch.zeros(0, 0)
    k = min(folds, tiles.shape[0])
    order = torch.from_numpy(rng.permutation(tiles.shape[0]))
    return [[tiles[order[f::k]]] for f in range(k)] if k >= 2 else []


def calibrate_task_vae(vae, per_image: list[torch.Tensor], quantile: float, seed: int = 0,
                       steps: int = VAE_STEPS, folds: int = 4) -> dict[str, Any]:
    """Fit task t's VAE on its training tiles and calibrate its routing threshold.

    Parameters
    ----------
    vae : TaskVAE
        The task's VAE (fitted in place).
    per_image : list of Tensor
        (n_tiles_i, D) pooled features of each training image's tiles (``tile_features``).
    quantile : float
        Share of the task's own held-out training tiles that the threshold accepts.
    steps, folds : int
        VAE training steps; cross-fitting groups (by image).

    Cross-fitting: for each of ``folds`` groups of images, a VAE fitted on the other groups
    scores the group's tiles. These held-out scores are what an unseen image of the task
    looks like, unlike the scores of the tiles a VAE was fitted on (too low: a threshold
    from them rejects new in-domain images). The decoder noise variance (per feature) is the
    mean held-out squared residual, the threshold the ``quantile`` of the held-out scores;
    the kept VAE is then fitted on every tile. Returns the figures that ``tasks.json``
    reports.
    """
    groups = _folds(per_image, folds, seed)
    everything = torch.cat(per_image)
    held_vaes, held_feats = [], []
    for f, group in enumerate(groups):
        rest = [x for g, other in enumerate(groups) if g != f for x in other]
        fold_vae = copy.deepcopy(vae)
        fit_task_vae(fold_vae, torch.cat(rest), seed + 1 + f, steps)
        held_vaes.append(fold_vae)
        held_feats.append(torch.cat(group))
    fit_task_vae(vae, everything, seed, steps)
    with torch.no_grad():
        if held_vaes:
            residual = torch.cat([v.residuals(x) for v, x in zip(held_vaes, held_feats, strict=True)])
        else:  # a single tile: nothing to hold out, the fitted residual is all there is
            residual = vae.residuals(everything)
        log_var = residual.mean(dim=0).clamp_min(1e-4).log()
        for v in [*held_vaes, vae]:
            v.noise_log_var.copy_(log_var)
        held_scores = (torch.cat([v.score(x) for v, x in zip(held_vaes, held_feats, strict=True)])
                       if held_vaes else vae.score(everything))
        fit_scores = vae.score(everything)
        threshold = float(torch.quantile(held_scores, quantile))
        vae.threshold.fill_(threshold)
    return {
        "threshold": threshold,
        "quantile": quantile,
        "fit_tiles": int(everything.shape[0]),
        "held_out_tiles": int(held_scores.shape[0]) if held_vaes else 0,
        "folds": len(groups),
        "fit_score_median": float(fit_scores.median()),
        "held_out_score_median": float(held_scores.median()),
        "held_out_score_max": float(held_scores.max()),
        "fit_tiles_accepted": float((fit_scores <= threshold).float().mean()),
    }


def finish_task(model, cfg, train_pairs, out: Path, device: torch.device
                ) -> Generator[Record, None, None]:
    """After a ca-sam task's training: fit and calibrate its VAE, save, list the task.

    The kept weights are ``out/weights.pt`` (best validation Dice, else last); the earlier
    tasks are those already listed in ``out/tasks.json`` (copied from the folder continued
    from when the run started).
    """
    if not is_continual_model(model):
        return
    from ..data.io import read_image

    task = model.num_tasks - 1
    yield {"stage": "setup", "message": f"fitting the routing VAE of task {task}"}
    model.load_trainable_state_dict(torch_load(out / "weights.pt", "model weights"),
                                    str(out / "weights.pt"))
    images = [read_image(p.image) for p in train_pairs]
    working = cfg.working_mpp  # training rescaled the images to it: so will inference
    features = tile_features(model, images, device,
                             rescale=cfg.mpp / working if cfg.mpp and working else 1.0)
    calibration = calibrate_task_vae(model.router.vaes[task], features, cfg.router_quantile,
                                     cfg.seed, steps=cfg.router_vae_steps)
    state = model.trainable_state_dict()
    atomic_torch_save(state, out / "weights.pt")
    atomic_torch_save(state, out / "best.pt")
    entry = {
        "task": task,
        "name": Path(cfg.primary).name,
        "primary": str(Path(cfg.primary).resolve()),
        "training_images": len(train_pairs),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "router": calibration,
        "thresholds": json.loads((out / "thresholds.json").read_text()),
    }
    tasks = [t for t in read_tasks(out) if int(t.get("task", -2)) < task] + [entry]
    write_tasks(out, tasks)
    model.active_task = None
    yield {"stage": "task", "task": task, "name": entry["name"], "router": calibration,
           "message": (f"task {task} ({entry['name']}): routing threshold "
                       f"{calibration['threshold']:.4f} = {calibration['quantile']:.2f} quantile of the "
                       f"VAE scores of {calibration['held_out_tiles']} training tiles held out "
                       f"by {calibration['folds']}-fold cross-fitting (fit on "
                       f"{calibration['fit_tiles']} tiles)")}
