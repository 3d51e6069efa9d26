"""Run an engine generator off the UI thread, or synchronously when threads are switched off.

The engine (trainer, predictor) reports progress by yielding record dicts. The widgets hand
such a generator to :func:`start_job`, which either wraps it in napari's
``thread_worker`` (records reach the widget on the UI thread through Qt's ``yielded``
signal) or, when the environment variable ``NAPARI_AMASAM_NOTHREADS`` is set to anything but
``""``/``"0"``, iterates it right away in the calling thread with the same callbacks. Tests
use the second mode: the code path is the same, only the thread differs.

Errors are caught in the worker and handed to ``on_errored`` through the ``returned`` signal:
napari relays a worker's ``errored`` signal to its own error notification (with the full
traceback), and the widget already reports the error in its status line and one
notification, so the user would see every error twice.

Cancelling is cooperative: :meth:`Job.cancel` sets a ``threading.Event``. The trainer gets
that event as its ``cancel=`` argument (it then saves and yields a ``done`` record); other
generators are closed by the wrapper at their next record.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Generator
from typing import Any

Record = dict[str, Any]
NOTHREADS_ENV = "NAPARI_AMASAM_NOTHREADS"
log = logging.getLogger(__name__)


def _llvm_loaded() -> bool:
    try:
        with open("/proc/self/maps") as maps:
            return any("libLLVM" in line for line in maps)
    except OSError:
        return False


def avoid_triton_llvm_clash() -> None:
    """Keep torch from importing triton where that would crash napari.

    With Mesa OpenGL (llvmpipe, Xvfb, many Linux desktops) napari's canvas loads
    ``libLLVM-*.so``; importing triton afterwards (torch does, lazily, when torchvision or
    ``torch._dynamo`` load) segfaults on the clashing LLVM symbols. Triton only serves
    ``torch.compile`` GPU kernels, which napari-amasam does not use, so on Linux it is hidden
    from import (torch then sees ``ImportError`` and runs without it) when Mesa's LLVM is
    loaded or could be loaded later (no CUDA GPU, where triton is of no use anyway).
    Called when the widgets are imported and before every job.
    """
    if "triton" in sys.modules or not sys.platform.startswith("linux"):
        return
    import torch

    if _llvm_loaded() or not torch.cuda.is_available():
        sys.modules["triton"] = None  # type: ignore[assignment]
        log.info("triton hidden from import (Mesa libLLVM or no CUDA): avoids a crash")


def threads_enabled() -> bool:
    """False when ``NAPARI_AMASAM_NOTHREADS`` is set (to anything but empty or ``0``)."""
    return os.environ.get(NOTHREADS_ENV, "").strip() in ("", "0")


class _Failed:
    """What :meth:`Job._wrapped` returns when the engine raised (see the module docstring)."""

    def __init__(self, exc: BaseException):
        self.exc = exc


class Job:
    """One running engine generator and its callbacks.

    Parameters
    ----------
    generator : Generator
        Yields record dicts; its return value goes to ``on_returned``.
    cancel_event : threading.Event, optional
        Event the generator itself watches (the trainer's ``cancel=``). Without one the job
        closes the generator at its next record when cancelled.
    on_yielded, on_returned, on_errored, on_finished : callable, optional
        Called on the UI thread with a record, the return value, the exception, and nothing.
    """

    def __init__(
        self,
        generator: Generator[Record, None, Any],
        *,
        cancel_event: threading.Event | None = None,
        on_yielded: Callable[[Record], None] | None = None,
        on_returned: Callable[[Any], None] | None = None,
        on_errored: Callable[[BaseException], None] | None = None,
        on_finished: Callable[[], None] | None = None,
    ):
        self._generator = generator
        self._engine_watches_cancel = cancel_event is not None
        self.cancel_event = cancel_event if cancel_event is not None else threading.Event()
        self._on_yielded = on_yielded
        self._on_returned = on_returned
        self._on_errored = on_errored
        self._on_finished = on_finished
        self.worker = None  # the napari GeneratorWorker in threaded mode
        self.running = False
        self.cancelled = False

    # ---------------------------------------------------------------- the wrapped generator
    def _wrapped(self) -> Generator[Record, None, Any]:
        """Forward records; stop at the next record once cancelled (unless the engine does).

        An exception of the engine becomes the return value ``_Failed(exc)``.
        """
        generator = self._generator
        try:
            while True:
                try:
                    record = next(generator)
                except StopIteration as stop:
                    return stop.value
                except Exception as exc:
                    return _Failed(exc)
                yield record
                if self.cancel_event.is_set() and not self._engine_watches_cancel:
                    return None
        finally:
            # Runs in the worker thread: a cancelled predictor releases its tiles here.
            generator.close()

    # ------------------------------------------------------------------------------ control
    def start(self) -> Job:
        """Start in a napari thread worker, or run to the end now when threads are off."""
        self.running = True
        avoid_triton_llvm_clash()
        if threads_enabled():
            self._start_thread()
        else:
            self._run_here()
        return self

    def cancel(self) -> None:
        """Ask the job to stop at its next record (a training run saves what it has)."""
        self.cancelled = True
        self.cancel_event.set()

    def _start_thread(self) -> None:
        from napari.qt.threading import create_worker

        worker = create_worker(self._wrapped, _start_thread=False)
        if self._on_yielded is not None:
            worker.yielded.connect(self._on_yielded)
        worker.returned.connect(self._returned)
        if self._on_errored is not None:  # only errors of the wrapper itself get here
            worker.errored.connect(self._on_errored)
        worker.finished.connect(self._finish)
        self.worker = worker
        worker.start()

    def _run_here(self) -> None:
        generator = self._wrapped()
        try:
            while True:
                try:
                    record = next(generator)
                except StopIteration as stop:
                    self._returned(stop.value)
                    break
                if self._on_yielded is not None:
                    self._on_yielded(record)
        except Exception as exc:  # reported like the threaded worker's `errored` signal
            if self._on_errored is None:
                raise
            self._on_errored(exc)
        finally:
            self._finish()

    def _returned(self, value: Any) -> None:
        if isinstance(value, _Failed):
            if self._on_errored is None:
                raise value.exc
            self._on_errored(value.exc)
        elif self._on_returned is not None:
            self._on_returned(value)

    def _finish(self) -> None:
        self.running = False
        if self._on_finished is not None:
            self._on_finished()


def start_job(generator: Generator[Record, None, Any], **kwargs: Any) -> Job:
    """Build a :class:`Job` (same keyword arguments) and start it."""
    return Job(generator, **kwargs).start()
