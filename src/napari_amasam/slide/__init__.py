"""Whole-slide images: open, segment and export a slide without holding it in memory.

Modules (one concept each)::

    mpp.py        microns per pixel from slide metadata
    reader.py     open a slide (OpenSlide or tifffile+zarr), read regions at any resolution
    ome_zarr.py   an OME-Zarr folder (NGFF multiscales) as a slide
    tissue.py     tissue mask at a low resolution (glass is skipped)
    regions.py    the area to segment (tissue / user polygons) cut into region tasks
    classical_threshold.py  the classical baseline's one threshold for a whole slide
    worker.py     one region: read with a halo, Predictor, keep owned nuclei, part file
    parts.py      finished regions on disk, resume
    scheduler.py  Dask distributed (LocalCluster or --scheduler ADDRESS), or serial
    writers.py    pyramidal BigTIFF labels, GeoJSON (level-0 pixels), CSV (µm)
    pipeline.py   iter_segment_slide: all of the above with progress and cancel

Needs the ``wsi`` extra for vendor formats and Dask: ``pip install napari-amasam[wsi]``.
"""
