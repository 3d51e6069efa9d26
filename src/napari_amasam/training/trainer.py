"""The training engine: a generator of progress records (CLI progress bar, widget plot).

``train(train_cfg, model_cfg)`` checks every data folder first (training never starts on
bad data), builds the multi-domain sampler and the model, and then yields one record per
optimiser step and one per validation. A ``threading.Event`` passed as ``cancel`` stops it
at the next step (or, during validation and the final threshold search, after the current
batch of tiles or post-processing); what was trained is saved. ``resume=True`` continues
from ``last.pt`` with optimiser, scheduler and RNG state, so a killed run resumed ends at
the same step.

Records (dicts) have a ``stage`` key: ``setup``, ``train``, ``progress`` (validation and
threshold search: ``task``, ``done``, ``total``, ``message``), ``val``, ``thresholds``,
``save``, ``done``.
A ``train`` record's ``loss`` is the segmentation loss; ``total_loss`` adds the domain term.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import shutil
import threading
import time
from collections.abc import Generator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import (
    RANDOM_BACKBONES,
    ConfigError,
    ModelConfig,
    PostprocessConfig,
    TrainConfig,
    with_backbone_defaults,
)
from ..data.dataset import primary_rows
from ..device import autocast_dtype, resolve_device
from ..errors import AmaSamError, CheckpointError, DataError
from ..model_folder import (
    append_history,
    atomic_torch_save,
    check_output_folder,
    publish_folder,
    read_model_folder,
    remove_temp_files,
    sha256_file,
    staging_folder,
    torch_load,
    truncate_history,
    write_config,
    write_thresholds,
)
from . import continual
from . import distributed as dist_utils
from .ema import WeightAverage
from .losses import LossWeights, amasam_loss

log = logging.getLogger(__name__)
Record = dict[str, Any]


#: How the training precision is reported (``autocast_dtype``'s answer).
PRECISION_WORDS = {None: "float32", torch.bfloat16: "bf16 mixed precision",
                   torch.float16: "fp16 mixed precision"}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    # Plain tensors, ints and lists only, so that torch.load(weights_only=True) can read it.
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def default_steps_per_epoch(datasets, cfg: TrainConfig, image_size: int) -> int:
    """Enough steps for the primary-domain crops of one epoch to cover every primary pixel once."""
    primary = datasets[0]
    pixels = sum(int(np.prod(primary.load(i)[1].shape)) for i in range(len(primary)))
    primary_per_batch = primary_rows(cfg.batch_size, cfg.primary_share, len(datasets) - 1)
    return max(1, math.ceil(pixels / (image_size * image_size * primary_per_batch)))


def resume_config(model_dir: str | Path, epochs: int | None = None,
                  max_steps: int | None = None, amp: bool | None = None) -> TrainConfig:
    """The training settings recorded in ``model_dir``, optionally run for longer
    (``epochs``, ``max_steps``) or with mixed precision switched (``amp``; None = as
    recorded)."""
    folder = read_model_folder(model_dir)
    if folder.train is None:
        raise CheckpointError(f"{model_dir}: no training settings recorded (cannot resume)")
    changes: dict[str, Any] = {"out": str(model_dir)}
    if epochs is not None:
        changes["epochs"] = epochs
    if max_steps is not None:
        changes["max_steps"] = max_steps
    if amp is not None:
        changes["amp"] = amp
    return dataclasses.replace(folder.train, **changes)  # validates the new values


def _base_checkpoint_record(model_cfg: ModelConfig, checkpoint: str | None) -> dict[str, Any]:
    if model_cfg.backbone in RANDOM_BACKBONES:
        trained = "trained" if model_cfg.trainable_backbone else "frozen"
        return {"name": f"{model_cfg.backbone} (random initial weights in base_sam.pt; encoder "
                        f"{trained})", "sha256": None, "path": None}
    if not checkpoint:
        return {"name": None, "sha256": None, "path": None,
                "warning": "no SAM checkpoint: random encoder weights"}
    path = Path(checkpoint).resolve()
    return {"name": path.name, "sha256": sha256_file(path), "path": str(path)}


def _iter_validate(model, model_cfg, thresholds, val_items, device, mpp,
                   input_mpp=None) -> Generator[Record, None, dict[str, Any]]:
    """Full-image validation through the real predictor (tiling + post-processing).

    The network runs once per image; its maps are post-processed with the configured
    thresholds and with the EDT fallback, and the instance method with the higher mean AJI
    is reported (``method``; by AJI alone, unlike the final search's AJI + Dice: a per-epoch
    curve of one instance metric). Early in training the distance heads lag the foreground, and
    the fine search of ``training.thresholds`` only runs once at the end, so this keeps the
    per-epoch Dice/AJI close to what the finished model will give.

    Yields a ``progress`` record after each batch of tiles and each post-processing (so
    that a cancel takes effect there, see :func:`_until_cancelled`); returns the scores.
    """
    import dataclasses as _dc

    from ..inference.predictor import Predictor
    from ..metrics import evaluate_pair, summarize

    # The predictor runs each forward in eval mode and restores the model's mode after it, so
    # training continues in train mode (discriminator dropout on) after every validation.
    predictor = Predictor(model, model_cfg, thresholds, mpp=mpp, device=device)
    candidates = [thresholds]
    if model_cfg.distance_heads and thresholds.method == "distance":
        candidates.append(_dc.replace(thresholds, method="edt"))
    # Validation images stay at the primary's scale (metrics on the user's pixels); the
    # predictor rescales them to the working scale ``mpp`` as inference will.
    n = len(val_items)
    maps = []
    for k, (stem, image, labels) in enumerate(val_items, start=1):
        tiles = predictor.iter_predict_maps(image, input_mpp=input_mpp)
        while True:
            try:
                tile = next(tiles)
            except StopIteration as stop:
                maps.append((stem, stop.value, labels))
                break
            yield {"stage": "progress", "task": "validation", "done": k - 1, "total": n,
                   "message": f"validating: image {k}/{n} (tiles {tile['done']}/{tile['total']})"}
    best = None
    for candidate in candidates:
        per_image = {}
        for k, (stem, m, labels) in enumerate(maps, start=1):
            per_image[stem] = evaluate_pair(labels, predictor.postprocess(m, candidate))
            yield {"stage": "progress", "task": "validation", "done": k, "total": n,
                   "message": f"validating: {candidate.method} instances of image {k}/{n}"}
        summary = summarize(per_image)
        aji = np.nan_to_num(summary["mean"].get("aji", np.nan), nan=-1.0)
        if best is None or aji > best[0]:
            best = (aji, candidate.method, summary, per_image)
    _, method, summary, per_image = best
    return {"mean": summary["mean"], "n_images": summary["n_images"], "method": method,
            "n_skipped": summary.get("n_skipped", 0), "images": per_image}


def _validate(model, model_cfg, thresholds, val_items, device, mpp,
              input_mpp=None) -> dict[str, Any]:
    """:func:`_iter_validate` run to the end (scripts and tests)."""
    generator = _iter_validate(model, model_cfg, thresholds, val_items, device, mpp, input_mpp)
    while True:
        try:
            next(generator)
        except StopIteration as stop:
            return stop.value


def _until_cancelled(generator: Generator[Record, None, Any],
                     cancel: threading.Event | None) -> Generator[Record, None, tuple[bool, Any]]:
    """Forward ``generator``'s records until ``cancel`` is set.

    Returns ``(True, its return value)``, or ``(False, None)`` once cancelled (checked before
    every record, so a cancel waits for one batch of tiles or one post-processing, not for
    the whole validation or threshold search); the generator is then closed.
    """
    try:
        while True:
            if cancel is not None and cancel.is_set():
                return False, None
            try:
                record = next(generator)
            except StopIteration as stop:
                return True, stop.value
            yield record
    finally:
        generator.close()


def _load_init_weights(model, path: Path) -> None:
    """Start fine-tuning from a model folder's weights.

    The domain discriminator exists only with auxiliary folders; fine-tuning with a
    different number of them keeps every other weight and starts or drops the discriminator
    (it is a training-only part with one P(primary) output, so nothing else changes shape).
    """
    state = torch_load(path, "model weights")
    current = model.trainable_state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("discriminator.") or k in current}
    for key, value in current.items():
        if key.startswith("discriminator.") and key not in state:
            state[key] = value
    model.load_trainable_state_dict(state, str(path))


def _tune_thresholds(model, model_cfg, thresholds, val_items, device, mpp, input_mpp, out):
    """Thresholds for the best weights, chosen on (at most 4) validation images: a generator
    of progress records that returns ``(thresholds, scores)``."""
    from ..inference.predictor import Predictor
    from .thresholds import iter_optimize_thresholds

    model.load_trainable_state_dict(torch_load(out / "weights.pt", "model weights"))
    model.eval()
    predictor = Predictor(model, model_cfg, thresholds, mpp=mpp, device=device)
    items = [(image, labels) for _, image, labels in val_items[:4]]
    return (yield from iter_optimize_thresholds(predictor, items, thresholds, input_mpp=input_mpp))


def train(
    cfg: TrainConfig,
    model_cfg: ModelConfig,
    *,
    resume: bool = False,
    cancel: threading.Event | None = None,
    thresholds: PostprocessConfig | None = None,
    overwrite: bool = False,
) -> Generator[Record, None, Path]:
    """Train an AMA-SAM model; yields progress records and returns the model folder.

    Raises ``DataError`` (all problems of all folders, one per line) before any training
    when the data are bad, ``CheckpointError``/``DeviceError``/``ConfigError`` for bad
    settings. Nothing is written to ``cfg.out`` before those checks pass. An existing model
    folder is refused unless ``resume`` (continue it) or ``overwrite`` (replace it); a new
    model is written into a staging folder renamed to ``cfg.out`` at its first save.
    """
    from ..data import DomainDataset, MultiDomainSampler, check_folders, find_pairs, split_train_val
    from ..data.io import read_image, read_labels
    from ..model import build_amasam, lambda_schedule
    from ..model.kinds import parameter_summary

    out = Path(cfg.out)
    if not cfg.out:
        raise ConfigError("no output model folder given")
    rank, world = dist_utils.rank_and_world()
    is_main = rank == 0

    if resume:
        folder = read_model_folder(out)
        if folder.train is None or not (out / "last.pt").is_file():
            raise CheckpointError(f"{out}: nothing to resume (no last.pt)")
        # The recorded architecture always wins; ``cfg`` is usually ``resume_config(out)``.
        model_cfg, thresholds = folder.model, folder.thresholds
        # A run recorded before weight averaging and clipping existed resumes as it began.
        cfg = dataclasses.replace(
            cfg, out=str(out), ema_decay=0.0 if cfg.ema_decay is None else cfg.ema_decay,
            grad_clip=0.0 if cfg.grad_clip is None else cfg.grad_clip)

    else:
        check_output_folder(out, overwrite)

    init_folder = None
    if (cfg.init_from or cfg.continue_from) and not resume:
        # Fine-tuning: same architecture, base SAM and thresholds as the starting model.
        init_folder = read_model_folder(cfg.init_from or cfg.continue_from)
        if not init_folder.has_weights:
            raise CheckpointError(f"{init_folder.path}: model folder has no weights.pt to start from")
        # CA-SAM continual learning (training.continual): one task more
        model_cfg = continual.next_task_config(init_folder) if cfg.continue_from else init_folder.model
        thresholds = thresholds or init_folder.thresholds
        if model_cfg.backbone not in RANDOM_BACKBONES and not cfg.checkpoint:
            cfg.checkpoint = init_folder.base_checkpoint.get("path")
        if cfg.mpp is None:  # new data taken to be at the scale of the model's training data
            cfg.mpp = init_folder.train.mpp if init_folder.train is not None else init_folder.mpp
        if init_folder.mpp is not None:
            cfg.model_mpp = init_folder.mpp  # its weights were learned at this scale

    if model_cfg.backbone not in RANDOM_BACKBONES and cfg.checkpoint and not Path(cfg.checkpoint).is_file():
        raise CheckpointError(f"{cfg.checkpoint}: SAM checkpoint not found")

    yield {"stage": "setup", "message": "checking data folders"}
    report = check_folders(cfg.primary, cfg.aux)
    report.raise_if_failed()
    for warning in report.warnings:
        yield {"stage": "setup", "message": f"warning: {warning}"}

    device = resolve_device(dist_utils.local_device_name(cfg.device))
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed + rank)

    num_domains = 1 + len(cfg.aux)
    if init_folder is not None and init_folder.model.num_domains != num_domains:
        log.info("fine-tuning with %d domains (model was trained with %d): the domain "
                 "discriminator is added or dropped", num_domains, init_folder.model.num_domains)
    model_cfg = dataclasses.replace(model_cfg, num_domains=num_domains)
    thresholds = thresholds or PostprocessConfig()
    primary_pairs = find_pairs(cfg.primary)
    train_pairs, val_pairs = split_train_val(primary_pairs, cfg.val_fraction, cfg.seed)
    # An auxiliary folder of unknown scale is taken to be at the primary's (as before the
    # working scale existed), so every domain reaches the working scale together.
    aux_mpp = [m if m is not None else cfg.mpp for m in (cfg.aux_mpp or [None] * len(cfg.aux))]
    if len(aux_mpp) != len(cfg.aux):
        raise ConfigError(f"{len(aux_mpp)} auxiliary mpp values for {len(cfg.aux)} auxiliary folders")
    scale = cfg.working_mpp  # every domain is rescaled to the network's working scale
    datasets = [DomainDataset(train_pairs, 0, mpp=cfg.mpp, target_mpp=scale)]
    for i, (folder_path, mpp) in enumerate(zip(cfg.aux, aux_mpp, strict=True), start=1):
        datasets.append(DomainDataset(find_pairs(folder_path), i, mpp=mpp, target_mpp=scale))
    sampler = MultiDomainSampler(
        datasets, cfg.batch_size, cfg.primary_share, seed=cfg.seed + 7919 * rank,
        crop_size=model_cfg.image_size, augment=cfg.augment,
    )
    val_items = [(p.stem, read_image(p.image), read_labels(p.label)) for p in val_pairs]
    steps_per_epoch = cfg.steps_per_epoch or default_steps_per_epoch(datasets, cfg, model_cfg.image_size)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps > 0:
        total_steps = min(total_steps, cfg.max_steps)
    n_epochs = math.ceil(total_steps / steps_per_epoch)

    # The tiny backbone's random SAM weights come from the seed and are stored in the folder.
    torch.manual_seed(cfg.seed)
    base_sam = out / "base_sam.pt"
    if model_cfg.backbone in RANDOM_BACKBONES and (resume or init_folder is not None):
        source = init_folder.path if init_folder is not None else out
        model = build_amasam(model_cfg, checkpoint=str(source / "base_sam.pt"))
    else:
        # A random backbone (tiny, tiny_conv) takes a checkpoint too when one is given
        # (benchmarks/variant_runs.py: a pretrained tiny SAM as the frozen base of sam-da/ca-sam).
        model = build_amasam(model_cfg, checkpoint=cfg.checkpoint)
    if init_folder is not None and cfg.continue_from:
        continual.load_previous_tasks(model, init_folder.path / "weights.pt")
    elif init_folder is not None:
        _load_init_weights(model, init_folder.path / "weights.pt")
    continual.prepare_model_for_training(model)
    model.to(device)
    yield {"stage": "setup", "message": parameter_summary(model)}
    params = [p for p in model.parameters() if p.requires_grad]
    # The fused kernel updates every parameter in one pass: on a 2-core CPU 2.5 ms a step
    # against 10.7 ms for the per-parameter loop (tiny_conv's 144 tensors), same update rule.
    fused = device.type in ("cpu", "cuda")
    optimizer = (torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
                 if cfg.weight_decay > 0 else torch.optim.Adam(params, lr=cfg.lr, fused=fused))
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.lr_gamma)
    amp_dtype = autocast_dtype(device) if cfg.amp else None
    yield {"stage": "setup", "message": f"precision: {PRECISION_WORDS[amp_dtype]} on {device.type}"}
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    cfg = with_backbone_defaults(cfg, model_cfg.backbone)  # recorded as resolved
    average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay > 0 else None

    start_step, best_dice = 0, -1.0
    work = out  # where this run writes: a staging folder until a new model's first save
    if resume:
        state = torch_load(out / "last.pt", "training state")
        model.load_trainable_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_step, best_dice = int(state["step"]), float(state["best_dice"])
        if average is not None and state.get("ema"):
            average.load_state_dict(state["ema"])
        _set_rng_state(state["rng"])
        if is_main:
            remove_temp_files(out)  # left by a killed save
            truncate_history(out, start_step)
        yield {"stage": "setup", "message": f"resumed at step {start_step}"}
    elif is_main:
        work = staging_folder(out)
        try:
            if model_cfg.backbone in RANDOM_BACKBONES:
                atomic_torch_save(model.sam_state_dict(), work / base_sam.name)
            write_config(work, model_cfg, cfg, _base_checkpoint_record(model_cfg, cfg.checkpoint),
                         scale, data={**report.summary(), "validation": [p.stem for p in val_pairs],
                                        "steps_per_epoch": steps_per_epoch, "total_steps": total_steps})
            write_thresholds(work, thresholds)
            if init_folder is not None and continual.read_tasks(init_folder.path):
                continual.write_tasks(work, continual.read_tasks(init_folder.path))
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)  # e.g. disk full: leave nothing half-made
            raise

    train_model = dist_utils.wrap_model(model, device) if world > 1 else model
    weights = LossWeights(coarse=cfg.coarse_weight, distance=cfg.distance_weight, domain=cfg.domain_weight)
    use_domain = model_cfg.alignment != "none" and model_cfg.num_domains > 1

    def save(step: int, epoch: int, best: bool) -> Record:
        nonlocal work
        state = {
            "model": model.trainable_state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
            "step": step, "epoch": epoch, "best_dice": best_dice, "rng": _rng_state(),
            "ema": average.state_dict() if average is not None else None,
        }
        atomic_torch_save(state, work / "last.pt")
        if best or not (work / "best.pt").exists():
            # what validation scored: the averaged weights when averaging is on
            published = average.weights() if average is not None else state["model"]
            atomic_torch_save(published, work / "best.pt")
            atomic_torch_save(published, work / "weights.pt")
        if work != out:  # the new model is complete and loadable: put it in place
            work = publish_folder(work, out)
        return {"stage": "save", "path": str(out), "step": step, "epoch": epoch, "best": best}

    def _loop():
        nonlocal step, steps_timed, cancelled, epoch_losses, best_dice, saved_step
        while step < total_steps:
            if cancel is not None and cancel.is_set():
                cancelled = True
                break
            epoch = step // steps_per_epoch + 1
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
                     for k, v in sampler.batch(step).items()}
            progress = step / max(1, total_steps - 1)
            lam = lambda_schedule(progress, model_cfg.lambda_max, model_cfg.lambda_schedule)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                output = train_model(batch["image"], domain=batch["domain"] if use_domain else None,
                                     lam=lam, valid=batch["valid"] if use_domain else None)
            loss, parts = amasam_loss(output, batch["targets"], batch["valid"], batch["domain"], weights)
            if not torch.isfinite(loss):
                raise AmaSamError(f"training diverged at step {step + 1} (loss {float(loss)}); "
                                  "lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                if cfg.grad_clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
            if average is not None:
                average.update()
            step += 1
            steps_timed += 1
            # The plotted loss is the segmentation objective; the adversarial domain term is
            # reported on its own (it is maximised by the encoder, so it does not fall).
            epoch_losses.append(float(loss.detach()) - weights.domain * parts.get("domain", 0.0))
            per_step = (time.perf_counter() - t_start) / steps_timed
            if is_main:
                yield {"stage": "train", "epoch": epoch, "epochs": n_epochs, "step": step,
                       "total_steps": total_steps, "loss": epoch_losses[-1], "total_loss": float(loss.detach()),
                       "losses": parts,
                       "lr": optimizer.param_groups[0]["lr"], "lam": lam,
                       "eta_s": per_step * (total_steps - step)}

            if step % steps_per_epoch == 0 or step == total_steps:
                scheduler.step()
                metrics: dict[str, Any] = {}
                is_best = False
                if is_main and val_items and (epoch % cfg.val_every == 0 or step == total_steps):
                    with average.applied(model) if average is not None else nullcontext():
                        validated, val = yield from _until_cancelled(
                            _iter_validate(model, model_cfg, thresholds, val_items, device,
                                           scale, cfg.mpp),
                            cancel)
                    if not validated:
                        # Cancelled while validating: this epoch goes unscored, but its
                        # steps are kept (saved below, as at every epoch end).
                        cancelled = True
                    else:
                        metrics = val["mean"]
                        dice = metrics.get("dice", float("nan"))
                        is_best = bool(np.isfinite(dice) and dice > best_dice)
                        if is_best:
                            best_dice = float(dice)
                        yield {"stage": "val", "epoch": epoch, "step": step, "metrics": metrics,
                               "method": val["method"], "n_images": val["n_images"],
                               "images": val["images"]}
                if is_main:
                    row = {"epoch": epoch, "step": step, "loss": float(np.mean(epoch_losses)),
                           "lr": optimizer.param_groups[0]["lr"], "lam": lam}
                    row.update({f"val_{k}": v for k, v in metrics.items()})
                    append_history(work, row)
                    yield save(step, epoch, is_best or not val_items)
                    saved_step = step
                epoch_losses = []
                dist_utils.barrier()
                if cancelled:
                    break

    model.train()
    step = start_step
    t_start, steps_timed = time.perf_counter(), 0
    cancelled = False
    saved_step = start_step if resume else -1  # the step last.pt holds
    epoch_losses: list[float] = []
    try:
        yield from _loop()
    except GeneratorExit:
        # The consumer stopped iterating (e.g. a napari worker quit): keep what was trained.
        if is_main and step > start_step and step != saved_step:
            save(step, step // steps_per_epoch, best=False)
        raise
    except Exception:
        if work != out:  # failed before its first save: nothing worth keeping
            shutil.rmtree(work, ignore_errors=True)
        raise

    if cancelled and is_main:
        if step != saved_step:
            yield save(step, step // steps_per_epoch, best=False)
    elif is_main and cfg.tune_thresholds and val_items:
        yield {"stage": "setup", "message": "choosing post-processing thresholds on validation images"}
        tuned, result = yield from _until_cancelled(
            _tune_thresholds(model, model_cfg, thresholds, val_items, device, scale, cfg.mpp, out),
            cancel)
        if tuned:
            write_thresholds(out, result[0])
            yield {"stage": "thresholds", "thresholds": result[0].to_dict(), "metrics": result[1]}
        else:
            # Every step is saved; the model keeps its thresholds.json, and resuming the
            # folder runs the threshold search again.
            cancelled = True
    if is_main and not cancelled:
        yield from continual.finish_task(model, cfg, train_pairs, out, device)
    if is_main:
        yield {"stage": "done", "cancelled": cancelled, "step": step, "total_steps": total_steps,
               "model_dir": str(out), "best_dice": best_dice}
    return out


def run_training(cfg: TrainConfig, model_cfg: ModelConfig, **kwargs) -> tuple[Path, list[Record]]:
    """Drain ``train`` and return the model folder and every record (for scripts and tests)."""
    records: list[Record] = []
    gen = train(cfg, model_cfg, **kwargs)
    while True:
        try:
            records.append(next(gen))
        except StopIteration as stop:
            return stop.value, records


__all__ = ["train", "run_training", "seed_everything", "DataError"]
