"""CA-SAM continual learning: adding a task keeps every earlier weight, lists the task, routes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_amasam import cli
from napari_amasam.config import TrainConfig
from napari_amasam.data.io import read_image
from napari_amasam.errors import CheckpointError
from napari_amasam.inference.predictor import Predictor
from napari_amasam.model_folder import read_model_folder
from napari_amasam.task_list import read_tasks, task_thresholds
from napari_amasam.training.trainer import run_training

from .helpers import aux_folder, primary_folder, tiny_model_config


def _quick(primary, out, **kwargs) -> TrainConfig:
    return TrainConfig(primary=str(primary), out=str(out), epochs=1, steps_per_epoch=2,
                       batch_size=2, device="cpu", seed=0, amp=False, val_fraction=0.0,
                       tune_thresholds=False, router_vae_steps=50, **kwargs)


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("continual")
    primary, aux = primary_folder(tmp, 3), aux_folder(tmp, 3)
    first, records = run_training(_quick(primary, tmp / "m1"),
                                  tiny_model_config(kind="ca-sam", trainable_backbone=False))
    assert any(r["stage"] == "task" for r in records)
    second, records = run_training(_quick(aux, tmp / "m2", continue_from=str(first)),
                                   tiny_model_config())  # the architecture comes from m1
    return tmp, primary, aux, first, second, records


def test_adding_a_task_keeps_every_earlier_weight(two_tasks):
    _, _, _, first, second, _ = two_tasks
    before = torch.load(first / "weights.pt", weights_only=True)
    after = torch.load(second / "weights.pt", weights_only=True)
    assert set(before) < set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set()  # heads, task 0's layer and task 0's VAE are bit-identical
    new_layer = [k for k in after if k.startswith("alignment_layers.1.")]
    assert new_layer and any(
        not torch.equal(after[k], before[k.replace("alignment_layers.1.", "alignment_layers.0.")])
        for k in new_layer
    )  # the new task's layer trained (it started as a copy of task 0's)
    assert torch.isfinite(after["router.vaes.1.threshold"])
    assert torch.equal(torch.load(first / "base_sam.pt", weights_only=True)["image_encoder.pos_embed"],
                       torch.load(second / "base_sam.pt", weights_only=True)["image_encoder.pos_embed"])


def test_model_folder_lists_its_tasks_and_round_trips(two_tasks):
    _, primary, aux, first, second, records = two_tasks
    folder = read_model_folder(second)
    assert folder.model.kind == "ca-sam" and folder.model.num_tasks == 2
    tasks = read_tasks(second)
    assert [t["task"] for t in tasks] == [0, 1]
    assert [t["name"] for t in tasks] == [primary.name, aux.name]
    assert all(np.isfinite(t["router"]["threshold"]) and t["router"]["folds"] == 3
               for t in tasks)  # cross-fitted by image (3 training images)
    assert set(task_thresholds(second)) == {0, 1}
    assert [t["task"] for t in read_tasks(first)] == [0]
    message = [r for r in records if r["stage"] == "task"][0]["message"]
    assert "routing threshold" in message

    predictor = Predictor.from_folder(second, device="cpu")
    image = read_image(sorted((aux / "images").iterdir())[0])
    result = predictor.predict_maps(image)
    assert result.routed_tasks and set(result.routed_tasks) <= {-1, 0, 1}
    assert result.routed_task in (-1, 0, 1)
    labels = predictor.postprocess(result)
    assert labels.shape == image.shape[:2] and labels.dtype == np.int32


def test_third_task_continues_from_a_continual_model(two_tasks, tmp_path):
    tmp, primary, _, _, second, _ = two_tasks
    third, _ = run_training(_quick(primary, tmp_path / "m3", continue_from=str(second)),
                            tiny_model_config())
    assert read_model_folder(third).model.num_tasks == 3
    assert [t["task"] for t in read_tasks(third)] == [0, 1, 2]
    doc = json.loads((third / "tasks.json").read_text())
    assert "base_path" in doc


def test_continue_from_a_non_ca_sam_model_is_a_one_line_error(tmp_path, capsys):
    primary = primary_folder(tmp_path, 2)
    model, _ = run_training(_quick(primary, tmp_path / "plain"), tiny_model_config())
    with pytest.raises(CheckpointError, match="needs a ca-sam model"):
        run_training(_quick(primary, tmp_path / "next", continue_from=str(model)), tiny_model_config())
    code = cli.main(["train", "--continue-from", str(model), "--primary", str(primary),
                     "--out", str(tmp_path / "next2")])
    err = capsys.readouterr().err
    assert code == cli.EXIT_ERROR and "needs a ca-sam model" in err and len(err.strip().splitlines()) == 1
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "--continue-from" in help_text and "sam-da" in help_text and "ca-sam" in help_text


def test_continue_from_without_mpp_warns_and_keeps_the_working_scale(tmp_path, capsys):
    """``train --continue-from`` builds its settings like a new run: without --mpp it says at
    which scale the new images are taken; the new model keeps the old one's working scale."""
    primary, aux = primary_folder(tmp_path, 2), aux_folder(tmp_path, 2)
    first, _ = run_training(_quick(primary, tmp_path / "m1", mpp=0.25, model_mpp=0.5),
                            tiny_model_config(kind="ca-sam", trainable_backbone=False))
    assert read_model_folder(first).mpp == 0.5
    quick = ["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2",
             "--val-fraction", "0", "--device", "cpu", "--quiet"]
    code = cli.main(["train", "--continue-from", str(first), "--primary", str(aux),
                     "--out", str(tmp_path / "m2"), *quick])
    err = capsys.readouterr().err
    assert code == 0, err
    warning = [line for line in err.splitlines() if line.startswith("warning: no --mpp")]
    assert len(warning) == 1 and "0.25 µm/px" in warning[0] and "0.5 µm/px working scale" in \
        warning[0], err
    second = read_model_folder(tmp_path / "m2")
    assert second.mpp == 0.5 and second.train.mpp == 0.25 and second.train.model_mpp == 0.5
    assert [task["task"] for task in read_tasks(second.path)] == [0, 1]
    # A new task cannot move the model to another working scale.
    code = cli.main(["train", "--continue-from", str(first), "--primary", str(aux), "--mpp",
                     "0.25", "--model-mpp", "0.25", "--out", str(tmp_path / "m3"), *quick])
    err = capsys.readouterr().err
    assert code == cli.EXIT_ERROR and "keeps that scale" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m3").exists()
