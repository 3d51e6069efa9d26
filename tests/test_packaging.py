"""The plugin is installed, its manifest validates, and its bundled data is real."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


def test_npe2_validate_passes():
    # `npe2 validate napari-amasam` finds the manifest through the installed entry point.
    npe2 = Path(sys.executable).with_name("npe2")
    result = subprocess.run(
        [str(npe2), "validate", "napari-amasam"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in (result.stdout + result.stderr).lower()


def test_manifest_commands_import():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-amasam")
    assert manifest.name == "napari-amasam"
    for command in manifest.contributions.commands:
        module, attr = command.python_name.split(":")
        mod = __import__(module, fromlist=[attr])
        assert callable(getattr(mod, attr)), command.python_name


@pytest.mark.parametrize("stem", ["monuseg_breast", "monuseg_prostate"])
def test_sample_data_is_real_and_labelled(stem):
    from napari_amasam import _sample_data

    layers = getattr(_sample_data, stem)()
    (image, image_kw, image_type), (labels, labels_kw, labels_type) = layers
    assert image_type == "image" and labels_type == "labels"
    assert image.shape == (512, 512, 3) and image.dtype == np.uint8
    assert labels.shape == (512, 512)
    # A real H&E crop has hundreds of distinct nuclei and real texture.
    assert len(np.unique(labels)) > 50
    assert image.std() > 10
    assert "CC BY-NC-SA" in image_kw["metadata"]["source"]
    # Nuclei are darker (haematoxylin) than the rest of the tissue.
    assert image[labels > 0].mean() < image[labels == 0].mean()


def test_engine_imports_no_qt():
    code = (
        "import sys; import napari_amasam.config, napari_amasam.device, "
        "napari_amasam.model_folder, napari_amasam._sample_data; "
        "bad=[m for m in sys.modules if m.split('.')[0] in ('PyQt5','PySide6','PyQt6','qtpy')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
