import os

# Tests never touch a GPU and run long jobs synchronously.
os.environ.setdefault("NAPARI_AMASAM_NOTHREADS", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
