"""Shared test data builders: small real H&E folders and a tiny model configuration.

Tests read only files inside the repository: the demo data (``resources/demo/data``), the
few extra files in ``tests/data`` (see its LICENSES.md), or inputs built in the test.
"""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import tifffile

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "resources" / "demo" / "data"
TEST_DATA = Path(__file__).resolve().parent / "data"
#: 8 TNBC 512x512 pairs (pixel-identical to the dataset; ``tests/data/tnbc_stats.json``).
TNBC = DEMO_DATA / "tnbc_aux"
#: 10 MoNuSeg training tiles, 512x512 centre crops.
MONUSEG = DEMO_DATA / "monuseg_train"
#: 4 CoNSeP 256x256 patches, one without nuclei (``test_7_005``).
CONSEP = TEST_DATA / "consep_test"
#: One full-size (1000 x 1000) MoNuSeg label map.
MONUSEG_FULL_LABEL = TEST_DATA / "monuseg_full" / "labels" / "TCGA-18-5592-01Z-00-DX1.tif"


def tiny_model_config(**overrides):
    from napari_amasam.config import ModelConfig

    kwargs = dict(backbone="tiny", image_size=128, tiny_embed_dim=32, tiny_depth=2, tiny_heads=2,
                  tiny_global_attn=(1,), tiny_window_size=4, trainable_backbone=True)
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


def make_folder(dst: Path, source: Path, n: int, crop: int = 256, stride_offset: int = 0) -> Path:
    """Copy ``n`` crops of a bundled dataset folder into ``dst/images`` + ``dst/labels``."""
    (dst / "images").mkdir(parents=True, exist_ok=True)
    (dst / "labels").mkdir(parents=True, exist_ok=True)
    images = sorted((source / "images").iterdir())[:n]
    for path in images:
        image = iio.imread(path)[..., :3]
        labels = tifffile.imread(source / "labels" / f"{path.stem}.tif")
        top = left = stride_offset
        image = image[top : top + crop, left : left + crop]
        labels = labels[top : top + crop, left : left + crop]
        iio.imwrite(dst / "images" / f"{path.stem}.png", np.ascontiguousarray(image))
        tifffile.imwrite(dst / "labels" / f"{path.stem}.tif", labels.astype(np.uint16))
    return dst


def primary_folder(tmp_path: Path, n: int = 4) -> Path:
    return make_folder(tmp_path / "primary", DEMO_DATA / "monuseg_train", n)


def aux_folder(tmp_path: Path, n: int = 3) -> Path:
    return make_folder(tmp_path / "aux", DEMO_DATA / "tnbc_aux", n)


def run_cli(*args):
    """The CLI in this process (each subprocess costs a torch import); same exit code and
    output. An exception the CLI does not turn into a one-line error fails the test."""
    import contextlib
    import io
    from types import SimpleNamespace

    from napari_amasam.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def drain(generator):
    """Run a progress generator to the end: (list of its records, its return value)."""
    records = []
    while True:
        try:
            records.append(next(generator))
        except StopIteration as stop:
            return records, stop.value


def saved_model_folder(folder: Path, config, base_record: dict, checkpoint=None, train=None,
                       mpp: float = 0.25, thresholds=None) -> Path:
    """A model folder as training leaves it, with seeded random trained weights.

    ``train``: the ``TrainConfig`` recorded (None: none); ``mpp``: the model's working pixel
    size; ``thresholds``: the ``PostprocessConfig`` saved (None: the defaults).
    """
    import torch

    from napari_amasam.config import PostprocessConfig
    from napari_amasam.model import build_amasam
    from napari_amasam.model_folder import atomic_torch_save, write_config, write_thresholds

    torch.manual_seed(1)
    model = build_amasam(config, checkpoint=checkpoint)
    with torch.no_grad():  # move the trained parts away from their initialisation
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    if config.backbone == "tiny":
        atomic_torch_save(model.sam_state_dict(), folder / "base_sam.pt")
    atomic_torch_save(model.trainable_state_dict(), folder / "weights.pt")
    write_config(folder, config, train, base_record, mpp=mpp)
    write_thresholds(folder, PostprocessConfig() if thresholds is None else thresholds)
    return folder
