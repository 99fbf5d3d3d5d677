"""Facts about the machine a process runs on: free memory, CPU cores, processes sharing them."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger("ssd")

AUTO_WORKERS_CAP = 10  # enough to feed one GPU at ImageNet crop sizes (the DINO recipes' value)


def available_host_bytes() -> float:
    """MemAvailable, lowered to what this process's memory cgroup (a container, a SLURM job's --mem) still
    allows when there is a limit."""
    available = float("inf")
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if math.isinf(available):
        available = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    return min(available, cgroup_headroom())


def cgroup_headroom() -> float:
    """Bytes this process's memory cgroup and its ancestors still allow (limit - usage; inf without a limit).
    cgroup v2 (memory.max / memory.current) and v1 (memory.limit_in_bytes / memory.usage_in_bytes)."""
    headroom = float("inf")
    try:
        with open("/proc/self/cgroup") as membership:
            lines = membership.read().splitlines()
    except OSError:
        return headroom
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            roots, files = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"), ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            roots, files = ("/sys/fs/cgroup/memory",), ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        for root in roots:
            folder = Path(root + path)
            while folder != Path(root).parent:
                headroom = min(headroom, _limit_minus_usage(folder, *files))
                folder = folder.parent
    return headroom


def _limit_minus_usage(folder: Path, limit_name: str, usage_name: str) -> float:
    try:
        limit = (folder / limit_name).read_text().strip()
        if limit == "max" or int(limit) >= 2**60:  # v1 writes a huge number for "no limit"
            return float("inf")
        return float(int(limit) - int((folder / usage_name).read_text().strip()))
    except (OSError, ValueError):
        return float("inf")


def processes_on_this_node() -> int:
    """Training processes sharing this machine's memory and cores (torchrun and SLURM both say; else 1)."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "").split("(")[0]  # SLURM may write "2(x3)"
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def cpu_cores() -> int:
    """Cores this process may run on: its CPU affinity (SLURM and taskset restrict it), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def auto_num_workers(processes: int) -> int:
    """Loader workers per process when data.num_workers=-1: this node's cores shared by its training processes,
    one core each kept for the training loop itself, at most AUTO_WORKERS_CAP."""
    per_process = cpu_cores() // max(processes, 1)
    return max(0, min(per_process - 1, AUTO_WORKERS_CAP))


def loader_workers(requested: int, processes: int) -> int:
    """data.num_workers as this process will use it: -1 resolved for this machine; an explicit count above the
    cores is kept (the user asked for it) but said to be one."""
    if requested < 0:
        workers = auto_num_workers(processes)
        log.info("data.num_workers=-1: %d loader worker(s) per process (%d CPU core(s), %d process(es) on this node)",
                 workers, cpu_cores(), processes)
        return workers
    cores = cpu_cores() // max(processes, 1)
    if requested >= cores > 0:
        log.warning("data.num_workers=%d on %d CPU core(s) per process: workers and the training loop will compete "
                    "for cores; data.num_workers=-1 picks %d for this machine", requested, cores,
                    auto_num_workers(processes))
    return requested
