"""A trained model folder <-> a bioimage.io model package (format 0.5, via bioimageio.spec).

Export (:func:`export_model_package`)::

    MODEL_DIR (config.json, thresholds.json, weights.pt, ...)
      -> rdf.yaml            bioimage.io model description (built with bioimageio.spec)
         weights.pt          pytorch_state_dict of AmaSamProbabilities (``net.*`` keys)
         weights_torchscript.pt  traced network (only when the base weights are embedded)
         bioimageio_architecture.py  the architecture source (imports napari_amasam)
         environment.yaml    conda environment: pytorch, segment-anything, napari-amasam
         test_input.npy      1,3,S,S float32: a crop of a real H&E image (0-255 RGB)
         test_output.npy     1,C,S,S float32: the probabilities for it
         cover.png           the test crop beside its post-processed nuclei
         README.md           what goes in, what comes out, post-processing, citations

    config.napari_amasam holds what this plugin needs to re-import the package exactly:
    the ModelConfig, the post-processing thresholds, mpp (the working scale) and data_mpp
    (the training data's, taken for images of unknown pixel size), SAM normalisation, the
    base checkpoint's name + sha256 and whether its weights are embedded.

Base weights: the official SAM checkpoints are Apache-2.0; by default a package stores only
the trained weights and records the checkpoint by name and sha256 (import looks it up with
``bioimageio_architecture.find_base_checkpoint``). ``include_base=True`` embeds the merged
weights (and a TorchScript copy) so the package runs anywhere. The random-weight ``tiny``
backbone always embeds them.

Import (:func:`load_model_package`): the same ``(AmaSam, ModelFolder)`` as
``model_folder.load_model``; packages not exported by this plugin give a one-line error.
bioimageio.spec/core are an optional dependency (``pip install napari-amasam[bioimageio]``).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .config import ConfigError, ModelConfig, PostprocessConfig, valid_mpp
from .errors import AmaSamError, CheckpointError
from .model_folder import SAM_NORMALISATION, ModelFolder, read_model_folder, resolve_base_checkpoint

#: Key under the package's ``config`` holding this plugin's settings.
CONFIG_KEY = "napari_amasam"
#: Format of that section (bump on incompatible changes).
PACKAGE_FORMAT_VERSION = 1
OUTPUT_CHANNELS = ("foreground", "center_distance", "boundary_distance")
ARCHITECTURE_CALLABLE = "AmaSamProbabilities"

CITATIONS = (
    ("AMA-SAM: adversarial multi-domain alignment of Segment Anything for nuclei segmentation "
     "(arXiv 2503.21695)", "https://arxiv.org/abs/2503.21695"),
    ("Kirillov et al., Segment Anything, ICCV 2023 (SAM; weights Apache-2.0)",
     "https://arxiv.org/abs/2304.02643"),
)


class PackageError(AmaSamError):
    """A bioimage.io package cannot be written or read (the message names the file)."""


def _require_bioimageio(path: str | Path):
    try:
        import bioimageio.spec  # noqa: F401
    except ImportError:
        raise PackageError(
            f"{path}: bioimage.io packages need bioimageio.spec and bioimageio.core "
            "(pip install 'napari-amasam[bioimageio]')"
        ) from None


# ----------------------------------------------------------------------------- detection


def is_model_package(path: str | Path) -> bool:
    """True for a ``.zip`` file or a folder holding a bioimage.io ``rdf.yaml``/``bioimageio.yaml``."""
    path = Path(path)
    names = ("rdf.yaml", "bioimageio.yaml")
    if path.is_dir():
        return any((path / n).is_file() for n in names) or any(path.glob("*.bioimageio.yaml"))
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return any(n in names or n.endswith(".bioimageio.yaml") for n in archive.namelist())
    return path.is_file() and path.name.endswith(("rdf.yaml", "bioimageio.yaml"))


# ----------------------------------------------------------------------------- export


def _test_crop(image_path: Path, size: int) -> np.ndarray:
    """Centre ``size x size`` crop of an image as ``(1, 3, size, size) float32`` 0-255 RGB
    (zero-padded, as the predictor pads tiles, when the image is smaller)."""
    from .data.io import as_rgb_uint8, read_image

    rgb = as_rgb_uint8(read_image(image_path), str(image_path))
    height, width = rgb.shape[:2]
    top, left = max((height - size) // 2, 0), max((width - size) // 2, 0)
    crop = np.zeros((size, size, 3), dtype=np.uint8)
    part = rgb[top : top + size, left : left + size]
    crop[: part.shape[0], : part.shape[1]] = part
    return np.ascontiguousarray(crop.transpose(2, 0, 1)[None].astype(np.float32))


def _cover(test_input: np.ndarray, probabilities: np.ndarray, thresholds: PostprocessConfig) -> np.ndarray:
    """``S x 2S x 3 uint8``: the test crop beside its post-processed nuclei outlines."""
    from skimage.segmentation import find_boundaries

    from .inference.postprocess import instances_from_maps

    rgb = test_input[0].transpose(1, 2, 0).astype(np.uint8)
    maps = probabilities[0]
    labels = instances_from_maps(
        maps[0], maps[1] if len(maps) >= 3 else None, maps[2] if len(maps) >= 3 else None, thresholds
    )
    overlay = rgb.copy()
    overlay[find_boundaries(labels, mode="inner")] = (255, 255, 0)
    return np.concatenate([rgb, overlay], axis=1)


def _documentation(folder: ModelFolder, channels: list[str], base: dict, embedded: bool,
                   data_citation: str, data_licence: str) -> str:
    cfg, t = folder.model, folder.thresholds
    size = cfg.image_size
    mpp = f"{folder.mpp} µm/px" if folder.mpp else "unknown (not recorded at training)"
    data_scale = ""
    if folder.data_mpp and folder.mpp and folder.data_mpp != folder.mpp:
        data_scale = (f"The training images were at {folder.data_mpp} µm/px and rescaled to "
                      f"{folder.mpp}; napari-amasam takes images of unknown pixel size to be at "
                      f"{folder.data_mpp} µm/px.\n")
    if t.method == "distance":
        how = (f"seeded watershed: foreground > {t.foreground_threshold}, seeds where centre distance "
               f"< {t.center_distance_threshold} and boundary distance < {t.boundary_distance_threshold}")
    else:
        how = f"distance-transform watershed on foreground > {t.foreground_threshold}, peaks {t.edt_min_distance} px apart"
    if embedded:
        weights = "The package embeds all weights (SAM base weights are Apache-2.0)."
    elif base.get("name"):
        weights = (f"The package holds only the trained weights. The frozen SAM encoder comes from the "
                   f"official checkpoint `{base['name']}` (sha256 `{base.get('sha256')}`), looked up in "
                   f"$NAPARI_AMASAM_SAM_DIR, the working folder, ~/.cache/napari-amasam or "
                   f"torch's checkpoint cache.")
    else:
        weights = "The package holds only the trained weights."
    return f"""# AMA-SAM nuclei segmentation ({cfg.backbone})

