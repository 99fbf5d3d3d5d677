"""RNG state capture/restore for exact resume (per rank, since ranks draw different random numbers)."""

from __future__ import annotations

import random

import torch

from ssd.engine import distributed


def capture_rng() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def gather_rng_states(world_size: int) -> list[dict]:
    """Every rank's RNG state, in rank order (collective: all ranks must call it)."""
    local = capture_rng()
    if world_size == 1 or not distributed.is_distributed():
        return [local]
    gathered: list = [None] * world_size
    torch.distributed.all_gather_object(gathered, local)
    return gathered


def restore_rng(states: list[dict], rank: int) -> bool:
    """Restore this rank's state; False when the checkpoint came from a different number of processes."""
    if rank >= len(states):
        return False
    state = states[rank]
    torch.set_rng_state(state["torch"])
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    return True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
