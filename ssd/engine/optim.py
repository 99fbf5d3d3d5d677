"""AdamW with DINO's parameter groups, and gradient clipping."""

from __future__ import annotations

import torch
import torch.nn as nn


def parameter_groups(module: nn.Module) -> list[dict]:
    """Biases and 1-D parameters (norm scales, tokens' own gains) get no weight decay, as in DINO/timm."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "apply_weight_decay": True}, {"params": no_decay, "apply_weight_decay": False}]


def build_optimizer(module: nn.Module, betas, device: torch.device) -> torch.optim.Optimizer:
    # lr and weight decay are set from the schedule before every step (apply_schedule). On GPU the fused
    # kernel updates all parameters in a few launches instead of several per tensor.
    return torch.optim.AdamW(parameter_groups(module), lr=0.0, weight_decay=0.0, betas=tuple(betas),
                             fused=device.type == "cuda")


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = weight_decay if group["apply_weight_decay"] else 0.0


def clip_gradients(parameters: list[nn.Parameter], max_norm: float, mode: str) -> torch.Tensor:
    """Returns the total gradient norm before clipping (for logging).

    `per_param` clips each tensor's norm separately, as the official DINO code does; `global` clips the norm
    of all gradients together (torch's clip_grad_norm_), as DINOv2 does.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
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
