"""SAM-DA test-time adaptation: tune only the decoder adapter on unlabelled images.

``napari-amasam adapt --model M --images DIR --out M2`` (``adapt``). The model must have a
decoder adapter (kind ``sam-da``, or ``amasam`` trained with ``--decoder-adapter``). Every
other weight is frozen and written back unchanged; M2 is a complete model folder (same
config, thresholds and base SAM, new ``weights.pt``, plus ``adaptation.json``).

Unsupervised objective (our default; SAM-DA's abstract names test-time adaptation but not its
loss), on random crops x of the new images, with p = sigmoid(fine logits)::

    L = H(p) + w_c * mean |p - T^-1 p(T x)|^2 + w_p * (mean p - p0)^2

* H(p): mean binary entropy of the nucleus probability (Tent-style entropy minimisation:
  confident predictions on the new domain);
* the consistency term compares the prediction with the prediction of a randomly flipped /
  90-degree-rotated copy mapped back (T: one of the 8 dihedral transforms), which entropy
  alone cannot make trivially small;
* the prior term keeps the mean nucleus fraction at p0, the unadapted model's mean fraction on
  the same images, so entropy minimisation cannot collapse to "everything background".
  The distance maps enter the consistency term too.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.dataset import rescale_image
from ..errors import CheckpointError, DataError
from ..model_folder import atomic_torch_save, atomic_write_text, read_model_folder

Record = dict[str, Any]
ADAPTER_MODULE = "decoder_adapter"


@dataclass
class AdaptConfig:
    """Settings of a test-time adaptation run (saved in ``adaptation.json``).

    Attributes
    ----------
    steps : int
        Optimiser steps.
    batch_size : int
        Crops per step.
    lr : float
        Adam learning rate of the adapter.
    consistency_weight, prior_weight : float
        w_c and w_p of the objective.
    seed : int
        Crop sampling and transform seed.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``mps``.
    """

    steps: int = 50
    batch_size: int = 2
    lr: float = 1e-4
    consistency_weight: float = 1.0
    prior_weight: float = 10.0
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        from ..config import ConfigError

        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("adaptation steps and batch size must be at least 1")
        if self.lr <= 0:
            raise ConfigError("adaptation learning rate must be positive")


def adapter_parameter_names(model) -> list[str]:
    """Names of the decoder adapter's parameters (prompts + residual adapters)."""
    return [n for n, _ in model.named_parameters() if f"{ADAPTER_MODULE}." in n]


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 flips/rotations of the last two dims (k in 0..7)."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if k >= 4 else x


def dihedral_inverse(x: torch.Tensor, k: int) -> torch.Tensor:
    if k >= 4:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, -(k % 4), dims=(-2, -1))


def _probabilities(output) -> torch.Tensor:
    maps = [output.fine_logits]
    if output.distance_logits is not None:
        maps.append(output.distance_logits)
    return torch.sigmoid(torch.cat(maps, dim=1).float())


