"""Ctrl-C (SIGINT) and SIGTERM during training: the first one asks the loop to save a checkpoint and stop
after the current step; a second one stops at once (checkpoints are written atomically, so the last one
on disk stays good)."""
from __future__ import annotations

import os
import signal
import sys
import threading


class StopRequest:
    """Installs the handlers for its ``with`` block (main thread only; elsewhere it does nothing)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict = {}
        self._pid = os.getpid()

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a data-loader worker inherited the handler: the main process speaks
            return
        name = signal.Signals(signum).name
        if self.requested is not None:
            print(f"\nboxmask: {name} again: stopping at once; the last saved checkpoint is kept", file=sys.stderr,
                  flush=True)
            os._exit(130)
        self.requested = name
        print(f"\nboxmask: {name}: saving a checkpoint after this step, then stopping "
              "(press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequest":
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}
