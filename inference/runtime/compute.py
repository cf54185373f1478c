"""The one thread of a process that runs model compute, for every engine in turn.

torch's CPU kernels run on an OpenMP pool that belongs to the thread calling them. A
second thread running parallel ops brings a second pool onto the same cores, and
libgomp then stops spinning between the hundreds of small ops of a decode step: on
2 cores a step takes up to twice as long (10 ms against 17-20 ms for the demo model
at batch 1, measured). Even one parallel op elsewhere, such as zero-filling a large
tensor, leaves such a pool behind. So every engine steps on this thread, and other
threads run their torch ops single-threaded (`single_threaded_torch`): model loading,
KV cache allocation.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import torch

log = logging.getLogger(__name__)


class ComputeThread:
    _shared: ComputeThread | None = None
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls) -> ComputeThread:
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def __init__(self):
        self.engines: list = []
        self.wakeup = threading.Condition()
        self.threads = 0  # torch intra-op threads on this thread; 0: torch's default
        self.thread = threading.Thread(target=self.loop, name="vigil-compute", daemon=True)
        self.thread.start()

    def attach(self, engine) -> None:
        with self.wakeup:
            self.engines.append(engine)

    def set_threads(self, threads: int) -> None:
        with self.wakeup:
            self.threads = threads
            self.wakeup.notify()

    def notify(self) -> None:
        with self.wakeup:
            self.wakeup.notify()

    def loop(self) -> None:
        torch.set_grad_enabled(False)
        applied = 0
        while True:
            with self.wakeup:
                while not any(e.has_work() for e in self.engines) and self.threads == applied:
                    self.wakeup.wait()
                if self.threads != applied:
                    applied = self.threads
                    # setting the count the thread already has still slows decoding (measured)
                    if applied and applied != torch.get_num_threads():
                        torch.set_num_threads(applied)
                busy = [e for e in self.engines if e.has_work()]
            for engine in busy:
                if engine.step_or_close():
                    with self.wakeup:
                        self.engines.remove(engine)


@contextlib.contextmanager
def single_threaded_torch():
    """Run torch ops of the calling thread on one core (see the module docstring)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
