"""The engine contract shared by the distillation methods: a student learns a fixed (frozen or random) teacher.

Such a method holds `self.student` and `self.teacher` (each with `.backbone`) and `self.cfg`; it keeps the teacher
in eval mode, gives the optimizer the student's (and its own heads' and projections') parameters, updates nothing
after a step, reports its outputs as floats, and is evaluated and exported through the student.
"""

from __future__ import annotations

import torch.nn as nn

from ssd.models.layer_decay import vit_parameter_groups
from ssd.teachers import keep_eval


class DistilsFixedTeacher(nn.Module):
    eval_network = "student"  # the teacher is fixed: the student is what the run trains

    def train(self, mode: bool = True):
        super().train(mode)
        keep_eval(self.teacher)
        return self

    def param_groups(self) -> list[dict]:
        return vit_parameter_groups(self, self.student.backbone, self.cfg.optim)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        return []  # no prototype layer to hold still at the start

    def monitor(self, outputs: dict) -> dict:
        return {name: float(value) for name, value in outputs.items()}

    def after_step(self, schedule: dict) -> None:
        return None  # the teacher is fixed

    def eval_backbone(self) -> nn.Module:
        return self.student.backbone
