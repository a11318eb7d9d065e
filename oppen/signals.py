"""Keep SIGTERM from cutting a short critical section in half (booking money), then deliver it."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def deferred_sigterm() -> Iterator[None]:
    """SIGTERM received inside the block is held until the block ends, then handled as it would have been.

    Signal handlers can only be set from the main thread; elsewhere (where no handler can
    interrupt us anyway) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if received:
            if callable(previous):
                previous(signal.SIGTERM, None)  # Prefect's handler raises TerminationSignal here
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGTERM)