def tta_objective(model, images: torch.Tensor, k: int, prior: float,
                  cfg: AdaptConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The unsupervised loss on a batch (B, 3, S, S) 0-255 and its parts."""
    probs = _probabilities(model(images))
    fg = probs[:, :1].clamp(1e-6, 1 - 1e-6)
    entropy = -(fg * fg.log() + (1 - fg) * (1 - fg).log()).mean()
    view = dihedral_inverse(_probabilities(model(dihedral(images, k))), k)
    consistency = ((probs - view) ** 2).mean()
    prior_term = (fg.mean() - prior) ** 2
    loss = entropy + cfg.consistency_weight * consistency + cfg.prior_weight * prior_term
    return loss, {"entropy": float(entropy.detach()), "consistency": float(consistency.detach()),
                  "foreground": float(fg.mean().detach())}


def _crops(images: list[np.ndarray], size: int, n: int, rng: np.random.Generator) -> torch.Tensor:
    """n random size x size crops (zero-padded when an image is smaller) -> (n, 3, S, S)."""
    batch = np.zeros((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        image = images[rng.integers(len(images))]
        h, w = image.shape[:2]
        y = rng.integers(0, max(1, h - size + 1))
        x = rng.integers(0, max(1, w - size + 1))
        crop = image[y:y + size, x:x + size]
        batch[i, : crop.shape[0], : crop.shape[1]] = crop
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float()


def adapt(model_dir: str | Path, images_dir: str | Path | list[np.ndarray], out: str | Path,
          cfg: AdaptConfig | None = None, *, checkpoint: str | Path | None = None,
          cancel: threading.Event | None = None) -> Generator[Record, None, Path]:
    """Adapt ``model_dir``'s decoder adapter to the images in ``images_dir`` (a folder, a
    file, or a list of image arrays); write ``out``.

    Yields ``{"stage": "adapt", "step", "total_steps", "loss", ...}`` per step and a final
    ``{"stage": "done", "model_dir": out}``; returns ``out``.

    Raises
    ------
    CheckpointError
        The model has no decoder adapter, or cannot be loaded.
    DataError
        No readable image in ``images_dir``.
    """
    from ..data.io import as_rgb_uint8, collect_images, read_image
    from ..device import resolve_device
    from ..model_folder import load_model
    from .trainer import seed_everything

    cfg = cfg or AdaptConfig()
    model_dir, out = Path(model_dir), Path(out)
    if out.resolve() == model_dir.resolve():
        raise CheckpointError(f"{out}: adaptation writes a new model folder, not over its source")
    folder = read_model_folder(model_dir)
    device = resolve_device(cfg.device)
    model, folder = load_model(model_dir, checkpoint=checkpoint, device=device)
    names = adapter_parameter_names(model)
    if not names:
        raise CheckpointError(
            f"{model_dir}: no decoder adapter to adapt (kind {folder.model.kind}); train with "
            "--kind sam-da (or --decoder-adapter)"
        )
    if isinstance(images_dir, (list, tuple)):  # arrays, e.g. the widget's image layer
        images = [as_rgb_uint8(image, "image") for image in images_dir]
        problems, images_dir = [], "<images given as arrays>"
    else:
        paths, problems = collect_images([str(images_dir)])
        images = [as_rgb_uint8(read_image(p), str(p)) for p in paths]
    if not images:
        detail = f" ({problems[0]})" if problems else ""
        raise DataError(images_dir, f"no readable images to adapt to{detail}")
    data_mpp = folder.data_mpp
    if data_mpp and folder.mpp and data_mpp != folder.mpp:
        # Images are taken to be at the training data's scale (as the predictor does when no
        # mpp is given) and brought to the network's working scale, as in training.
        images = [rescale_image(image, data_mpp / folder.mpp) for image in images]

    seed_everything(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model.requires_grad_(False)
    params = dict(model.named_parameters())
    trainable = [params[n] for n in names]
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(trainable, lr=cfg.lr)
    size = folder.model.image_size
    model.eval()  # no dropout/normalisation statistics to update; gradients still flow
    with torch.no_grad():
        prior = float(np.mean([
            _probabilities(model(_crops(images, size, cfg.batch_size, rng).to(device)))[:, 0].mean()
            for _ in range(min(4, cfg.steps))
        ]))
    yield {"stage": "setup", "message": f"adapting {len(names)} adapter tensors on {len(images)} "
                                         f"image(s); unadapted foreground fraction {prior:.3f}"}
    history = []
    t0 = time.perf_counter()
    step = 0
    for step in range(1, cfg.steps + 1):
        if cancel is not None and cancel.is_set():
            break
        batch = _crops(images, size, cfg.batch_size, rng).to(device)
        k = int(rng.integers(1, 8))
        loss, parts = tta_objective(model, batch, k, prior, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append({"step": step, "loss": float(loss.detach()), **parts})
        eta = (time.perf_counter() - t0) / step * (cfg.steps - step)
        yield {"stage": "adapt", "step": step, "total_steps": cfg.steps, "loss": history[-1]["loss"],
               "eta_s": eta, **parts}
    cancelled = step < cfg.steps or (cancel is not None and cancel.is_set())

    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "thresholds.json", "base_sam.pt", "tasks.json", "history.csv"):
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out / f".{name}.tmp")
            (out / f".{name}.tmp").replace(out / name)
    state = model.trainable_state_dict()
    atomic_torch_save(state, out / "weights.pt")
    doc = {"adapted_from": str(model_dir.resolve()), "images": str(images_dir),
           "n_images": len(images), "adapted_parameters": names, "settings": asdict(cfg),
           "unadapted_foreground": prior, "steps_done": len(history), "cancelled": cancelled,
           "objective": "entropy + consistency_weight * dihedral consistency "
                        "+ prior_weight * (mean foreground - unadapted mean)^2",
           "history": history}
    atomic_write_text(out / "adaptation.json", json.dumps(doc, indent=2))
    yield {"stage": "done", "model_dir": str(out), "step": len(history), "cancelled": cancelled}
    return out


def run_adapt(*args, **kwargs) -> tuple[Path, list[Record]]:
    """Drain :func:`adapt`; returns the new model folder and every record."""
    records: list[Record] = []
    gen = adapt(*args, **kwargs)
    while True:
        try:
            records.append(next(gen))
        except StopIteration as stop:
            return stop.value, records
