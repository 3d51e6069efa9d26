"""bioimage.io export/import: bioimageio.core validates the package, re-import segments alike."""

from __future__ import annotations

import zipfile
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from napari_amasam.config import PostprocessConfig
from tests.helpers import saved_model_folder, tiny_model_config

pytest.importorskip("bioimageio.core")

from napari_amasam import bioimageio_package as bp  # noqa: E402
from napari_amasam.errors import AmaSamError, CheckpointError  # noqa: E402
from napari_amasam.inference.predictor import Predictor  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "napari_amasam" / "_sample_data"
THRESHOLDS = PostprocessConfig(method="edt", foreground_threshold=0.45, edt_min_distance=3)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_model")
    return saved_model_folder(folder, tiny_model_config(image_size=64), {"name": "tiny"},
                              thresholds=THRESHOLDS)


@pytest.fixture(scope="module")
def breast():
    return iio.imread(SAMPLE / "monuseg_breast.png")[:160, :200, :3]


@pytest.fixture(scope="module")
def tiny_package(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("pkg") / "tiny.zip"
    return bp.export_model_package(tiny_folder, out, data_citation="MoNuSeg 2018 crops.",
                                   data_licence="CC-BY-NC-SA-4.0")


def test_tiny_package_validates_with_bioimageio_core(tiny_package):
    names = zipfile.ZipFile(tiny_package).namelist()
    for name in ("rdf.yaml", "weights.pt", "weights_torchscript.pt", "bioimageio_architecture.py",
                 "test_input.npy", "test_output.npy", "cover.png", "README.md", "environment.yaml"):
        assert name in names
    result = bp.validate_model_package(tiny_package)
    assert result["passed"], result["failures"]
    # both weight formats reproduce the test output
    for fmt in ("pytorch_state_dict", "torchscript"):
        assert f"passed: Reproduce test outputs from test inputs ({fmt})" in result["checks"]


def test_package_records_mpp_thresholds_and_a_real_test_image(tiny_package):
    from bioimageio.spec import load_model_description

    descr = load_model_description(str(tiny_package), perform_io_checks=False)
    section = descr.config.model_dump()[bp.CONFIG_KEY]
    assert section["mpp"] == 0.25
    assert PostprocessConfig.from_dict(section["thresholds"]) == THRESHOLDS
    assert [a.scale for a in descr.inputs[0].axes[2:]] == [0.25, 0.25]
    with zipfile.ZipFile(tiny_package) as archive:
        readme = archive.read("README.md").decode()
        assert "Method `edt`" in readme and "foreground > 0.45" in readme and "0.25 µm/px" in readme
        with archive.open("test_input.npy") as fh:
            test_input = np.load(fh)
    sample = iio.imread(SAMPLE / "monuseg_breast.png")[..., :3]
    top = (sample.shape[0] - 64) // 2
    left = (sample.shape[1] - 64) // 2
    crop = sample[top : top + 64, left : left + 64].transpose(2, 0, 1)[None]
    np.testing.assert_array_equal(test_input, crop.astype(np.float32))


def test_reimported_package_segments_identically(tiny_folder, tiny_package, breast):
    from_folder = Predictor.from_folder(tiny_folder, device="cpu")
    from_package = Predictor.from_folder(tiny_package, device="cpu")
    assert from_package.mpp == 0.25 and from_package.thresholds == THRESHOLDS
    a = from_folder.segment(breast, input_mpp=0.25)
    b = from_package.segment(breast, input_mpp=0.25)
    assert a.max() > 0
    np.testing.assert_array_equal(a, b)


def test_package_keeps_the_training_data_scale(tmp_path, breast):
    """A model working at 0.5 µm/px trained on 0.25 µm/px images: its package takes an image
    of unknown pixel size to be at 0.25 µm/px, as the folder does (same labels)."""
    from napari_amasam.config import TrainConfig

    folder = tmp_path / "at_20x"
    folder.mkdir()
    train = TrainConfig(primary=str(tmp_path / "data"), mpp=0.25, model_mpp=0.5)
    saved_model_folder(folder, tiny_model_config(image_size=64), {"name": "tiny"}, train=train,
                       mpp=0.5, thresholds=THRESHOLDS)
    package = bp.export_model_package(folder, tmp_path / "at_20x.zip",
                                      data_citation="MoNuSeg 2018 crops.",
                                      data_licence="CC-BY-NC-SA-4.0")
    assert bp.read_package(package).data_mpp == 0.25
    from_folder = Predictor.from_folder(folder, device="cpu")
    from_package = Predictor.from_folder(package, device="cpu")
    assert from_folder.data_mpp == from_package.data_mpp == 0.25
    assert from_package.mpp == 0.5
    a = from_folder.segment(breast)  # no mpp given: taken at the training data's 0.25
    b = from_package.segment(breast)
    assert a.max() > 0
    np.testing.assert_array_equal(a, b)
    with zipfile.ZipFile(package) as archive:
        assert "training images were at 0.25 µm/px" in archive.read("README.md").decode()


def test_folder_package_and_detection(tiny_folder, tmp_path, breast):
    out = bp.export_model_package(tiny_folder, tmp_path / "pkg_folder", torchscript=False)
    assert (out / "rdf.yaml").is_file() and not (out / "weights_torchscript.pt").exists()
    assert bp.is_model_package(out) and not bp.is_model_package(tiny_folder)
    labels = Predictor.from_folder(out, device="cpu").segment(breast)
    np.testing.assert_array_equal(labels, Predictor.from_folder(tiny_folder, device="cpu").segment(breast))


def test_package_of_another_architecture_gives_one_line_error(tiny_folder, tmp_path):
    out = bp.export_model_package(tiny_folder, tmp_path / "other", torchscript=False)
    rdf = (out / "rdf.yaml").read_text()
    start = rdf.index("  napari_amasam:")
    (out / "rdf.yaml").write_text(rdf[:start].replace("AmaSamProbabilities", "UNet2d"))
    with pytest.raises(AmaSamError) as info:
        Predictor.from_folder(out, device="cpu")
    message = str(info.value)
    assert "not exported by napari-amasam" in message and "UNet2d" in message
    assert "\n" not in message


def test_corrupt_package_gives_one_line_error(tmp_path):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as archive:
        archive.writestr("rdf.yaml", "type: model\nformat_version: 0.5.4\nname: [\n")
    with pytest.raises(AmaSamError) as info:
        Predictor.from_folder(bad, device="cpu")
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------ vit_b base weights


@pytest.fixture(scope="module")
def vit_b_checkpoint(tmp_path_factory):
    """A generated state dict in the official vit_b layout (random weights, 64-px tables)."""
    from napari_amasam.model.backbone import SAM_VARIANTS, build_sam_parts
    from napari_amasam.model_folder import sha256_file

    folder = tmp_path_factory.mktemp("sam")
    path = folder / "sam_vit_b_01ec64.pth"
    torch.save(build_sam_parts(SAM_VARIANTS["vit_b"], image_size=64, seed=3).state_dict(), path)
    return path, sha256_file(path)


@pytest.fixture(scope="module")
def vit_b_folder(vit_b_checkpoint, tmp_path_factory):
    from napari_amasam.config import ModelConfig

    path, sha = vit_b_checkpoint
    folder = tmp_path_factory.mktemp("vit_b_model")
    config = ModelConfig(backbone="vit_b", image_size=64)
    return saved_model_folder(folder, config, {"name": path.name, "sha256": sha, "path": str(path)},
                              checkpoint=path, thresholds=THRESHOLDS)


@pytest.mark.slow  # ~370 MB of vit_b weights written, traced, zipped and run twice
def test_vit_b_include_base_validates_and_reimports(vit_b_folder, tmp_path, breast):
    out = bp.export_model_package(vit_b_folder, tmp_path / "vit_b.zip", include_base=True)
    result = bp.validate_model_package(out)
    assert result["passed"], result["failures"]
    crop = breast[:96, :96]
    np.testing.assert_array_equal(
        Predictor.from_folder(out, device="cpu").segment(crop),
        Predictor.from_folder(vit_b_folder, device="cpu").segment(crop),
    )


@pytest.mark.slow
def test_vit_b_without_base_finds_checkpoint_by_name_and_hash(vit_b_folder, vit_b_checkpoint,
                                                              tmp_path, monkeypatch, breast):
    path, sha = vit_b_checkpoint
    out = bp.export_model_package(vit_b_folder, tmp_path / "small.zip")
    names = zipfile.ZipFile(out).namelist()
    assert "weights_torchscript.pt" not in names  # would contain the SAM weights
    with zipfile.ZipFile(out) as archive:
        assert archive.getinfo("weights.pt").file_size < path.stat().st_size / 4
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NAPARI_AMASAM_SAM_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="sam_vit_b_01ec64.pth"):
        Predictor.from_folder(out, device="cpu")
    monkeypatch.setenv("NAPARI_AMASAM_SAM_DIR", str(path.parent))
    crop = breast[:96, :96]
    np.testing.assert_array_equal(
        Predictor.from_folder(out, device="cpu").segment(crop),
        Predictor.from_folder(vit_b_folder, device="cpu").segment(crop),
    )
    assert bp.validate_model_package(out)["passed"]


