"""The command line: segment, evaluate and the bad-input paths (one line, no traceback)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from napari_amasam.cli import main

from .helpers import DEMO_DATA, primary_folder


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "napari_amasam.cli", *map(str, args)],
                          capture_output=True, text=True)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], result.stderr


def test_train_missing_primary_folder_is_one_line(tmp_path):
    result = run_cli("train", "--primary", tmp_path / "nope", "--out", tmp_path / "m",
                     "--backbone", "tiny")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "nope" in result.stderr
    assert not (tmp_path / "m").exists()


def test_train_bad_arguments(tmp_path):
    assert_one_line_error(run_cli("train", "--primary", tmp_path), "--out")
    result = run_cli("train", "--primary", tmp_path, "--out", tmp_path / "m", "--backbone", "vit_x")
    assert result.returncode == 2 and "invalid choice" in result.stderr
    assert_one_line_error(
        run_cli("train", "--primary", primary_folder(tmp_path), "--out", tmp_path / "m",
                "--backbone", "vit_b", "--checkpoint", tmp_path / "missing.pth"),
        "missing.pth")
    assert_one_line_error(
        run_cli("train", "--primary", primary_folder(tmp_path), "--out", tmp_path / "m",
                "--backbone", "tiny", "--batch-size", "0"), "batch size")
    assert_one_line_error(run_cli("train", "--resume", tmp_path / "nothing"), "nothing")


def test_train_unavailable_device_is_one_line(tmp_path):
    result = run_cli("train", "--primary", primary_folder(tmp_path), "--out", tmp_path / "m",
                     "--backbone", "tiny", "--image-size", "128", "--device", "cuda")
    assert_one_line_error(result, "cuda")


def _recorded_model(folder, **model):
    """A model folder holding only its config.json: enough for the checks that run before
    any training (no weights, no last.pt)."""
    from napari_amasam.config import ModelConfig, TrainConfig
    from napari_amasam.model_folder import write_config

    folder.mkdir()
    write_config(folder, ModelConfig(**model), TrainConfig(out=str(folder)), {}, mpp=None)
    return folder


@pytest.mark.parametrize("how", ["--continue-from", "--resume"])
def test_train_on_an_existing_model_refuses_architecture_flags(tmp_path, capsys, how):
    """--continue-from / --resume build on the recorded architecture; a flag that would change
    it is an error, not silently ignored. A flag equal to the recorded value passes."""
    model = _recorded_model(tmp_path / "m", backbone="tiny", image_size=256, kind="ca-sam",
                            alignment="none", lambda_max=0.1)
    run = ["train", how, str(model)]
    if how == "--continue-from":
        run += ["--primary", str(tmp_path / "new"), "--out", str(tmp_path / "m2")]
    for flags, named in ((["--alignment", "cgrl"], "--alignment cgrl"),
                         (["--image-size", "512"], "--image-size 512"),
                         (["--backbone", "vit_b"], "--backbone vit_b"),
                         (["--kind", "amasam"], "--kind amasam"),
                         (["--lambda-max", "1"], "--lambda-max 1.0"),
                         (["--alignment-layer", "5"], "--alignment-layer 5"),
                         (["--decoder-adapter"], "--decoder-adapter"),
                         (["--trainable-backbone"], "--trainable-backbone")):
        assert main(run + flags) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"napari-amasam: error: {named}: "), err
        assert str(model) in err[0] and f"{how} cannot change an existing model's architecture" \
            in err[0], err
    # The recorded values themselves change nothing: the run goes on to its next check
    # (this folder has no weights / no last.pt to build on).
    assert main(run + ["--alignment", "none", "--image-size", "256", "--backbone", "tiny",
                       "--kind", "ca-sam", "--lambda-max", "0.1", "--alignment-layer", "2",
                       "--frozen-backbone"]) == 2
    err = capsys.readouterr().err
    assert "architecture" not in err and ("no weights.pt" in err or "nothing to resume" in err), err


def test_resume_refuses_training_settings_it_would_ignore(tmp_path, capsys):
    """--resume continues with the recorded settings: a flag that would change one is an error
    naming the flag and the recorded value; the recorded value itself, --epochs, --max-steps
    and --fp32 pass (on to the next check: this folder has nothing to resume)."""
    from napari_amasam.config import ModelConfig, TrainConfig
    from napari_amasam.model_folder import write_config

    model = tmp_path / "m"
    model.mkdir()
    data = tmp_path / "data"
    write_config(model, ModelConfig(backbone="tiny"),
                 TrainConfig(out=str(model), primary=str(data), lr=1e-3, batch_size=4, seed=3,
                             mpp=0.25, model_mpp=0.5, primary_share=0.75), {}, mpp=0.5)
    run = ["train", "--resume", str(model)]
    for flags, named, recorded in ((["--lr", "0.01"], "--lr 0.01", "lr 0.001"),
                                   (["--batch-size", "8"], "--batch-size 8", "batch_size 4"),
                                   (["--seed", "1"], "--seed 1", "seed 3"),
                                   (["--seed", "0"], "--seed 0", "seed 3"),
                                   (["--primary", str(tmp_path / "other")], "--primary ",
                                    f"primary {data}"),
                                   (["--aux", str(data)], "--aux ", "aux []"),
                                   (["--mpp", "0.5"], "--mpp 0.5", "mpp 0.25"),
                                   (["--primary-share", "0.5"], "--primary-share 0.5",
                                    "primary_share 0.75"),
                                   (["--no-augment"], "--no-augment", "augmentation")):
        assert main(run + flags) == 2, flags
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"napari-amasam: error: {named}"), err
        assert str(model) in err[0] and recorded in err[0] and "--resume" in err[0], err
    same = ["--lr", "0.001", "--batch-size", "4", "--seed", "3", "--primary",
            str(tmp_path / "." / "data"), "--mpp", "0.25", "--model-mpp", "0.5",
            "--primary-share", "0.75", "--epochs", "40", "--max-steps", "10", "--fp32"]
    assert main(run + same) == 2
    err = capsys.readouterr().err
    assert "recorded settings" not in err and "nothing to resume" in err, err


#: The defaults ``train --help`` must show, stated by hand (not read from
#: config.train_defaults, so that the test fails if the help or the defaults drift): the
#: paper's protocol for vit_* and the CPU recipe for tiny*, as config.train_defaults's
#: docstring documents them (Adam 1e-4, ExponentialLR 0.98, 30 epochs of one pass, batch 4,
#: 1024 px, lambda_max 1, CGRL; tiny*: 0.5 µm/px (20x), 256-px crops, a 10x larger learning
#: rate decaying to ~7 % over 30 epochs of 100 steps, averaged weights, clipped gradients,
#: three primary tiles and one auxiliary per batch, no adversarial alignment, 10 % for
#: validation).
TRAIN_HELP_DEFAULTS = {
    "--epochs": "default 30",
    "--steps-per-epoch": "default one pass over the primary images for vit_*, 100 for tiny*",
    "--batch-size": "default 4",
    "--lr": "default 0.0001 for vit_*, 0.001 for tiny*",
    "--lr-gamma": "default 0.98 for vit_*, 0.915 for tiny*",
    "--image-size": "default 1024 for vit_*, 256 for tiny*",
    "--lambda-max": "default 1.0 for vit_*, 0.1 for tiny*",
    "--alignment": "default cgrl for vit_*, none for tiny*",
    "--val-fraction": "default 0.2 for vit_*, 0.1 for tiny*",
    "--model-mpp": "default the primary's mpp for vit_*, 0.5 µm/px (20x) for tiny*",
    "--ema-decay": "default 0.0 for vit_*, 0.995 for tiny*",
    "--grad-clip": "default 0.0 for vit_*, 1.0 for tiny*",
    "--primary-share": "default 0.5 for vit_*, 0.75 for tiny*",
}


def _options_help(text: str) -> dict[str, str]:
    """``--flag`` -> its help text (wrapped lines joined) from argparse's ``--help`` output."""
    options, current = {}, None
    for line in text.splitlines():
        match = re.match(r"^  (--?[\w-]+)", line)
        if match:
            current = match.group(1)
            options[current] = line[match.end():]
        elif current is not None and line.startswith("    "):
            options[current] += " " + line
        else:
            current = None
    return {flag: " ".join(help_text.split()) for flag, help_text in options.items()}


