"""Training augmentations in numpy, driven by a ``np.random.Generator`` (reproducible).

Geometric steps (flips, 90-degree rotations) move pixels without interpolation, so labels
stay exact. Colour steps (HED stain jitter, brightness/contrast, blur) touch the image only.
``strength`` is the stain-jitter amplitude: 0.05 on the primary domain, 0.1 on auxiliaries
(method.md 1.3: milder on the primary).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

PRIMARY_STRENGTH = 0.05
AUXILIARY_STRENGTH = 0.1


def flip_rotate(rng: np.random.Generator, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Apply one random flip/90-degree rotation (one of 8) identically to every array.

    Parameters
    ----------
    rng : np.random.Generator
    *arrays : ndarray
        Each ``H x W`` or ``H x W x C`` (the first two axes are spatial).

    Returns
    -------
    tuple of ndarray
        Transformed contiguous copies, same order. Square inputs keep their shape;
        otherwise odd rotations swap H and W.
    """
    quarter_turns = int(rng.integers(0, 4))
    flip = bool(rng.integers(0, 2))
    out = []
    for array in arrays:
        if flip:
            array = array[:, ::-1]
        array = np.rot90(array, quarter_turns, axes=(0, 1))
        out.append(np.ascontiguousarray(array))
    return tuple(out)


def hed_jitter(
    image: np.ndarray, rng: np.random.Generator, strength: float, mask: np.ndarray | None = None
) -> np.ndarray:
    """Perturb haematoxylin, eosin and DAB concentrations independently.

    Colour deconvolution with skimage's H&E-DAB matrix (``skimage.color.hed_from_rgb``): each
    stain concentration c becomes ``c * U(1 - a, 1 + a) + U(-a, a) * p99(c)`` with
    a = ``strength``; the shift is relative to the channel's own 99th percentile because
    stain units are small and image-dependent. As deconvolution is linear in optical density
    (OD = -log(I/255)), the whole jitter is one 3x3 matrix and an offset applied to OD, which
    is much faster than ``rgb2hed``/``hed2rgb`` round trips on 1024x1024 crops.

    Parameters
    ----------
    image : ndarray
        ``H x W x 3`` RGB, uint8 or float on the 0-255 scale.
    rng : np.random.Generator
    strength : float
        Jitter amplitude a (0 returns the image unchanged, as float32).
    mask : ndarray, optional
        ``H x W`` bool: pixels used for the percentile (leave out black padding).

    Returns
    -------
    ndarray
        ``H x W x 3`` float32 in [0, 255].
    """
    from skimage.color import hed_from_rgb, rgb_from_hed

    image = np.asarray(image, np.float32)
    if strength <= 0:
        return image
    # Intensity 1/255 is the darkest value (OD ~5.5): keeps log finite on black pixels.
    optical_density = -np.log(np.clip(image, 1.0, 255.0) / 255.0)
    scale = rng.uniform(1.0 - strength, 1.0 + strength, size=3)
    shift_fraction = rng.uniform(-strength, strength, size=3)

    od_pixels = optical_density[mask] if mask is not None and mask.any() else optical_density
    od_pixels = od_pixels.reshape(-1, 3)
    # A strided subsample of ~20k pixels is plenty for a percentile and keeps this cheap.
    sample = od_pixels[:: max(1, len(od_pixels) // 20000)] @ hed_from_rgb
    shift = shift_fraction * np.percentile(np.abs(sample), 99, axis=0)

    # OD' = ((OD @ M) * scale + shift) @ M^-1 = OD @ (M diag(scale) M^-1) + shift @ M^-1
    matrix = (hed_from_rgb * scale) @ rgb_from_hed
    offset = shift @ rgb_from_hed
    jittered = optical_density @ matrix.astype(np.float32) + offset.astype(np.float32)
    return np.clip(255.0 * np.exp(-jittered), 0.0, 255.0).astype(np.float32)


def brightness_contrast(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Random contrast ``U(1 - a, 1 + a)`` about the mean and brightness shift ``U(-a, a) * 255``.

    Parameters
    ----------
    image : ndarray
        ``H x W x 3`` on the 0-255 scale.
    rng : np.random.Generator
    strength : float
        Amplitude a.

    Returns
    -------
    ndarray
        ``H x W x 3`` float32 clipped to [0, 255].
    """
    image = np.asarray(image, np.float32)
    contrast = rng.uniform(1.0 - strength, 1.0 + strength)
    brightness = rng.uniform(-strength, strength) * 255.0
    mean = image.mean()
    return np.clip((image - mean) * contrast + mean + brightness, 0.0, 255.0).astype(np.float32)


def random_blur(
    image: np.ndarray, rng: np.random.Generator, probability: float = 0.2, max_sigma: float = 1.0
) -> np.ndarray:
    """With the given probability, Gaussian-blur each channel with sigma ~ U(0.3, max_sigma).

    Parameters
    ----------
    image : ndarray
        ``H x W x 3``.

    Returns
    -------
    ndarray
        ``H x W x 3`` float32.
    """
    image = np.asarray(image, np.float32)
    # Always draw both numbers so the random stream does not depend on the outcome.
    apply, sigma = rng.random(), rng.uniform(0.3, max_sigma)
    if apply >= probability:
        return image
    return ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0))


def augment_sample(
    image: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    strength: float = PRIMARY_STRENGTH,
    valid: np.ndarray | None = None,
    blur_probability: float = 0.2,
    targets: np.ndarray | None = None,
) -> tuple[np.ndarray, ...]:
    """Full augmentation of one training crop.

    Parameters
    ----------
    image : ndarray
        ``H x W x 3`` uint8 or float (0-255).
    labels : ndarray
        ``H x W`` int instance map (moved, never interpolated).
    rng : np.random.Generator
    strength : float
        Stain/colour jitter amplitude (0.05 primary, 0.1 auxiliary).
    valid : ndarray, optional
        ``H x W`` bool, False on padding; padding is reset to 0 after the colour steps so the
        network sees the same black padding as at inference.
    blur_probability : float
        Chance of a mild Gaussian blur.
    targets : ndarray, optional
        ``H x W x C`` per-pixel targets computed before cropping; moved with the labels.

    Returns
    -------
    image, labels, valid[, targets] : ndarray
        ``H x W x 3`` float32 (0-255), ``H x W`` labels (input dtype), ``H x W`` bool, and
        the moved targets when given.
    """
    if valid is None:
        valid = np.ones(labels.shape, bool)
    extra = () if targets is None else (targets,)
    image, labels, valid, *moved = flip_rotate(rng, image, labels, valid, *extra)
    image = hed_jitter(image, rng, strength, mask=valid)
    image = brightness_contrast(image, rng, strength)
    image = random_blur(image, rng, blur_probability)
    image[~valid] = 0.0
    return (image, labels, valid, *moved)
