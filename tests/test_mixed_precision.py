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
