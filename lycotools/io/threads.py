"""Threads lycotools starts leave SIGINT/SIGTERM/SIGHUP to the main thread.

A process-directed signal goes to any thread that does not block it. Python runs handlers only in the
main thread, and a main thread blocked on a lock (waiting for a -j worker's result) wakes for a signal
only when the signal is delivered to it: delivered to a worker instead, the handler waited until that
worker had finished, and its output was published after the signal. Every thread lycotools starts calls
``signals_to_main_thread()`` first.
"""

from __future__ import annotations

import signal

_SIGNALS = {s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None}


def signals_to_main_thread():
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
