"""Folder convention, pairing and the all-problems folder check."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from napari_amasam.data.folders import (
    FolderCheckError,
    check_folder,
    check_folders,
    find_pairs,
    pair_folder,
)
from napari_amasam.errors import DataError

from .helpers import CONSEP, DEMO_DATA, REPO, TEST_DATA, TNBC


def _stats_nuclei(stats_file: Path) -> int:
    return sum(entry["n_instances"] for entry in json.loads(stats_file.read_text()))


def _image(height=32, width=32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _labels(height=32, width=32, n=2) -> np.ndarray:
    labels = np.zeros((height, width), np.uint16)
    for i in range(n):
        labels[2 + 6 * i : 6 + 6 * i, 3:8] = i + 1
    return labels


def _write_pair(
    root: Path,
    stem: str,
    labels: np.ndarray | None = None,
    label_name=None,
    label_dir="labels",
    image=None,
):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / label_dir).mkdir(parents=True, exist_ok=True)
    iio.imwrite(root / "images" / f"{stem}.png", _image() if image is None else image)
    tifffile.imwrite(
        root / label_dir / (label_name or f"{stem}.tif"), _labels() if labels is None else labels
    )


@pytest.mark.parametrize(
    "folder, n_pairs",
    [
        (TNBC, 8),
        (DEMO_DATA / "monuseg_train", 10),
        (DEMO_DATA / "monuseg_heldout", 4),
        (DEMO_DATA / "monuseg_train_20x", 23),  # the demo's training set (JPEG images)
        (DEMO_DATA / "monuseg_heldout_whole", 7),  # the demo's evaluation set (JPEG images)
        (CONSEP, 4),
    ],
)
def test_real_folders_pair_completely(folder, n_pairs):
    pairs = find_pairs(folder)
    assert len(pairs) == n_pairs
    assert [p.stem for p in pairs] == sorted(p.stem for p in pairs)
    assert all(p.image.stem == p.stem and p.label.stem == p.stem for p in pairs)
    assert pair_folder is find_pairs


def test_real_check_counts_nuclei_and_warns_on_the_empty_label():
    report = check_folders(CONSEP, [TNBC])
    assert report.ok, report.problems
    assert report.n_pairs == {str(CONSEP): 4, str(TNBC): 8}
    summary = report.summary()
    assert summary["primary"]["n_nuclei"] == _stats_nuclei(CONSEP / "stats.json")
    assert summary["aux"][0]["n_nuclei"] == _stats_nuclei(TEST_DATA / "tnbc_stats.json")
    assert summary["aux"][0]["image_sizes"] == {"512x512": 8}
    json.dumps(summary)  # storable in config.json
    assert len(report.warnings) == 1 and "test_7_005.tif" in report.warnings[0]
    report.raise_if_failed()  # no problems: no exception


def test_dataset_root_resolves_to_train(tmp_path):
    # A dataset root with splits (like MoNuSeg's): train/ is used. Speed: benchmarks/bench_data.py.
    import shutil

    shutil.copytree(DEMO_DATA / "monuseg_heldout", tmp_path / "monuseg" / "train")
    check = check_folder(tmp_path / "monuseg")
    assert check.root == tmp_path / "monuseg" / "train"
    assert check.n_pairs == 4 and not check.problems
    assert check.image_sizes == {"512x512": 4}


def test_label_suffixes_and_masks_folder(tmp_path):
    root = tmp_path / "d"
    _write_pair(root, "a", label_name="a_masks.tif", label_dir="masks")
    _write_pair(root, "b", label_name="b_label.tif", label_dir="masks")
    _write_pair(root, "c", label_name="c.tif", label_dir="masks")
    _write_pair(root, "d_mask", label_name="d_mask.tif", label_dir="masks")  # stem itself ends so
    (root / "images" / ".DS_Store").write_bytes(b"junk")  # hidden/other files are ignored
    (root / "masks" / "notes.txt").write_text("ignored")
    pairs = find_pairs(root)
    assert [(p.stem, p.label.name) for p in pairs] == [
        ("a", "a_masks.tif"),
        ("b", "b_label.tif"),
        ("c", "c.tif"),
        ("d_mask", "d_mask.tif"),
    ]
    assert check_folders(root).ok


def test_find_pairs_raises_on_missing_structure(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        find_pairs(tmp_path / "missing")
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="no labels/"):
        find_pairs(tmp_path)


def test_every_problem_is_reported_at_once(tmp_path):
    # Primary: a mix of good pairs and every per-file problem.
    primary = tmp_path / "primary"
    _write_pair(primary, "good")
    _write_pair(primary, "empty", labels=np.zeros((32, 32), np.uint16))  # warning only
    iio.imwrite(primary / "images" / "orphan_image.png", _image())
    tifffile.imwrite(primary / "labels" / "orphan_label.tif", _labels())
    _write_pair(primary, "mismatch", labels=_labels(40, 32))
    _write_pair(primary, "badimage")
    (primary / "images" / "badimage.png").write_bytes(b"not a png" * 20)
    _write_pair(primary, "badlabel")
    (primary / "labels" / "badlabel.tif").write_bytes(b"not a tiff" * 20)
    _write_pair(primary, "fraction", labels=np.full((32, 32), 0.25, np.float32))
    _write_pair(primary, "rgblabel")
    iio.imwrite(primary / "labels" / "rgblabel.tif", _image())

    missing = tmp_path / "missing"
    no_images = tmp_path / "no_images"
    (no_images / "labels").mkdir(parents=True)
    no_labels = tmp_path / "no_labels"
    (no_labels / "images").mkdir(parents=True)
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "labels").mkdir()
    no_nuclei = tmp_path / "no_nuclei"
    _write_pair(no_nuclei, "x", labels=np.zeros((32, 32), np.uint16))
    _write_pair(no_nuclei, "y", labels=np.zeros((32, 32), np.uint16))

    report = check_folders(primary, [missing, no_images, no_labels, empty, no_nuclei])
    assert not report.ok
    problems = report.problems
    expected = {
        "orphan_image.png": "no label file",
        "orphan_label.tif": "no image file",
        "mismatch.tif": "does not match image",
        "badimage.png": "cannot be read",
        "badlabel.tif": "cannot be read",
        "fraction.tif": "labels are not integers",
        "rgblabel.tif": "single-channel",
        str(missing): "folder does not exist",
        str(no_images): "no images/",
        str(no_labels): "no labels/",
        str(empty / "images"): "no image files",
        str(empty / "labels"): "no label files",
        str(no_nuclei): "no nuclei in any label",
    }
    for name, problem in expected.items():
        matching = [p for p in problems if name in p and problem in p]
        assert len(matching) == 1, (name, problem, problems)
    assert len(problems) == len(expected), problems
    # A single empty label in an otherwise fine folder is a warning, not a problem.
    assert any("empty.tif" in w and "no nuclei" in w for w in report.warnings)
    assert not any("empty.tif" in p for p in problems)

    primary_check = report.folders[0]
    # Valid: good and empty (a bad image still reads its label; it is not valid).
    assert [p.stem for p in primary_check.pairs] == ["empty", "good"]
    assert primary_check.n_nuclei == 2
    assert report.folders[-1].n_pairs == 2 and report.folders[-1].n_nuclei == 0

    with pytest.raises(FolderCheckError) as info:
        report.raise_if_failed()
    assert isinstance(info.value, DataError)
    message = str(info.value)
    assert f"{len(expected)} problems" in message
    for problem in problems:
        assert problem in message.splitlines()
    assert info.value.problems == problems


def test_duplicate_stems_and_duplicate_folders(tmp_path):
    root = tmp_path / "d"
    _write_pair(root, "a")
    iio.imwrite(root / "images" / "a.jpg", _image())
    _write_pair(root, "b")
    tifffile.imwrite(root / "labels" / "b_mask.tif", _labels())
    report = check_folders(root, [root])
    assert any("several images share the name 'a'" in p for p in report.problems)
    assert any("b.png" in p and "several label files" in p for p in report.problems)
    assert any("more than once" in w for w in report.warnings)


def test_binary_label_warning_reaches_the_report(tmp_path):
    root = tmp_path / "d"
    mask = (_labels() > 0).astype(np.uint8) * 255
    _write_pair(root, "a", labels=mask)
    report = check_folders(root)
    assert report.ok
    assert any("a.tif" in w and "binary mask" in w for w in report.warnings)
    assert report.summary()["primary"]["n_nuclei"] == 2


def _bench_quality_held_out() -> set[str]:
    """``HELD_OUT`` of benchmarks/bench_quality.py, read without importing the benchmark."""
    tree = ast.parse((REPO / "benchmarks" / "bench_quality.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == \
                ["HELD_OUT"]:
            return set(ast.literal_eval(node.value))
    raise AssertionError("benchmarks/bench_quality.py defines no HELD_OUT")


def test_the_demo_training_set_is_disjoint_from_every_held_out_image():
    """The demo evaluates on monuseg_heldout_whole, which must be exactly
    benchmarks/bench_quality.py's 7 held-out images; its 20x training tiles must include none
    of them (nor of the 4 monuseg_heldout crops, which come from the same images)."""
    train = {p.stem for p in find_pairs(DEMO_DATA / "monuseg_train_20x")}
    demo_evaluation = {p.stem for p in find_pairs(DEMO_DATA / "monuseg_heldout_whole")}
    crops = {p.stem for p in find_pairs(DEMO_DATA / "monuseg_heldout")}
    bench_held_out = _bench_quality_held_out()
    assert len(bench_held_out) == 7 and demo_evaluation == bench_held_out
    assert len(crops) == 4 and crops <= bench_held_out
    assert train and not train & bench_held_out, sorted(train & bench_held_out)
    report = check_folders(DEMO_DATA / "monuseg_train_20x", [])
    assert report.ok, report.problems
