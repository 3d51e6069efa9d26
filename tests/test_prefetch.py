"""The batch prefetcher: the batches of (seed, step), drawn on a worker thread."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from napari_amasam.data.dataset import DomainDataset, MultiDomainSampler
from napari_amasam.data.folders import find_pairs
from napari_amasam.data.prefetch import BatchPrefetcher
from napari_amasam.errors import DataError

from .helpers import CONSEP, TNBC


def _sampler(seed: int = 5) -> MultiDomainSampler:
    datasets = [DomainDataset(find_pairs(TNBC)[:2], 0), DomainDataset(find_pairs(CONSEP)[:2], 1)]
    return MultiDomainSampler(datasets, batch_size=3, primary_share=0.5, seed=seed, crop_size=48)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_prefetched_batches_are_the_samplers_in_order_and_after_a_jump():
    reference = _sampler()
    with BatchPrefetcher(_sampler()) as batches:
        for step in (0, 1, 2, 7, 8, 3):  # sequential, a jump ahead (resume), a jump back
            _assert_same(batches.batch(step), reference.batch(step))


class _RecordingSampler:
    """Records the thread and step of each draw (the prefetcher's own behaviour is tested)."""

    def __init__(self, fail_at: int | None = None):
        self.draws: list[tuple[int, str]] = []
        self.fail_at = fail_at

    def batch(self, step: int) -> dict:
        self.draws.append((step, threading.current_thread().name))
        if step == self.fail_at:
            raise DataError("bad.tif", "cannot be read")
        return {"step": torch.tensor(step)}


def test_the_next_batch_is_drawn_on_a_worker_while_the_caller_works():
    sampler = _RecordingSampler()
    batches = BatchPrefetcher(sampler)
    assert int(batches.batch(0)["step"]) == 0
    deadline = time.monotonic() + 10
    while len(sampler.draws) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [step for step, _ in sampler.draws] == [0, 1]  # drawn without being asked for
    assert int(batches.batch(1)["step"]) == 1  # the prefetched one, not drawn again
    batches.close()  # step 2 is dropped or finished: nothing draws after this
    drawn = [step for step, _ in sampler.draws]
    assert drawn in ([0, 1], [0, 1, 2])
    caller = threading.current_thread().name
    assert all(name != caller and name.startswith("amasam-batches") for _, name in sampler.draws)
    # After close, batches are drawn in the caller.
    assert int(batches.batch(9)["step"]) == 9 and sampler.draws[-1] == (9, caller)


def test_an_error_while_drawing_is_raised_by_the_call_for_that_batch():
    sampler = _RecordingSampler(fail_at=1)
    with BatchPrefetcher(sampler) as batches:
        assert int(batches.batch(0)["step"]) == 0  # step 1 fails in the background meanwhile
        with pytest.raises(DataError, match="bad.tif"):
            batches.batch(1)


def test_without_background_each_batch_is_drawn_in_the_caller():
    sampler = _RecordingSampler()
    batches = BatchPrefetcher(sampler, background=False)
    batches.batch(4)
    assert sampler.draws == [(4, threading.current_thread().name)]
