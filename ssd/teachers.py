"""Teachers: a frozen copy of the student network plus a rule for updating it after each optimizer step.

- `ema`: exponential moving average of the student (DINO, iBOT, DINOv2, I-JEPA).
- `frozen`: never updated (a pretrained checkpoint, or a random initialisation for random-teacher methods).

The teacher module itself is a plain copy of the student's structure, so its state-dict keys mirror the
student's (`teacher.backbone.*` beside `student.backbone.*`). It never receives gradients and stays in eval mode
(no drop-path, BatchNorm on running statistics): methods call `keep_eval()` from their `train()`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


def frozen_copy(network: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(network)
    teacher.requires_grad_(False)
    return teacher.eval()


def keep_eval(teacher: nn.Module) -> None:
    teacher.eval()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter; buffers copied."""
    teacher_params = list(teacher.parameters())
    student_params = list(student.parameters())
    if len(teacher_params) != len(student_params):
        raise RuntimeError("teacher and student have different parameter lists; they must share a structure")
    torch._foreach_lerp_(teacher_params, [p.detach() for p in student_params], 1.0 - momentum)
    for teacher_buffer, student_buffer in zip(teacher.buffers(), student.buffers()):
        teacher_buffer.copy_(student_buffer)


def no_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    return None


TEACHER_UPDATES = {"ema": ema_update, "frozen": no_update}
