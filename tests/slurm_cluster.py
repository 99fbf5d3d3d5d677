"""A real, throwaway one-node SLURM cluster for tests (pytest plugin).

Load it with ``pytest_plugins = ["tests.slurm_cluster"]`` in ``tests/conftest.py`` (or ``-p tests.slurm_cluster``).
The session fixture ``slurm_cluster`` installs SLURM and munge from Debian packages when they are missing,
starts a private munged, slurmctld and slurmd on loopback with state in a temporary folder, waits until the
node is idle and stops everything it started at the end of the session.

Everything is private to the session (own munge key and socket, own ports, own spool), so it neither needs
nor touches a system-wide SLURM or munge installation. When the cluster cannot be started (not root, no
package manager, no network) the tests that use it are skipped with the reason, except in CI (``CI=true``)
where they fail, so a broken CI image cannot hide the SLURM tests.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "munged", "mungekey")
DEBIAN_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
STARTUP_TIMEOUT_S = 60

SLURM_CONF_TEMPLATE = """\
ClusterName=ssdtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: a requeued job waits this long before it may start again (default 120 s).
AuthInfo=socket={munge_socket},cred_expire=10
CredType=cred/munge
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldLogFile={base}/slurmctld.log
SlurmdLogFile={base}/slurmd.log
# No cgroups in containers: track processes by parent pid, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# CPUs are the only consumable resource; jobs that ask for no memory get no memory limit.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Schedule every second, not every minute, so requeued jobs restart quickly.
SchedulerParameters=sched_interval=1,bf_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
KillWait=10
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be started on this machine; the message says why."""


@dataclass
class SlurmCluster:
    """Handle on the running test cluster: its config file and helpers to run SLURM commands."""

    base: Path
    conf: Path
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *command: str, check: bool = True) -> str:
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def job_state(self, job_id: str) -> str:
        """SLURM state of a job (PENDING, RUNNING, COMPLETED, ...), read from slurmctld's memory."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        for item in out.split():
            if item.startswith("JobState="):
                return item.split("=", 1)[1]
        return "UNKNOWN"

    def job_field(self, job_id: str, name: str) -> str | None:
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        for item in out.split():
            if item.startswith(name + "="):
                return item.split("=", 1)[1]
        return None

    def wait_for_job(self, job_id: str, timeout_s: float = 180) -> str:
        """Block until the job reaches a final state and return it. Requeues are not final."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
        deadline = time.monotonic() + timeout_s
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in final:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {state} after {timeout_s:.0f}s; slurmctld log: {self.base}/slurmctld.log")

    def cancel_all_jobs(self) -> None:
        out = self.run("squeue", "-h", "-o", "%i", check=False)
        job_ids = out.split()
        if job_ids:
            self.run("scancel", *job_ids, check=False)
            deadline = time.monotonic() + 30
            while self.run("squeue", "-h", "-o", "%i", check=False).split() and time.monotonic() < deadline:
                time.sleep(0.5)

    def stop(self) -> None:
        self.cancel_all_jobs()
        # Stop in reverse start order: slurmd, slurmctld, then munged, each by the handle we started it with.
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes.clear()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ensure_packages() -> None:
    missing = [name for name in SLURM_BINARIES if shutil.which(name) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"{', '.join(missing)} not installed and not root, so cannot apt-get install them")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"{', '.join(missing)} not installed and no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *DEBIAN_PACKAGES]):
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(command)} failed: {result.stderr.strip()[-500:]}")
    still_missing = [name for name in SLURM_BINARIES if shutil.which(name) is None]
    if still_missing:
        raise SlurmUnavailable(f"{', '.join(still_missing)} still missing after installing {DEBIAN_PACKAGES}")


def _start_munge(base: Path) -> tuple[subprocess.Popen, Path]:
    """Start a private munged as user munge with a fresh key; return it and its socket path."""
    munge_dir = base / "munge"
    munge_dir.mkdir()
    key = munge_dir / "munge.key"
    subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
    # munged refuses keys and folders that other users could read or write, and refuses to run as root.
    shutil.chown(munge_dir, "munge", "munge")
    shutil.chown(key, "munge", "munge")
    key.chmod(0o600)
    socket_path = munge_dir / "munge.socket"
    command = [
        "munged", "--foreground", f"--socket={socket_path}", f"--key-file={key}",
        f"--log-file={munge_dir / 'munged.log'}", f"--pid-file={munge_dir / 'munged.pid'}",
        f"--seed-file={munge_dir / 'munged.seed'}",
    ]  # fmt: skip
    process = subprocess.Popen(command, user="munge", group="munge", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SlurmUnavailable(f"munged exited: {process.stderr.read().decode().strip()}")
        probe = subprocess.run(f"munge -S {socket_path} -n | unmunge -S {socket_path}", shell=True, capture_output=True)
        if probe.returncode == 0:
            return process, socket_path
        time.sleep(0.2)
    process.kill()
    raise SlurmUnavailable("munged did not answer within a minute")


def _node_memory_mb() -> int:
    # Conservative: a quarter of the machine, at most 4 GiB. slurmd drains a node that claims more than it has.
    total_kb = int(next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")).split()[1])
    return max(256, min(4096, total_kb // 1024 // 4))


def start_cluster() -> SlurmCluster:
    """Start munged, slurmctld and slurmd; raise SlurmUnavailable with the reason if that cannot be done."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("starting slurmd and munged needs root")
    _ensure_packages()
    base = Path(tempfile.mkdtemp(prefix="ssd-slurm-"))
    base.chmod(0o755)  # user munge must reach its folder inside
    cluster = SlurmCluster(base=base, conf=base / "slurm.conf")
    try:
        munged, munge_socket = _start_munge(base)
        cluster.processes.append(munged)
        (base / "state").mkdir()
        (base / "spool").mkdir()
        cluster.conf.write_text(
            SLURM_CONF_TEMPLATE.format(
                base=base, ctld_port=_free_port(), slurmd_port=_free_port(), munge_socket=munge_socket,
                cpus=os.cpu_count() or 1, memory_mb=_node_memory_mb(),
            )  # fmt: skip
        )
        for daemon in (["slurmctld", "-D", "-i"], ["slurmd", "-D", "-N", "localhost"]):
            log = open(base / f"{daemon[0]}.stderr", "wb")
            cluster.processes.append(
                subprocess.Popen([*daemon, "-f", str(cluster.conf)], env=cluster.env, stdout=log, stderr=log)
            )
        _wait_until_idle(cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_until_idle(cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    state = "no answer"
    while time.monotonic() < deadline:
        for process in cluster.processes:
            if process.poll() is not None:
                raise SlurmUnavailable(f"{process.args[0]} exited ({process.returncode}); see logs in {cluster.base}")
        out = cluster.run("sinfo", "-h", "-N", "-o", "%t", check=False).strip()
        state = out or state
        if out == "idle":
            return
        time.sleep(0.5)
    raise SlurmUnavailable(f"node not idle after {STARTUP_TIMEOUT_S}s (state: {state}); see logs in {cluster.base}")


def skip_or_fail(reason: str) -> None:
    """Skip, except in CI, where a cluster that does not start is a broken image to fix, not a reason to skip."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: not skipping)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node SLURM cluster; ``SLURM_CONF`` points to it for the whole session."""
    try:
        cluster = start_cluster()
    except (SlurmUnavailable, OSError, subprocess.SubprocessError) as error:
        skip_or_fail(f"SLURM test cluster could not be started: {error}")
    previous_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)  # submitit and the launcher call sbatch/scontrol themselves
    try:
        yield cluster
    finally:
        cluster.stop()
        if previous_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous_conf
        shutil.rmtree(cluster.base, ignore_errors=True)
