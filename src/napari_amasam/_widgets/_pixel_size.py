"""An image layer's pixel size in microns: layer metadata, layer scale, or the file's tags."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

#: Length units napari layers may carry, in microns.
_MICRONS = {"um": 1.0, "µm": 1.0, "micrometer": 1.0, "micron": 1.0, "nm": 1e-3,
            "nanometer": 1e-3, "mm": 1e3, "millimeter": 1e3}


def _from_scale(layer) -> float | None:
    try:
        units = [str(u).replace("micrometer", "um") for u in layer.units[-2:]]
        scale = [float(s) for s in layer.scale[-2:]]
    except Exception:
        return None
    factors = [_MICRONS.get(u.strip().lower()) for u in units]
    if None in factors:  # "pixel" (napari's default) or an unknown unit
        return None
    mpp = [s * f for s, f in zip(scale, factors, strict=True)]
    return mpp[-1] if mpp[-1] > 0 else None


def mpp_from_file(path: str) -> float | None:
    """Microns per pixel from a TIFF's OME ``PhysicalSizeX``, Aperio ``MPP`` or
    resolution tags (None when the file says nothing usable)."""
    if not path or not str(path).lower().endswith((".tif", ".tiff", ".svs")):
        return None
    try:
        import re

        import tifffile

        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            description = page.description or ""
            if tif.is_ome:
                match = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata or "")
                if match:
                    return float(match.group(1))
            match = re.search(r"MPP\s*=\s*([0-9.]+)", description)
            if match:
                return float(match.group(1))
            tags = page.tags
            if "XResolution" in tags and "ResolutionUnit" in tags:
                num, den = tags["XResolution"].value
                unit = int(tags["ResolutionUnit"].value)
                per_unit = num / den if den else 0
                microns = {2: 25400.0, 3: 10000.0}.get(unit)
                if per_unit > 0 and microns:
                    return microns / per_unit
    except Exception as exc:  # unreadable tags: unknown, not an error
        log.debug("%s: no pixel size (%s)", path, exc)
    return None


def layer_mpp(layer) -> float | None:
    """The layer's microns per pixel: ``metadata["mpp"]``, else its scale when its units
    are lengths, else the source file's tags; None when unknown."""
    mpp = (layer.metadata or {}).get("mpp")
    if mpp:
        return float(mpp)
    from_scale = _from_scale(layer)
    if from_scale:
        return from_scale
    path = getattr(getattr(layer, "source", None), "path", None)
    return mpp_from_file(str(path)) if path else None