def test_read_model_folder_describes_a_package(tiny_package):
    """The Segment widget fills its thresholds from read_model_folder: packages too."""
    from napari_amasam.model_folder import read_model_folder

    folder = read_model_folder(tiny_package)
    assert folder.thresholds == THRESHOLDS and folder.mpp == 0.25
    assert folder.model == tiny_model_config(image_size=64)


def test_cli_export_model_then_segment_with_the_package(tiny_folder, tmp_path, breast):
    import tifffile

    from napari_amasam.cli import main

    image = tmp_path / "in" / "crop.png"
    image.parent.mkdir()
    iio.imwrite(image, breast)
    package = tmp_path / "model.zip"
    args = ["export-model", "--model", str(tiny_folder), "--out", str(package), "--no-validate",
            "--no-torchscript", "--author", "Test Author", "--data-citation", "MoNuSeg crops.",
            "--data-licence", "CC-BY-NC-SA-4.0"]
    assert main(args) == 0 and bp.is_model_package(package)
    assert main(args) == 2  # exists: refused without --overwrite
    for model, out in ((package, "a"), (tiny_folder, "b")):
        assert main(["segment", str(image), "--model", str(model), "--out", str(tmp_path / out),
                     "--device", "cpu"]) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "a" / "crop_labels.tif"),
                                  tifffile.imread(tmp_path / "b" / "crop_labels.tif"))


