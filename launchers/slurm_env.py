"""Translate a SLURM job step's variables into the ones ``torch.distributed`` reads with ``init_method="env://"``.

``ssd.engine.distributed.init_distributed()`` only knows the standard variables (MASTER_ADDR, MASTER_PORT,
RANK, WORLD_SIZE, LOCAL_RANK), which torchrun sets. Under SLURM (``srun``, one task per GPU) nobody sets them,
so ``export_distributed_env()`` derives them from SLURM's. Variables that are already set win, so the same
code runs unchanged under torchrun, under torchrun inside an allocation, and on a laptop.
"""

from __future__ import annotations

import os
import re

# Ports below Linux's ephemeral range (32768-60999), so a port we pick is unlikely to be taken by a client
# socket; the job id picks one of them so two jobs sharing a first node do not collide.
PORT_BASE = 20000
PORT_SPAN = 10000


def in_slurm_step(env: dict[str, str] | None = None) -> bool:
    """True inside an ``srun`` step. The batch script itself also has SLURM_PROCID and SLURM_NTASKS, but there a
    single process runs whatever SLURM_NTASKS says, so treating it as rank 0 of N would wait forever for peers."""
    env = os.environ if env is None else env
    return "SLURM_STEP_ID" in env and "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compressed host list: ``"gpu[01-03,07],login1"`` -> ``[gpu01, gpu02, gpu03, gpu07, login1]``.

    Parsed here rather than with ``scontrol show hostnames`` so it works where scontrol is not on PATH inside the
    job, and costs no round trip to slurmctld from every rank at once.
    """
    hosts: list[str] = []
    # A group is a prefix, then optionally one bracketed range list, then an optional suffix (rare, e.g. "-ib").
    for prefix, ranges, suffix in re.findall(r"([^,\[]+)(?:\[([^\]]+)\])?([^,\[]*)", nodelist):
        if not ranges:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            low, _, high = part.partition("-")
            if not high:
                hosts.append(f"{prefix}{low}{suffix}")
                continue
            width = len(low)  # keep zero padding: node[08-10] -> node08, node09, node10
            hosts.extend(f"{prefix}{number:0{width}d}{suffix}" for number in range(int(low), int(high) + 1))
    return hosts


def expand_tasks_per_node(tasks_per_node: str) -> list[int]:
    """Expand SLURM's task counts per node: ``"4(x2),2"`` -> ``[4, 4, 2]``."""
    counts: list[int] = []
    for group in tasks_per_node.split(","):
        count, _, repeat = group.partition("(x")
        counts.extend([int(count)] * int(repeat.rstrip(")") or 1))
    return counts


def master_port(job_id: str) -> int:
    # Array jobs have ids like "1234_5"; all digits together still tell tasks of different jobs apart.
    digits = int(re.sub(r"\D", "", job_id) or 0)
    return PORT_BASE + digits % PORT_SPAN


def slurm_distributed_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The torch.distributed variables implied by SLURM's, or ``{}`` outside an ``srun`` step."""
    env = os.environ if env is None else env
    if not in_slurm_step(env):
        return {}
    nodelist = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
    node_id = int(env.get("SLURM_NODEID", "0"))
    return {
        "MASTER_ADDR": expand_nodelist(nodelist)[0],
        "MASTER_PORT": str(master_port(env["SLURM_JOB_ID"])),
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(expand_tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", "1"))[node_id]),
    }


def export_distributed_env() -> dict[str, str]:
    """Set MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, LOCAL_RANK (and LOCAL_WORLD_SIZE) from SLURM where unset.

    Returns the variables it set. Does nothing outside an ``srun`` step or when torchrun already set them.
    """
    exported = {}
    for name, value in slurm_distributed_env().items():
        if name not in os.environ:
            os.environ[name] = value
            exported[name] = value
    return exported
