"""Stop requests: SIGTERM / SIGUSR2 (or a caller such as the SLURM launcher) ask the engine to save a
checkpoint at the next step boundary and return. The handler only sets a flag; the loop acts on it."""

from __future__ import annotations

import signal
import threading

_stop = threading.Event()
_stop_signal: int | None = None
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


def request_stop(signum: int | None = None, _frame=None) -> None:
    """Signal handler, or a direct call from code (then `signum` is None)."""
    global _stop_signal
    if signum is not None:
        _stop_signal = signum
    _stop.set()


def stop_requested() -> bool:
    return _stop.is_set()


def stop_signal() -> int | None:
    """Which signal asked the engine to stop (None: no signal, or a caller without one). The SLURM job uses
    it to requeue after SIGUSR2 (time limit) but not after SIGTERM (scancel, preemption by SLURM itself)."""
    return _stop_signal


def clear_stop() -> None:
    global _stop_signal
    _stop_signal = None
    _stop.clear()


def install_handlers() -> dict:
    """Install the flag-setting handler; returns the previous handlers so they can be restored."""
    previous = {}
    if threading.current_thread() is not threading.main_thread():
        return previous  # signal handlers can only be installed from the main thread
    for signum in STOP_SIGNALS:
        previous[signum] = signal.signal(signum, request_stop)
    return previous


def restore_handlers(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)
