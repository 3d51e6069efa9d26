"""The AMP code paths (bf16/fp16 autocast, used on CUDA) run through the whole model.

No GPU is available to the test suite, so CPU autocast stands in for it: it exercises the
same dtype mixing in the fused attention, the HR-Decoder and the losses.
"""

import pytest
import torch

from napari_amasam.model import build_amasam
from napari_amasam.training.losses import amasam_loss

from .helpers import tiny_model_config


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_backward_and_inference(dtype):
    torch.manual_seed(0)
    model = build_amasam(tiny_model_config(num_domains=2))
    images = torch.rand(2, 3, 128, 128) * 255
    domain = torch.tensor([0, 1])
    with torch.autocast("cpu", dtype=dtype):
        output = model(images, domain=domain, lam=0.5)
    assert output.fine_logits.dtype == dtype and output.domain_logits is not None
    targets = torch.rand(2, 3, 128, 128)
    valid = torch.ones(2, 128, 128, dtype=torch.bool)
    loss, _ = amasam_loss(output, targets, valid, domain)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.inference_mode():
        reference = torch.sigmoid(model(images).fine_logits)
        with torch.autocast("cpu", dtype=dtype):
            mixed = torch.sigmoid(model(images).fine_logits.float())
    # Reduced precision changes probabilities only slightly.
    assert (mixed - reference).abs().max() < 0.05


@pytest.mark.parametrize("native_bf16, amp, expected", [
    (True, True, torch.bfloat16),   # a CPU with AVX-512 BF16 / AMX trains in bf16
    (False, True, torch.float32),   # elsewhere bf16 is emulated (slower): float32
    (True, False, torch.float32),   # train --fp32
])
def test_cpu_training_uses_bf16_only_where_the_cpu_computes_it(
        tmp_path, monkeypatch, native_bf16, amp, expected):
    """The trainer's forward runs under bf16 autocast on a CPU that has bf16 arithmetic
    (unless ``amp`` is off), says which precision it uses, and keeps float32 weights."""
    import napari_amasam.device as device_module
    import napari_amasam.training.trainer as trainer_module
    from napari_amasam.config import TrainConfig
    from napari_amasam.model_folder import load_model
    from napari_amasam.training.trainer import run_training

    from .helpers import primary_folder

    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: native_bf16)
    seen = []
    real_loss = trainer_module.amasam_loss

    def recording_loss(output, *args, **kwargs):
        seen.append(output.fine_logits.dtype)
        return real_loss(output, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "amasam_loss", recording_loss)
    cfg = TrainConfig(primary=str(primary_folder(tmp_path)), out=str(tmp_path / "model"),
                      epochs=1, steps_per_epoch=2, batch_size=2, device="cpu", seed=0,
                      augment=False, val_fraction=0.0, amp=amp)
    out, records = run_training(cfg, tiny_model_config())
    assert seen == [expected, expected]
    words = "bf16 mixed precision" if expected == torch.bfloat16 else "float32"
    assert any(r["stage"] == "setup" and r["message"] == f"precision: {words} on cpu"
               for r in records)
    model, _ = load_model(out)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_train_fp32_flag_and_resume_switch_mixed_precision_off(tmp_path, monkeypatch):
    """On a CPU with bf16 arithmetic a new run trains in bf16; ``--fp32`` turns it off for a
    resumed run too (one recorded with mixed precision on, moved to a CPU without it, say)."""
    import json

    import napari_amasam.device as device_module

    from .helpers import primary_folder, run_cli

    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: True)
    primary, model = primary_folder(tmp_path), tmp_path / "model"
    common = ("--device", "cpu", "--val-fraction", "0", "--batch-size", "2", "--image-size", "128")
    first = run_cli("train", "--primary", primary, "--out", model, "--backbone", "tiny",
                    "--max-steps", "1", "--steps-per-epoch", "2", *common)
    assert first.returncode == 0, first.stderr
    assert "precision: bf16 mixed precision on cpu" in first.stdout
    assert json.loads((model / "config.json").read_text())["train"]["amp"] is True
    resumed = run_cli("train", "--resume", model, "--max-steps", "2", "--fp32")
    assert resumed.returncode == 0, resumed.stderr
    assert "precision: float32 on cpu" in resumed.stdout and "resumed at step 1" in resumed.stdout
