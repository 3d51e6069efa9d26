"""Training engine on real H&E crops with a tiny SAM-shaped model (CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from napari_amasam.config import TrainConfig
from napari_amasam.errors import DataError
from napari_amasam.model_folder import load_model, read_history, read_model_folder
from napari_amasam.training.trainer import run_training, train

from .helpers import aux_folder, primary_folder, tiny_model_config


def _cfg(tmp_path, **kw):
    base = dict(primary=str(primary_folder(tmp_path)), out=str(tmp_path / "model"), epochs=1,
                steps_per_epoch=3, batch_size=2, lr=1e-3, device="cpu", seed=0, augment=False)
    base.update(kw)
    return TrainConfig(**base)


def test_training_lowers_the_loss_on_real_images(tmp_path):
    cfg = _cfg(tmp_path, epochs=1, steps_per_epoch=30, val_fraction=0.25)
    out, records = run_training(cfg, tiny_model_config())
    losses = [r["loss"] for r in records if r["stage"] == "train"]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    val = [r for r in records if r["stage"] == "val"]
    assert val and 0.0 <= val[-1]["metrics"]["dice"] <= 1.0 and "aji" in val[-1]["metrics"]
    assert val[-1]["method"] in ("distance", "edt")
    # The model folder is self-describing and loads for inference.
    folder = read_model_folder(out)
    assert folder.model.backbone == "tiny" and folder.train.seed == 0
    for name in ("config.json", "thresholds.json", "weights.pt", "best.pt", "last.pt",
                 "base_sam.pt", "history.csv"):
        assert (out / name).is_file(), name
    tuned = [r for r in records if r["stage"] == "thresholds"]
    assert len(tuned) == 1 and tuned[0]["thresholds"]["method"] in ("distance", "edt")
    assert folder.thresholds.to_dict() == tuned[0]["thresholds"]
    history = read_history(out)
    assert len(history) == 1 and "val_dice" in history[0]
    model, _ = load_model(out)
    x = torch.full((1, 3, 128, 128), 128.0)
    assert model(x).fine_logits.shape == (1, 1, 128, 128)


@pytest.mark.parametrize("alignment", ["cgrl", "grl", "none"])
def test_primary_plus_auxiliary_with_each_alignment(tmp_path, alignment):
    cfg = _cfg(tmp_path, aux=[str(aux_folder(tmp_path))], steps_per_epoch=2, val_fraction=0.0)
    out, records = run_training(cfg, tiny_model_config(alignment=alignment))
    train_records = [r for r in records if r["stage"] == "train"]
    assert len(train_records) == 2
    has_domain_loss = all("domain" in r["losses"] for r in train_records)
    assert has_domain_loss == (alignment != "none")
    assert read_model_folder(out).model.num_domains == 2


def test_cancel_stops_and_saves_a_loadable_model(tmp_path):
    cancel = threading.Event()
    cfg = _cfg(tmp_path, epochs=5, steps_per_epoch=4)
    seen = []
    for record in train(cfg, tiny_model_config(), cancel=cancel):
        seen.append(record)
        if record["stage"] == "train" and record["step"] == 2:
            cancel.set()
    done = seen[-1]
    assert done["stage"] == "done" and done["cancelled"] and done["step"] == 2
    state = torch.load(tmp_path / "model" / "last.pt", weights_only=True)
    assert state["step"] == 2
    model, _ = load_model(tmp_path / "model")
    assert model(torch.zeros(1, 3, 128, 128)).fine_logits.shape[-1] == 128


def _cancel_at_first(records_of, task):
    """Drain a training generator, setting its cancel event at the first ``progress``
    record of ``task``; returns (all records, index just after that record)."""
    generator, cancel = records_of
    seen, at = [], None
    for record in generator:
        seen.append(record)
        if at is None and record["stage"] == "progress" and record["task"] == task:
            cancel.set()
            at = len(seen)
    assert at is not None, f"no {task} progress record"
    return seen, at


def test_cancel_during_validation_stops_there_and_resumes_without_lost_steps(tmp_path):
    """Cancel waits for one batch of validation tiles, not the whole validation; the steps
    done are saved and a resumed run continues after them."""
    from napari_amasam.training.trainer import resume_config

    cancel = threading.Event()
    cfg = _cfg(tmp_path, epochs=3, steps_per_epoch=2, val_fraction=0.5)
    seen, at = _cancel_at_first((train(cfg, tiny_model_config(), cancel=cancel), cancel),
                                "validation")
    # Nothing more was computed: no further tiles, no scores, no training step.
    assert [r["stage"] for r in seen[at:]] == ["save", "done"]
    done = seen[-1]
    assert done["cancelled"] and done["step"] == 2
    out = tmp_path / "model"
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2
    assert read_model_folder(out).has_weights
    _, records = run_training(resume_config(out), tiny_model_config(), resume=True)
    assert [r["step"] for r in records if r["stage"] == "train"] == [3, 4, 5, 6]
    assert [r["epoch"] for r in read_history(out)] == ["1", "2", "3"]
    assert records[-1]["stage"] == "done" and not records[-1]["cancelled"]
    assert any(r["stage"] == "thresholds" for r in records)


def test_cancel_during_threshold_search_keeps_the_model_and_resume_finishes_it(tmp_path):
    from napari_amasam.config import PostprocessConfig
    from napari_amasam.training.trainer import resume_config

    cancel = threading.Event()
    cfg = _cfg(tmp_path, epochs=1, steps_per_epoch=2, val_fraction=0.5)
    seen, at = _cancel_at_first((train(cfg, tiny_model_config(), cancel=cancel), cancel),
                                "thresholds")
    assert [r["stage"] for r in seen[at:]] == ["done"]
    assert seen[-1]["cancelled"] and seen[-1]["step"] == 2
    out = tmp_path / "model"
    folder = read_model_folder(out)
    assert folder.has_weights and folder.thresholds == PostprocessConfig()  # not half-tuned
    _, records = run_training(resume_config(out), tiny_model_config(), resume=True)
    assert not [r for r in records if r["stage"] == "train"]  # every step was kept
    tuned = [r for r in records if r["stage"] == "thresholds"]
    assert len(tuned) == 1 and not records[-1]["cancelled"]
    assert read_model_folder(out).thresholds.to_dict() == tuned[0]["thresholds"]


def test_stopping_iteration_still_saves(tmp_path):
    gen = train(_cfg(tmp_path, epochs=5, steps_per_epoch=4), tiny_model_config())
    for record in gen:
        if record["stage"] == "train" and record["step"] == 3:
            break
    gen.close()
    state = torch.load(tmp_path / "model" / "last.pt", weights_only=True)
    assert state["step"] == 3


def test_bad_data_reports_every_problem_and_writes_nothing(tmp_path):
    primary = primary_folder(tmp_path)
    (primary / "labels" / sorted(os.listdir(primary / "labels"))[0]).unlink()
    (primary / "images" / "broken.png").write_bytes(b"not a png")
    aux = tmp_path / "empty_aux"
    (aux / "images").mkdir(parents=True)
    (aux / "labels").mkdir()
    cfg = _cfg(tmp_path, primary=str(primary), aux=[str(aux)])
    with pytest.raises(DataError) as info:
        list(train(cfg, tiny_model_config()))
    message = str(info.value)
    assert "broken.png" in message and "empty_aux" in message
    assert len(message.splitlines()) >= 3
    assert not (tmp_path / "model").exists()


def _train_cmd(primary, out, *extra):
    return [sys.executable, "-m", "napari_amasam.cli", "train", "--primary", str(primary),
            "--out", str(out), "--backbone", "tiny", "--image-size", "128", "--epochs", "4",
            "--steps-per-epoch", "3", "--batch-size", "2", "--lr", "1e-3", "--device", "cpu",
            "--trainable-backbone", "--val-fraction", "0", "--no-augment", "--quiet", *extra]


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    primary = primary_folder(tmp_path)
    # Same tiny architecture as the other tests, chosen through the CLI defaults for tiny.
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_train_cmd(primary, full), check=True, capture_output=True)
    proc = subprocess.Popen(_train_cmd(primary, killed), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(read_history(killed)) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 2 <= len(read_history(killed)) < 4, "the run should be killed part-way"
    subprocess.run([sys.executable, "-m", "napari_amasam.cli", "train", "--resume", str(killed),
                    "--quiet"], check=True, capture_output=True)
    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(killed / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 12
    assert [r["epoch"] for r in read_history(killed)] == ["1", "2", "3", "4"]
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6)
    # tiny* defaults average the weights (training.ema): the average resumes too, and the
    # folder's weights are it
    assert a["ema"]["updates"] == b["ema"]["updates"] == 12
    published = torch.load(killed / "weights.pt", weights_only=True)
    for key in a["model"]:
        torch.testing.assert_close(a["ema"]["average"][key], b["ema"]["average"][key],
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(published[key], b["ema"]["average"][key])


# Runs the CLI in each rank and saves the rank's own trainable weights after training (a
# spy on the model the trainer builds; the training itself is the real one).
_RANK_SPY = """
import os, sys, torch
import napari_amasam.model as model_pkg
from napari_amasam.cli import main
built = []
real_build = model_pkg.build_amasam
def spy(*args, **kwargs):
    built.append(real_build(*args, **kwargs))
    return built[-1]
