"""Command line: ``napari-amasam train | segment | evaluate | adapt | export-model``.

Bad arguments and bad data exit non-zero with a short message and no traceback
(``NAPARI_AMASAM_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .atomic import atomic_write_text, remove_temp_files
from .config import (
    BACKBONES,
    MODEL_KINDS,
    RANDOM_BACKBONES,
    ConfigError,
    ModelConfig,
    PostprocessConfig,
    TrainConfig,
    lr_gamma_for_epochs,
    train_defaults,
)
from .errors import AmaSamError, describe_os_error

EXIT_ERROR = 2


def _fail(message: str) -> int:
    print(f"napari-amasam: error: {message}", file=sys.stderr)
    return EXIT_ERROR


# --------------------------------------------------------------------------- train
DEFAULT_BACKBONE = "vit_b"
DEFAULT_KIND = "amasam"


def _default_help(key: str, show=str) -> str:
    """``default X for vit_*, Y for tiny*`` (or ``default X`` when equal), read from
    ``config.train_defaults`` so the help always says what a run gets."""
    vit, tiny = train_defaults("vit_b")[key], train_defaults("tiny_conv")[key]
    if vit == tiny:
        return f"default {show(vit)}"
    return f"default {show(vit)} for vit_*, {show(tiny)} for tiny*"


def _show_steps(steps: int) -> str:
    return "one pass over the primary images" if steps == 0 else str(steps)


def _show_model_mpp(mpp: float | None) -> str:
    return "the primary's mpp" if mpp is None else f"{mpp} µm/px ({10 / mpp:g}x)"


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune AMA-SAM on a primary folder (+ auxiliary folders)")
    p.add_argument("--primary", help="folder with images/ and labels/ (your data, domain 0)")
    p.add_argument("--aux", nargs="*", default=[], metavar="DIR", help="auxiliary folders (other domains)")
    p.add_argument("--out", help="model folder to write")
    # Architecture flags default to None (not given), so that --resume / --continue-from can
    # tell a flag given on the command line from the default (check_architecture_unchanged).
    p.add_argument("--backbone", default=None, choices=list(BACKBONES),
                   help="vit_b/l/h: official SAM (needs --checkpoint); tiny, tiny_conv: random-weight "
                        "CPU backbones that train from scratch (tiny_conv: with a conv stem); "
                        f"default {DEFAULT_BACKBONE}")
    p.add_argument("--kind", default=None, choices=list(MODEL_KINDS),
                   help="amasam: encoder adapters + CGRL + HR-Decoder; sam-da: frozen SAM, only a "
                        "decoder adapter + prompt tokens train (<1%% of vit_b); ca-sam: frozen SAM + "
                        "an alignment layer per task (continual learning with --continue-from); "
                        f"default {DEFAULT_KIND}")
    p.add_argument("--continue-from", metavar="MODEL_DIR",
                   help="ca-sam: add --primary as a new task to MODEL_DIR (no forgetting: earlier "
                        "tasks stay as they are; images are routed to their task by per-task VAEs)")
    p.add_argument("--checkpoint", help="official SAM checkpoint .pth for vit_b/vit_l/vit_h")
    p.add_argument("--alignment", choices=["cgrl", "grl", "none"],
                   help="domain alignment with the --aux folders: cgrl (the paper's), grl or "
                        f"none; {_default_help('alignment')} (random tiny* encoders learn better "
                        "without the adversarial term, benchmarks/README.md)")
    p.add_argument("--decoder-adapter", action="store_true", default=None,
                   help="SAM-DA: learnable prompt tokens + adapters in the mask decoder")
    p.add_argument("--alignment-layer", type=int, default=None, metavar="BLOCKS",
                   help="CA-SAM: residual alignment blocks between encoder and decoder (0 = off)")
    p.add_argument("--lambda-max", type=float, default=None,
                   help="maximum gradient-reversal strength (warmed up over training; "
                        f"{_default_help('lambda_max')})")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"{_default_help('epochs')} (resume: as recorded)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N steps (0 = no limit)")
    p.add_argument("--steps-per-epoch", type=int, default=None,
                   help=_default_help("steps_per_epoch", _show_steps))
    p.add_argument("--batch-size", type=int, default=None, help=_default_help("batch_size"))
    p.add_argument("--lr", type=float, default=None, help=_default_help("lr"))
    p.add_argument("--lr-gamma", type=float, default=None,
                   help=f"learning-rate decay per epoch ({_default_help('lr_gamma')}; "
                        "tiny* with other --epochs: decays to the same ~7 %% at the end)")
    p.add_argument("--ema-decay", type=float, default=None,
                   help="average the trained weights with this per-step decay (0 = off; "
                        f"{_default_help('ema_decay')}); the model folder holds the average")
    p.add_argument("--grad-clip", type=float, default=None,
                   help=f"clip the gradient norm to this (0 = off; {_default_help('grad_clip')})")
    p.add_argument("--image-size", type=int, default=None,
                   help=f"network input side ({_default_help('image_size')})")
    p.add_argument("--mpp", type=float, default=None, help="microns per pixel of the primary data")
    p.add_argument("--aux-mpp", type=float, nargs="*", default=None, help="microns per pixel of each aux folder")
    p.add_argument("--model-mpp", type=float, default=None,
                   help="working scale of the network in microns per pixel: every folder is "
                        "rescaled to it (an aux folder without --aux-mpp is taken to be at --mpp), "
                        "and inference rescales its inputs to it; "
                        f"{_default_help('model_mpp', _show_model_mpp)}; needs --mpp; "
                        "--continue-from keeps the model's")
    p.add_argument("--primary-share", type=float, default=None, help=_default_help("primary_share"))
    p.add_argument("--val-fraction", type=float, default=None, help=_default_help("val_fraction"))
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    p.add_argument("--fp32", dest="amp", action="store_false", default=None,
                   help="optimiser steps in float32 (default: mixed precision where the device "
                        "computes it natively: bf16 on CPUs with AVX-512 BF16 or AMX, bf16 or "
                        "fp16 on CUDA; validation and inference follow the model's precision, "
                        "segment --precision)")
    p.add_argument("--resume", metavar="MODEL_DIR",
                   help="continue a run from MODEL_DIR/last.pt with its recorded settings "
                        "(--epochs, --max-steps and --fp32 may change; other settings may not)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing model folder at --out (when the new one is first saved)")
    # None = not given (default 0), so that --resume can tell an explicit --seed 0 apart
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--trainable-backbone", action="store_true", default=None,
                   help="also train the encoder (the default for the random-weight tiny backbones)")
    p.add_argument("--frozen-backbone", dest="trainable_backbone", action="store_false",
                   help="train only the added parts, also for tiny backbones")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)


def _format_record(record: dict) -> str | None:
    stage = record["stage"]
    if stage == "train":
        done, total = record["step"], record["total_steps"]
        width = 24
        bar = "#" * int(width * done / total) + "-" * (width - int(width * done / total))
        return (f"[{bar}] step {done}/{total} epoch {record['epoch']}/{record['epochs']} "
                f"loss {record['loss']:.4f} lr {record['lr']:.2e} eta {record['eta_s']:.0f}s")
    if stage == "val":
        m = record["metrics"]
        return (f"validation epoch {record['epoch']}: " +
                " ".join(f"{k} {m[k]:.4f}" for k in ("dice", "aji", "pq") if k in m) +
                f" ({record['n_images']} images, {record.get('method', 'distance')} watershed)")
    if stage == "setup":
        return record["message"]
    if stage == "thresholds":
        t, m = record["thresholds"], record["metrics"]
        how = (f"distance watershed, foreground {t['foreground_threshold']}, centre "
               f"{t['center_distance_threshold']}, boundary {t['boundary_distance_threshold']}"
               if t["method"] == "distance" else
               f"EDT watershed, foreground {t['foreground_threshold']}, peak distance {t['edt_min_distance']}")
        return (f"post-processing chosen on validation: {how}, smoothing {t['sigma_foreground']} px "
                f"(AJI {m['aji']:.4f}, Dice {m['dice']:.4f}, PQ {m['pq']:.4f})")

    if stage == "task":
        return record["message"]
    if stage == "done":
        state = "cancelled" if record["cancelled"] else "finished"
        return f"training {state} at step {record['step']}: model folder {record['model_dir']}"
    return None


#: Flags that override ``config.train_defaults`` (None = not given on the command line).
TRAIN_SETTINGS = ("image_size", "alignment", "lambda_max", "epochs", "steps_per_epoch",
                  "batch_size", "lr", "lr_gamma", "primary_share", "val_fraction", "model_mpp",
                  "ema_decay", "grad_clip")


#: Flags that set the architecture (ModelConfig) of a new model: (flag, argparse dest,
#: ModelConfig field). An existing model (--resume, --continue-from) keeps its own.
ARCHITECTURE_FLAGS = (
    ("--backbone", "backbone", "backbone"),
    ("--kind", "kind", "kind"),
    ("--image-size", "image_size", "image_size"),
    ("--alignment", "alignment", "alignment"),
    ("--lambda-max", "lambda_max", "lambda_max"),
    ("--decoder-adapter", "decoder_adapter", "decoder_adapter"),
    ("--alignment-layer", "alignment_layer", "alignment_layer_blocks"),
    ("--trainable-backbone", "trainable_backbone", "trainable_backbone"),
)


def check_architecture_unchanged(args, folder, how: str) -> None:
    """Refuse architecture flags that would be silently ignored: ``how`` (``--resume`` or
    ``--continue-from``) builds on ``folder``'s recorded ModelConfig, which always wins. A
    flag equal to the recorded value changes nothing and passes."""
    for flag, dest, field in ARCHITECTURE_FLAGS:
        given, recorded = getattr(args, dest), getattr(folder.model, field)
        if given is None or given == recorded:
            continue
        if isinstance(given, bool):  # store_true / store_false flags take no value
            shown = flag if dest != "trainable_backbone" or given else "--frozen-backbone"
        else:
            shown = f"{flag} {given}"
        raise ConfigError(f"{shown}: {folder.path} has {field} {recorded}, and {how} cannot "
                          "change an existing model's architecture (leave the flag out, or "
                          "train a new model)")


#: Training-setting flags that ``--resume`` cannot change: (flag, argparse dest, TrainConfig
#: field). A resumed run continues with its recorded settings (``--epochs``, ``--max-steps``
#: and ``--fp32`` are the exceptions: they extend the run or switch its precision).
RESUME_FIXED_FLAGS = (
    ("--primary", "primary", "primary"),
    ("--aux", "aux", "aux"),
    ("--mpp", "mpp", "mpp"),
    ("--aux-mpp", "aux_mpp", "aux_mpp"),
    ("--model-mpp", "model_mpp", "model_mpp"),
    ("--steps-per-epoch", "steps_per_epoch", "steps_per_epoch"),
    ("--batch-size", "batch_size", "batch_size"),
    ("--lr", "lr", "lr"),
    ("--lr-gamma", "lr_gamma", "lr_gamma"),
    ("--primary-share", "primary_share", "primary_share"),
    ("--val-fraction", "val_fraction", "val_fraction"),
    ("--ema-decay", "ema_decay", "ema_decay"),
    ("--grad-clip", "grad_clip", "grad_clip"),
    ("--seed", "seed", "seed"),
)


def _same_setting(given, recorded, dest: str) -> bool:
    if dest in ("primary", "aux"):  # folders: the same folder however it is written
        as_paths = [given] if dest == "primary" else list(given)
        recorded_paths = [recorded] if dest == "primary" else list(recorded or [])
        return [Path(p).resolve() for p in as_paths] == [Path(p).resolve() for p in recorded_paths]
    if dest == "aux_mpp":
        return list(given) == list(recorded or [])
    return given == recorded


def check_resume_settings_unchanged(args, folder) -> None:
    """Refuse training-setting flags that ``--resume`` would silently ignore: the run goes on
    with the settings recorded in ``folder`` (its config.json, and its last.pt's optimizer and
    schedule). A flag equal to the recorded value changes nothing and passes."""
    recorded_train = folder.train
    if recorded_train is None:
        return  # resume_config says what is missing
    for flag, dest, field_name in RESUME_FIXED_FLAGS:
        given = getattr(args, dest)
        if given is None or (dest == "aux" and not given):  # not given (aux defaults to [])
            continue
        recorded = getattr(recorded_train, field_name)
        if _same_setting(given, recorded, dest):
            continue
        shown = " ".join(map(str, given)) if isinstance(given, list) else given
        raise ConfigError(f"{flag} {shown}: {folder.path} was trained with {field_name} "
                          f"{recorded}, and --resume continues a run with its recorded settings "
                          "(only --epochs, --max-steps and --fp32 may change; leave the flag "
                          "out, or train a new model)")
    if args.no_augment and recorded_train.augment:
        raise ConfigError(f"--no-augment: {folder.path} was trained with augmentation, and "
                          "--resume continues a run with its recorded settings (leave the flag "
                          "out, or train a new model)")


def new_run_config(args, backbone: str, continuing=None) -> tuple[TrainConfig, dict]:
    """The TrainConfig of a new run (a new model, or a new task with ``--continue-from``)
    from the command line, and the merged settings (``train_defaults(backbone)`` overridden
    by the flags given; ``image_size`` and ``lambda_max`` are for the ModelConfig).

    ``continuing`` is the model folder a new task is added to: its working scale is kept
    (its weights were learned at it), as is its architecture (``alignment`` included;
    ``cmd_train`` refuses architecture flags that differ, check_architecture_unchanged).
    Without ``--mpp`` a warning says at which scale the new images are taken to be.
    """
    defaults = train_defaults(backbone)
    if continuing is not None:
        if args.model_mpp is not None and continuing.mpp is not None and \
                args.model_mpp != continuing.mpp:
            raise ConfigError(f"--model-mpp {args.model_mpp}: {continuing.path} works at "
                              f"{continuing.mpp} µm/px; a new task keeps that scale")
        defaults["model_mpp"] = continuing.mpp
    given = {k: getattr(args, k) for k in TRAIN_SETTINGS if getattr(args, k) is not None}
    if "epochs" in given and "lr_gamma" not in given:
        given["lr_gamma"] = lr_gamma_for_epochs(backbone, given["epochs"])
    settings = {**defaults, **given}
    working = settings["model_mpp"]
    if args.mpp is None and working is not None:
        if continuing is None:
            print(f"warning: no --mpp: training at the images' own scale, not at the "
                  f"{working} µm/px working scale of {backbone} (give the primary's microns "
                  "per pixel, e.g. --mpp 0.25 for 40x)", file=sys.stderr)
        else:
            print(f"warning: no --mpp: the new task's images are taken to be at "
                  f"{continuing.data_mpp or working} µm/px like {continuing.path}'s training data and "
                  f"rescaled to its {working} µm/px working scale (give the primary's microns "
                  "per pixel if they differ, e.g. --mpp 0.25 for 40x)", file=sys.stderr)
    train_cfg = TrainConfig(
        primary=args.primary, aux=list(args.aux), out=args.out, checkpoint=args.checkpoint,
        epochs=settings["epochs"], max_steps=0 if args.max_steps is None else args.max_steps,
        steps_per_epoch=settings["steps_per_epoch"], batch_size=settings["batch_size"],
        lr=settings["lr"], lr_gamma=settings["lr_gamma"], mpp=args.mpp, aux_mpp=args.aux_mpp,
        model_mpp=working, primary_share=settings["primary_share"],
        val_fraction=settings["val_fraction"], ema_decay=settings["ema_decay"],
        grad_clip=settings["grad_clip"], augment=not args.no_augment, device=args.device,
        seed=0 if args.seed is None else args.seed, num_threads=args.threads,
        amp=args.amp is not False,
        continue_from=None if continuing is None else args.continue_from,
    )
    return train_cfg, settings


def cmd_train(args) -> int:
    from .model_folder import read_model_folder
    from .training.trainer import resume_config, train

    if args.continue_from:
        if args.resume:
            return _fail("give either --resume MODEL_DIR or --continue-from MODEL_DIR, not both")
        if not args.primary or not args.out:
            return _fail("train --continue-from needs --primary DIR (the new task) and --out MODEL_DIR")
        continuing = read_model_folder(args.continue_from)
        check_architecture_unchanged(args, continuing, "--continue-from")
        model_cfg = continuing.model  # the trainer adds the task
        # The existing model's backbone decides the defaults of settings not given here.
        train_cfg, _ = new_run_config(args, model_cfg.backbone, continuing)
    elif args.resume:
        # Recorded settings; --epochs / --max-steps given here extend the run, --fp32 turns
        # mixed precision off (a run resumed on a CPU without bf16 arithmetic, say).
        train_cfg = resume_config(args.resume, epochs=args.epochs, max_steps=args.max_steps,
                                  amp=args.amp)
        resumed = read_model_folder(args.resume)
        check_architecture_unchanged(args, resumed, "--resume")
        check_resume_settings_unchanged(args, resumed)
        model_cfg = resumed.model
    else:
        if not args.primary or not args.out:
            return _fail("train needs --primary DIR and --out MODEL_DIR (or --resume MODEL_DIR)")
        backbone = args.backbone or DEFAULT_BACKBONE
        if backbone not in RANDOM_BACKBONES and not args.checkpoint:
            # Not refused (a random encoder still runs the whole pipeline, e.g. as a smoke
            # test), but it learns little, slowly: say what to use instead.
            print(f"warning: no --checkpoint for {backbone}: the SAM encoder gets random "
                  "weights (download the official .pth once and pass its path; without one, "
                  "--backbone tiny_conv trains a small CPU model as `make demo` does)",
                  file=sys.stderr)
        train_cfg, settings = new_run_config(args, backbone)
        model_cfg = ModelConfig(backbone=backbone, image_size=settings["image_size"],
                                alignment=settings["alignment"], lambda_max=settings["lambda_max"],
                                decoder_adapter=bool(args.decoder_adapter),
                                alignment_layer_blocks=args.alignment_layer or 0,
                                trainable_backbone=args.trainable_backbone,
                                kind=args.kind or DEFAULT_KIND)
    interactive = sys.stderr.isatty() and not args.quiet
    last_print = 0.0
    for record in train(train_cfg, model_cfg, resume=bool(args.resume), overwrite=args.overwrite):
        line = _format_record(record)
        if line is None or args.quiet and record["stage"] == "train":
            continue
        if record["stage"] == "train":
            now = time.monotonic()
            final = record["step"] == record["total_steps"]
            if interactive:
                print("\r" + line, end="\n" if final else "", file=sys.stderr, flush=True)
            elif final or now - last_print > 10:
                print(line, file=sys.stderr, flush=True)
                last_print = now
        else:
            if interactive:
                print(file=sys.stderr)
            print(line, flush=True)
    return 0


# --------------------------------------------------------------------------- adapt
def add_adapt_parser(sub) -> None:
    p = sub.add_parser(
        "adapt", help="SAM-DA test-time adaptation: tune only the decoder adapter on unlabelled images",
        description="Adapt a model's decoder adapter (kind sam-da, or --decoder-adapter) to a new "
                    "domain from unlabelled images: entropy minimisation + flip/rotation "
                    "consistency + a foreground-fraction prior (training/adapt.py). Every other "
                    "weight is copied unchanged into the new model folder.")
    p.add_argument("--model", required=True, help="model folder to adapt")
    p.add_argument("--images", required=True, help="folder (or file) of unlabelled images of the new domain")
    p.add_argument("--out", required=True, help="new model folder to write")
    p.add_argument("--checkpoint", help="base SAM checkpoint (if not at the recorded path)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.set_defaults(func=cmd_adapt)


def cmd_adapt(args) -> int:
    from .training.adapt import AdaptConfig, adapt

    cfg = AdaptConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      device=args.device)
    for record in adapt(args.model, args.images, args.out, cfg, checkpoint=args.checkpoint):
        if record["stage"] == "adapt":
            if record["step"] == record["total_steps"] or record["step"] % 10 == 0:
                print(f"step {record['step']}/{record['total_steps']} loss {record['loss']:.4f} "
                      f"entropy {record['entropy']:.4f} consistency {record['consistency']:.5f} "
                      f"foreground {record['foreground']:.3f}", file=sys.stderr, flush=True)
        elif record["stage"] == "setup":
            print(record["message"], flush=True)
        elif record["stage"] == "done":
            print(f"adapted model folder {record['model_dir']} ({record['step']} steps)", flush=True)
    return 0


# ------------------------------------------------------------------------- segment
def add_segment_parser(sub) -> None:
    p = sub.add_parser("segment", help="segment nuclei in images with a model folder or the classical baseline")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    p.add_argument("--model", required=True,
                   help="model folder, bioimage.io package (.zip or folder) exported by export-model, or 'classical'")
    p.add_argument("--checkpoint", help="base SAM checkpoint (if not at the recorded path)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--geojson", action="store_true", help="also write QuPath GeoJSON")
    p.add_argument("--csv", action="store_true", help="also write per-nucleus measurements")
    p.add_argument("--tile-size", type=int, default=None)
    p.add_argument("--overlap", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--mpp", type=float, default=None, help="microns per pixel of the inputs")
    p.add_argument("--thresholds", help="JSON file overriding the model's thresholds.json")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average the maps over 8 flips/rotations "
                        "(3-4x slower: the tiles are batched)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16"],
                   help="inference precision (default: the model folder's; auto = bf16 where "
                        "the device computes it natively, else fp32)")
    from .slide.command import add_slide_arguments

    add_slide_arguments(p)
    p.set_defaults(func=cmd_segment)


def segment_outputs(image: Path, out: Path, geojson: bool, csv: bool) -> list[Path]:
    """The files ``segment`` writes for one input image."""
    paths = [out / f"{image.stem}_labels.tif"]
    if geojson:
        paths.append(out / f"{image.stem}.geojson")
    if csv:
        paths.append(out / f"{image.stem}.csv")
    return paths


def check_segment_outputs(images: list[Path], out: Path, geojson: bool, csv: bool,
                          overwrite: bool) -> None:
    """Refuse, before anything runs, inputs whose outputs collide or would replace results.

    Outputs are named by stem, so ``a.png`` and ``a.tif`` would write the same files; an
    existing result is replaced only with ``overwrite``.
    """
    from .atomic import check_can_create
    from .errors import OutputError

    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: --out names a file; give a folder for the results")
    if out.is_dir():
        if not os.access(out, os.W_OK | os.X_OK):
            raise OutputError(f"{out}: folder is not writable (permission denied)")
    else:
        check_can_create(out)
    writers: dict[Path, Path] = {}
    existing = []
    for image in images:
        for path in segment_outputs(image, out, geojson, csv):
            if path in writers and writers[path] != image:
                raise OutputError(f"{writers[path]} and {image} would both write {path.name}; "
                                  "rename one or segment them into different --out folders")
            writers[path] = image
            if path.exists():
                existing.append(path)
    if existing and not overwrite:
        more = f" and {len(existing) - 1} more result file(s)" if len(existing) > 1 else ""
        raise OutputError(f"{existing[0]}{more} already exist(s); pass --overwrite to replace "
                          "them, or choose another --out")


def cmd_segment(args) -> int:
    from .data.io import collect_images, read_image
    from .export import write_csv, write_geojson, write_labels_tiff
    from .inference.predictor import Predictor
    from .slide.command import segment_slides, split_slides

    for name, value, low in (("--batch-size", args.batch_size, 1), ("--tile-size", args.tile_size, 1),
                             ("--overlap", args.overlap, 0)):
        if value is not None and value < low:
            return _fail(f"{name} must be at least {low}, not {value}")
    if args.mpp is not None and not args.mpp > 0:
        return _fail(f"--mpp must be positive, not {args.mpp}")
    slides, plain_inputs = split_slides(args.inputs)
    images, problems = collect_images(plain_inputs) if plain_inputs else ([], [])
    images = list(dict.fromkeys(path.resolve() for path in images))  # a file given twice
    out = Path(args.out)
    check_segment_outputs(images, out, args.geojson, args.csv, args.overwrite)
    thresholds = None
    if args.thresholds:
        try:
            thresholds = PostprocessConfig.from_dict(json.loads(Path(args.thresholds).read_text()))
        except (OSError, json.JSONDecodeError, ConfigError, TypeError) as exc:
            return _fail(f"{args.thresholds}: invalid thresholds file ({exc})")
    # Whole-slide images stream region by region (napari_amasam.slide); the rest below.
    slides_failed = (segment_slides(args, slides, thresholds and thresholds.to_dict())
                     if slides else 0)
    if not plain_inputs:
        return 1 if slides_failed else 0
    if args.model == "classical":
        predictor = Predictor.classical()
    else:
        predictor = Predictor.from_folder(args.model, checkpoint=args.checkpoint, device=args.device,
                                          precision=args.precision)
        if args.mpp is None and predictor.mpp is not None:
            # Without --mpp the images are resized as if they had the training data's pixel
            # size: wrong by 2x for a 40x scan given to a 20x model, and nuclei split or merge.
            assumed = predictor.data_mpp if predictor.data_mpp is not None else predictor.mpp
            print(f"warning: no --mpp: the images are taken to be at {assumed:g} µm/px, the "
                  f"training data's pixel size; give --mpp when they are not (about 0.25 for "
                  f"40x scans, 0.5 for 20x)", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    remove_temp_files(out)  # left by a killed earlier run (ours only: .<name>.<random>.tmp)
    for problem in problems:
        print(f"skipped: {problem}", file=sys.stderr)
    failed = len(problems) + slides_failed
    for path in images:
        t0 = time.perf_counter()
        try:
            image = read_image(path)
            labels = predictor.segment(image, tile_size=args.tile_size, overlap=args.overlap,
                                       batch_size=args.batch_size, input_mpp=args.mpp,
                                       thresholds=thresholds, tta=args.tta)
        except AmaSamError as exc:
            print(f"skipped: {exc}", file=sys.stderr)
            failed += 1
            continue
        write_labels_tiff(out / f"{path.stem}_labels.tif", labels)
        if args.geojson:
            write_geojson(out / f"{path.stem}.geojson", labels, image=image, mpp=args.mpp)
        if args.csv:
            write_csv(out / f"{path.stem}.csv", labels, image=image, mpp=args.mpp)
        n = int(labels.max())
        print(f"{path.name}: {n} nuclei in {time.perf_counter() - t0:.1f}s")
    if failed:
        print(f"{failed} input(s) failed", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------ evaluate
def add_evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="compare predicted label images with ground truth")
    p.add_argument("--pred", required=True, help="folder of predicted label images")
    p.add_argument("--gt", required=True, help="ground-truth label folder (or a dataset folder with labels/)")
    p.add_argument("--json", help="write per-image and mean metrics to this JSON file")
    p.set_defaults(func=cmd_evaluate)


def check_writable_file(path: Path) -> None:
    """Refuse, before any work, an output file path that cannot be written."""
    from .errors import OutputError

    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name")
    if not path.absolute().parent.is_dir():
        raise OutputError(f"{path.parent}: no such folder (for {path.name})")
    if not os.access(path.absolute().parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path.parent}: folder is not writable (permission denied)")


METRIC_KEYS = ("dice", "aji", "aji_plus", "dice2", "dq", "sq", "pq", "f1")


def format_table(per_image: dict[str, dict], mean: dict, title: str = "image") -> str:
    width = max([len(title), 4] + [len(s) for s in per_image])
    lines = [f"{title:<{width}} " + " ".join(f"{k:>8}" for k in METRIC_KEYS)]
    for stem, m in per_image.items():
        lines.append(f"{stem:<{width}} " + " ".join(f"{m[k]:8.4f}" for k in METRIC_KEYS))
    lines.append(f"{'mean':<{width}} " + " ".join(f"{mean[k]:8.4f}" for k in METRIC_KEYS))
    return "\n".join(lines)


def cmd_evaluate(args) -> int:
    from .data.folders import label_files
    from .data.io import read_labels
    from .metrics import evaluate_pair, summarize

    pred_dir, gt_dir = Path(args.pred), Path(args.gt)
    for d in (pred_dir, gt_dir):
        if not d.is_dir():
            return _fail(f"{d}: no such folder")
    if args.json:
        check_writable_file(Path(args.json))
    preds, gts = label_files(pred_dir), label_files(gt_dir)
    common = sorted(set(preds) & set(gts))
    if not common:
        return _fail(f"no prediction in {pred_dir} matches a ground-truth file in {gt_dir} by stem")
    for stem in sorted(set(gts) - set(preds)):
        print(f"warning: no prediction for {gts[stem]}", file=sys.stderr)
    per_image = {}
    for stem in common:
        gt, pred = read_labels(gts[stem]), read_labels(preds[stem])
        if gt.shape != pred.shape:
            return _fail(f"{preds[stem]}: shape {pred.shape} differs from ground truth {gt.shape}")
        per_image[stem] = {k: float(v) for k, v in evaluate_pair(gt, pred).items()}
    summary = summarize(per_image)
    print(format_table(per_image, summary["mean"]))
    if summary.get("n_skipped"):
        print(f"({summary['n_skipped']} image(s) with nothing to find and nothing found were skipped)")
    if args.json:
        doc = {"images": per_image, "mean": summary["mean"]}
        atomic_write_text(args.json, json.dumps(doc, indent=2, allow_nan=True))
    return 0


# --------------------------------------------------------------------- export-model
def add_export_model_parser(sub) -> None:
    p = sub.add_parser("export-model", help="write a model folder as a bioimage.io model package")
    p.add_argument("--model", required=True, help="trained model folder")
    p.add_argument("--out", required=True, help="package to write: NAME.zip (or a folder)")
    p.add_argument("--include-base", action="store_true",
                   help="embed the base SAM weights (Apache-2.0) instead of recording their name + sha256")
    p.add_argument("--checkpoint", help="base SAM checkpoint (if not at the recorded path)")
    p.add_argument("--test-image", help="real image for the test tensors and cover (default: bundled sample)")
    p.add_argument("--name", help="package name")
    p.add_argument("--author", action="append", default=None, help="author name (repeatable)")
    p.add_argument("--data-citation", help="training data reference, e.g. 'MoNuSeg 2018 (Kumar et al.)'")
    p.add_argument("--data-licence", default="unspecified", help="training data licence (SPDX id)")
    p.add_argument("--licence", default="BSD-3-Clause", help="package licence (SPDX id)")
    p.add_argument("--no-torchscript", action="store_true", help="state-dict weights only")
    p.add_argument("--no-validate", action="store_true", help="skip the bioimageio.core check")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_export_model)


def cmd_export_model(args) -> int:
    from .bioimageio_package import export_model_package, validate_model_package

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        return _fail(f"{out}: already exists (pass --overwrite to replace it)")
    t0 = time.perf_counter()
    path = export_model_package(
        args.model, out, include_base=args.include_base, checkpoint=args.checkpoint,
        test_image=args.test_image, name=args.name, authors=args.author,
        data_citation=args.data_citation, data_licence=args.data_licence, licence=args.licence,
        torchscript=not args.no_torchscript,
    )
    print(f"wrote {path} in {time.perf_counter() - t0:.1f}s")
    if args.no_validate:
        return 0
    result = validate_model_package(path)
    for line in result["checks"]:
        print(f"  {line}")
    if not result["passed"]:
        for failure in result["failures"]:
            print(f"failed: {failure}", file=sys.stderr)
        return 1
    print("bioimageio.core: package valid, test outputs reproduced")
    return 0


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="napari-amasam",
                                     description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--version", action="version", version=f"napari-amasam {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_adapt_parser(sub)
    add_segment_parser(sub)
    add_evaluate_parser(sub)
    add_export_model_parser(sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # One line per warning, without the source location Python prints by default.
    text = str(message).strip().splitlines()
    print(f"napari-amasam: warning: {text[0] if text else category.__name__}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    import warnings

    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.func(args)
    except (AmaSamError, ConfigError) as exc:
        if os.environ.get("NAPARI_AMASAM_DEBUG"):
            raise
        return _fail(str(exc))
    except OSError as exc:  # disk full, permissions, a path that is a file...: one line
        if os.environ.get("NAPARI_AMASAM_DEBUG"):
            raise
        return _fail(describe_os_error(exc))
    except KeyboardInterrupt:
        return _fail("interrupted")
    finally:
        from .training.distributed import cleanup

        cleanup()


if __name__ == "__main__":
    sys.exit(main())
