"""CGRL routing, plain GRL, no alignment, discriminator gradients and the lambda schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from napari_amasam.model import conditional_gradient_reversal, lambda_schedule
from napari_amasam.model.cgrl import DomainDiscriminator, align_features, gradient_reversal

LAM = 0.37


def _features():
    torch.manual_seed(0)
    return torch.randn(4, 256, 8, 8)


def _domain_loss(disc, routed, domain):
    is_primary = (domain == 0).float().unsqueeze(1)
    return F.binary_cross_entropy_with_logits(disc(routed), is_primary)


def _reference_grad(disc, feats, domain):
    """Gradient of the domain loss at the discriminator's input (no reversal)."""
    x = feats.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_domain_loss(disc, x, domain), x)
    return g


def test_cgrl_zeroes_primary_and_reverses_auxiliary_rows():
    disc = DomainDiscriminator(256).eval()  # eval: dropout off, both passes identical
    feats = _features()
    domain = torch.tensor([0, 2, 0, 1])
    g = _reference_grad(disc, feats, domain)
    x = feats.clone().requires_grad_(True)
    routed = conditional_gradient_reversal(x, domain, LAM)
    assert torch.equal(routed, feats)  # identity forward
    _domain_loss(disc, routed, domain).backward()
    assert torch.count_nonzero(x.grad[domain == 0]) == 0
    aux = domain != 0
    assert torch.count_nonzero(g[aux]) > 0
    assert torch.equal(x.grad[aux], g[aux] * -LAM)


def test_grl_reverses_every_row():
    disc = DomainDiscriminator(256).eval()
    feats = _features()
    domain = torch.tensor([0, 1, 0, 1])
    g = _reference_grad(disc, feats, domain)
    x = feats.clone().requires_grad_(True)
    _domain_loss(disc, align_features(x, domain, LAM, "grl"), domain).backward()
    assert torch.equal(x.grad, g * -LAM)
    y = feats.clone().requires_grad_(True)
    _domain_loss(disc, gradient_reversal(y, LAM), domain).backward()
    assert torch.equal(y.grad, x.grad)


def test_none_gives_no_gradient_to_features():
    disc = DomainDiscriminator(256).eval()
    x = _features().requires_grad_(True)
    domain = torch.tensor([0, 1, 0, 1])
    routed = align_features(x, domain, LAM, "none")
    assert not routed.requires_grad
    _domain_loss(disc, routed, domain).backward()
    assert x.grad is None
    assert disc.classifier[-1].weight.grad is not None


@pytest.mark.parametrize("mode", ["cgrl", "grl"])
def test_discriminator_weights_get_ordinary_gradients(mode):
    feats = _features()
    domain = torch.tensor([0, 1, 0, 1])
    disc = DomainDiscriminator(256).eval()
    _domain_loss(disc, feats, domain).backward()
    plain = {n: p.grad.clone() for n, p in disc.named_parameters()}
    disc.zero_grad()
    x = feats.clone().requires_grad_(True)
    _domain_loss(disc, align_features(x, domain, LAM, mode), domain).backward()
    for name, p in disc.named_parameters():
        assert torch.equal(p.grad, plain[name]), name


def test_bad_mode_and_domain_shape_raise():
    with pytest.raises(ValueError, match="alignment must be"):
        align_features(_features(), torch.zeros(4, dtype=torch.long), 1.0, "dann")
    with pytest.raises(ValueError, match="domain must be"):
        conditional_gradient_reversal(_features(), torch.zeros(3, dtype=torch.long), 1.0)


def test_discriminator_shape_and_size():
    disc = DomainDiscriminator(256, hidden=256)
    # method.md 1.3 B: about 1.25 M parameters at width 256
    assert sum(p.numel() for p in disc.parameters()) == 1246209
    assert disc(torch.randn(3, 256, 16, 16)).shape == (3, 1)


def test_lambda_schedule():
    assert lambda_schedule(0.0, 1.0, "dann") == 0.0
    assert lambda_schedule(1.0, 2.0, "dann") == pytest.approx(2 * (2 / (1 + math.exp(-10)) - 1))
    values = [lambda_schedule(p / 10, 1.0, "dann") for p in range(11)]
    assert all(a < b for a, b in zip(values, values[1:], strict=False))
    assert lambda_schedule(0.3, 0.1, "constant") == 0.1
    assert lambda_schedule(5.0, 1.0, "dann") == lambda_schedule(1.0, 1.0, "dann")  # clamped
    with pytest.raises(ValueError, match="dann or constant"):
        lambda_schedule(0.5, 1.0, "linear")
