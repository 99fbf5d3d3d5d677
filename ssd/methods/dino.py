"""DINO (Caron et al. 2021): a student matches an EMA teacher's centred, sharpened outputs across multi-crop views.

The method owns student, teacher and loss; it never sees the optimizer, the checkpoint or the logger. The engine
calls `forward(batch, schedule)` for the loss and `after_step(schedule)` for the teacher update.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ssd.data.seeded import collate_crops
from ssd.losses.dino_loss import DINOLoss
from ssd.models.backbone import build_student_backbone
from ssd.models.dino_head import DINOHead
from ssd.models.layer_decay import vit_parameter_groups
from ssd.models.multicrop import MultiCropEncoder
from ssd.monitors import collapse_statistics
from ssd.teachers import (
    EvaluatesTrainedNetwork,
    build_teacher,
    keep_eval,
    store_origin_instead,
    update_teacher,
)

NUM_GLOBAL_VIEWS = 2


def build_head(cfg, in_dim: int, out_dim: int | None = None) -> DINOHead:
    """The DINO head of the config on features of width `in_dim` (`out_dim` prototypes, head.out_dim by default)."""
    head = cfg.head
    return DINOHead(in_dim, out_dim=out_dim or head.out_dim, hidden_dim=head.hidden_dim,
                    bottleneck_dim=head.bottleneck_dim, nlayers=head.nlayers, use_bn=head.use_bn,
                    norm_last_layer=head.norm_last_layer)


class DINO(EvaluatesTrainedNetwork, nn.Module):
    def __init__(self, cfg):
        super().__init__()
        backbone = build_student_backbone(cfg.model)
        self.student = MultiCropEncoder(backbone, build_head(cfg, backbone.num_features), cfg.model.packed_crops)
        # An EMA teacher starts as an exact copy of the student (same random init), as in the paper; a frozen or
        # random one (teacher.kind) gets its own head of the same prototypes on its own width.
        self.teacher, origin = build_teacher(cfg, self.student,
                                             lambda network: MultiCropEncoder(network, build_head(cfg, network.num_features)))
        store_origin_instead(self, origin, "teacher")
        self.loss = DINOLoss(cfg.head.out_dim, cfg.method.student_temp, cfg.method.center_momentum)
        self.cfg = cfg
        self.optim_cfg = cfg.optim

    def train(self, mode: bool = True) -> DINO:
        super().train(mode)
        keep_eval(self.teacher)
        return self

    def make_collate(self, seed: int):
        """How samples become a batch: plain stacking (DINO masks nothing)."""
        return collate_crops

    def param_groups(self) -> list[dict]:
        return vit_parameter_groups(self, self.student.backbone, self.optim_cfg)

    def student_networks(self) -> list[nn.Module]:
        """The networks the optimizer trains, for optim.clip_mode=per_module (ssd.engine.optim.network_parts)."""
        return [self.student]

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Parameters frozen during the first `optim.freeze_last_layer_epochs` epochs."""
        return list(self.student.head.last_layer.parameters())

    def forward(self, batch: dict, schedule: dict) -> tuple[torch.Tensor, dict]:
        crops = batch["crops"]  # V tensors (B, 3, H, W): 2 global crops first, then the local crops
        global_crops = crops[:NUM_GLOBAL_VIEWS]
        with torch.no_grad():
            teacher_features, teacher_logits = self.teacher(global_crops)
        _, student_logits = self.student(crops)
        loss, teacher_probs = self.loss(
            student_logits,
            teacher_logits,
            num_student_views=len(crops),
            num_teacher_views=NUM_GLOBAL_VIEWS,
            teacher_temp=schedule["teacher_temp"],
        )
        return loss, {"teacher_probs": teacher_probs.detach(), "teacher_features": teacher_features.detach()}

    def monitor(self, outputs: dict) -> dict:
        return collapse_statistics(outputs["teacher_probs"], outputs["teacher_features"])

    @torch.no_grad()
    def after_step(self, schedule: dict) -> None:
        self.loss.update_center()
        update_teacher(self.cfg.teacher.kind, self.teacher, self.student, schedule["teacher_momentum"])
