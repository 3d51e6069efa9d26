"""Structure checks from issue #9 point 5: declared dependencies are the ones the package
imports, and data flows one way (training and inference share the model folder module
below both; widgets never import the CLI)."""

from __future__ import annotations

import ast
import configparser
import re
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "napari_amasam"
SETUP_CFG = PACKAGE.parents[1] / "setup.cfg"
# Import name -> distribution name where they differ.
DISTRIBUTION = {"skimage": "scikit-image", "segment_anything": "segment-anything",
                "openslide": "openslide-python"}
# Namespace packages: the distribution is named after the first two parts (bioimageio.spec).
NAMESPACES = {"bioimageio"}
# Declared without a direct import, each for a reason.
DECLARED_FOR_A_REASON = {
    "torchvision": "segment_anything imports it; pinned beside torch",
    "npe2": "napari reads the plugin manifest (napari.yaml) through it",
}


def _imports(path: Path) -> set[str]:
    """Absolute top-level module names imported anywhere in ``path`` (also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.level == 0:
                names.add(node.module)
            else:  # resolve the relative import against the file's package
                parts = path.relative_to(PACKAGE.parent).with_suffix("").parts[: -node.level]
                names.add(".".join([*parts, node.module]))
    return names


def _names(value: str) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", line.strip(), maxsplit=1)[0].lower()
            for line in value.strip().splitlines() if line.strip() and not line.strip().startswith("#")}


def _requirements() -> tuple[set[str], set[str]]:
    """(install_requires, everything the optional extras add except the testing tools)."""
    parser = configparser.ConfigParser()
    parser.read(SETUP_CFG)
    extras = set()
    for name, value in parser["options.extras_require"].items():
        if name != "testing":
            extras |= _names(value)
    return _names(parser["options"]["install_requires"]), extras


def test_declared_dependencies_are_the_imported_ones():
    used = set()
    for path in PACKAGE.rglob("*.py"):
        for name in _imports(path):
            top = name.split(".")[0]
            if top in NAMESPACES:
                top = ".".join(name.split(".")[:2])
            if top != "napari_amasam" and top not in sys.stdlib_module_names:
                used.add(DISTRIBUTION.get(top, top).lower())
    declared, extras = _requirements()
    missing = used - declared - extras
    assert missing == set(), f"imported but not declared: {sorted(missing)}"
    unused = declared - used - set(DECLARED_FOR_A_REASON)
    assert unused == set(), f"declared but never imported: {sorted(unused)}"


def _package_imports(subpackage: str) -> dict[str, set[str]]:
    root = PACKAGE / subpackage
    files = [root] if root.suffix == ".py" else sorted(root.rglob("*.py"))
    return {str(p.relative_to(PACKAGE)): _imports(p) for p in files}


def test_data_flows_one_way():
    crossings = []
    for sub in ("inference", "model", "data", "model_folder.py", "export.py"):
        for file, names in _package_imports(sub).items():
            crossings += [f"{file} imports {n}" for n in names
                          if n.startswith(("napari_amasam.training", "napari_amasam._widgets",
                                           "napari_amasam.cli"))]
    for file, names in _package_imports("_widgets").items():
        crossings += [f"{file} imports {n}" for n in names if n == "napari_amasam.cli"]
    assert crossings == []
