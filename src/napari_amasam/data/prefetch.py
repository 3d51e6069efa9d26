"""Draw the next training batch on a worker thread while the current step trains.

A CPU training step leaves the cores partly idle (many small operators; ``/usr/bin/time``
reported 157 % of 200 % on 2 cores), and drawing a batch (crops, flips, stain jitter, blur,
stacking) is numpy work that releases the GIL, so the two overlap. Batches stay a function of
``(seed, step)`` (:class:`~napari_amasam.data.dataset.MultiDomainSampler`), so a run draws
exactly the batches it drew without the worker, and a resumed run those of the uninterrupted
one. Only the worker touches the sampler's datasets (their load caches) once it has started.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


class BatchPrefetcher:
    """``sampler.batch(step)`` with ``step + 1`` drawn in the background meanwhile.

    Parameters
    ----------
    sampler : MultiDomainSampler
        Anything with ``batch(step) -> dict``.
    background : bool
        Draw on a worker thread (default); False draws each batch when asked, in the caller.
    """

    def __init__(self, sampler, background: bool = True):
        self.sampler = sampler
        self._pool = (ThreadPoolExecutor(1, thread_name_prefix="amasam-batches")
                      if background else None)
        self._next: tuple[int, Future] | None = None

    def batch(self, step: int) -> dict[str, Any]:
        """The batch of ``step`` (as ``sampler.batch(step)``); starts drawing ``step + 1``.

        An error raised while drawing (a bad file read for the first time, say) is raised
        here, by the call that asks for that batch.
        """
        if self._pool is None:
            return self.sampler.batch(step)
        if self._next is not None and self._next[0] == step:
            current = self._next[1]
        else:  # the first call, or a jump (the queued batch is dropped)
            if self._next is not None:
                self._next[1].cancel()
            current = self._pool.submit(self.sampler.batch, step)
        self._next = (step + 1, self._pool.submit(self.sampler.batch, step + 1))
        return current.result()

    def close(self) -> None:
        """Stop the worker: a queued batch is dropped, one being drawn is waited for (so that
        nothing touches the sampler after this returns)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._next = None, None

    def __enter__(self) -> BatchPrefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