def test_train_help_states_the_defaults_a_run_gets(tmp_path, capsys):
    """``train --help`` shows the documented defaults (TRAIN_HELP_DEFAULTS), and a tiny_conv
    run given no flags gets the same tiny* numbers."""
    from napari_amasam.cli import build_parser, new_run_config

    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    helps = _options_help(capsys.readouterr().out)
    for flag, expected in TRAIN_HELP_DEFAULTS.items():
        assert expected in helps.get(flag, ""), (flag, helps.get(flag))
    args = build_parser().parse_args(["train", "--primary", str(tmp_path / "p"), "--out",
                                      str(tmp_path / "m"), "--backbone", "tiny_conv"])
    _, settings = new_run_config(args, "tiny_conv")
    assert settings == dict(image_size=256, alignment="none", lambda_max=0.1, epochs=30,
                            steps_per_epoch=100, batch_size=4, lr=1e-3, lr_gamma=0.915,
                            primary_share=0.75, val_fraction=0.1, model_mpp=0.5,
                            ema_decay=0.995, grad_clip=1.0)


def test_segment_skips_bad_files_and_processes_the_rest(tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    good = sorted((DEMO_DATA / "monuseg_heldout" / "images").iterdir())[0]
    (images / good.name).write_bytes(good.read_bytes())
    (images / "corrupt.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    result = run_cli("segment", images, tmp_path / "missing.tif", "--model", "classical",
                     "--out", out, "--geojson", "--csv")
    assert result.returncode == 1
    assert "corrupt.png" in result.stderr and "missing.tif" in result.stderr
    assert "Traceback" not in result.stderr
    labels = tifffile.imread(out / f"{good.stem}_labels.tif")
    assert labels.shape == (512, 512) and labels.max() > 50
    doc = json.loads((out / f"{good.stem}.geojson").read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == labels.max()
    assert (out / f"{good.stem}.csv").read_text().count("\n") == labels.max() + 1


def test_segment_bad_model_folder_is_one_line(tmp_path):
    assert_one_line_error(run_cli("segment", tmp_path, "--model", tmp_path / "nomodel",
                                  "--out", tmp_path / "o"), "nomodel")


def test_evaluate_table_and_json(tmp_path, capsys):
    gt_dir = DEMO_DATA / "monuseg_heldout"
    pred = tmp_path / "pred"
    pred.mkdir()
    stems = [p.stem for p in sorted((gt_dir / "labels").iterdir())]
    for i, stem in enumerate(stems[:3]):
        labels = tifffile.imread(gt_dir / "labels" / f"{stem}.tif")
        if i == 1:  # one imperfect prediction: half of the nuclei missing
            labels = np.where(labels % 2 == 0, labels, 0)
        tifffile.imwrite(pred / f"{stem}_labels.tif", labels)
    report = tmp_path / "metrics.json"
    assert main(["evaluate", "--pred", str(pred), "--gt", str(gt_dir), "--json", str(report)]) == 0
    printed = capsys.readouterr()
    assert stems[0] in printed.out and "mean" in printed.out
    assert stems[3] in printed.err  # no prediction for the 4th image: warned, not scored
    doc = json.loads(report.read_text())
    assert set(doc["images"]) == set(stems[:3])
    keys = {"dice", "aji", "aji_plus", "dice2", "dq", "sq", "pq", "f1"}
    assert set(doc["mean"]) >= keys and set(doc["images"][stems[0]]) == keys
    assert doc["images"][stems[0]]["aji"] == pytest.approx(1.0)
    assert doc["images"][stems[1]]["f1"] < 0.8
    assert doc["mean"]["pq"] == pytest.approx(np.mean([doc["images"][s]["pq"] for s in stems[:3]]))


def test_evaluate_nothing_matches_is_one_line(tmp_path):
    (tmp_path / "a").mkdir()
    assert_one_line_error(run_cli("evaluate", "--pred", tmp_path / "a",
                                  "--gt", DEMO_DATA / "monuseg_heldout"), "matches")


@pytest.mark.parametrize("flag", ["--mpp", "--aux-mpp", "--model-mpp"])
def test_train_refuses_an_infinite_or_nan_mpp_in_one_line(tmp_path, flag):
    """inf passed a plain ``> 0`` check and crashed the rescaling with a traceback."""
    from .helpers import aux_folder, run_cli

    primary = primary_folder(tmp_path)
    extra = ["--aux", str(aux_folder(tmp_path))] if flag == "--aux-mpp" else []
    for value in ("inf", "nan"):
        result = run_cli("train", "--primary", primary, "--out", tmp_path / "m", "--backbone",
                         "tiny", "--device", "cpu", *extra, flag, value)
        assert_one_line_error(result, "mpp", "positive finite")


def test_a_shortened_tiny_schedule_still_anneals_the_learning_rate(tmp_path):
    """``--epochs`` without ``--lr-gamma``: tiny* decays to the default run's final rate
    (~7 %) in the epochs given; vit_* keep the paper's fixed 0.98 per epoch."""
    from napari_amasam.cli import build_parser, new_run_config

    def settings(backbone, *flags):
        args = build_parser().parse_args(["train", "--primary", str(tmp_path / "p"), "--out",
                                          str(tmp_path / "m"), "--backbone", backbone, *flags])
        return new_run_config(args, backbone)[1]

    assert settings("tiny_conv", "--epochs", "10")["lr_gamma"] == pytest.approx(0.766, abs=1e-3)
    assert settings("tiny_conv")["lr_gamma"] == 0.915
    assert settings("tiny_conv", "--epochs", "10", "--lr-gamma", "0.9")["lr_gamma"] == 0.9
    assert settings("vit_b", "--epochs", "10")["lr_gamma"] == 0.98


@pytest.mark.parametrize("mpp_flag", [[], ["--mpp", "0.25"]])
def test_segment_without_mpp_says_which_pixel_size_it_assumes(tmp_path, capsys, mpp_flag):
    # A model trained at 0.5 µm/px on 0.3 µm/px data: without --mpp the images are resized as
    # if they were at 0.3, which the user must be told; with --mpp nothing is assumed.
    from napari_amasam.config import TrainConfig

    from .helpers import saved_model_folder, tiny_model_config

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    train = TrainConfig(out=str(model_dir), primary="data", mpp=0.3, model_mpp=0.5)
    saved_model_folder(model_dir, tiny_model_config(image_size=64), {"name": "tiny"},
                       train=train, mpp=0.5)
    image = sorted((DEMO_DATA / "monuseg_heldout" / "images").iterdir())[0]
    assert main(["segment", str(image), "--model", str(model_dir), "--out",
                 str(tmp_path / "out"), "--device", "cpu", *mpp_flag]) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if "no --mpp" in line]
    if mpp_flag:
        assert warned == [], err
    else:
        assert len(warned) == 1 and "0.3 µm/px" in warned[0], err
    assert (tmp_path / "out" / f"{image.stem}_labels.tif").exists()