model_pkg.build_amasam = spy
code = main(sys.argv[1:])
rank = os.environ["RANK"]
torch.save(built[-1].trainable_state_dict(), os.path.join(os.environ["RANK_WEIGHTS"], f"rank{rank}.pt"))
sys.exit(code)
"""


@pytest.mark.slow
def test_two_process_gloo_run_keeps_ranks_in_sync(tmp_path):
    primary = primary_folder(tmp_path)
    out = tmp_path / "ddp"
    spy = tmp_path / "rank_spy.py"
    spy.write_text(_RANK_SPY)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29517", str(spy), *_train_cmd(primary, out)[3:]]
    cmd[cmd.index("--epochs") + 1] = "1"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK_WEIGHTS": str(tmp_path)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == 3
    load_model(out)
    # Different seeds per rank give different crops; all-reduced gradients keep the weights equal.
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert set(rank0) == set(rank1) == set(state["model"])
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0, msg=key)
        torch.testing.assert_close(rank0[key], state["model"][key], rtol=0, atol=0, msg=key)


def test_threshold_tuning_finds_better_settings_than_the_defaults():
    from napari_amasam.config import PostprocessConfig
    from napari_amasam.data import instance_targets, read_labels
    from napari_amasam.inference.predictor import Maps, Predictor
    from napari_amasam.metrics import evaluate_pair
    from napari_amasam.training.thresholds import optimize_thresholds

    from .helpers import DEMO_DATA

    gt = read_labels(sorted((DEMO_DATA / "monuseg_heldout" / "labels").iterdir())[0])[:200, :200]
    targets = instance_targets(gt)
    rng = np.random.default_rng(0)
    # Under-confident foreground (0.45 on nuclei): the default threshold 0.5 finds almost
    # nothing; the search must pick a lower one.
    noisy = [np.clip(t + rng.normal(0, 0.02, t.shape), 0, 1).astype(np.float32) for t in targets]
    noisy[0] = np.clip(0.45 * targets[0] + rng.normal(0, 0.02, targets[0].shape), 0, 1).astype(np.float32)

    class FakePredictor:
        postprocess = Predictor.postprocess

        def __init__(self):
            self.thresholds = PostprocessConfig()
            self.task_thresholds = {}  # per routed task (CA-SAM); none here
            self.is_classical = False

        def predict_maps(self, image, input_mpp=None):
            return Maps(noisy[0], noisy[1], noisy[2], 1.0)

        def iter_predict_maps(self, image, input_mpp=None):  # as Predictor's: tiles, then maps
            yield {"stage": "tile", "done": 1, "total": 1}
            return self.predict_maps(image, input_mpp)

    fake = FakePredictor()
    best, scores = optimize_thresholds(fake, [(np.zeros((200, 200, 3), np.uint8), gt)])
    default_aji = evaluate_pair(gt, fake.postprocess(fake.predict_maps(None)))["aji"]
    assert best.foreground_threshold < 0.45
    assert scores["aji"] > default_aji + 0.3, (scores, default_aji)
    assert scores["aji"] == pytest.approx(evaluate_pair(gt, fake.postprocess(fake.predict_maps(None), best))["aji"])


def test_threshold_tuning_refines_the_foreground_smoothing_of_the_winner():
    """A foreground map of 0.65 on every nucleus: smoothing it and thresholding at 0.4-0.6
    erodes each nucleus's rim, whatever the first stage's grid picks; only the second stage
    (smoothing x threshold around the winner) can find the unsmoothed map, which is exact."""
    import dataclasses

    from napari_amasam.config import PostprocessConfig
    from napari_amasam.data import instance_targets, read_labels
    from napari_amasam.inference.predictor import Maps, Predictor
    from napari_amasam.metrics import evaluate_pair
    from napari_amasam.training.thresholds import candidate_thresholds, optimize_thresholds

    from .helpers import DEMO_DATA

    gt = read_labels(sorted((DEMO_DATA / "monuseg_heldout" / "labels").iterdir())[1])[:200, :200]
    targets = instance_targets(gt)
    maps = Maps((0.65 * targets[0]).astype(np.float32), targets[1], targets[2], 1.0)

    class FakePredictor:
        postprocess = Predictor.postprocess

        def __init__(self):
            self.thresholds = PostprocessConfig()
            self.task_thresholds = {}
            self.is_classical = False

        def iter_predict_maps(self, image, input_mpp=None):
            yield {"stage": "tile", "done": 1, "total": 1}
            return maps

    fake = FakePredictor()
    first_stage = max(evaluate_pair(gt, fake.postprocess(maps, c))["aji"]
                      for c in candidate_thresholds(fake.thresholds, True))
    best, scores = optimize_thresholds(fake, [(np.zeros((200, 200, 3), np.uint8), gt)])
    assert best.sigma_foreground == 0.0 and best.foreground_threshold < 0.65
    assert scores["aji"] > first_stage + 0.01, (scores["aji"], first_stage)
    smoothed = dataclasses.replace(best, sigma_foreground=1.0)
    assert evaluate_pair(gt, fake.postprocess(maps, smoothed))["aji"] < scores["aji"]

    # Progress: every setting is scored once and the count ends at its total, also from a
    # hand-edited base whose smoothing is none of the second stage's.
    from napari_amasam.training.thresholds import iter_optimize_thresholds

    from .helpers import drain

    for base in (PostprocessConfig(), PostprocessConfig(sigma_foreground=1.6)):
        records, _ = drain(iter_optimize_thresholds(
            fake, [(np.zeros((200, 200, 3), np.uint8), gt)], base))
        settings = [r for r in records if r["message"].startswith("tuning thresholds: setting")]
        assert [r["done"] for r in settings] == list(range(1, len(settings) + 1))
        assert all(r["done"] <= r["total"] for r in settings)
        last = settings[-1]
        assert last["done"] == last["total"] and last["message"].endswith(f"{last['total']}/{last['total']}")


def test_fine_tune_from_a_model_with_a_different_number_of_domains(tmp_path):
    # A model trained with an auxiliary domain (so with a discriminator) is fine-tuned on
    # primary data alone, and the fine-tuned one again with the auxiliary folder.
    aux = str(aux_folder(tmp_path))
    first, _ = run_training(_cfg(tmp_path, aux=[aux], steps_per_epoch=2, val_fraction=0.0),
                            tiny_model_config())
    start = load_model(first)[0].trainable_state_dict()
    second, records = run_training(
        _cfg(tmp_path, out=str(tmp_path / "ft1"), init_from=str(first), steps_per_epoch=2,
             val_fraction=0.0, lr=1e-9), tiny_model_config())
    assert read_model_folder(second).model.num_domains == 1
    after = load_model(second)[0].trainable_state_dict()
    assert not any(k.startswith("discriminator.") for k in after)
    # Started from the first model's weights (a tiny learning rate barely moves them).
    for key in after:
        torch.testing.assert_close(after[key], start[key], atol=1e-5, rtol=0)
    third, _ = run_training(
        _cfg(tmp_path, aux=[aux], out=str(tmp_path / "ft2"), init_from=str(second),
             steps_per_epoch=1, val_fraction=0.0), tiny_model_config())
    assert any(k.startswith("discriminator.") for k in load_model(third)[0].trainable_state_dict())


def test_working_scale_rescales_training_data_and_inference_inputs(tmp_path):
    """``model_mpp``: 40x data trained at 20x; the folder records both scales and inference
    rescales a 40x image to 20x even when the caller does not give its mpp."""
    from napari_amasam.data.io import read_image
    from napari_amasam.inference.predictor import Predictor

    primary = primary_folder(tmp_path)
    cfg = _cfg(tmp_path, steps_per_epoch=2, val_fraction=0.25, mpp=0.25, model_mpp=0.5,
               tune_thresholds=False)
    assert cfg.working_mpp == 0.5
    assert TrainConfig(mpp=None, model_mpp=0.5).working_mpp is None  # unknown data scale
    assert TrainConfig(mpp=0.25).working_mpp == 0.25
    out, records = run_training(cfg, tiny_model_config())
    folder = read_model_folder(out)
    assert folder.mpp == 0.5 and folder.train.mpp == 0.25 and folder.train.model_mpp == 0.5
    assert [r for r in records if r["stage"] == "val"]  # validation ran on rescaled images

    predictor = Predictor.from_folder(out, device="cpu")
    assert (predictor.mpp, predictor.data_mpp) == (0.5, 0.25)
    image = read_image(next((primary / "images").iterdir()))
    implicit = predictor.predict_maps(image)
    explicit = predictor.predict_maps(image, input_mpp=0.25)
    native = predictor.predict_maps(image, input_mpp=0.5)
    assert implicit.scale == explicit.scale == 2.0 and native.scale == 1.0
    assert implicit.foreground.shape == image.shape[:2]
    np.testing.assert_allclose(implicit.foreground, explicit.foreground)
    assert not np.allclose(implicit.foreground, native.foreground)


def test_cli_tiny_defaults_train_at_20x_from_40x_data(tmp_path):
    """``train --backbone tiny --mpp 0.25`` without ``--model-mpp`` works at 0.5 µm/px."""
    from .helpers import run_cli

    primary = primary_folder(tmp_path)
    out = tmp_path / "m"
    result = run_cli("train", "--primary", primary, "--out", out, "--backbone", "tiny",
                     "--mpp", "0.25", "--max-steps", "1", "--val-fraction", "0", "--quiet")
    assert result.returncode == 0, result.stderr
    folder = read_model_folder(out)
    assert folder.mpp == 0.5 and folder.train.mpp == 0.25
    # the tiny* recipe: no adversarial term, averaged weights, clipped gradients
    assert folder.model.alignment == "none"
    assert folder.train.ema_decay > 0 and folder.train.grad_clip > 0
    aligned = tmp_path / "aligned"
    result = run_cli("train", "--primary", primary, "--aux", aux_folder(tmp_path), "--out", aligned,
                     "--backbone", "tiny", "--alignment", "cgrl", "--mpp", "0.25",
                     "--ema-decay", "0", "--grad-clip", "0",
                     "--max-steps", "1", "--val-fraction", "0", "--quiet")
    assert result.returncode == 0, result.stderr
    given = read_model_folder(aligned)  # given flags win
    assert given.model.alignment == "cgrl"
    assert given.train.ema_decay == 0.0 and given.train.grad_clip == 0.0


def test_slide_regions_read_at_the_working_scale_are_not_rescaled_again(tmp_path, monkeypatch):
    """The slide pipeline reads regions at the model's working scale; the predictor must not
    take them to be at the training data's scale and shrink them a second time."""
    from napari_amasam.data.io import read_image
    from napari_amasam.inference.predictor import Predictor
    from napari_amasam.slide.pipeline import segment_slide
    from tests.slide_data import write_pyramidal_tiff

    primary = primary_folder(tmp_path)
    cfg = _cfg(tmp_path, steps_per_epoch=1, val_fraction=0.0, mpp=0.25, model_mpp=0.5)
    out, _ = run_training(cfg, tiny_model_config())
    image = read_image(next((primary / "images").iterdir()))
    slide = write_pyramidal_tiff(tmp_path / "slide.tif", image, 0.25)

    scales = []
    original = Predictor.iter_segment

    def spy(self, image, **kwargs):
        scales.append((image.shape, self._scale_for(kwargs.get("input_mpp"))))
        return original(self, image, **kwargs)

    monkeypatch.setattr(Predictor, "iter_segment", spy)
    result = segment_slide(slide, str(out), tmp_path / "seg", region_size=256, scheduler="serial",
                           tissue=False)
    assert scales and all(scale == 1.0 for _, scale in scales), scales
    assert result is not None
