"""AdamW with DINO's parameter groups, and gradient clipping."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor


def parameter_groups(module: nn.Module, lr_multiplier=None) -> list[dict]:
    """Biases and 1-D parameters (norm scales, tokens' own gains) get no weight decay, as in DINO/timm.

    `lr_multiplier(name) -> float` (layer-wise lr decay, DINOv2's patch-embedding factor) splits the groups
    further; parameters with the same multiplier and decay share a group."""
    groups: dict[tuple[bool, float], dict] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (name.endswith(".bias") or param.ndim <= 1)
        multiplier = float(lr_multiplier(name)) if lr_multiplier else 1.0
        group = groups.setdefault((decay, multiplier), {"params": [], "apply_weight_decay": decay,
                                                        "lr_multiplier": multiplier})
        group["params"].append(param)
    return [groups[key] for key in sorted(groups, key=lambda key: (not key[0], -key[1]))]


def build_optimizer(groups: list[dict], betas, device: torch.device) -> torch.optim.Optimizer:
    # lr and weight decay are set from the schedule before every step (apply_schedule). On GPU the fused
    # kernel updates all parameters in a few launches instead of several per tensor.
    return torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0, betas=tuple(betas), fused=device.type == "cuda")


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_multiplier", 1.0)
        group["weight_decay"] = weight_decay if group["apply_weight_decay"] else 0.0


def clip_gradients(parameters: list[nn.Parameter], max_norm: float, mode: str) -> torch.Tensor:
    """Returns the total gradient norm before clipping (for logging).

    `per_param` clips each tensor's norm separately, as the official DINO code does; `global` clips the norm
    of all gradients together (torch's clip_grad_norm_); DINOv2's and DINOv3's per-part clipping is `global` on
    each set of `network_parts`.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if isinstance(grads[0], DTensor):  # FSDP: each process holds a shard of every gradient
        grads = [grad.to_local() for grad in grads]
        norms = list(_sharded_norms(grads).unbind())
    else:
        norms = torch._foreach_norm(grads)
    total_norm = torch.linalg.vector_norm(torch.stack(norms))
    if max_norm > 0:
        if mode == "global":
            scale = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, scale)
        else:
            scales = (max_norm / (torch.stack(norms) + 1e-6)).clamp(max=1.0)  # one kernel, not one per tensor
            torch._foreach_mul_(grads, list(scales.unbind()))
    return total_norm


def _sharded_norms(local_shards: list[torch.Tensor]) -> torch.Tensor:
    """Each tensor's norm from every process's shard of it: one all-reduce of the squared shard norms."""
    squares = torch.stack(torch._foreach_norm(local_shards)).double() ** 2
    dist.all_reduce(squares)
    return squares.sqrt().to(local_shards[0].dtype)


def network_parts(network: nn.Module) -> list[list[nn.Parameter]]:
    """A student network's trainable parameters by part, for optim.clip_mode=per_module: the backbone together
    with the parameters the network holds itself (the mask token, which DINOv2 keeps inside its backbone), then
    each head on its own. DINOv2 and DINOv3 clip each of these by its own norm (clip_grad_norm_ per student
    module in their train loops)."""
    def trainable(module: nn.Module, recurse: bool = True) -> list[nn.Parameter]:
        return [p for p in module.parameters(recurse=recurse) if p.requires_grad]

    parts = [trainable(network, recurse=False) + trainable(network.backbone)]
    parts += [trainable(child) for child in network.children() if child is not network.backbone]
    return [part for part in parts if part]


def clip_gradient_sets(sets: list[list[nn.Parameter]], max_norm: float, mode: str) -> torch.Tensor:
    """`clip_gradients` on each set alone (a multi-student run clips each student's gradients by their own norm);
    returns the norm of all gradients together, before clipping."""
    norms = [clip_gradients(parameters, max_norm, mode) for parameters in sets]
    if len(norms) == 1:
        return norms[0]
    device = next((n.device for n in norms if n.device.type != "cpu"), norms[0].device)
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