Exported by napari-amasam {__version__} from `{folder.path.name}`.

## Input
`image`: batch x 3 x {size} x {size} float32, RGB on the 0-255 scale (H&E), at {mpp}.
{data_scale}Larger images are tiled ({size} px tiles, overlapping, blended); napari-amasam does this.

## Output
`probabilities`: batch x {len(channels)} x {size} x {size} float32 in [0, 1]; channels
{", ".join(channels)}.

## Post-processing (not part of the network)
Method `{t.method}`: {how}; Gaussian smoothing {t.sigma_foreground} px (foreground) /
{t.sigma_distance} px (distances), objects under {t.min_size} px dropped, holes filled:
{t.fill_holes}. Pixel constants are at the model's mpp. The exact settings are in
`config.napari_amasam.thresholds`; `napari-amasam segment --model this.zip` applies them.

## Weights
{weights}

## Training data
{data_citation} Licence: {data_licence}.

## Citations
- AMA-SAM, arXiv 2503.21695.
- Kirillov et al., Segment Anything, ICCV 2023 (SAM weights: Apache-2.0).
- {data_citation}
"""


def _environment() -> str:
    return f"""name: napari-amasam
channels:
  - pytorch
  - conda-forge
dependencies:
  - python>=3.10
  - pytorch>={torch.__version__.split('+')[0]}
  - pip
  - pip:
    - segment-anything>=1.0
    - napari-amasam>={__version__}
