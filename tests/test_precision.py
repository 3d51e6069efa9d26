"""The inference ``precision`` option: config field, what it means per device, the predictor
and the CLI flag; bf16 output agrees with fp32 on real H&E with a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_amasam.cli import build_parser
from napari_amasam.config import ConfigError, ModelConfig, PostprocessConfig
from napari_amasam.data.io import read_image
from napari_amasam.errors import DeviceError
from napari_amasam.inference.predictor import Predictor
from napari_amasam.precision import (
    autocast_dtype_for,
    check_precision,
    cpu_has_native_bf16,
    precision_context,
)

from .helpers import DEMO_DATA, tiny_model_config


def test_model_config_precision_field_validates_and_round_trips():
    assert ModelConfig().precision == "auto"
    cfg = ModelConfig(backbone="tiny", precision="bf16")
    assert ModelConfig.from_dict(cfg.to_dict()).precision == "bf16"
    # Folders written before the field existed load with the default.
    data = cfg.to_dict()
    del data["precision"]
    assert ModelConfig.from_dict(data).precision == "auto"
    with pytest.raises(ConfigError, match="precision must be auto, fp32 or bf16, not 'fp16'"):
        ModelConfig(precision="fp16")


def test_precision_names_and_devices():
    assert check_precision(" BF16 ") == "bf16"
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, bf16"):
        check_precision("half")
    cpu = torch.device("cpu")
    assert autocast_dtype_for("fp32", cpu) is None
    assert autocast_dtype_for("bf16", cpu) is torch.bfloat16
    # auto takes bf16 on a CPU only where oneDNN computes it natively (else it is slower).
    assert autocast_dtype_for("auto", cpu) is (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert autocast_dtype_for("auto", torch.device("mps")) is None
    with pytest.raises(DeviceError, match="bf16 is available on CPU and CUDA, not on mps"):
        autocast_dtype_for("bf16", torch.device("mps"))
    with precision_context(torch.bfloat16, cpu):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    with precision_context(None, cpu):
        assert not torch.is_autocast_enabled("cpu")


class AutocastProbe(torch.nn.Module):
    """Records whether autocast was on during its forward; a 1x1 conv as the 'network'."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 1)
        self.seen: list[torch.dtype] = []

    def forward(self, images, domain=None, lam=0.0):
        fine = self.conv(images / 255.0)
        self.seen.append(fine.dtype)

        class Out:
            fine_logits = fine
            distance_logits = None

        return Out()


def test_predictor_precision_default_override_and_effect():
    image = np.full((40, 40, 3), 128, np.uint8)
    config = ModelConfig(backbone="tiny", image_size=64, precision="bf16")
    probe = AutocastProbe()
    predictor = Predictor(probe, config, device="cpu")  # the config's default
    assert predictor.precision == "bf16" and predictor.autocast_dtype is torch.bfloat16
    predictor.predict_maps(image)
    assert probe.seen[-1] == torch.bfloat16
    predictor = Predictor(probe, config, device="cpu", precision="fp32")  # override
    assert predictor.autocast_dtype is None
    maps = predictor.predict_maps(image)
    assert probe.seen[-1] == torch.float32 and maps.foreground.dtype == np.float32
    with pytest.raises(ConfigError, match="precision must be one of"):
        Predictor(probe, config, device="cpu", precision="fp8")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def test_bf16_maps_agree_with_fp32_on_real_he():
    """A tiny random-weight AMA-SAM on a real H&E crop: bf16 changes the logits (autocast
    really ran) but the probabilities and the foreground mask stay close to fp32."""
    from napari_amasam.model import build_amasam

    torch.manual_seed(0)
    config = tiny_model_config(trainable_backbone=False)
    model = build_amasam(config)
    image = read_image(sorted((DEMO_DATA / "monuseg_heldout" / "images").iterdir())[0])
    image = image[:200, :200]
    maps = {}
    for precision in ("fp32", "bf16"):
        predictor = Predictor(model, config, PostprocessConfig(), device="cpu", precision=precision)
        maps[precision] = predictor.predict_maps(image)
    fp32, bf16 = maps["fp32"].foreground, maps["bf16"].foreground
    assert not np.array_equal(fp32, bf16)
    assert np.abs(fp32 - bf16).max() < 0.05
    threshold = float(np.median(fp32))  # random weights: split the map in half
    assert _dice(fp32 > threshold, bf16 > threshold) > 0.95
    for name in ("center_distance", "boundary_distance"):
        assert np.abs(getattr(maps["fp32"], name) - getattr(maps["bf16"], name)).max() < 0.05


def test_segment_cli_precision_flag():
    parser = build_parser()
    args = parser.parse_args(["segment", "x.png", "--model", "m", "--out", "o", "--precision", "bf16"])
    assert args.precision == "bf16"
    assert parser.parse_args(["segment", "x.png", "--model", "m", "--out", "o"]).precision is None
    with pytest.raises(SystemExit):
        parser.parse_args(["segment", "x.png", "--model", "m", "--out", "o", "--precision", "fp16"])


def test_from_folder_rejects_unknown_precision_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="precision must be one of"):
        Predictor.from_folder(tmp_path / "no_such_model", device="cpu", precision="int8")
