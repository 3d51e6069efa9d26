"""Bad input and failing writes end in one line naming the file, never a traceback
(issue #9, point 3), and settings are validated before anything is written (point 4)."""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
import torch

from napari_amasam import model_folder as mf
from napari_amasam.cli import main
from napari_amasam.config import ConfigError, ModelConfig, PostprocessConfig, TrainConfig
from napari_amasam.data.io import read_image
from napari_amasam.errors import CheckpointError, DataError

from .helpers import DEMO_DATA, primary_folder, run_cli, tiny_model_config


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error" in line]
    assert len(errors) == 1, stderr
    return errors[0]


def _images(tmp_path, n=1):
    folder = tmp_path / "in"
    folder.mkdir()
    for path in sorted((DEMO_DATA / "monuseg_heldout" / "images").iterdir())[:n]:
        iio.imwrite(folder / path.name, iio.imread(path)[:96, :96, :3])
    return folder


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny model folder (random weights; saved, not trained) for the loading checks."""
    from napari_amasam.model import build_amasam

    out = tmp_path_factory.mktemp("model") / "m"
    out.mkdir()
    cfg = tiny_model_config(image_size=64)
    torch.manual_seed(0)
    model = build_amasam(cfg)
    mf.atomic_torch_save(model.sam_state_dict(), out / "base_sam.pt")
    mf.atomic_torch_save(model.trainable_state_dict(), out / "weights.pt")
    mf.write_config(out, cfg, None, {}, None)
    mf.write_thresholds(out, PostprocessConfig())
    return out


def _copy_model(tiny_model, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    return copy


# ----------------------------------------------------------------------------- failing writes
def test_disk_full_while_writing_results_is_one_line(tmp_path, monkeypatch, capsys):
    import tifffile as tf

    def full_disk(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(tf, "imwrite", full_disk)
    code = main(["segment", str(_images(tmp_path)), "--model", "classical", "--out",
                 str(tmp_path / "out")])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and "disk full" in line
    assert [p for p in (tmp_path / "out").iterdir()] == []  # no temp file left behind


def test_disk_full_while_training_leaves_nothing(tmp_path, monkeypatch, capsys):
    primary = primary_folder(tmp_path, n=2)

    def full_disk(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(mf, "atomic_write_bytes", full_disk)
    code = main(["train", "--primary", str(primary), "--out", str(tmp_path / "m"), "--backbone",
                 "tiny", "--image-size", "128", "--epochs", "1", "--steps-per-epoch", "1",
                 "--device", "cpu", "--quiet"])
    assert code == 2 and "disk full" in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["primary"]


def test_read_only_output_folder_is_refused_before_work(tmp_path, monkeypatch, capsys):
    # Tests run as root, whom chmod does not stop: the permission check is simulated.
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(locked)
                        else real_access(p, mode, **kw))
    code = main(["segment", str(_images(tmp_path)), "--model", "classical", "--out",
                 str(locked / "out")])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and "permission denied" in line and str(locked) in line
    primary = primary_folder(tmp_path, n=2)
    code = main(["train", "--primary", str(primary), "--out", str(locked / "m"), "--backbone",
                 "tiny", "--image-size", "128", "--device", "cpu"])
    assert code == 2 and "permission denied" in one_error_line(capsys.readouterr().err)
    assert list(locked.iterdir()) == []


def test_out_naming_a_file(tmp_path):
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep me")
    line = one_error_line(run_cli("segment", _images(tmp_path), "--model", "classical",
                                  "--out", a_file).stderr)
    assert "results.txt" in line and "file" in line
    line = one_error_line(run_cli("train", "--primary", primary_folder(tmp_path, n=2), "--out",
                                  a_file, "--backbone", "tiny").stderr)
    assert "results.txt" in line and "file" in line
    assert a_file.read_text() == "keep me"


def test_evaluate_json_to_a_missing_folder_or_a_folder(tmp_path):
    gt = DEMO_DATA / "monuseg_heldout"
    for target, words in ((tmp_path / "no" / "m.json", "no such folder"),
                          (tmp_path, "is a folder")):
        result = run_cli("evaluate", "--pred", gt / "labels", "--gt", gt, "--json", target)
        assert result.returncode == 2 and words in one_error_line(result.stderr)
        assert result.stdout == ""  # refused before any metric was computed


# ----------------------------------------------------------------------------- bad files
def test_wrong_typed_threshold_is_refused_before_inference(tmp_path, tiny_model):
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps({"foreground_threshold": "high"}))
    result = run_cli("segment", _images(tmp_path), "--model", "classical", "--out",
                     tmp_path / "out", "--thresholds", bad)
    line = one_error_line(result.stderr)
    assert "foreground_threshold" in line and "number" in line and "t.json" in line
    assert not (tmp_path / "out").exists()
    model = _copy_model(tiny_model, tmp_path)
    (model / "thresholds.json").write_text(json.dumps({"min_size": "10"}))
    with pytest.raises(CheckpointError, match="min_size must be an integer"):
        mf.read_model_folder(model)


def test_wrong_typed_config_field_names_the_field(tmp_path, tiny_model):
    model = _copy_model(tiny_model, tmp_path)
    doc = json.loads((model / "config.json").read_text())
    doc["model"]["image_size"] = "64"
    (model / "config.json").write_text(json.dumps(doc))
    line = one_error_line(run_cli("segment", tmp_path, "--model", model, "--out",
                                  tmp_path / "o").stderr)
    assert "config.json" in line and "image_size must be an integer" in line
    with pytest.raises(ConfigError, match="tiny_global_attn must be a list of integers"):
        ModelConfig.from_dict({"tiny_global_attn": "1"})
    with pytest.raises(ConfigError, match="amp must be true or false"):
        TrainConfig.from_dict({"amp": "yes"})


def test_format_version_is_checked(tmp_path, tiny_model):
    model = _copy_model(tiny_model, tmp_path)
    doc = json.loads((model / "config.json").read_text())
    for version, words in ((mf.FORMAT_VERSION + 1, "newer napari-amasam"), ("1", "version"),
                           (None, "version")):
        doc["format_version"] = version
        (model / "config.json").write_text(json.dumps(doc))
        with pytest.raises(CheckpointError, match=words):
            mf.read_model_folder(model)


def test_unreadable_png_says_permission_denied(tmp_path, monkeypatch):
    target = tmp_path / "a.png"
    iio.imwrite(target, np.zeros((8, 8, 3), np.uint8))
    real_open = builtins.open

    def denying_open(file, *args, **kwargs):  # what a file without read permission does
        if str(file) == str(target):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denying_open)
    with pytest.raises(DataError) as info:
        read_image(target)
    assert str(info.value) == f"{target}: cannot be read: permission denied"


class _Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_pickled_checkpoint_is_refused_in_one_line(tmp_path, recwarn):
    evil = tmp_path / "weights.pt"
    torch.save({"model": _Payload()}, evil)
    with pytest.raises(CheckpointError) as info:
        mf.torch_load(evil, "model weights")
    message = str(info.value)
    assert "\n" not in message and "refused for safety" in message and "weights_only" not in message
    assert not [w for w in recwarn if "pickle" in str(w.message)]
    truncated = tmp_path / "last.pt"
    torch.save({"a": torch.zeros(3)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        mf.torch_load(truncated, "training state")


def test_cli_warnings_are_one_line_without_source_locations(tmp_path):
    gt = tmp_path / "gt"
    (gt / "labels").mkdir(parents=True)
    binary = np.zeros((64, 64), np.uint8)
    binary[5:15, 5:15] = 255
    binary[30:40, 30:40] = 255
    tifffile.imwrite(gt / "labels" / "a.tif", binary)  # a binary mask: split with a warning
    pred = tmp_path / "pred"
    pred.mkdir()
    tifffile.imwrite(pred / "a_labels.tif", (binary > 0).astype(np.uint16))
    result = run_cli("evaluate", "--pred", pred, "--gt", gt)
    assert result.returncode == 0, result.stderr
    warning_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert warning_lines and all(line.startswith("napari-amasam: warning: ") for line in warning_lines), result.stderr
    assert "Warning:" not in result.stderr and ".py:" not in result.stderr


# ----------------------------------------------------------------------------- settings (point 4)
@pytest.mark.parametrize("args, words", [
    (["--epochs", "0"], "epochs must be at least 1"),
    (["--epochs", "-1", "--max-steps", "5"], "epochs must be at least 1"),
    (["--max-steps", "-5"], "max steps must be 0"),
    (["--steps-per-epoch", "-1"], "steps per epoch must be 0"),
    (["--alignment-layer", "-3"], "alignment layer blocks must be 0"),
    (["--threads", "-2"], "threads must be 0"),
    (["--mpp", "0"], "mpp must be a positive finite number"),
])
def test_bad_training_settings_are_refused_before_anything_is_written(tmp_path, args, words):
    primary = primary_folder(tmp_path, n=2)
    code = main(["train", "--primary", str(primary), "--out", str(tmp_path / "m"),
                 "--backbone", "tiny", "--image-size", "128", "--device", "cpu", *args])
    assert code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["primary"]
    with pytest.raises(ConfigError, match=words):
        # The same check for the widgets: it lives in the config dataclasses.
        kwargs = {"epochs": 1}
        for flag, value in zip(args[::2], args[1::2], strict=True):
            name = {"--epochs": "epochs", "--max-steps": "max_steps", "--mpp": "mpp",
                    "--steps-per-epoch": "steps_per_epoch", "--threads": "num_threads"}.get(flag)
            if name is None:
                ModelConfig(backbone="tiny", alignment_layer_blocks=int(value))
            kwargs[name] = float(value) if name == "mpp" else int(value)
        TrainConfig(primary=str(primary), out="m", **kwargs)


def test_epochs_given_as_is(tmp_path, capsys):
    from napari_amasam.training.trainer import resume_config

    primary = primary_folder(tmp_path, n=2)
    code = main(["train", "--primary", str(primary), "--out", str(tmp_path / "m"), "--backbone",
                 "tiny", "--image-size", "128", "--epochs", "1", "--steps-per-epoch", "1",
                 "--val-fraction", "0", "--device", "cpu", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert mf.read_model_folder(tmp_path / "m").train.epochs == 1
    with pytest.raises(ConfigError, match="epochs must be at least 1"):
        resume_config(tmp_path / "m", epochs=0)
    assert resume_config(tmp_path / "m", epochs=3).epochs == 3


def test_aux_equal_to_primary_is_an_error(tmp_path):
    primary = primary_folder(tmp_path, n=2)
    with pytest.raises(ConfigError, match="auxiliary folder is the primary"):
        TrainConfig(primary=str(primary), aux=[str(primary / ".")], out="m")
    result = run_cli("train", "--primary", primary, "--aux", primary, "--out", tmp_path / "m",
                     "--backbone", "tiny")
    assert result.returncode == 2 and "auxiliary folder is the primary" in one_error_line(result.stderr)
    assert not (tmp_path / "m").exists()


def test_bad_segment_settings(tmp_path):
    images = _images(tmp_path)
    for args, words in ((["--batch-size", "0"], "--batch-size"), (["--tile-size", "-4"], "--tile-size"),
                        (["--mpp", "-1"], "--mpp")):
        result = run_cli("segment", images, "--model", "classical", "--out", tmp_path / "o", *args)
        assert result.returncode == 2 and words in one_error_line(result.stderr)
    assert not (tmp_path / "o").exists()


def test_postprocess_ranges():
    with pytest.raises(ConfigError, match="foreground_threshold must be in"):
        PostprocessConfig(foreground_threshold=1.5)
    with pytest.raises(ConfigError, match="edt_min_distance"):
        PostprocessConfig(edt_min_distance=0)
