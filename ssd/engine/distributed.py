"""torch.distributed set-up from the standard environment variables (torchrun, or the SLURM launcher).

With no WORLD_SIZE (or WORLD_SIZE=1) the run is one plain process and nothing is initialised.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible: use train.device=cpu or auto")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(requested_device: str = "auto") -> DistInfo:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise RuntimeError(
                    f"WORLD_SIZE={world_size} but {name} is not set: start with torchrun or the SLURM launcher"
                )
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group; (0, 1) for a plain process."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(values)
    return values


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands every rank the gradient of its own rows, summed over all ranks' losses.

    The backward is an all-reduce of the full gradient plus a slice, which gloo supports (torch's own
    differentiable all_gather needs reduce_scatter, which gloo lacks)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        ctx.rows, ctx.rank, ctx.group = tensor.shape[0], rank, group
        pieces = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(pieces, tensor.contiguous(), group=group)
        return torch.cat(pieces)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


def all_gather_with_grad(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """(B, ...) on every rank of `group` (default: all) -> (ranks * B, ...), rank-major, differentiable; the
    tensor itself when alone. Every rank must pass the same number of rows."""
    return _GatherWithGrad.apply(tensor, group) if is_distributed() else tensor


def all_gather_rows(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's (B_r, ...) tensor, in rank order, on every rank; the row counts B_r may differ. Not
    differentiable (targets and inputs only)."""
    if not is_distributed():
        return [tensor]
    if tensor.dtype == torch.bool:  # gloo's all_gather takes no bool
        return [piece.bool() for piece in all_gather_rows(tensor.to(torch.uint8))]
    world = dist.get_world_size()
    counts = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([tensor.shape[0]], device=tensor.device))
    longest = max(int(count) for count in counts)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded)
    return [piece[:int(count)] for piece, count in zip(pieces, counts)]


_GROUPS: dict[tuple[int, ...], object] = {}


def process_group(ranks: tuple[int, ...]):
    """The process group of `ranks`, created once (every rank must ask for every group, in the same order, the
    first time); None for the whole world or a plain process."""
    if not is_distributed() or len(ranks) == dist.get_world_size():
        return None
    if ranks not in _GROUPS:
        _GROUPS[ranks] = dist.new_group(list(ranks))
    return _GROUPS[ranks]
