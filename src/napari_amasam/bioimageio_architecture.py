"""The network a bioimage.io package of this plugin describes (its ``architecture`` source).

This file is copied into every exported package and named by the package's
``weights.pytorch_state_dict.architecture``; bioimageio.core imports it and calls
:class:`AmaSamProbabilities` with the package's ``kwargs``. It builds the AMA-SAM network
from the ``napari-amasam`` package (listed in the package's environment file), so the
architecture is the plugin's own code rather than a copy of it.

Contract (what bioimage.io runs)::

    image B,3,S,S float32, RGB on the 0-255 scale (S = model_config["image_size"])
      -> probabilities B,C,S,S float32 in [0, 1]
         C = 3: foreground, centre distance, boundary distance (distance heads)
         C = 1: foreground only

Instance labels come from these maps by the post-processing the package's config and
documentation describe (``napari_amasam.inference.postprocess.instances_from_maps``).

Weights: a package made with the base SAM weights (``--include-base``, or the ``tiny``
backbone) holds the full state dict. Otherwise it holds only the trained weights
(``strict: false``) and the official SAM checkpoint is looked up by its recorded file name
and sha256 (:func:`find_base_checkpoint`), because those weights are not ours to
redistribute.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Environment variable: folders (``os.pathsep``-separated) holding official SAM checkpoints.
CHECKPOINT_DIRS_ENV = "NAPARI_AMASAM_SAM_DIR"


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_search_dirs(extra: list[str | Path] | None = None) -> list[Path]:
    """Where :func:`find_base_checkpoint` looks, in order.

    ``extra`` first, then the folders in ``$NAPARI_AMASAM_SAM_DIR``, the current folder,
    ``~/.cache/napari-amasam`` and torch's checkpoint cache (``torch.hub.get_dir()/checkpoints``,
    where segment-anything users often keep the files; nothing is downloaded).
    """
    dirs = [Path(p) for p in (extra or [])]
    dirs += [Path(p) for p in os.environ.get(CHECKPOINT_DIRS_ENV, "").split(os.pathsep) if p]
    dirs += [Path.cwd(), Path.home() / ".cache" / "napari-amasam"]
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    return dirs


def find_base_checkpoint(
    name: str, sha256: str | None, extra_dirs: list[str | Path] | None = None
) -> Path:
    """The official SAM checkpoint called ``name`` whose sha256 is ``sha256``.

    Raises
    ------
    FileNotFoundError
        One line naming the file, its hash prefix and the folders searched.
    """
    searched = checkpoint_search_dirs(extra_dirs)
    for folder in searched:
        candidate = folder / name
        if candidate.is_file() and (not sha256 or _sha256(candidate) == sha256):
            return candidate
    digest = f" (sha256 {sha256[:12]}...)" if sha256 else ""
    raise FileNotFoundError(
        f"base SAM checkpoint {name}{digest} not found in "
        f"{', '.join(str(d) for d in searched)}; put it in one of them or set "
        f"{CHECKPOINT_DIRS_ENV}"
    )


class AmaSamProbabilities(nn.Module):
    """AMA-SAM returning sigmoid maps: ``B,3,S,S`` (0-255 RGB) -> ``B,C,S,S`` in [0, 1].

    Parameters
    ----------
    model_config : dict
        ``ModelConfig.to_dict()`` of the trained model.
    base_checkpoint : dict, optional
        ``{"name": file name, "sha256": hex}`` of the official SAM checkpoint when the
        package does not embed the base weights; None when it does.
    """

    def __init__(self, model_config: dict[str, Any], base_checkpoint: dict | None = None):
        super().__init__()
        from napari_amasam.config import ModelConfig
        from napari_amasam.model import build_amasam

        cfg = ModelConfig.from_dict(dict(model_config))
        checkpoint = None
        if base_checkpoint and base_checkpoint.get("name"):
            checkpoint = find_base_checkpoint(base_checkpoint["name"], base_checkpoint.get("sha256"))
        self.net = build_amasam(cfg, checkpoint=checkpoint).eval()

    @classmethod
    def wrapping(cls, net: nn.Module) -> AmaSamProbabilities:
        """Wrap an already built AmaSam (the exporter's loaded model; nothing is rebuilt)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.net = net.eval()
        return self

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        out = self.net(image)
        maps = [out.fine_logits]
        if out.distance_logits is not None:
            maps.append(out.distance_logits)
        return torch.sigmoid(torch.cat(maps, dim=1).float())
