"""Run region tasks with Dask distributed: a LocalCluster by default, or an existing cluster.

The regions of a slide are independent tasks (:func:`.worker.segment_region`); Dask
schedules them on its workers (processes on this machine, or a cluster's machines with
their GPUs) and hands back results as they finish. ``scheduler="serial"`` runs them one
after the other in the calling process instead (no cluster start-up: small slides, tests,
debugging).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import AmaSamError

SERIAL = "serial"


def default_threads(workers: int) -> int:
    """Torch threads per local worker: the CPU cores shared out, at least one."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def run_tasks(function: Callable, job: Any, items: list, scheduler: str | None = None,
              workers: int = 1) -> Iterator[Any]:
    """Yield ``function(job, item)`` for every item, in the order they finish.

    Parameters
    ----------
    function : callable
        Importable (module-level) so Dask can send it to workers.
    job : picklable
        Shared settings, sent to the cluster once.
    items : list
    scheduler : str or None
        None: start a ``LocalCluster`` with ``workers`` worker processes (one thread each)
        and close it afterwards. ``"serial"``: no Dask. Otherwise the address of a running
        scheduler (``tcp://host:8786``); the cluster is left running.
    workers : int
        Local worker processes (None scheduler only).

    Closing the iterator early (cancel) cancels the tasks not yet finished.
    """
    if not items:
        return
    if scheduler == SERIAL:
        for item in items:
            yield function(job, item)
        return
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise AmaSamError("running slide regions needs Dask distributed: pip install "
                          "'napari-amasam[wsi]' (or use --scheduler serial)") from None

    cluster = None
    if scheduler:
        client = Client(scheduler, timeout="30s")
    else:
        cluster = LocalCluster(n_workers=max(1, int(workers)), threads_per_worker=1,
                               processes=True, dashboard_address=None,
                               silence_logs=logging.ERROR)
        client = Client(cluster)
    futures = []
    try:
        [job_future] = client.scatter([job], broadcast=True)
        futures = [client.submit(function, job_future, item, pure=False) for item in items]
        for future in as_completed(futures):
            yield future.result()
    finally:
        if futures:
            client.cancel(futures)
        client.close()
        if cluster is not None:
            cluster.close()
