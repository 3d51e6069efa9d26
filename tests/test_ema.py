"""Weight averaging (training.ema) and gradient clipping in the trainer."""

from __future__ import annotations

import pytest
import torch

from napari_amasam.config import TrainConfig, train_defaults, with_backbone_defaults
from napari_amasam.training.ema import WeightAverage
from napari_amasam.training.trainer import run_training

from .helpers import primary_folder, tiny_model_config


class _Toy(torch.nn.Module):
    """Two trainable tensors and a frozen one, with AmaSam's weight interface."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(3))
        self.b = torch.nn.Parameter(torch.zeros(2, 2))
        self.frozen = torch.nn.Parameter(torch.ones(1), requires_grad=False)

    def trainable_state_dict(self):
        return {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state, source=""):
        with torch.no_grad():
            for n, p in self.named_parameters():
                if p.requires_grad:
                    p.copy_(state[n])


def test_average_follows_the_closed_form_and_is_swapped_in_and_out():
    toy = _Toy()
    average = WeightAverage(toy, decay=0.5)
    assert set(average.average) == {"a", "b"}
    expected = torch.zeros(3)
    for n, value in enumerate([4.0, 8.0, 2.0], start=1):
        with torch.no_grad():
            toy.a.fill_(value)
        average.update()
        decay = min(0.5, (1 + n) / (10 + n))  # 0.5 is below the warm-up ratio from n = 1
        expected = decay * expected + (1 - decay) * value
        torch.testing.assert_close(average.average["a"], expected)
    with average.applied(toy):
        torch.testing.assert_close(toy.a.detach(), expected)
    torch.testing.assert_close(toy.a.detach(), torch.full((3,), 2.0))  # raw weights back
    with pytest.raises(RuntimeError), average.applied(toy):
        raise RuntimeError("validation failed")
    torch.testing.assert_close(toy.a.detach(), torch.full((3,), 2.0))
    restored = WeightAverage(_Toy(), decay=0.5)
    restored.load_state_dict(average.state_dict())
    torch.testing.assert_close(restored.average["a"], expected)
    assert restored.updates == 3


def test_backbone_defaults_fill_only_what_the_user_left_open():
    cfg = with_backbone_defaults(TrainConfig(), "tiny_conv")
    assert cfg.ema_decay == train_defaults("tiny_conv")["ema_decay"] > 0
    assert cfg.grad_clip == train_defaults("tiny_conv")["grad_clip"] > 0
    assert with_backbone_defaults(TrainConfig(), "vit_b").ema_decay == 0.0  # the paper's protocol
    assert with_backbone_defaults(TrainConfig(ema_decay=0.0), "tiny").ema_decay == 0.0


def _cfg(tmp_path, name, **kw):
    return TrainConfig(primary=str(primary_folder(tmp_path)), out=str(tmp_path / name), epochs=1,
                       steps_per_epoch=6, batch_size=2, lr=1e-3, device="cpu", seed=0,
                       augment=False, val_fraction=0.0, tune_thresholds=False, **kw)


def test_the_model_folder_holds_the_averaged_weights(tmp_path):
    out, _ = run_training(_cfg(tmp_path, "ema", ema_decay=0.9, grad_clip=0.0), tiny_model_config())
    last = torch.load(out / "last.pt", weights_only=True)
    weights = torch.load(out / "weights.pt", weights_only=True)
    assert last["ema"]["updates"] == 6
    moved = 0
    for name, value in weights.items():
        torch.testing.assert_close(value, last["ema"]["average"][name])
        moved += int(not torch.equal(value, last["model"][name]))
    assert moved > 0  # the average lags the raw weights
    plain, _ = run_training(_cfg(tmp_path, "plain", ema_decay=0.0, grad_clip=0.0), tiny_model_config())
    last = torch.load(plain / "last.pt", weights_only=True)
    assert last["ema"] is None
    for name, value in torch.load(plain / "weights.pt", weights_only=True).items():
        torch.testing.assert_close(value, last["model"][name])


def test_gradients_are_clipped_before_the_step(tmp_path):
    """With a vanishing clip norm Adam's steps shrink to ~clip/eps of the learning rate, so
    the weights hardly move; without clipping they move by about the learning rate."""
    start = None

    def change(out):
        nonlocal start
        weights = torch.load(out / "last.pt", weights_only=True)["model"]
        if start is None:
            from napari_amasam.model import build_amasam

            torch.manual_seed(0)
            start = build_amasam(tiny_model_config()).trainable_state_dict()
        return max(float((weights[k] - start[k]).abs().max()) for k in weights)

    free = change(run_training(_cfg(tmp_path, "free", ema_decay=0.0, grad_clip=0.0),
                               tiny_model_config())[0])
    clipped = change(run_training(_cfg(tmp_path, "clipped", ema_decay=0.0, grad_clip=1e-12),
                                  tiny_model_config())[0])
    assert free > 1e-3
    assert clipped < 1e-5


def test_a_folder_recorded_before_averaging_resumes_without_it(tmp_path):
    """config.json without ema_decay/grad_clip and last.pt without "ema" (an older folder):
    the resumed run neither starts an average from scratch nor clips, and records that."""
    import json

    from napari_amasam.model_folder import read_model_folder
    from napari_amasam.training.trainer import resume_config

    out, _ = run_training(_cfg(tmp_path, "old", ema_decay=0.0, grad_clip=0.0), tiny_model_config())
    config = json.loads((out / "config.json").read_text())
    for key in ("ema_decay", "grad_clip"):
        del config["train"][key]
    (out / "config.json").write_text(json.dumps(config))
    state = torch.load(out / "last.pt", weights_only=True)
    del state["ema"]
    torch.save(state, out / "last.pt")
    assert resume_config(out).ema_decay is None  # as recorded: unknown
    run_training(resume_config(out, epochs=2), tiny_model_config(), resume=True)
    resumed = torch.load(out / "last.pt", weights_only=True)
    assert resumed["step"] == 12 and resumed["ema"] is None
    for name, value in torch.load(out / "weights.pt", weights_only=True).items():
        torch.testing.assert_close(value, resumed["model"][name])
    recorded = read_model_folder(out).train
    assert recorded.ema_decay is None or recorded.ema_decay == 0.0
