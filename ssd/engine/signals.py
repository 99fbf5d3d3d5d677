"""Stop requests: SIGTERM / SIGUSR2 / SIGINT (or a caller such as the SLURM launcher) ask the engine to save a
checkpoint at the next step boundary and return. The handler only sets a flag; the loop acts on it.

Who receives a stop signal matters as much as what the handler does. `scancel`, SLURM preemption, systemd,
`kill -TERM -PGID` and torchrun (which signals each worker's whole process group) deliver it to the DataLoader
workers too. A worker killed by it makes the main process crash in the middle of the step, before anything is
saved, so workers ignore the stop signals (`ignore_stop_signals`, their `worker_init_fn`) and are shut down by
the main process once it has saved. A signal that arrives while a worker is being forked must not reach the new
worker before it ignores it: `stop_signals_blocked` holds stop signals back while the loader forks.

A second Ctrl-C (SIGINT) while a stop is pending interrupts at once (KeyboardInterrupt), for a user who does
not want to wait for the step to end.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading

_stop = threading.Event()
_stop_signal: int | None = None
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def request_stop(signum: int | None = None, _frame=None) -> None:
    """Signal handler, or a direct call from code (then `signum` is None)."""
    global _stop_signal
    if signum == signal.SIGINT and _stop.is_set():
        raise KeyboardInterrupt  # second Ctrl-C: the user does not want to wait for the step boundary
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


def ignore_stop_signals(_worker_id: int | None = None) -> None:
    """DataLoader `worker_init_fn`: the main process decides when to stop; workers must outlive the signal.

    Ignoring (rather than blocking) also discards a signal that was held back while the worker was forked."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def stop_signals_blocked():
    """Hold stop signals back in this thread (they are delivered on exit): wrap the creation of DataLoader
    workers, which inherit the blocked mask and unblock only after `ignore_stop_signals`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def stop_when_launcher_dies() -> None:
    """Under torchrun, ask the kernel for SIGTERM when the launcher dies (Linux only).

    torchrun forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT to the training processes, but a signal it does not handle
    (SIGUSR2, unless given in `--signals-to-handle`) kills torchrun alone and would leave the training
    processes running unsupervised. With this they save at the next step boundary and exit instead. Not set for
    a plain `python -m ssd.train`, whose parent is a shell that may legitimately exit first (nohup)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not os.path.exists("/proc/self"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)
