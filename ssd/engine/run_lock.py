"""One run per run folder: a lock file held for the life of a run.

`<run>/run.lock` is created with O_CREAT | O_EXCL, which is atomic on local file systems and on NFSv3+, Lustre
and GPFS (unlike flock/fcntl locks, which some cluster mounts ignore). It holds JSON saying who holds it: host,
pid, the process's start time (so a recycled pid is not mistaken for the holder), the boot id, the SLURM job
and restart count, and the command. A thread touches the file every HEARTBEAT_S seconds.

A lock is stale, and is taken over with a warning, when
- its holder ran on this host (same boot) and that process is gone;
- its holder was an earlier start of the same SLURM job (a requeue, possibly on another node);
- its holder ran on another host and the heartbeat stopped for STALE_AFTER_S seconds. Ages are measured
  against the file system's own clock (the mtime of a file written now), so clock skew between nodes does not
  matter.
Otherwise the run is refused at once, naming the holder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
log = logging.getLogger("ssd")


class RunLockedError(RuntimeError):
    """Another live run holds the run folder."""


def _boot_id() -> str:
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    return ""


def _process_start(pid: int) -> str:
    """Start time of `pid` in clock ticks since boot (field 22 of /proc/<pid>/stat); "" when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # fields after the command name, which may contain spaces


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_record() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_start": _process_start(os.getpid()),
        "boot_id": _boot_id(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        "command": " ".join(sys.argv)[:500],
    }


def describe_holder(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, started {holder.get('started')}"


def _file_system_now(folder: Path) -> float:
    """The current time as the file system stamps it."""
    probe = folder / f".clock-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"")
        return probe.stat().st_mtime
    except OSError:
        return time.time()
    finally:
        probe.unlink(missing_ok=True)


def stale_reason(holder: dict, lock_mtime: float, folder: Path) -> str | None:
    """Why the holder is certainly gone, or None when it may still be running."""
    me = holder_record()
    if holder.get("host") == me["host"] and holder.get("boot_id") == me["boot_id"]:
        pid = int(holder.get("pid", -1))
        if not _pid_alive(pid):
            return f"process {pid} on this host is gone"
        if holder.get("process_start") and _process_start(pid) != holder["process_start"]:
            return f"pid {pid} now belongs to another process"
        return None
    if me["slurm_job_id"] and holder.get("slurm_job_id") == me["slurm_job_id"]:
        if me["slurm_restart_count"] > int(holder.get("slurm_restart_count", 0)):
            return f"it was held by an earlier start of SLURM job {me['slurm_job_id']} (requeued since)"
    silent = _file_system_now(folder) - lock_mtime
    if silent > STALE_AFTER_S:
        return f"its holder on {holder.get('host')} has not touched it for {silent:.0f} s"
    return None


class RunLock:
    """`RunLock(run_dir).acquire()` ... `release()`; also a context manager."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.record: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> RunLock:
        for _ in range(5):
            if self._try_create():
                self._start_heartbeat()
                return self
            holder, mtime = self._read_holder()
            if holder is None:  # vanished, or being written right now: look again shortly
                time.sleep(0.2)
                continue
            reason = stale_reason(holder, mtime, self.run_dir)
            if reason is None:
                raise RunLockedError(
                    f"run folder {self.run_dir} is in use by another run ({describe_holder(holder)}). Wait for it "
                    f"to end or stop it, or give this run another output.run_name. If that run is certainly "
                    f"dead, delete {self.path}."
                )
            self._take_over(holder, reason)
        raise RunLockedError(f"could not take the lock {self.path}: other processes keep competing for it")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder, _ = self._read_holder()
        if holder is not None and self.record is not None and holder.get("pid") == self.record["pid"] \
                and holder.get("host") == self.record["host"]:
            self.path.unlink(missing_ok=True)
        self.record = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # ---- internals -------------------------------------------------------------------------------------
    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        self.record = holder_record()
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(self.record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def _read_holder(self) -> tuple[dict | None, float]:
        try:
            mtime = self.path.stat().st_mtime
            text = self.path.read_text()
        except OSError:
            return None, 0.0
        try:
            return json.loads(text), mtime
        except ValueError:
            # Half-written by a creator that is still writing, or by one killed mid-write: the latter only
            # is stale, and it shows by its age.
            if _file_system_now(self.run_dir) - mtime > 10.0:
                return {"host": "?", "pid": -1, "started": "?"}, 0.0
            return None, mtime

    def _take_over(self, holder: dict, reason: str) -> None:
        """Remove a stale lock. Competing starters serialise on a second O_EXCL file, so one stale lock is
        never removed twice (the second removal would hit the first starter's fresh lock)."""
        guard = self.path.with_name(LOCK_NAME + ".takeover")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            with contextlib.suppress(OSError):
                if _file_system_now(self.run_dir) - guard.stat().st_mtime > 60.0:
                    guard.unlink()  # left by a starter killed during its takeover
            time.sleep(0.2)
            return
        os.close(fd)
        try:
            current, _ = self._read_holder()
            if current == holder:
                log.warning("taking over the lock %s of an earlier run (%s): %s", self.path,
                            describe_holder(holder), reason)
                self.path.unlink(missing_ok=True)
        finally:
            guard.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                with contextlib.suppress(OSError):
                    os.utime(self.path)

        self._stop.clear()
        self._thread = threading.Thread(target=beat, name="ssd-run-lock-heartbeat", daemon=True)
        self._thread.start()
