"""Preemption: the first SIGTERM/SIGINT asks the run to stop after the current optimizer step (and
save a checkpoint); a second one ends the process at once."""

from __future__ import annotations

import os
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            # Second signal: give the process the default behaviour back and die by it.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        print(
            f"\nreceived {signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
            "(send it again to stop at once, without saving)",
            flush=True,
        )

    def __enter__(self) -> StopRequest:
        # Handlers can only be installed from the main thread (a library caller may train elsewhere).
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
