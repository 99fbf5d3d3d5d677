"""Teachers behind one small interface: `update(student, momentum)` after each optimizer step.

- EMATeacher: exponential moving average of the student (DINO, iBOT, DINOv2, I-JEPA).
- FrozenTeacher: a fixed network (a pretrained checkpoint or a random initialisation); `update` does nothing.

The teacher never receives gradients and always stays in eval mode (no dropout / drop-path, BatchNorm uses
running statistics), whatever `.train()` is called on the parent module.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class FrozenTeacher(nn.Module):
    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network
        self.network.requires_grad_(False)
        self.network.eval()

    def train(self, mode: bool = True) -> "FrozenTeacher":  # the teacher ignores train mode on purpose
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        return self.network(*args, **kwargs)

    def update(self, student: nn.Module, momentum: float) -> None:
        return None


class EMATeacher(FrozenTeacher):
    @classmethod
    def from_student(cls, student: nn.Module) -> "EMATeacher":
        return cls(copy.deepcopy(student))

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
        teacher_params = list(self.network.parameters())
        student_params = list(student.parameters())
        if len(teacher_params) != len(student_params):
            raise RuntimeError("teacher and student have different parameter lists; they must share a structure")
        torch._foreach_lerp_(teacher_params, [p.detach() for p in student_params], 1.0 - momentum)
        for teacher_buffer, student_buffer in zip(self.network.buffers(), student.buffers()):
            teacher_buffer.copy_(student_buffer)
