"""Per-object training targets for the foreground and the two distance heads.

Follows torch-em's ``PerObjectDistanceTransform(distances=True, boundary_distances=True,
foreground=True)`` (method.md section 5.1), with the normalisation stated in
architecture.md: every distance is scaled per object so its range inside the object is
exactly [0, 1].
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _object_distances(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre and inverted boundary distances of one object.

    Parameters
    ----------
    mask : ndarray
        ``h x w`` bool, the object padded by at least one background pixel on every side.

    Returns
    -------
    centre, boundary : ndarray
        ``h x w`` float32 each, values in [0, 1] inside the object (outside: undefined).
    """
    # Distance of each object pixel to the nearest background pixel (border pixels: 1).
    boundary_distance = ndimage.distance_transform_edt(mask)
    rows, cols = np.nonzero(mask)
    inside = boundary_distance[rows, cols]

    # Centre = the centroid's pixel; for non-convex objects (the centroid falls outside)
    # the deepest pixel instead, so the centre always lies inside its own object.
    centre_row = int(np.rint(rows.mean()))
    centre_col = int(np.rint(cols.mean()))
    if not mask[centre_row, centre_col]:
        deepest = int(np.argmax(inside))
        centre_row, centre_col = int(rows[deepest]), int(cols[deepest])
    distance_to_centre = np.hypot(rows - centre_row, cols - centre_col)

    centre = np.zeros(mask.shape, np.float32)
    farthest = distance_to_centre.max()
    if farthest > 0:
        centre[rows, cols] = distance_to_centre / farthest

    boundary = np.zeros(mask.shape, np.float32)
    depth_range = inside.max() - inside.min()
    if depth_range > 0:
        # 0 at the deepest pixel, 1 on the border; objects one or two pixels thick stay 0.
        boundary[rows, cols] = (inside.max() - inside) / depth_range
    return centre, boundary


def instance_targets(labels: np.ndarray) -> np.ndarray:
    """Foreground, normalised centre distance and inverted boundary distance per nucleus.

    Parameters
    ----------
    labels : ndarray
        ``H x W`` integer instance map (0 = background). Ids need not be sequential; each
        id is one object even if it has several pieces.

    Returns
    -------
    ndarray
        ``3 x H x W`` float32:
        0. foreground in {0, 1};
        1. distance to the object's centre divided by the largest such distance in the
           object (0 at the centre, 1 at the farthest object pixel);
        2. (largest boundary distance - boundary distance) / its range in the object
           (0 at the deepest pixel, 1 on the object border).
        Channels 1 and 2 are 0 in the background.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be H x W, got shape {labels.shape}")
    height, width = labels.shape
    targets = np.zeros((3, height, width), np.float32)
    targets[0] = labels > 0
    if not targets[0].any():
        return targets

    # find_objects allocates one slot per id up to the maximum: compact sparse ids first.
    ids = labels.astype(np.int64, copy=False)
    if ids.max() > 4 * ids.size:
        ids = np.unique(ids, return_inverse=True)[1].reshape(labels.shape)
    for index, box in enumerate(ndimage.find_objects(ids), start=1):
        if box is None:
            continue
        crop = ids[box] == index
        # Pad so the image edge counts as background for the boundary distance.
        centre, boundary = _object_distances(np.pad(crop, 1))
        centre, boundary = centre[1:-1, 1:-1], boundary[1:-1, 1:-1]
        targets[1][box][crop] = centre[crop]
        targets[2][box][crop] = boundary[crop]
    return targets