"""


def _training_data_text(folder: ModelFolder) -> str:
    data = folder.data or {}
    sources = [str(v) for k, v in data.items() if k in ("primary", "aux", "folders") and v]
    if folder.train is not None:
        sources = [folder.train.primary, *folder.train.aux]
    return f"Trained on {', '.join(Path(s).name for s in sources if s) or 'unrecorded folders'}."


def export_model_package(
    model_dir: str | Path,
    out: str | Path,
    *,
    include_base: bool = False,
    checkpoint: str | Path | None = None,
    test_image: str | Path | None = None,
    name: str | None = None,
    authors: list[str] | None = None,
    data_citation: str | None = None,
    data_licence: str = "unspecified",
    licence: str = "BSD-3-Clause",
    torchscript: bool = True,
) -> Path:
    """Write a bioimage.io model package (zip, or a folder when ``out`` has no ``.zip``).

    Parameters
    ----------
    model_dir : path
        A trained model folder.
    out : path
        ``.zip`` file, or folder, to write (atomically: temporary sibling, then rename).
    include_base : bool
        Embed the base SAM weights (merged state dict + TorchScript). Without it a vit_*
        model records the checkpoint's name and sha256 only.
    checkpoint : path, optional
        The base SAM checkpoint, if not at the path recorded at training.
    test_image : path, optional
        Real image for the test tensors and cover (default: the bundled MoNuSeg sample).
    name, authors : optional
        Package name and author names.
    data_citation, data_licence : str
        Training data reference and licence (documentation and citations).
    licence : str
        SPDX licence of the package.
    torchscript : bool
        Also write TorchScript weights when the base weights are embedded.

    Returns
    -------
    Path written.
    """
    _require_bioimageio(out)
    from bioimageio.spec import save_bioimageio_package, save_bioimageio_package_as_folder
    from bioimageio.spec.model import v0_5

    from .bioimageio_architecture import AmaSamProbabilities
    from .model_folder import load_model

    out = Path(out)
    folder = read_model_folder(model_dir)
    embedded = include_base or folder.model.backbone == "tiny"
    base = dict(folder.base_checkpoint)
    if not embedded and not base.get("name"):
        raise PackageError(
            f"{folder.path}: trained without an official SAM checkpoint (random encoder), "
            "so only --include-base can make a complete package"
        )
    if not embedded:
        # Fail now, not at import, if the recorded checkpoint is not the one on disk.
        resolve_base_checkpoint(folder, checkpoint)
    model, folder = load_model(model_dir, checkpoint=checkpoint, device="cpu")
    network = AmaSamProbabilities.wrapping(model)

    size = folder.model.image_size
    if test_image is None:
        test_image = Path(__file__).parent / "_sample_data" / "monuseg_breast.png"
    test_input = _test_crop(Path(test_image), size)
    with torch.no_grad():
        test_output = network(torch.from_numpy(test_input)).numpy()
    channels = list(OUTPUT_CHANNELS[: test_output.shape[1]])

    if embedded:
        state = {k: v.contiguous() for k, v in network.state_dict().items()}
        arch_kwargs: dict[str, Any] = {"model_config": folder.model.to_dict(), "base_checkpoint": None}
    else:
        state = {f"net.{k}": v for k, v in model.trainable_state_dict().items()}
        base_record = {"name": base["name"], "sha256": base.get("sha256")}
        arch_kwargs = {"model_config": folder.model.to_dict(), "base_checkpoint": base_record}

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        stage = Path(tmp) / "stage"
        stage.mkdir()
        torch.save(state, stage / "weights.pt")
        shutil.copyfile(Path(__file__).parent / "bioimageio_architecture.py",
                        stage / "bioimageio_architecture.py")
        (stage / "environment.yaml").write_text(_environment())
        np.save(stage / "test_input.npy", test_input)
        np.save(stage / "test_output.npy", test_output)
        import imageio.v3 as iio

        iio.imwrite(stage / "cover.png", _cover(test_input, test_output, folder.thresholds))
        data_citation = data_citation or _training_data_text(folder)
        (stage / "README.md").write_text(
            _documentation(folder, channels, base, embedded, data_citation, data_licence),
            encoding="utf-8",
        )
        scripted = None
        if embedded and torchscript:
            scripted = _trace(network, test_input, test_output, stage / "weights_torchscript.pt")

        descr = _describe(
            v0_5, stage, folder, channels, arch_kwargs, embedded, scripted, base,
            name=name, authors=authors, data_citation=data_citation,
            data_licence=data_licence, licence=licence,
        )
        target = Path(tmp) / ("package.zip" if out.suffix == ".zip" else "package")
        try:
            if out.suffix == ".zip":
                save_bioimageio_package(descr, output_path=target)
            else:
                save_bioimageio_package_as_folder(descr, output_path=target)
        except Exception as exc:  # pydantic/IO errors: one line naming the target
            raise PackageError(f"{out}: cannot write the bioimage.io package ({exc})") from None
        if out.is_dir() and out.suffix != ".zip":
            shutil.rmtree(out)
        os.replace(target, out)
    return out


def _trace(network, test_input: np.ndarray, test_output: np.ndarray, path: Path) -> bool:
    """TorchScript by tracing; kept only if it reproduces the eager output. Returns success.

    The traced copy uses SAM's own attention code (``fast_attention=False``): the fast path
    calls oneDNN kernels the tracer cannot record; the weights are the same tensors.
    """
    import dataclasses
    import warnings

    from .bioimageio_architecture import AmaSamProbabilities
    from .model.amasam import AmaSam
    from .model.backbone import MODEL_REGISTRY

    try:
        cfg = dataclasses.replace(network.net.cfg, fast_attention=False)
        plain = AmaSamProbabilities.wrapping(AmaSam(cfg, MODEL_REGISTRY[cfg.backbone](cfg)))
        plain.load_state_dict(network.state_dict())
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks
            traced = torch.jit.trace(plain, torch.from_numpy(test_input), check_trace=False)
            again = traced(torch.from_numpy(test_input)).numpy()
    except Exception:  # noqa: BLE001 - a model that does not trace ships state-dict weights only
        return False
    if not np.allclose(again, test_output, atol=1e-4):
        return False
    traced.save(str(path))
    return True


def _describe(v0_5, stage: Path, folder: ModelFolder, channels: list[str], arch_kwargs: dict,
              embedded: bool, scripted: bool | None, base: dict, *, name, authors,
              data_citation, data_licence, licence):
    """The ``v0_5.ModelDescr`` of the staged files."""
    from bioimageio.spec.model.v0_5 import (
        ArchitectureFromFileDescr,
        Author,
        AxisId,
        BatchAxis,
        ChannelAxis,
        CiteEntry,
        EnsureDtypeDescr,
        EnsureDtypeKwargs,
        FileDescr,
        Identifier,
        InputTensorDescr,
        IntervalOrRatioDataDescr,
        ModelDescr,
        OutputTensorDescr,
        PytorchStateDictWeightsDescr,
        SizeReference,
        SpaceInputAxis,
        SpaceOutputAxis,
        TensorId,
        TorchscriptWeightsDescr,
        Version,
        WeightsDescr,
    )

    cfg = folder.model
    size = cfg.image_size
    scale = float(folder.mpp) if folder.mpp else 1.0
    unit = "micrometer" if folder.mpp else None

    def space_in(axis: str):
        return SpaceInputAxis(id=AxisId(axis), size=size, scale=scale, unit=unit)

    def space_out(axis: str):
        return SpaceOutputAxis(id=AxisId(axis), size=SizeReference(tensor_id=TensorId("image"),
                               axis_id=AxisId(axis)), scale=scale, unit=unit)

    image = InputTensorDescr(
        id=TensorId("image"),
        description=f"RGB H&E on the 0-255 scale, {size}x{size} px"
        + (f" at {folder.mpp} um/px" if folder.mpp else ""),
        axes=[BatchAxis(), ChannelAxis(channel_names=[Identifier(c) for c in ("R", "G", "B")]),
              space_in("y"), space_in("x")],
        test_tensor=FileDescr(source=stage / "test_input.npy"),
        data=IntervalOrRatioDataDescr(type="float32", range=(0.0, 255.0)),
        preprocessing=[EnsureDtypeDescr(kwargs=EnsureDtypeKwargs(dtype="float32"))],
    )
    output = OutputTensorDescr(
        id=TensorId("probabilities"),
        description="sigmoid maps: " + ", ".join(channels) + " (post-processing: see README)",
        axes=[BatchAxis(), ChannelAxis(channel_names=[Identifier(c) for c in channels]),
              space_out("y"), space_out("x")],
        test_tensor=FileDescr(source=stage / "test_output.npy"),
        data=IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
    )
    pytorch_version = Version(torch.__version__.split("+")[0])
    weights = WeightsDescr(
        pytorch_state_dict=PytorchStateDictWeightsDescr(
            source=stage / "weights.pt",
            architecture=ArchitectureFromFileDescr(
                source=stage / "bioimageio_architecture.py",
                callable=Identifier(ARCHITECTURE_CALLABLE),
                kwargs=json.loads(json.dumps(arch_kwargs)),
            ),
            pytorch_version=pytorch_version,
            dependencies=FileDescr(source=stage / "environment.yaml"),
            strict=embedded,
        ),
        torchscript=(
            TorchscriptWeightsDescr(source=stage / "weights_torchscript.pt",
                                    pytorch_version=pytorch_version, parent="pytorch_state_dict")
            if scripted else None
        ),
    )
    cite = [CiteEntry(text=text, url=url) for text, url in CITATIONS]
    cite.append(CiteEntry(text=f"Training data: {data_citation} Licence: {data_licence}.",
                          url="https://github.com/napari-amasam/napari-amasam"))
    section = {
        "format_version": PACKAGE_FORMAT_VERSION,
        "package_version": __version__,
        "model": cfg.to_dict(),
        "thresholds": folder.thresholds.to_dict(),
        "mpp": folder.mpp,
        "data_mpp": folder.data_mpp,  # the scale inputs of unknown pixel size are taken at
        "normalisation": SAM_NORMALISATION,
        "output_channels": channels,
        "base_checkpoint": {"name": base.get("name"), "sha256": base.get("sha256"),
                            "embedded": embedded},
        "training_data": {"citation": data_citation, "licence": data_licence},
    }
    try:
        return ModelDescr(
            name=name or f"AMA-SAM nuclei {cfg.backbone} {folder.path.name}"[:128],
            description="H&E nuclei segmentation: Segment Anything with adapters and an HR-Decoder "
            "(AMA-SAM), exported by napari-amasam",
            authors=[Author(name=a) for a in (authors or ["napari-amasam user"])],
            cite=cite,
            license=licence,
            documentation=FileDescr(source=stage / "README.md"),
            covers=[FileDescr(source=stage / "cover.png")],
            tags=["nuclei", "instance-segmentation", "histopathology", "H&E", "segment-anything",
                  "napari-amasam", "pytorch"],
            inputs=[image],
            outputs=[output],
            weights=weights,
            config={
                "bioimageio": {"architecture_type": "SAM ViT + adapters", "task": "segmentation",
                               "target_structure": ["nuclei"], "modality": "brightfield H&E"},
                CONFIG_KEY: section,
            },
        )
    except Exception as exc:  # pydantic ValidationError: one line
        lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        raise PackageError(
            f"{folder.path}: invalid bioimage.io description ({'; '.join(lines[:4])})"
        ) from None


# ----------------------------------------------------------------------------- import


def read_package_section(path: str | Path) -> tuple[Any, dict]:
    """Load a package's description and its ``config.napari_amasam`` section.

    Raises
    ------
    PackageError
        Not a valid bioimage.io model, or not one of this plugin (names its architecture).
    """
    _require_bioimageio(path)
    from bioimageio.spec import InvalidDescr, load_model_description

    try:
        descr = load_model_description(str(path), perform_io_checks=False)
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes one line
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PackageError(f"{path}: not a readable bioimage.io model ({msg})") from None
    if isinstance(descr, InvalidDescr):
        raise PackageError(f"{path}: invalid bioimage.io model description")
    config = descr.config.model_dump() if hasattr(descr.config, "model_dump") else dict(descr.config)
    section = config.get(CONFIG_KEY)
    if not section:
        arch = "?"
        w = descr.weights.pytorch_state_dict
        if w is not None:
            arch = str(getattr(w.architecture, "callable", "?"))
        formats = ", ".join(k for k, v in descr.weights if v is not None)
        raise PackageError(
            f"{path}: bioimage.io model '{descr.name}' was not exported by napari-amasam "
            f"(architecture {arch}, weights {formats}); only AMA-SAM packages can be loaded"
        )
    if int(section.get("format_version", 0)) > PACKAGE_FORMAT_VERSION:
        raise PackageError(f"{path}: made by a newer napari-amasam (package format "
                           f"{section.get('format_version')}); update the plugin")
    return descr, section


def _folder_from_section(path: Path, descr: Any, section: dict) -> ModelFolder:
    try:
        cfg = ModelConfig.from_dict(section["model"])
        thresholds = PostprocessConfig.from_dict(section["thresholds"])
    except (ConfigError, KeyError, TypeError) as exc:
        raise PackageError(f"{path}: invalid napari_amasam config ({exc})") from None
    base = section.get("base_checkpoint") or {}
    for key in ("mpp", "data_mpp"):
        value = section.get(key)
        if not valid_mpp(value):  # NaN and inf included
            raise PackageError(f"{path}: invalid napari_amasam config ({key} must be a "
                               f"positive finite number or null, not {value!r})")
    return ModelFolder(
        path=path,
        model=cfg,
        thresholds=thresholds,
        train=None,
        base_checkpoint={k: base.get(k) for k in ("name", "sha256", "embedded")},
        mpp=section.get("mpp"),
        data=section.get("training_data") or {},
        meta={"package_version": section.get("package_version"), "bioimageio_name": descr.name,
              "normalisation": section.get("normalisation")},
        data_mpp=section.get("data_mpp"),  # absent from older packages: unknown
    )


def read_package(path: str | Path) -> ModelFolder:
    """What a package says about its model (architecture, thresholds, mpp), no weights read:
    the package counterpart of ``model_folder.read_model_folder``."""
    path = Path(path)
    descr, section = read_package_section(path)
    return _folder_from_section(path, descr, section)


def load_model_package(
    path: str | Path,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
):
    """Rebuild the network of a package exported by :func:`export_model_package`.

    Parameters
    ----------
    path : path
        The package (``.zip`` or folder).
    checkpoint : path, optional
        The official SAM checkpoint for packages that do not embed it (else it is looked up
        by name + sha256, see ``bioimageio_architecture.find_base_checkpoint``).
    device : str or torch.device

    Returns
    -------
    (AmaSam, ModelFolder)
        As ``model_folder.load_model``; ``ModelFolder.path`` is the package path.
    """
    from bioimageio.spec.utils import get_reader

    from .bioimageio_architecture import find_base_checkpoint
    from .device import resolve_device
    from .model import build_amasam
    from .model.amasam import AmaSam
    from .model.backbone import MODEL_REGISTRY
    from .model_folder import sha256_file

    path = Path(path)
    descr, section = read_package_section(path)
    folder = _folder_from_section(path, descr, section)
    cfg, base = folder.model, folder.base_checkpoint
    weights = descr.weights.pytorch_state_dict
    if weights is None:
        raise PackageError(f"{path}: no pytorch_state_dict weights")
    try:
        raw = get_reader(weights.source).read()
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise PackageError(f"{path}: cannot read its weights ({exc})") from None
    state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    if base.get("embedded"):
        model = AmaSam(cfg, MODEL_REGISTRY[cfg.backbone](cfg))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            first = (missing or unexpected)[0]
            raise PackageError(f"{path}: weights do not fit the recorded architecture "
                               f"({len(missing)} missing, {len(unexpected)} unexpected, e.g. {first})")
    else:
        if checkpoint is not None:
            found = Path(checkpoint)
            expected = base.get("sha256")
            if not found.is_file():
                raise CheckpointError(f"{found}: base SAM checkpoint not found")
            if expected and sha256_file(found) != expected:
                raise CheckpointError(f"{found}: sha256 does not match the {expected[:12]}... "
                                      f"this package was trained on ({base.get('name')})")
        else:
            try:
                found = find_base_checkpoint(base.get("name") or "?", base.get("sha256"),
                                             [path.parent])
            except FileNotFoundError as exc:
                raise CheckpointError(f"{path}: needs {exc}; or pass it with --checkpoint") from None
        model = build_amasam(cfg, checkpoint=found)
        model.load_trainable_state_dict(state, f"{path} weights")
    if not isinstance(device, torch.device):
        device = resolve_device(device)
    return model.to(device).eval(), folder


def validate_model_package(path: str | Path, weight_format: str | None = None) -> dict:
    """Run ``bioimageio.core.test_model`` (format checks + test-output reproduction).

    Returns
    -------
    dict with ``passed`` (bool), ``status``, ``failures`` (one line each) and ``checks``
    (``"status: name"`` of every check, e.g. ``"passed: Reproduce test outputs from test
    inputs (torchscript)"``; without ``weight_format`` every weight format is run).
    """
    _require_bioimageio(path)
    from bioimageio.core import test_model

    summary = test_model(str(path), weight_format=weight_format)
    failures, checks = [], []
    for detail in summary.details:
        checks.append(f"{detail.status}: {detail.name}")
        if detail.status == "failed":
            errors = "; ".join(str(e.msg) for e in (detail.errors or []))[:300]
            failures.append(f"{detail.name}: {errors}")
    return {"passed": summary.status == "passed", "status": summary.status,
            "failures": failures, "checks": checks}