@pytest.mark.parametrize("key, value, shown", [("mpp", ".nan", "nan"), ("mpp", ".inf", "inf"),
                                               ("data_mpp", ".nan", "nan"),
                                               ("data_mpp", "-.inf", "-inf")])
def test_package_mpp_must_be_positive_and_finite(tiny_folder, tmp_path, key, value, shown):
    """YAML reads .nan and .inf as floats; a package mpp / data_mpp that is not a positive
    finite number is a one-line error naming it."""
    out = bp.export_model_package(tiny_folder, tmp_path / "pkg", torchscript=False)
    rdf = (out / "rdf.yaml").read_text()
    lines = [line for line in rdf.splitlines() if line.strip().startswith(f"{key}:")]
    assert len(lines) == 1, lines
    indent = lines[0][: len(lines[0]) - len(lines[0].lstrip())]
    (out / "rdf.yaml").write_text(rdf.replace(lines[0], f"{indent}{key}: {value}"))
    with pytest.raises(AmaSamError) as info:
        bp.read_package(out)
    assert f"{key} must be a positive finite number or null, not {shown}" in str(info.value)
    assert "\n" not in str(info.value)


def test_cli_segment_with_a_foreign_package_prints_one_line(tiny_folder, tmp_path, capsys):
    from napari_amasam.cli import main

    out = bp.export_model_package(tiny_folder, tmp_path / "other", torchscript=False)
    rdf = (out / "rdf.yaml").read_text()
    (out / "rdf.yaml").write_text(rdf[: rdf.index("  napari_amasam:")])
    image = SAMPLE / "monuseg_breast.png"
    assert main(["segment", str(image), "--model", str(out), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("napari-amasam: error:") and "not exported by napari-amasam" in err
    assert "\n" not in err
