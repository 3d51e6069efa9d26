"""Microns per pixel of a slide from its metadata.

Sources, in the order tried:

- OpenSlide properties ``openslide.mpp-x`` / ``openslide.mpp-y`` (every vendor format
  OpenSlide knows that records a resolution);
- OME-XML ``PhysicalSizeX`` / ``PhysicalSizeY`` with their units (OME-TIFF);
- the Aperio ``MPP = ...`` field of an SVS ImageDescription (when read without OpenSlide);
- the TIFF ``XResolution`` / ``YResolution`` tags with ``ResolutionUnit`` inch or centimetre;
- for OME-Zarr, the NGFF multiscales ``scale`` of the ``y`` / ``x`` axes with their ``unit``.

Many plain TIFFs carry a placeholder resolution (72 or 1 dots per inch, i.e. 353 or 25400
microns per pixel); values outside :data:`PLAUSIBLE_MPP` are treated as absent, so such a
file asks for an explicit ``--mpp`` instead of being processed at a nonsense scale.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

#: Range of microns per pixel accepted from metadata (100x oil immersion to a 1x overview).
PLAUSIBLE_MPP = (0.02, 20.0)

_UNIT_TO_UM = {
    "m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "um": 1.0, "μm": 1.0, "nm": 1e-3,
    "micron": 1.0, "microns": 1.0,
    # NGFF axis units (UDUNITS-2 names).
    "meter": 1e6, "centimeter": 1e4, "millimeter": 1e3, "micrometer": 1.0, "nanometer": 1e-3,
    "angstrom": 1e-4,
}


def plausible(value: float | None) -> float | None:
    """``value`` as a float when it is a finite mpp inside :data:`PLAUSIBLE_MPP`, else None."""
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(value) or not PLAUSIBLE_MPP[0] <= value <= PLAUSIBLE_MPP[1]:
        return None
    return value


def _mean_xy(x: float | None, y: float | None) -> float | None:
    """Mean of the two axes (slides are square-pixelled; a missing axis copies the other)."""
    x, y = plausible(x), plausible(y)
    if x is None and y is None:
        return None
    if x is None or y is None:
        return x if x is not None else y
    return (x + y) / 2


def mpp_from_openslide(properties: Mapping[str, str]) -> float | None:
    """Microns per pixel from OpenSlide's standard properties, or None."""
    return _mean_xy(properties.get("openslide.mpp-x"), properties.get("openslide.mpp-y"))


def mpp_from_ome(ome_xml: str | None) -> float | None:
    """Microns per pixel from the first ``<Pixels>`` element of OME-XML, or None."""
    if not ome_xml:
        return None
    match = re.search(r"<(?:\w+:)?Pixels\b[^>]*>", ome_xml)
    if match is None:
        return None
    element = match.group(0)

    def size(axis: str) -> float | None:
        value = re.search(rf'PhysicalSize{axis}="([^"]+)"', element)
        if value is None:
            return None
        unit = re.search(rf'PhysicalSize{axis}Unit="([^"]+)"', element)
        factor = _UNIT_TO_UM.get(unit.group(1) if unit else "µm")
        return None if factor is None else float(value.group(1)) * factor

    try:
        return _mean_xy(size("X"), size("Y"))
    except ValueError:
        return None


def mpp_from_aperio(description: str | None) -> float | None:
    """Microns per pixel from an Aperio SVS ImageDescription (``|MPP = 0.4990|``), or None."""
    if not description:
        return None
    match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description)
    return plausible(match.group(1)) if match else None


def mpp_from_tiff_resolution(
    x_resolution: tuple[int, int] | float | None,
    y_resolution: tuple[int, int] | float | None,
    unit: int | None,
) -> float | None:
    """Microns per pixel from TIFF resolution tags (pixels per unit), or None.

    Parameters
    ----------
    x_resolution, y_resolution : (numerator, denominator) or float or None
    unit : int or None
        TIFF ResolutionUnit: 2 = inch, 3 = centimetre (1 = none: no physical size).
    """
    um_per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit) if unit is not None else 0)
    if um_per_unit is None:
        return None

    def to_mpp(resolution) -> float | None:
        if resolution is None:
            return None
        if isinstance(resolution, tuple):
            numerator, denominator = resolution
            if not numerator or not denominator:
                return None
            resolution = numerator / denominator
        return um_per_unit / float(resolution) if resolution else None

    return _mean_xy(to_mpp(x_resolution), to_mpp(y_resolution))


def mpp_from_ngff(unit_y: str | None, unit_x: str | None, scale_y: float,
                  scale_x: float) -> tuple[float | None, str]:
    """Microns per pixel from an NGFF level's ``y`` / ``x`` scale and the axes' units.

    Returns
    -------
    (mpp or None, why it is None: ``""`` when found)
    """
    factors = []
    for name, unit in (("y", unit_y), ("x", unit_x)):
        if not unit:
            return None, f"axis {name} has no unit"
        factor = _UNIT_TO_UM.get(str(unit).lower())
        if factor is None:
            return None, f"axis {name} has unit {unit!r}, not a length"
        factors.append(factor)
    value = _mean_xy(scale_y * factors[0], scale_x * factors[1])
    if value is None:
        return None, (f"scale {scale_y * factors[0]:.4g} x {scale_x * factors[1]:.4g} µm per "
                      f"pixel is outside {PLAUSIBLE_MPP[0]}-{PLAUSIBLE_MPP[1]}")
    return value, ""
