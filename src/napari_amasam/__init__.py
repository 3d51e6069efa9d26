"""napari-amasam: fine-tune and run an AMA-SAM nuclei segmenter on H&E images.

The engine (``model``, ``data``, ``training``, ``inference``, ``metrics``, ``export``,
``cli``) imports no Qt; only ``_widgets`` does.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
