"""`train.parallel=fsdp`: FSDP2 (`torch.distributed.fsdp.fully_shard`) instead of DDP, for models whose weights,
gradients and optimizer state do not fit on one device several times over.

Every transformer block of every network of the method (student, teacher, predictor, heads' owners) is its own
FSDP unit; the method itself is the root unit and holds the rest (embeddings, norms, heads, tokens). Each process
keeps 1/world of every parameter, gradient and AdamW moment; a block's full weights exist only while it runs.
The method's code does not change: the same modules, their parameters now DTensors. What reads weights outside
a training step goes through this module:

    EMA update           `foreach` ops on the local shards (teacher and student are sharded alike)
    gradient clipping    norms of sharded gradients reduced across processes (`ssd.engine.optim`)
    weights health       the largest weight over all processes
    checkpoints          by default each process writes its own slices (`ssd.engine.sharded_checkpoint`,
                         nothing gathered); with checkpoint.format=file, whole tensors gathered to CPU on the
                         writing process, the same single file as DDP's (`full_state`, `load_full_state`).
                         Either resumes with DDP or FSDP at any number of processes, and exports as before
    evaluation           a plain copy of the evaluated backbone, gathered by every process (`plain_copy`)

`train.fsdp_bf16_params=true` keeps the sharded fp32 master weights but gathers them as bf16 for compute and
reduces gradients in fp32 (FSDP2's MixedPrecisionPolicy), DINOv2's choice for its large models.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from ssd.engine.compile import transformer_blocks


def shard_method(method: nn.Module, bf16_params: bool = False) -> int:
    """Shard `method` in place (every process, same order); returns the number of FSDP units."""
    # Each process built its own random init (seeded by its rank); DDP broadcasts process 0's at construction,
    # fully_shard would keep each process's slice of its own: broadcast first.
    for parameter in method.parameters():
        dist.broadcast(parameter.detach(), src=0)
    broadcast_buffers(method)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_params \
        else MixedPrecisionPolicy()
    units = 0
    for module in list(method.modules()):
        for block in transformer_blocks(module):
            fully_shard(block, mp_policy=policy)
            units += 1
    fully_shard(method, mp_policy=policy)
    return units + 1


def is_sharded(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor; a plain tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's value over all processes (collective); a plain tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def weights_health(parameters, max_abs_weight: float) -> dict:
    """`checkpoint.weights_health` over the shards of all processes (collective)."""
    from ssd.engine.checkpoint import weights_health as local_health

    largest = local_health([local(p) for p in parameters], float("inf"))["max_abs_weight"]
    largest = torch.tensor([largest if math.isfinite(largest) else float("inf")], dtype=torch.float64)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    largest = float(largest)
    finite = math.isfinite(largest)
    return {"finite": finite, "max_abs_weight": largest, "usable": finite and largest <= max_abs_weight}


def broadcast_buffers(method: nn.Module) -> None:
    """Every process takes process 0's buffers (BatchNorm statistics), as DDP does before each forward."""
    for buffer in method.buffers():
        dist.broadcast(buffer, src=0)


def _whole(value, keep: bool):
    """A state value with every shard gathered (collective for a DTensor), on CPU where `keep`, else None."""
    if not torch.is_tensor(value):
        return value
    value = full_value(value).detach()
    return value.cpu() if keep else None


def full_state(method: nn.Module, optimizer: torch.optim.Optimizer, keep: bool) -> tuple[dict, dict]:
    """(method, optimizer) state dicts as one unsharded process would write them: whole tensors, on CPU, the
    optimizer's parameters numbered in group order. Every process must call it (each sharded tensor is gathered
    in turn); the tensors are kept where `keep` (the process that writes the checkpoint)."""
    model_state = {name: _whole(value, keep) for name, value in method.state_dict().items()}
    optimizer_state = optimizer.state_dict()
    optimizer_state["state"] = {index: {key: _whole(value, keep) for key, value in state.items()}
                                for index, state in optimizer_state["state"].items()}
    return model_state, optimizer_state


def _like(reference: torch.Tensor, value):
    """`value` (a whole tensor from a checkpoint) sharded as `reference` is; unchanged for a plain reference."""
    if not isinstance(reference, DTensor) or not torch.is_tensor(value) or value.shape != reference.shape:
        return value  # a wrong shape is reported by load_state_dict, naming the key
    return distribute_tensor(value.to(reference.device, reference.dtype), reference.device_mesh,
                             reference.placements)


def load_full_state(method: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict,
                    optimizer_state: dict | None, strict: bool = True):
    """Put whole state dicts (read from a checkpoint by every process) into the sharded method and optimizer."""
    current = method.state_dict()
    result = method.load_state_dict({name: _like(current[name], value) if name in current else value
                                     for name, value in model_state.items()}, strict=strict)
    if optimizer is not None and optimizer_state is not None:
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        state = {index: {key: _like(parameters[int(index)], value) for key, value in entries.items()}
                 for index, entries in optimizer_state["state"].items()}
        optimizer.load_state_dict({**optimizer_state, "state": state})
    return result


def plain_copy(module: nn.Module, build, device: torch.device) -> nn.Module:
    """`module` with ordinary tensors, for evaluation by one process: itself when not sharded, else `build()` (a
    fresh module of the same architecture) filled with the gathered weights. Collective when sharded."""
    if not is_sharded(module):
        return module
    state = {name: full_value(value).detach() for name, value in module.state_dict().items()}
    copy = build()
    copy.load_state_dict(state)
    return copy.to(device).eval()
