"""napari dock widgets (the only Qt code in the package): Train, Segment nuclei, Evaluate.

Each widget is a ``QWidget`` taking ``napari_viewer`` and is a thin layer over the engine:
long jobs are engine generators run by :mod:`._workers` (a napari thread worker, or in the
calling thread when ``NAPARI_AMASAM_NOTHREADS=1``).
"""

from ._workers import avoid_triton_llvm_clash

# Before any engine code can import torchvision (see the function's docstring).
avoid_triton_llvm_clash()

from ._evaluate import EvaluateWidget  # noqa: E402
from ._segment import SegmentWidget  # noqa: E402
from ._train import TrainWidget  # noqa: E402

__all__ = ["EvaluateWidget", "SegmentWidget", "TrainWidget"]
