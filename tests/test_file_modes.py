"""Written files follow the user's umask (not mkstemp's 0600) and the base checkpoint's
sha256 is computed once per file version (issue #9, point 5)."""

from __future__ import annotations

import hashlib
import os
import stat

import numpy as np
import pytest

from napari_amasam import model_folder as mf
from napari_amasam.export import write_csv, write_geojson, write_labels_tiff


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_model_files_exports_and_staging_folders_use_the_umask(tmp_path, umask_022):
    labels = np.zeros((16, 16), np.int32)
    labels[2:6, 2:6] = 1
    written = [
        write_labels_tiff(tmp_path / "a_labels.tif", labels),
        write_csv(tmp_path / "a.csv", labels),
        write_geojson(tmp_path / "a.geojson", labels),
    ]
    mf.atomic_write_text(tmp_path / "config.json", "{}")
    mf.atomic_torch_save({"x": 1}, tmp_path / "weights.pt")
    mf.append_history(tmp_path, {"epoch": 1, "step": 1})
    written += [tmp_path / "config.json", tmp_path / "weights.pt", tmp_path / "history.csv"]
    for path in written:
        assert _mode(path) == 0o644, (path.name, oct(_mode(path)))
    staging = mf.staging_folder(tmp_path / "model")
    assert _mode(staging) == 0o755
    os.umask(0o077)  # a private umask is honoured too
    mf.atomic_write_text(tmp_path / "private.json", "{}")
    assert _mode(tmp_path / "private.json") == 0o600


def test_base_checkpoint_sha256_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    checkpoint = tmp_path / "sam.pth"
    checkpoint.write_bytes(b"a" * 1000)
    digests = []
    real = hashlib.sha256

    def counting_sha256(*args):
        digests.append(1)
        return real(*args)

    monkeypatch.setattr(mf.hashlib, "sha256", counting_sha256)
    first = mf.sha256_file(checkpoint)
    assert mf.sha256_file(checkpoint) == first == real(b"a" * 1000).hexdigest()
    assert len(digests) == 1  # the second load did not read the file again
    checkpoint.write_bytes(b"b" * 1000)  # same size, new content and mtime
    os.utime(checkpoint, ns=(1, 1))
    assert mf.sha256_file(checkpoint) == real(b"b" * 1000).hexdigest()
    assert len(digests) == 2
