"""The ``<image> nuclei`` Labels layer: measured off the UI thread, never overwriting edits.

A segmentation's per-nucleus table (``export.nucleus_measurements``) costs about a second
on a 2048 px image, so :func:`measure_nuclei` runs in the worker and the UI thread only
hands the finished arrays to napari (:func:`write_nuclei_layer`).

A layer the user has painted in (or corrected with prompts) since the plugin last wrote it
is never overwritten: the new result goes to a new layer (``<image> nuclei (2)``, ...) and
a warning says so. The plugin recognises its own writes by a digest of the data it wrote
(``layer.metadata["amasam_digest"]``).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

DIGEST_KEY = "amasam_digest"


def labels_digest(labels: np.ndarray) -> str:
    """A short digest of a label array's values and shape."""
    array = np.ascontiguousarray(np.asarray(labels))
    digest = hashlib.blake2b(array.view(np.uint8).reshape(-1), digest_size=16)
    digest.update(repr((array.shape, array.dtype.str)).encode())
    return digest.hexdigest()


def measure_nuclei(labels: np.ndarray, image: np.ndarray, source: str = "image"):
    """Per-nucleus table (pandas DataFrame) for napari's ``features``; worker-side.

    ``index`` (first column) repeats ``label``: napari looks nuclei up by it.
    """
    import pandas as pd

    from ..data.io import as_rgb_uint8
    from ..export import nucleus_measurements

    features = pd.DataFrame(nucleus_measurements(labels, as_rgb_uint8(image, source)))
    features.insert(0, "index", features["label"].to_numpy())
    return features


def was_edited(layer) -> bool:
    """Whether ``layer``'s data differs from what the plugin last wrote into it."""
    written = (layer.metadata or {}).get(DIGEST_KEY)
    return written is None or written != labels_digest(np.asarray(layer.data))


def free_name(viewer, name: str) -> str:
    """``name``, or ``name (2)``, ``name (3)``, ... whichever no layer has."""
    if name not in viewer.layers:
        return name
    n = 2
    while f"{name} ({n})" in viewer.layers:
        n += 1
    return f"{name} ({n})"


def write_nuclei_layer(viewer, image_layer, labels: np.ndarray, features: Any,
                       model: str, target=None):
    """Put ``labels`` into ``target`` (default ``<image> nuclei``) or a new layer, in the
    smallest unsigned dtype that holds its ids (``_labels.smallest_label_dtype``).

    Returns ``(layer, kept)``: ``kept`` is the edited layer that was left alone (None when
    the target was updated in place or did not exist).
    """
    from .._labels import compact_labels

    labels = compact_labels(labels)  # a no-op for a worker's result (compacted there)
    name = f"{image_layer.name} nuclei"
    if target is None and name in viewer.layers:
        target = viewer.layers[name]
    kept = None
    if target is not None and target in viewer.layers and not was_edited(target):
        target.data = labels
        target.features = features
        layer = target
    else:
        if target is not None and target in viewer.layers:
            kept = target
        ndim = 2
        layer = viewer.add_labels(
            labels, name=free_name(viewer, name), features=features,
            scale=tuple(image_layer.scale[-ndim:]),
            translate=tuple(image_layer.translate[-ndim:]),
            units=tuple(image_layer.units[-ndim:]),
            metadata={"source_image": image_layer.name},
        )
    layer.metadata["model"] = model
    layer.metadata["source_image"] = image_layer.name
    layer.metadata[DIGEST_KEY] = labels_digest(labels)
    # Painting a new nucleus (M: max id + 1) must work at 255 nuclei in a uint8 layer too.
    layer.bind_key("m", new_label, overwrite=True)
    return layer, kept


def make_room_for(layer, new_id: int) -> None:
    """Widen ``layer``'s dtype if ``new_id`` does not fit in it (napari would wrap id 256
    of a uint8 layer to 0). The values, and the undo history of earlier edits, stay."""
    from .._labels import smallest_label_dtype

    dtype = np.asarray(layer.data).dtype
    if np.issubdtype(dtype, np.integer) and new_id <= np.iinfo(dtype).max:
        return
    layer.data = np.asarray(layer.data).astype(smallest_label_dtype(new_id))


def new_label(layer) -> None:
    """napari's "new label" key (M) for a nuclei layer: select the largest id + 1, widening
    the layer's dtype first when that id does not fit (napari itself refuses it)."""
    new_id = int(np.max(np.asarray(layer.data))) + 1
    make_room_for(layer, new_id)
    layer.selected_label = new_id
